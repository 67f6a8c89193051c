"""Our model folder: conversion of the authors' checkpoints into it is exact, it round-trips,
``ELF.from_pretrained`` reads every format (training runs of every layout included) and attaches
the encoder, bad folders fail with errors naming them."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from elflm.checkpoint import CheckpointError, TrainingCheckpoint
from elflm.cli import main
from elflm.config import Config, DataConfig, SampleConfig, Settings
from elflm.encoder import TextEncoder
from elflm.formats.flax import flax_params_to_state_dict
from elflm.generate import generate
from elflm.model import ELF
from elflm.pretrained import RAW_WEIGHTS, WEIGHTS, detect_format

from conftest import GOLDEN, load_npz
from golden_utils import (
    FLAX,
    FLAX_CONFIG,
    PORT,
    STEP2,
    T,
    assert_close,
    assert_same_weights,
    muon_weights,
    tiny_model,
    tree,
)


@pytest.fixture(scope="module")
def flax_folder(golden_dir, tmp_path_factory):
    """The golden orbax checkpoint converted once, with the raw weights."""
    return ELF.convert(FLAX, tmp_path_factory.mktemp("flax") / "model", raw=True)


@pytest.fixture(scope="module")
def port_folder(golden_dir, tmp_path_factory):
    return ELF.convert(PORT, tmp_path_factory.mktemp("port") / "model", config=FLAX_CONFIG)


# --------------------------------------------------------------------------- conversion


def test_flax_orbax_converts_exactly(flax_folder):
    assert detect_format(flax_folder) == ("elflm", flax_folder)
    assert_same_weights(load_file(flax_folder / WEIGHTS), muon_weights(f"{STEP2}/ema_after"))
    assert_same_weights(load_file(flax_folder / RAW_WEIGHTS), muon_weights(f"{STEP2}/params_after"))
    cfg = json.loads((flax_folder / "config.json").read_text())
    sizes = dict(
        encoder_dim=32,
        vocab_size=128,
        max_length=16,
        hidden_size=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        bottleneck_dim=16,
    )
    assert {k: cfg["model"][k] for k in sizes} == sizes
    assert cfg["source"]["format"] == "flax-orbax" and cfg["source"]["step"] == 3 and cfg["source"]["weights"] == "ema"
    assert cfg["objective"]["latent_std"] == 0.2 and cfg["objective"]["noise_scale"] == 2.0
    assert (cfg["sample"]["method"], cfg["sample"]["steps"], cfg["sample"]["gamma"], cfg["sample"]["w"]) == (
        "sde",
        4,
        1.5,
        3.0,
    )


def test_converted_flax_model_runs_like_the_npz_model(flax_folder):
    model = ELF.from_pretrained(flax_folder, encoder=False)
    assert model.encoder is None and model.pretrained.source["format"] == "flax-orbax" and not model.training
    reference = tiny_model("muon.npz", f"{STEP2}/ema_after", fast=True)  # our default attention path
    g = load_npz("elf_model.npz")
    with torch.no_grad():
        for name in ("uncond", "cond"):
            x, t, w = T(g, f"{name}/x_in"), T(g, f"{name}/t"), T(g, f"{name}/w")
            assert torch.equal(model(x, t, w).x_hat, reference(x, t, w).x_hat)
            x_dec = T(g, f"{name}/x_dec_in")
            a, b = model(x_dec, torch.ones(3), w, decode=True), reference(x_dec, torch.ones(3), w, decode=True)
            assert torch.equal(a.logits, b.logits)
    raw = ELF.from_pretrained(flax_folder, raw=True, encoder=False)
    assert_same_weights(raw.state_dict(), muon_weights(f"{STEP2}/params_after"))


def test_torch_port_reproduces_the_official_forward(port_folder):
    cfg = json.loads((port_folder / "config.json").read_text())
    assert cfg["source"]["format"] == "torch-port" and cfg["source"]["weights"] == "ema"
    model = ELF.from_pretrained(port_folder, encoder=False)
    model.set_fast_attention(False)
    g = load_npz("elf_model.npz")
    assert_same_weights(model.state_dict(), flax_params_to_state_dict(tree(g, "params")))
    with torch.no_grad():
        for name in ("uncond", "cond"):
            w = T(g, f"{name}/w")
            assert_close(
                model(T(g, f"{name}/x_in"), T(g, f"{name}/t"), w).x_hat, g[f"{name}/denoise_out"], 1e-5, "denoise_out"
            )
            logits = model(T(g, f"{name}/x_dec_in"), torch.ones(3), w, decode=True).logits
            assert_close(logits, g[f"{name}/decode_logits"], 5e-5, "decode_logits")


def test_local_foreign_checkpoints_load_without_converting(golden_dir):
    model = ELF.from_pretrained(PORT, encoder=False, config=FLAX_CONFIG)
    assert model.pretrained.source["format"] == "torch-port" and model.config.max_length == 16
    model = ELF.from_pretrained(FLAX.parent, encoder=False)  # run folder -> newest checkpoint_<N>
    assert model.pretrained.source["step"] == 3
    assert_same_weights(model.state_dict(), muon_weights(f"{STEP2}/ema_after"))


def test_cli_convert(golden_dir, tmp_path, capsys):
    assert (
        main(
            ["convert", str(PORT), "--output", str(tmp_path / "m"), "--config", str(FLAX_CONFIG), "--max-length", "12"]
        )
        == 0
    )
    assert "torch-port" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["max_length"] == 12
    assert main(["convert", str(tmp_path / "m"), "-o", str(tmp_path / "m2")]) == 0  # our own folder: a copy
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"converted elflm checkpoint {tmp_path / 'm'} (") and "None" not in line
    assert main(["convert", str(PORT), "-o", str(tmp_path / "n"), "--config", str(FLAX_CONFIG), "--raw"]) == 0
    assert (tmp_path / "n" / RAW_WEIGHTS).is_file()
    assert main(["convert", str(PORT), "-o", str(tmp_path / "x")]) == 2
    assert "does not store max_length" in capsys.readouterr().err


def test_encoder_pickle_is_converted_into_the_folder_and_attached(golden_dir, t5_tokenizer_dir, tmp_path):
    out = ELF.convert(FLAX, tmp_path / "m", encoder=GOLDEN / "t5_encoder_tiny.pkl", tokenizer=t5_tokenizer_dir)
    enc_cfg = json.loads((out / "config.json").read_text())["encoder"]
    assert (enc_cfg["weights"], enc_cfg["tokenizer"], enc_cfg["latent_std"]) == ("encoder", "encoder", 0.2)
    assert (out / "encoder" / "model.safetensors").is_file() and (out / "encoder" / "tokenizer.json").is_file()
    model = ELF.from_pretrained(out)
    enc = model.encoder
    assert isinstance(enc, TextEncoder) and model.tokenizer is enc.tokenizer and isinstance(model.pretrained, Settings)
    assert "encoder" not in dict(model.named_modules()) and not any(k.startswith("encoder") for k in model.state_dict())
    g = load_npz("t5_encoder.npz")
    x0 = enc.encode(T(g, "uncond/input_ids"), T(g, "uncond/encoder_attention_mask"))
    assert_close(x0, g["uncond/x0_latent_std0.2"], 1e-5, "latents")
    again = ELF.from_pretrained(model.save_pretrained(tmp_path / "copy"))  # the local encoder travels along
    assert (tmp_path / "copy" / "encoder" / "model.safetensors").is_file()
    assert torch.equal(again.encoder.encode(T(g, "uncond/input_ids")), enc.encode(T(g, "uncond/input_ids")))
    assert_same_weights(again.state_dict(), model.state_dict())


def test_loaded_model_is_ready_for_sampling(golden_dir, t5_tokenizer_dir, port_folder):
    model = ELF.from_pretrained(port_folder, encoder=GOLDEN / "t5_encoder_tiny.pkl", tokenizer=t5_tokenizer_dir)
    enc, settings = model.encoder, model.pretrained
    assert enc.dim == 32 and settings.encoder.weights == str(GOLDEN / "t5_encoder_tiny.pkl")
    from transformers import T5Config, T5EncoderModel

    narrow = TextEncoder(
        T5EncoderModel(T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
    )
    with pytest.raises(CheckpointError, match="encoder width 16 does not match the model's encoder_dim 32"):
        ELF.from_pretrained(port_folder, encoder=narrow)
    out = generate(model, enc, replace(settings.sample, steps=2), num_samples=2, batch_size=2)
    assert len(out) == 2 and all(len(r["ids"]) == 16 for r in out)


# --------------------------------------------------------------------------- our format


def test_save_load_round_trip_is_bit_exact(port_folder, tmp_path):
    model = ELF.from_pretrained(port_folder, encoder=False)
    raw = {k: v + 1 for k, v in model.state_dict().items()}
    out = model.save_pretrained(tmp_path / "saved", raw_state_dict=raw)
    again = ELF.from_pretrained(out, encoder=False)
    assert again.config == model.config
    assert replace(again.pretrained, encoder=None) == replace(model.pretrained, encoder=None)
    saved = json.loads((out / "config.json").read_text())["encoder"]  # the encoder copied in, relative paths
    assert (saved["weights"], saved["name_or_path"], saved["tokenizer"]) == ("encoder", "t5-small", "t5-small")
    assert_same_weights(again.state_dict(), model.state_dict())
    assert_same_weights(ELF.from_pretrained(out, raw=True, encoder=False).state_dict(), raw)
    with pytest.raises(CheckpointError, match=f"no raw weights \\({RAW_WEIGHTS}\\)"):
        ELF.from_pretrained(port_folder, raw=True, encoder=False)
    with pytest.raises(CheckpointError, match="raw_state_dict: weights do not fit.*missing keys \\['mode_tokens'\\]"):
        model.save_pretrained(tmp_path / "bad", raw_state_dict={k: v for k, v in raw.items() if k != "mode_tokens"})


@pytest.mark.parametrize("layout", ["current", "before raw.safetensors"])
def test_training_checkpoint_loads_ema_and_raw(port_folder, tmp_path, layout):
    """A run folder written by the trainer, and one of earlier versions (raw weights in model.safetensors)."""
    model = ELF.from_pretrained(port_folder, encoder=False)
    sd = model.state_dict()
    raw = {k: v + 1 for k, v in sd.items()}
    run = Config(
        data=DataConfig(max_length=16, max_input_length=8, pad_token="eos"), sample=SampleConfig(steps=7, cfg_scale=2.0)
    )
    ckpt = TrainingCheckpoint.write(
        tmp_path / "run",
        10,
        raw=raw,
        ema=sd,
        optimizer={"state": {}, "param_groups": []},
        config=run,
        state={"step": 10, "model_config": vars(model.config)},
        keep_last=0,
    )
    if layout != "current":
        (ckpt.path / TrainingCheckpoint.RAW).rename(ckpt.path / TrainingCheckpoint.LEGACY_RAW)
    assert detect_format(tmp_path / "run") == ("elflm-train", ckpt.path)
    ema_model = ELF.from_pretrained(tmp_path / "run", encoder=False)
    settings = ema_model.pretrained
    assert settings.source == {"format": "elflm-train", "path": ckpt.path.name, "step": 10}
    assert settings == Settings.from_config(run, settings.source) and settings.objective.pad_token == "eos"
    assert_same_weights(ema_model.state_dict(), sd)
    assert_same_weights(ELF.from_pretrained(ckpt.path, raw=True, encoder=False).state_dict(), raw)
    out = ELF.convert(tmp_path / "run" / "checkpoints", tmp_path / "model", raw=True)
    assert_same_weights(load_file(out / WEIGHTS), sd)
    assert_same_weights(load_file(out / RAW_WEIGHTS), raw)


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def folder_copy(port_folder, tmp_path):
    return shutil.copytree(port_folder, tmp_path / "copy")


def test_truncated_safetensors(folder_copy):
    data = (folder_copy / WEIGHTS).read_bytes()
    (folder_copy / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{folder_copy / WEIGHTS}.*truncated or corrupted"):
        ELF.from_pretrained(folder_copy, encoder=False)


def test_corrupted_safetensors_header(folder_copy):
    data = bytearray((folder_copy / WEIGHTS).read_bytes())
    data[8:40] = b"\xff" * 32
    (folder_copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{folder_copy / WEIGHTS}.*truncated or corrupted"):
        ELF.from_pretrained(folder_copy, encoder=False)


def test_missing_key_and_shape_mismatch(folder_copy):
    sd = load_file(folder_copy / WEIGHTS)
    save_file({k: v for k, v in sd.items() if k != "mode_tokens"}, str(folder_copy / WEIGHTS))
    with pytest.raises(CheckpointError, match=f"{folder_copy}.*missing keys \\['mode_tokens'\\]"):
        ELF.from_pretrained(folder_copy, encoder=False)
    save_file({**sd, "blocks.0.norm1.weight": torch.ones(65)}, str(folder_copy / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.0\.norm1\.weight: \(65,\) != \(64,\)"):
        ELF.from_pretrained(folder_copy, encoder=False)


def test_bad_config(folder_copy):
    cfg = json.loads((folder_copy / "config.json").read_text())
    cfg["model"]["depht"] = 3
    (folder_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown ModelConfig field\(s\) \['depht'\]"):
        ELF.from_pretrained(folder_copy, encoder=False)
    (folder_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read config"):
        ELF.from_pretrained(folder_copy, encoder=False)
    (folder_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"has {WEIGHTS} but no config.json"):
        ELF.from_pretrained(folder_copy, encoder=False)


def test_wrong_paths(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=f"{junk}: unknown checkpoint layout \\(found: notes.txt\\)"):
        ELF.from_pretrained(junk, encoder=False)
    with pytest.raises(CheckpointError, match=f"{junk / 'notes.txt'}: unknown checkpoint file format"):
        ELF.convert(junk / "notes.txt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such file or folder, and not a Hub id"):
        ELF.from_pretrained(tmp_path / "nothing-here", encoder=False)
