"""Frozen text encoders against the official T5 encoder (golden/t5_encoder.npz), the safe pickle
loader, any-HF-encoder loading and input validation."""

import os
import pickle

import numpy as np
import pytest
import torch

from elflm.data.rows import apply_label_drop, encoder_attention_mask
from elflm.encoder import EncoderFileError, TextEncoder, denormalize_latent, load_jax_pickle, save_encoder_folder

from conftest import load_npz
from golden_utils import T, assert_close, tree

BATCHES = ["uncond", "cond"]


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("t5_encoder.npz")


@pytest.fixture(scope="module")
def pkl(golden_dir):
    return golden_dir / "t5_encoder_tiny.pkl"


@pytest.fixture(scope="module")
def enc(pkl):
    return TextEncoder.from_jax_pickle(pkl, tokenizer=None)


def masks(g, name):
    am, cm = T(g, f"{name}/attention_mask"), T(g, f"{name}/cond_seq_mask")
    return am, cm, encoder_attention_mask(am, cm)


def check_golden(enc, g, atol=1e-5):
    for name in BATCHES:
        ids = T(g, f"{name}/input_ids")
        am, cm, em = masks(g, name)
        assert_close(enc.hidden(ids, am), g[f"{name}/hidden_padmask"], atol, f"{name}/hidden_padmask")
        assert_close(enc.hidden(ids, em), g[f"{name}/hidden_encmask"], atol, f"{name}/hidden_encmask")
        assert_close(enc.encode(ids, em), g[f"{name}/x0_latent_std0.2"], atol, f"{name}/x0_latent_std0.2")
    ids = T(g, "cond/input_ids")
    _, cm, em = masks(g, "cond")
    dropped = apply_label_drop(em, cm, T(g, "cond/label_drop_rows"))
    assert_close(enc.hidden(ids, dropped), g["cond/hidden_encmask_labeldrop"], atol, "hidden_encmask_labeldrop")
    assert_close(enc.hidden(T(g, "uncond/input_ids")), g["no_mask/hidden"], atol, "no_mask/hidden")


# ------------------------------------------------------------------------ golden numbers


def test_pickle_params_match_official_loader(g, pkl):
    params = load_jax_pickle(pkl)
    ref = tree(g, "params")
    assert sorted(params) == sorted(ref)
    for k, v in params.items():
        assert v.dtype == np.float32 and np.array_equal(v, ref[k]), k


def test_converted_t5_matches_official_encoder(enc, g):
    assert (enc.dim, enc.vocab_size, enc.pad_id, enc.eos_id) == (32, 128, 0, 1)
    cfg = enc.model.config
    assert (cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers, cfg.relative_attention_num_buckets) == (8, 4, 64, 2, 32)
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight
    check_golden(enc, g)


def test_float32_under_autocast(enc, g):
    ids = T(g, "cond/input_ids")
    _, _, em = masks(g, "cond")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0 = enc.encode(ids, em)
    assert x0.dtype == torch.float32
    assert_close(x0, g["cond/x0_latent_std0.2"], 1e-5, "x0 under autocast")
    assert_close(denormalize_latent(x0), g["cond/hidden_encmask"], 1e-5, "denormalised")


