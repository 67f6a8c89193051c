"""Foreign formats: the authors' Flax (orbax, per-array zarr, msgpack) and torch-port files read
exactly into our names, the official config semantics, and bad files fail with errors naming them."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from elflm.checkpoint import CheckpointError
from elflm.formats import detect_format, infer_model_config, official, read_checkpoint
from elflm.formats.flax import flax_name, flax_params_to_state_dict
from elflm.formats.torchport import port_params_to_state_dict

from conftest import load_npz
from golden_utils import (
    FLAX,
    FLAX_CONFIG,
    PORT,
    STEP2,
    assert_same_weights,
    muon_weights,
    pd_weights,
    tree,
    write_pd_checkpoint,
)


def test_flax_names():
    assert flax_name("blocks_11/attn/qkv/kernel") == ("blocks.11.attn.qkv.weight", True)
    assert flax_name("final_layer/norm_final/weight") == ("final_layer.norm_final.weight", False)
    assert flax_name("unembed_kernel") == ("decoder.unembed.weight", True)
    assert flax_name("proj_bias") == ("decoder.proj.bias", False)


def test_flax_orbax_reads_exactly(golden_dir):
    assert detect_format(FLAX) == ("flax-orbax", FLAX)
    assert detect_format(FLAX.parent) == ("flax-orbax", FLAX)  # run folder -> newest checkpoint_<N>
    cfg, settings, weights = read_checkpoint(FLAX, which="both")
    assert_same_weights(weights.ema, muon_weights(f"{STEP2}/ema_after"))
    assert_same_weights(weights.raw, muon_weights(f"{STEP2}/params_after"))
    assert weights.step == 3 and weights.sampling is weights.ema
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
    assert {k: getattr(cfg, k) for k in sizes} == sizes and cfg == infer_model_config(weights.ema, 16)
    assert settings.source == {
        "format": "flax-orbax",
        "path": FLAX.name,
        "step": 3,
        "config": FLAX_CONFIG.name,
        "weights": "ema",
    }
    assert settings.objective.latent_std == 0.2 and settings.objective.noise_scale == 2.0
    s = settings.sample
    assert (s.method, s.steps, s.gamma, s.w) == ("sde", 4, 1.5, 3.0)
    _, _, ema_only = read_checkpoint(FLAX)
    assert ema_only.raw is None and ema_only.ema is not None


def test_torch_port_reads_exactly(golden_dir):
    assert detect_format(PORT) == ("torch-port", PORT)
    cfg, settings, weights = read_checkpoint(PORT, config=FLAX_CONFIG)
    assert settings.source["format"] == "torch-port" and settings.source["weights"] == "ema" and cfg.max_length == 16
    assert weights.raw is None
    assert_same_weights(weights.ema, flax_params_to_state_dict(tree(load_npz("elf_model.npz"), "params")))
    _, _, raw = read_checkpoint(PORT, config=FLAX_CONFIG, max_length=12, which="raw")
    assert raw.ema is None and raw.raw is not None


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_distilled_checkpoint_of_the_distillation_branch(golden_dir, tmp_path, prefix):
    """The PD student's run folder (checkpoint_<step> + the config.yml that branch dumps): EMA and raw
    weights exactly, the few-step sampler of its sampling configs, names without wrapper prefixes."""
    file = write_pd_checkpoint(tmp_path / "run", prefix=prefix)
    assert detect_format(tmp_path / "run") == ("torch-port", file)
    cfg, settings, weights = read_checkpoint(tmp_path / "run", which="both")
    assert_same_weights(weights.ema, port_params_to_state_dict(pd_weights("teacher")))
    assert_same_weights(weights.raw, port_params_to_state_dict(pd_weights("student_init")))
    assert weights.step == 3 and cfg.max_length == 16 and (cfg.depth, cfg.hidden_size) == (2, 64)
    s = settings.sample
    assert (s.method, s.steps, s.gamma, s.w, s.grid) == ("sde", 1, 1.5, 2.5, "logit_normal")
    assert settings.source == {
        "format": "torch-port",
        "path": file.name,
        "step": 3,
        "config": "config.yml",
        "weights": "ema",
    }


def _write_zarr(folder, name, array):
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": f"{folder}/{name}/"}}
    ts.open(spec, create=True, dtype=array.dtype.name, shape=array.shape).result().write(array).result()


def _orbax_metadata(leaves) -> dict:
    return {
        "tree_metadata": {
            str(k): {
                "key_metadata": [{"key": p, "key_type": 2} for p in k],
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
            }
            for k in leaves
        },
        "use_zarr3": False,
    }


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
    assert_same_weights(weights.ema, muon_weights(f"{STEP2}/ema_after"))


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
        "__msgpack_chunked_array__": True,
        "shape": {"0": ema[big].shape[0], "1": ema[big].shape[1]},
        "chunks": {"0": flat[:1000], "1": flat[1000:]},
    }
    file = tmp_path / "checkpoint_3"
    file.write_bytes(_flax_msgpack(state))
    assert detect_format(file) == ("flax-msgpack", file)
    _, settings, weights = read_checkpoint(file, config=FLAX_CONFIG, which="both")
    assert_same_weights(weights.ema, muon_weights(f"{STEP2}/ema_after"))
    assert_same_weights(weights.raw, muon_weights(f"{STEP2}/params_after"))
    assert weights.step == 3 and settings.source["step"] == 3


# --------------------------------------------------------------------------- the official config


def test_official_config_semantics(golden_dir, tmp_path):
    assert official.find_config(FLAX) == FLAX_CONFIG
    de_en = official.published_config("embedded-language-flows/ELF-B-de-en-torch")
    settings, max_length = official.settings_from_official(de_en)
    assert max_length == 128 and settings.data.max_input_length == 64 and settings.objective.pad_token == "eos"
    assert (settings.sample.method, settings.sample.steps, settings.sample.cfg_scale) == ("ode", 64, 2.0)
    assert settings.encoder.weights == official.ENCODER and settings.encoder.latent_std == 0.2
    assert official.published_config("someone/ELF-B-owt") is None
    # a relative encoder_checkpoint resolves against the run folder, as the official run did
    (tmp_path / "enc.pkl").write_bytes(b"")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yml").write_text("encoder_checkpoint: enc.pkl\nmax_length: 16\n")
    cfg, file = official.read_config(None, tmp_path / "run" / "checkpoint_3")
    assert file == tmp_path / "run" / "config.yml"
    assert official.settings_from_official(cfg, file)[0].encoder.weights == str(tmp_path / "enc.pkl")
    (tmp_path / "run" / "config.yml").write_text("- a list\n")
    with pytest.raises(CheckpointError, match="config.yml: a config must be a mapping"):
        official.read_config(None, tmp_path / "run")


# --------------------------------------------------------------------------- bad input


def test_truncated_torch_file(golden_dir, tmp_path):
    bad = tmp_path / "tiny.pt"
    bad.write_bytes(PORT.read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match=f"{bad}: cannot read torch checkpoint"):
        read_checkpoint(bad, config=FLAX_CONFIG)


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
        detect_format(junk)
    with pytest.raises(CheckpointError, match=f"{junk / 'notes.txt'}: unknown checkpoint file format"):
        read_checkpoint(junk / "notes.txt")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        detect_format(tmp_path / "nothing-here")
    torch.save({"state_dict": {}}, tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match="not a pytorch_elf checkpoint"):
        read_checkpoint(tmp_path / "lightning.ckpt", max_length=16)
    with pytest.raises(CheckpointError, match=f"{PORT}: not a readable flax msgpack"):
        read_checkpoint(PORT, format="flax-msgpack", max_length=16)
    with pytest.raises(CheckpointError, match="unknown format 'elflm'"):
        read_checkpoint(PORT, format="elflm")
    with pytest.raises(CheckpointError, match="does not store max_length"):
        read_checkpoint(PORT)
    sd = flax_params_to_state_dict(tree(load_npz("elf_model.npz"), "params"))
    with pytest.raises(CheckpointError, match="missing parameter 't_emb_tokens'"):
        infer_model_config({k: v for k, v in sd.items() if k != "t_emb_tokens"}, 16)
