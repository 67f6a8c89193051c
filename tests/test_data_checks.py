"""Data that cannot be misused: training refuses data prepared for another kind of config or with
another tokenizer than the encoder's, saying how to fix it; `prepare` drops no column silently;
encoders without EOS (BERT / MiniLM) take an explicit end-of-text token; ``data.train_path`` may
name inputs that are prepared on first use into a cache."""

import gzip
import json

import pytest
import torch

from elflm.data import PackedDataset, prepare
from elflm.train import Trainer

from conftest import need_module, read_gzip_text
from train_fixtures import make_corpus, make_tiny_t5, tiny_run_config

L, MAX_IN = 32, 16


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("checks")
    enc = make_tiny_t5(base / "enc", t5_tokenizer_dir)
    uncond = make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir, chars=20_000, max_length=L)
    pairs = base / "pairs.jsonl"
    de = read_gzip_text(assets_dir / "text/multi30k/train.de.gz").splitlines()[:200]
    en = read_gzip_text(assets_dir / "text/multi30k/train.en.gz").splitlines()[:200]
    pairs.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in zip(de, en)))
    kw = dict(max_length=L, workers=1, progress=False)
    cond = prepare(pairs, base / "cond", tokenizer=str(t5_tokenizer_dir), max_input_length=MAX_IN, **kw)
    gpt2_tok = str(assets_dir / "tokenizers/gpt2")
    gpt2 = prepare(base / "corpus" / "corpus.txt", base / "gpt2", tokenizer=gpt2_tok, pad_token="eos", **kw)
    assert cond["conditional"] and gpt2["tokenizer"]["class"].startswith("GPT2")
    return {"enc": enc, "uncond": uncond, "cond": base / "cond", "gpt2": base / "gpt2", "pairs": pairs}


def cfg(env, tmp_path, data, **over):
    return tiny_run_config(tmp_path / "run", data, env["enc"], {"train.max_steps": 1, **over})


def test_conditional_and_unconditional_data_under_the_other_config(env, tmp_path):
    with pytest.raises(
        ValueError, match=rf"conditional data .* but an unconditional config: set data.max_input_length={MAX_IN}"
    ):
        Trainer(cfg(env, tmp_path, env["cond"]))
    with pytest.raises(ValueError, match="unconditional data but data.max_input_length=8.*--max-input-length 8"):
        Trainer(cfg(env, tmp_path, env["uncond"], **{"data.max_input_length": 8, "data.pad_token": "eos"}))
    with pytest.raises(ValueError, match="keeps 16 condition tokens but data.max_input_length=8"):
        Trainer(cfg(env, tmp_path, env["cond"], **{"data.max_input_length": 8, "data.pad_token": "eos"}))
    with pytest.raises(ValueError, match="rows padded with eos but data.pad_token=pad"):
        Trainer(cfg(env, tmp_path, env["cond"], **{"data.max_input_length": MAX_IN}))
    t = Trainer(cfg(env, tmp_path, env["cond"], **{"data.max_input_length": MAX_IN, "data.pad_token": "eos"}))
    assert t.dataset.conditional and t.train_step()["loss"] > 0