# ------------------------------------------------------------------------ the pickle loader


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f'echo x > "{marker}"',)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"params": {"shared": {"embedding": Payload()}}}, protocol=4))
    with pytest.raises(EncoderFileError, match=r"refused to load the global \w+\.system") as err:
        load_jax_pickle(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_bare_tree_and_protocol5_load(g, pkl, tmp_path):
    bare = pickle.loads(pkl.read_bytes())["params"]
    path = tmp_path / "bare.pkl"
    path.write_bytes(pickle.dumps(bare, protocol=5))
    params = load_jax_pickle(path)
    assert all(np.array_equal(v, g[f"params/{k}"]) for k, v in params.items())
    check_golden(TextEncoder.from_jax_pickle(path, tokenizer=None), g)


def test_truncated_or_malformed_pickle_names_the_file(pkl, tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pkl.read_bytes()[:5000])
    with pytest.raises(EncoderFileError, match="cut.pkl: not a readable encoder pickle"):
        load_jax_pickle(path)
    params = pickle.loads(pkl.read_bytes())["params"]
    del params["encoder"]["final_layer_norm"]
    path.write_bytes(pickle.dumps(params, protocol=4))
    with pytest.raises(EncoderFileError, match="cut.pkl: missing 'encoder/final_layer_norm/weight'"):
        TextEncoder.from_jax_pickle(path, tokenizer=None)
    path.write_bytes(pickle.dumps({"params": {"w": "text"}}, protocol=4))
    with pytest.raises(EncoderFileError, match="'w' is a str, expected a floating-point numpy array"):
        load_jax_pickle(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_jax_pickle(tmp_path / "absent.pkl")


def test_hf_folder_round_trip(enc, g, pkl, t5_tokenizer_dir, tmp_path):
    folder = save_encoder_folder(pkl, tmp_path / "enc", tokenizer=t5_tokenizer_dir)
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    check_golden(TextEncoder.from_pretrained(folder), g)
    check_golden(TextEncoder.t5(t5_tokenizer_dir, weights=folder), g)
    check_golden(TextEncoder.t5(t5_tokenizer_dir, weights=pkl), g)


# ------------------------------------------------------------------------ tokenizer, T5 from config


def test_t5_tokenizer_and_random_t5(t5_tokenizer_dir):
    enc = TextEncoder.t5(t5_tokenizer_dir)
    text = "Hello world, this is a test."
    assert enc.tokenizer(text)["input_ids"] == [8774, 296, 6, 48, 19, 3, 9, 794, 5, 1]
    assert enc.token_ids(text) == [8774, 296, 6, 48, 19, 3, 9, 794, 5]
    assert enc.token_ids([text, "Hello"]) == [[8774, 296, 6, 48, 19, 3, 9, 794, 5], [8774]]
    assert (enc.dim, enc.vocab_size, enc.pad_id, enc.eos_id) == (512, 32128, 0, 1)
    assert len(enc.tokenizer) == 32100
    x = enc.encode(torch.tensor([enc.token_ids(text) + [1]]))
    assert x.shape == (1, 10, 512) and torch.isfinite(x).all()
    same = TextEncoder.t5(t5_tokenizer_dir)
    assert torch.equal(same.model.shared.weight, enc.model.shared.weight)  # seeded


# ------------------------------------------------------------------------ any HF encoder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", ",", "this", "is", "a", "test", "."]
    wp = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", sep_token="[SEP]", cls_token="[CLS]"
    )
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_any_hf_encoder(bert_dir):
    from transformers import BertModel

    enc = TextEncoder.from_pretrained(bert_dir, latent_std=0.5)
    assert (enc.dim, enc.vocab_size, enc.pad_id, enc.eos_id) == (24, 12, 0, 3)
    assert not any(p.requires_grad for p in enc.parameters())
    ids = torch.tensor(
        [enc.token_ids(["hello world , this is a test .", "hello world"])[0], enc.token_ids("hello world") + [0] * 6]
    )
    am = (torch.arange(8) < torch.tensor([[8], [2]])).float()
    x = enc.encode(ids, am)
    assert x.shape == (2, 8, 24) and x.dtype == torch.float32 and torch.isfinite(x).all()
    with torch.no_grad():
        ref = BertModel.from_pretrained(bert_dir).eval()(input_ids=ids, attention_mask=am.long()).last_hidden_state
    assert_close(x * 0.5, ref, 1e-5, "BERT hidden")
    # (B, L, L) encoder mask: condition rows see only the condition, so they equal the condition alone
    cm = (torch.arange(8) < 3).float().expand(2, 8)
    h = enc.hidden(ids, encoder_attention_mask(am, cm))
    assert_close(h[:, :3], enc.hidden(ids[:, :3]), 1e-4, "condition rows")
    assert_close(h[0, 3:], enc.hidden(ids, am)[0, 3:], 1e-4, "target rows see every valid token")
    assert (h[0, :3] - enc.hidden(ids, am)[0, :3]).abs().max() > 1e-2  # the mask mattered


def test_offline_hub_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (TextEncoder.from_pretrained, lambda n: TextEncoder.t5(n)):
        with pytest.raises(OSError, match="HF_HUB_OFFLINE=1.*local folder") as err:
            load("elflm-test/no-such-encoder")
        assert "cache" in str(err.value)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_jax_pickle("elflm-test/no-such-repo/encoder.pkl")
    with pytest.raises(FileNotFoundError, match="no such local file or folder"):
        TextEncoder.from_pretrained(str(tmp_path / "missing"))


# ------------------------------------------------------------------------ validation, frozen


def test_bad_inputs_raise(enc):
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(ValueError, match="integer input_ids"):
        enc.encode(ids.float())
    with pytest.raises(ValueError, match=r"\(B, L\) integer tensor"):
        enc.encode(ids[0])
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        enc.encode(ids + 128)
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        enc.encode(ids - 200)
    with pytest.raises(ValueError, match="mask of shape"):
        enc.encode(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask of shape"):
        enc.encode(ids, torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="at least one"):
        enc.encode(ids[:, :0])
    with pytest.raises(ValueError, match="latent_std"):
        TextEncoder(enc.model, latent_std=0.0)


def test_frozen_and_deterministic(enc):
    enc.train()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    ids = torch.randint(0, 128, (2, 7), dtype=torch.int32)
    zero_row = torch.ones(2, 7)
    zero_row[1] = 0  # a row with no valid token still gives finite values (uniform attention)
    with torch.enable_grad():
        x = enc(ids, zero_row)
    assert x.grad_fn is None and torch.isfinite(x).all()
    assert torch.equal(x, enc.encode(ids.long(), zero_row.bool()))
