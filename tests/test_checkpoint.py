"""Checkpoints: the authors' Flax and torch-port files convert exactly, our folder round-trips,
bad files fail with errors naming them, Hub snapshots load offline."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN, load_npz
from golden_utils import T, assert_close, tiny_model, tree
from elflm.checkpoint import (
    RAW_WEIGHTS, WEIGHTS, CheckpointError, Settings, add_convert_args, convert, detect_format,
    flax_params_to_state_dict, load_pretrained, read_checkpoint, run_convert, save_pretrained,
)
from elflm.config import Config, DataConfig, SampleConfig, dump_config

FLAX = GOLDEN / "checkpoint" / "checkpoint_3"
FLAX_CONFIG = GOLDEN / "checkpoint" / "config.yml"
PORT = GOLDEN / "checkpoint_torch" / "tiny.pt"
STEP2 = "trainstep/step2"


@pytest.fixture(scope="module")
def flax_folder(golden_dir, tmp_path_factory):
    """The golden orbax checkpoint converted once, with the raw weights."""
    return convert(FLAX, tmp_path_factory.mktemp("flax") / "model", raw=True)


@pytest.fixture(scope="module")
def port_folder(golden_dir, tmp_path_factory):
    return convert(PORT, tmp_path_factory.mktemp("port") / "model", config=FLAX_CONFIG)


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ELFLM_CACHE", str(tmp_path / "elflm-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def expected(prefix: str) -> dict[str, torch.Tensor]:
    return flax_params_to_state_dict(tree(load_npz("muon.npz"), prefix))


def assert_same_weights(actual: dict, reference: dict):
    assert set(actual) == set(reference)
    for k, v in reference.items():
        assert actual[k].dtype == v.dtype and torch.equal(actual[k], v), k


# --------------------------------------------------------------------------- conversion


def test_flax_orbax_converts_exactly(flax_folder):
    assert detect_format(FLAX) == ("flax-orbax", FLAX)
    assert_same_weights(load_file(flax_folder / WEIGHTS), expected(f"{STEP2}/ema_after"))
    assert_same_weights(load_file(flax_folder / RAW_WEIGHTS), expected(f"{STEP2}/params_after"))
    cfg = json.loads((flax_folder / "config.json").read_text())
    sizes = dict(encoder_dim=32, vocab_size=128, max_length=16, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0, bottleneck_dim=16)
    assert {k: cfg["model"][k] for k in sizes} == sizes
    assert cfg["source"]["format"] == "flax-orbax" and cfg["source"]["step"] == 3 and cfg["source"]["weights"] == "ema"
    assert cfg["objective"]["latent_std"] == 0.2 and cfg["objective"]["noise_scale"] == 2.0
    assert (cfg["sample"]["method"], cfg["sample"]["steps"], cfg["sample"]["gamma"], cfg["sample"]["w"]) == ("sde", 4, 1.5, 3.0)


def test_converted_flax_model_runs_like_the_npz_model(flax_folder):
    model, enc, settings = load_pretrained(flax_folder, encoder=False)
    assert enc is None and model.pretrained is settings and not model.training
    reference = tiny_model("muon.npz", f"{STEP2}/ema_after", fast=True)  # our default attention path
    g = load_npz("elf_model.npz")
    with torch.no_grad():
        for name in ("uncond", "cond"):
            x, t, w = T(g, f"{name}/x_in"), T(g, f"{name}/t"), T(g, f"{name}/w")
            assert torch.equal(model(x, t, w).x_hat, reference(x, t, w).x_hat)
            a, b = model(T(g, f"{name}/x_dec_in"), torch.ones(3), w, decode=True), reference(T(g, f"{name}/x_dec_in"), torch.ones(3), w, decode=True)
            assert torch.equal(a.logits, b.logits)
    raw, _, _ = load_pretrained(flax_folder, raw=True, encoder=False)
    assert_same_weights(raw.state_dict(), expected(f"{STEP2}/params_after"))


def test_torch_port_reproduces_the_official_forward(port_folder):
    cfg = json.loads((port_folder / "config.json").read_text())
    assert cfg["source"]["format"] == "torch-port" and cfg["source"]["weights"] == "ema"
    model, _, _ = load_pretrained(port_folder, encoder=False)
    model.set_fast_attention(False)
    g = load_npz("elf_model.npz")
    assert_same_weights(model.state_dict(), flax_params_to_state_dict(tree(g, "params")))
    with torch.no_grad():
        for name in ("uncond", "cond"):
            w = T(g, f"{name}/w")
            assert_close(model(T(g, f"{name}/x_in"), T(g, f"{name}/t"), w).x_hat, g[f"{name}/denoise_out"], 1e-5, "denoise_out")
            logits = model(T(g, f"{name}/x_dec_in"), torch.ones(3), w, decode=True).logits
            assert_close(logits, g[f"{name}/decode_logits"], 5e-5, "decode_logits")


def test_local_foreign_checkpoints_load_without_converting(golden_dir):
    model, _, settings = load_pretrained(PORT, encoder=False, config=FLAX_CONFIG)
    assert settings.source["format"] == "torch-port" and model.config.max_length == 16
    model, _, settings = load_pretrained(FLAX.parent, encoder=False)  # run folder -> newest checkpoint_<N>
    assert settings.source["step"] == 3
    assert_same_weights(model.state_dict(), expected(f"{STEP2}/ema_after"))


def _write_zarr(folder, name, array):
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": f"{folder}/{name}/"}}
    ts.open(spec, create=True, dtype=array.dtype.name, shape=array.shape).result().write(array).result()


def _orbax_metadata(leaves) -> dict:
    return {"tree_metadata": {str(k): {"key_metadata": [{"key": p, "key_type": 2} for p in k],
                                       "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                              for k in leaves}, "use_zarr3": False}


@pytest.mark.parametrize("layout", ["metadata", "folders_only", "item_folder"])
def test_older_orbax_layout_with_one_zarr_folder_per_array(golden_dir, tmp_path, layout):
    ema = tree(load_npz("muon.npz"), f"{STEP2}/ema_after")
    ckpt = tmp_path / "run" / "checkpoint_7"
    if layout == "item_folder":  # orbax CheckpointManager: checkpoint_7/_CHECKPOINT_METADATA + checkpoint_7/default/
        ckpt.mkdir(parents=True)
        (ckpt / "_CHECKPOINT_METADATA").write_text("{}")
        ckpt = ckpt / "default"
    ckpt.mkdir(parents=True)
    keys = [("ema_params1", *k.split("/")) for k in ema]
    for k, path in zip(keys, ema):
        _write_zarr(ckpt, ".".join(k), ema[path])
    if layout == "folders_only":
        (ckpt / "_CHECKPOINT_METADATA").write_text("{}")
    else:
        (ckpt / "_METADATA").write_text(json.dumps(_orbax_metadata(keys)))
    shutil.copy(FLAX_CONFIG, tmp_path / "run" / "config.yml")
    cfg, _, weights = read_checkpoint(tmp_path / "run")
    assert weights.step is None and cfg.depth == 2
    assert_same_weights(weights.ema, expected(f"{STEP2}/ema_after"))


def _flax_msgpack(tree_: dict) -> bytes:
    import msgpack

    def pack(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes()), use_bin_type=True))
        raise TypeError(type(x))

    return msgpack.packb(tree_, default=pack, use_bin_type=True)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def test_old_flax_msgpack_files(golden_dir, tmp_path):
    g = load_npz("muon.npz")
    ema, raw = tree(g, f"{STEP2}/ema_after"), tree(g, f"{STEP2}/params_after")
    # the largest kernel written the way flax chunks oversized arrays
    big = "blocks_0/mlp/w12/kernel"
    flat = ema[big].reshape(-1)
    chunked = dict(ema, **{big: None})
    state = {"params": _nest(raw), "ema_params1": _nest({k: v for k, v in chunked.items() if v is not None}), "step": 3}
    state["ema_params1"]["blocks_0"]["mlp"]["w12"]["kernel"] = {
        "__msgpack_chunked_array__": True, "shape": {"0": ema[big].shape[0], "1": ema[big].shape[1]},
        "chunks": {"0": flat[:1000], "1": flat[1000:]},
    }
    file = tmp_path / "checkpoint_3"
    file.write_bytes(_flax_msgpack(state))
    assert detect_format(file) == ("flax-msgpack", file)
    out = convert(file, tmp_path / "model", config=FLAX_CONFIG, raw=True)
    assert_same_weights(load_file(out / WEIGHTS), expected(f"{STEP2}/ema_after"))
    assert_same_weights(load_file(out / RAW_WEIGHTS), expected(f"{STEP2}/params_after"))
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 3


def test_cli_convert(golden_dir, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_convert_args(p)
    assert run_convert(p.parse_args([str(PORT), "--output", str(tmp_path / "m"), "--config", str(FLAX_CONFIG), "--max-length", "12"])) == 0
    assert "torch-port" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["max_length"] == 12


def test_encoder_pickle_is_converted_into_the_folder_and_attached(golden_dir, t5_tokenizer_dir, tmp_path):
    out = convert(FLAX, tmp_path / "m", encoder=GOLDEN / "t5_encoder_tiny.pkl", tokenizer=t5_tokenizer_dir)
    enc_cfg = json.loads((out / "config.json").read_text())["encoder"]
    assert (enc_cfg["weights"], enc_cfg["tokenizer"], enc_cfg["latent_std"]) == ("encoder", "encoder", 0.2)
    assert (out / "encoder" / "model.safetensors").is_file() and (out / "encoder" / "tokenizer.json").is_file()
    model, enc, settings = load_pretrained(out)
    assert model.encoder is enc and model.tokenizer is enc.tokenizer and model.pretrained is settings
    assert "encoder" not in dict(model.named_modules()) and not any(k.startswith("encoder") for k in model.state_dict())
    g = load_npz("t5_encoder.npz")
    x0 = enc.encode(T(g, "uncond/input_ids"), T(g, "uncond/encoder_attention_mask"))
    assert_close(x0, g["uncond/x0_latent_std0.2"], 1e-5, "latents")
    again, enc2, _ = load_pretrained(save_pretrained(model, tmp_path / "copy"))  # the local encoder travels along
    assert (tmp_path / "copy" / "encoder" / "model.safetensors").is_file()
    assert torch.equal(enc2.encode(T(g, "uncond/input_ids")), enc.encode(T(g, "uncond/input_ids")))
    assert_same_weights(again.state_dict(), model.state_dict())


def test_loaded_model_is_ready_for_sampling(golden_dir, t5_tokenizer_dir, port_folder):
    from dataclasses import replace

    from elflm.generate import generate

    model, enc, settings = load_pretrained(port_folder, encoder=GOLDEN / "t5_encoder_tiny.pkl", tokenizer=t5_tokenizer_dir)
    assert enc.dim == 32 and settings.encoder.weights == str(GOLDEN / "t5_encoder_tiny.pkl")
    from transformers import T5Config, T5EncoderModel

    from elflm.encoder import TextEncoder

    narrow = TextEncoder(T5EncoderModel(T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)))
    with pytest.raises(CheckpointError, match="encoder width 16 does not match the model's encoder_dim 32"):
        load_pretrained(port_folder, encoder=narrow)
    out = generate(model, enc, replace(settings.sample, steps=2), num_samples=2, batch_size=2)
    assert len(out) == 2 and all(len(r["ids"]) == 16 for r in out)


# --------------------------------------------------------------------------- our format


def test_save_load_round_trip_is_bit_exact(port_folder, tmp_path):
    model, _, settings = load_pretrained(port_folder, encoder=False)
    raw = {k: v + 1 for k, v in model.state_dict().items()}
    out = save_pretrained(model, tmp_path / "saved", raw_state_dict=raw)
    again, _, settings2 = load_pretrained(out, encoder=False)
    assert again.config == model.config and settings2 == settings
    assert_same_weights(again.state_dict(), model.state_dict())
    assert_same_weights(load_pretrained(out, raw=True, encoder=False)[0].state_dict(), raw)
    with pytest.raises(CheckpointError, match=f"no raw weights \\({RAW_WEIGHTS}\\)"):
        load_pretrained(port_folder, raw=True, encoder=False)


def test_training_checkpoint_folder_loads_ema_and_raw(port_folder, tmp_path):
    model, _, _ = load_pretrained(port_folder, encoder=False)
    step = tmp_path / "run" / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    sd = model.state_dict()
    save_file({k.replace("blocks.1.", "blocks.1._orig_mod."): v + 1 for k, v in sd.items()}, str(step / "model.safetensors"))
    save_file(sd, str(step / "ema.safetensors"))
    (step / "trainer_state.json").write_text(json.dumps({"step": 10, "model_config": vars(model.config)}))
    run = Config(data=DataConfig(max_length=16, max_input_length=8, pad_token="eos"), sample=SampleConfig(steps=7, cfg_scale=2.0))
    dump_config(run, step / "config.yaml")
    ema, _, settings = load_pretrained(tmp_path / "run", encoder=False)
    assert settings.source == {"format": "elflm-train", "path": str(step), "step": 10}
    assert settings == Settings.from_config(run, settings.source) and settings.objective.pad_token == "eos"
    assert_same_weights(ema.state_dict(), sd)
    raw, _, _ = load_pretrained(step, raw=True, encoder=False)
    assert_same_weights(raw.state_dict(), {k: v + 1 for k, v in sd.items()})


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def folder_copy(port_folder, tmp_path):
    return shutil.copytree(port_folder, tmp_path / "copy")


def test_truncated_safetensors(folder_copy):
    data = (folder_copy / WEIGHTS).read_bytes()
    (folder_copy / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{folder_copy / WEIGHTS}.*truncated or corrupted"):
        load_pretrained(folder_copy, encoder=False)


def test_corrupted_safetensors_header(folder_copy):
    data = bytearray((folder_copy / WEIGHTS).read_bytes())
    data[8:40] = b"\xff" * 32
    (folder_copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{folder_copy / WEIGHTS}.*truncated or corrupted"):
        load_pretrained(folder_copy, encoder=False)


def test_missing_key_and_shape_mismatch(folder_copy):
    sd = load_file(folder_copy / WEIGHTS)
    save_file({k: v for k, v in sd.items() if k != "mode_tokens"}, str(folder_copy / WEIGHTS))
    with pytest.raises(CheckpointError, match=f"{folder_copy}.*missing keys \\['mode_tokens'\\]"):
        load_pretrained(folder_copy, encoder=False)
    save_file({**sd, "blocks.0.norm1.weight": torch.ones(65)}, str(folder_copy / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.0\.norm1\.weight: \(65,\) != \(64,\)"):
        load_pretrained(folder_copy, encoder=False)


def test_bad_config(folder_copy):
    cfg = json.loads((folder_copy / "config.json").read_text())
    cfg["model"]["depht"] = 3
    (folder_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown ModelConfig field\(s\) \['depht'\]"):
        load_pretrained(folder_copy, encoder=False)
    (folder_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read config"):
        load_pretrained(folder_copy, encoder=False)


def test_truncated_torch_file(golden_dir, tmp_path):
    bad = tmp_path / "tiny.pt"
    bad.write_bytes(PORT.read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match=f"{bad}: cannot read torch checkpoint"):
        convert(bad, tmp_path / "out", config=FLAX_CONFIG)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_malicious_pickle_is_refused(tmp_path):
    file, target = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"params": {"w": torch.zeros(1)}, "step": _Evil(str(target))}, file)
    with pytest.raises(CheckpointError, match=f"{file}: refused to load"):
        read_checkpoint(file, max_length=16)
    assert not target.exists()


def test_wrong_formats(golden_dir, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=f"{junk}: unknown checkpoint layout \\(found: notes.txt\\)"):
        load_pretrained(junk, encoder=False)
    with pytest.raises(CheckpointError, match=f"{junk / 'notes.txt'}: unknown checkpoint file format"):
        convert(junk / "notes.txt", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match="not a pytorch_elf checkpoint"):
        convert(tmp_path / "lightning.ckpt", tmp_path / "out", max_length=16)
    with pytest.raises(CheckpointError, match=f"{PORT}: not a readable flax msgpack"):
        convert(PORT, tmp_path / "out", format="flax-msgpack", max_length=16)
    with pytest.raises(CheckpointError, match="does not store max_length"):
        convert(PORT, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such file or folder, and not a Hub id"):
        load_pretrained(tmp_path / "nothing-here", encoder=False)


# --------------------------------------------------------------------------- Hub


def _hub_snapshot(cache, repo_id: str, commit: str, files: dict) -> None:
    """A Hugging Face cache entry as snapshot_download leaves it (files copied, not linked)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        (shutil.copytree if src.is_dir() else shutil.copy)(src, snap / name)