def test_data_of_another_tokenizer_is_refused(env, tmp_path):
    made = r"tokenised with .*gpt2 \(GPT2Tokenizer(Fast)?, 50257 tokens\)"
    ours = r"but the encoder's tokenizer is .*enc \(T5Tokenizer(Fast)?, 32100 tokens\): prepare the data again"
    with pytest.raises(ValueError, match=made + " " + ours + r" .* --tokenizer"):
        Trainer(cfg(env, tmp_path, env["gpt2"]))
    meta_file = env["uncond"] / "meta.json"
    meta = json.loads(meta_file.read_text())
    changed = {**meta, "tokenizer": {**meta["tokenizer"], "vocab_sha256": "0" * 16}}  # same class and size
    (tmp_path / "copy").mkdir()
    for f in env["uncond"].iterdir():
        (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "copy" / "meta.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="tokenised with"):
        Trainer(cfg(env, tmp_path, tmp_path / "copy"))


def test_train_path_prepared_on_first_use(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELFLM_CACHE", str(tmp_path / "cache"))
    over = {"data.max_input_length": MAX_IN, "data.pad_token": "eos"}
    t = Trainer(cfg(env, tmp_path, env["pairs"], **over))  # a JSONL file, prepared with the encoder's tokenizer
    assert t.dataset.path.parent == tmp_path / "cache" / "data" and t.dataset.conditional
    ref = PackedDataset(env["cond"])
    assert len(t.dataset) == len(ref) and all(
        torch.equal(
            torch.from_numpy(t.dataset[i]["input_ids"].astype("int64")),
            torch.from_numpy(ref[i]["input_ids"].astype("int64")),
        )
        for i in range(len(ref))
    )
    capsys.readouterr()
    again = Trainer(cfg(env, tmp_path, env["pairs"], **over))
    assert again.dataset.path == t.dataset.path and "already prepared" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT encoder whose tokenizer has no EOS token (as MiniLM's): [SEP] ends texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "man", "dog", "runs", "on", "the", "grass", ".", "ein", "hund"]
    wp = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", sep_token="[SEP]", cls_token="[CLS]"
    )
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_encoder_without_eos_takes_an_explicit_end_of_text_token(bert, tmp_path):
    pairs = tmp_path / "p.jsonl"
    rows = [{"source": "ein hund .", "target": "a dog runs on the grass ."}] * 40
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(tokenizer=str(bert), max_length=L, max_input_length=8, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"has no EOS token.*--eos-token \[SEP\]"):
        prepare(pairs, tmp_path / "d", **kw)
    with pytest.raises(ValueError, match=r"--eos-token '\[EOS\]' is not a token of the tokenizer"):
        prepare(pairs, tmp_path / "d", eos_token="[EOS]", **kw)
    meta = prepare(pairs, tmp_path / "d", eos_token="[SEP]", **kw)
    assert meta["eos_id"] == 3 and meta["pad_id"] == 3 and meta["options"]["eos_token"] == "[SEP]"
    row = PackedDataset(tmp_path / "d")[0]
    assert row["input_ids"][:4].tolist() == [12, 13, 11, 3] and row["cond_len"] == 4  # ein hund . [SEP]
    over = {"encoder.kind": "hf", "data.max_input_length": 8, "data.pad_token": "eos", "data.max_length": L}
    config = tiny_run_config(tmp_path / "run", tmp_path / "d", bert, {"train.max_steps": 1, **over})
    t = Trainer(config)
    assert t.encoder.eos_id == 3 and t.train_step()["loss"] > 0


def test_prepare_never_drops_a_column_silently(tmp_path, t5_tokenizer_dir, capsys):
    datasets = need_module("datasets", "pip install 'elflm[data]'")
    ds = datasets.Dataset.from_dict(
        {"condition_input_ids": [[5, 6, 1]] * 4, "input_ids": [[7, 8, 9, 1]] * 4, "url": ["u"] * 4}
    )
    ds.save_to_disk(tmp_path / "hf")
    kw = dict(tokenizer=str(t5_tokenizer_dir), max_length=16, workers=1)
    with pytest.raises(ValueError, match="has a condition_input_ids column .*give --max-input-length"):
        prepare(tmp_path / "hf", tmp_path / "o", progress=False, **kw)
    meta = prepare(tmp_path / "hf", tmp_path / "o", max_input_length=8, **kw)
    assert list(meta["ignored_columns"].values()) == [["url"]] and meta["conditional"]
    assert "columns not used of" in capsys.readouterr().out


def test_gz_text_folder_as_train_path(env, tmp_path, monkeypatch, assets_dir):
    monkeypatch.setenv("ELFLM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "texts"
    folder.mkdir()
    with gzip.open(folder / "a.txt.gz", "wt") as f:
        f.write(read_gzip_text(assets_dir / "text/gutenberg/val-00.txt.gz")[:8000])
    t = Trainer(cfg(env, tmp_path, folder))
    assert t.dataset.max_length == L and t.dataset.meta["tokenizer"]["vocab_sha256"]