def test_hub_snapshot_of_an_official_checkpoint_converts_once_offline(golden_dir, tmp_path):
    _hub_snapshot(tmp_path / "hub-cache", "someone/elf-tiny", "a" * 40, {"checkpoint_3": FLAX, "config.yml": FLAX_CONFIG})
    model, _, settings = load_pretrained("someone/elf-tiny", encoder=False)
    assert_same_weights(model.state_dict(), expected(f"{STEP2}/ema_after"))
    converted = tmp_path / "elflm-cache" / "converted" / "models--someone--elf-tiny" / ("a" * 40)
    assert settings.source["hub"] == {"repo_id": "someone/elf-tiny", "commit": "a" * 40}
    stamp = (converted / WEIGHTS).stat().st_mtime_ns
    load_pretrained("someone/elf-tiny", encoder=False)
    assert (converted / WEIGHTS).stat().st_mtime_ns == stamp  # cached, not converted again


def test_hub_snapshot_in_our_format_loads_directly(port_folder, tmp_path):
    _hub_snapshot(tmp_path / "hub-cache", "someone/elf-ours", "b" * 40, {p.name: p for p in port_folder.iterdir()})
    model, _, _ = load_pretrained("someone/elf-ours", encoder=False)
    assert_same_weights(model.state_dict(), load_file(port_folder / WEIGHTS))
    assert not (tmp_path / "elflm-cache").exists()


def test_encoder_pickle_from_the_hub_cache(golden_dir, t5_tokenizer_dir, port_folder, tmp_path):
    _hub_snapshot(tmp_path / "hub-cache", "someone/encoder", "c" * 40, {"enc.pkl": GOLDEN / "t5_encoder_tiny.pkl"})
    _, enc, _ = load_pretrained(port_folder, encoder="someone/encoder/enc.pkl", tokenizer=t5_tokenizer_dir)
    g = load_npz("t5_encoder.npz")
    assert_close(enc.hidden(T(g, "uncond/input_ids")), g["no_mask/hidden"], 1e-5, "hidden")  # no mask at all
    with pytest.raises(CheckpointError, match="someone/encoder:other.pkl.*HF_HUB_OFFLINE"):
        load_pretrained(port_folder, encoder="someone/encoder/other.pkl", tokenizer=t5_tokenizer_dir)


def test_no_network_error_explains_what_to_do(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_pretrained("embedded-language-flows/ELF-B-owt", encoder=False)
    msg = str(e.value)
    for part in ("embedded-language-flows/ELF-B-owt", "HF_HUB_OFFLINE", str(tmp_path / "hub-cache"), "local path"):
        assert part in msg
