"""The Lightning reproduction's checkpoints (tangyayan/ELF-pytorch, Hub Ugness/elf-torch): a faithful
``.ckpt`` of their layout is built here (``state_dict`` with ``model.`` / ``encoder.model.``, the EMA
shadow, ``_my_opt_step``, Lightning's bookkeeping, a config object of a module that is never
importable on load); it reads exactly, converts into a folder that needs no Hub, and the reader runs
nothing the file names."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from elflm.checkpoint import CheckpointError
from elflm.formats import detect_format, lightning, read_checkpoint
from elflm.formats.t5_encoder import load_jax_pickle, t5_from_jax_params
from elflm.formats.torchport import port_params_to_state_dict
from elflm.model import ELF
from elflm.pretrained import RAW_WEIGHTS, WEIGHTS

from conftest import GOLDEN, load_npz
from golden_utils import FLAX_CONFIG, PORT, T, assert_close, assert_same_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("imported")  # a side effect: the loader must never import this module


class SamplingConfig:
    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            setattr(self, k, v)


class Config:
    max_length: int = 128
    latent_std: float = 1.0
"""


def _port_params() -> dict:
    return torch.load(PORT, map_location="cpu", weights_only=True)["params"]


def write_ckpt(path: Path, *, config_module: Path | None = None, encoder: bool = True, extra: dict | None = None):
    """A ``.ckpt`` as their ``ELFLitModule`` + ``pl.Trainer`` save it: raw weights under ``model.``
    (their ``pytorch_elf`` names), the frozen T5 under ``encoder.model.``, the EMA shadow (raw + 0.5,
    so the two differ), step counters, optimizer states, loops, callbacks and, with
    ``config_module``, ``hyper_parameters`` holding a ``configs.config.Config`` object."""
    params = _port_params()
    state = OrderedDict((f"model.{k}", v) for k, v in params.items())
    if encoder:
        t5 = t5_from_jax_params(load_jax_pickle(GOLDEN / "t5_encoder_tiny.pkl"))
        state.update((f"encoder.model.{k}", v) for k, v in t5.state_dict().items())
    ckpt = {
        "epoch": 3,
        "global_step": 8,
        "pytorch-lightning_version": "2.5.1",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0}": {
                "dirpath": "/cluster/outputs/elf_b-owt-lightning",
                "best_model_path": "",
                "kth_value": torch.tensor(float("inf")),
            }
        },
        "optimizer_states": [
            {"state": {0: {"momentum_buffer": torch.zeros(3, 3)}}, "param_groups": [{"lr": 2e-3, "params": [0]}]}
        ],
        "lr_schedulers": [],
        "ema": {"decay": 0.9999, "shadow": {k: v + 0.5 for k, v in params.items()}},
        "_my_opt_step": 4,
        **(extra or {}),
    }
    if config_module is not None:
        sys.path.insert(0, str(config_module))
        try:
            from configs.config import Config, SamplingConfig

            cfg = Config()
            official = yaml.safe_load(FLAX_CONFIG.read_text())
            official.pop("sampling_configs")
            for k, v in official.items():
                setattr(cfg, k, v)
            cfg.sampling_configs = [
                SamplingConfig(sampling_method="ode", num_sampling_steps=[6], cfgs=[1], self_cond_cfg_scales=[2])
            ]
            ckpt["hyper_parameters"] = {"config": cfg, "vocab_size": 128}
            torch.save(ckpt, path)
        finally:
            sys.path.remove(str(config_module))
            for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
                del sys.modules[name]
    else:
        torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("their-code")
    (base / "configs").mkdir()
    (base / "configs" / "__init__.py").write_text("")
    marker = base / "IMPORTED"
    (base / "configs" / "config.py").write_text(CONFIG_MODULE.format(marker=str(marker)))
    return base


@pytest.fixture(scope="module")
def ckpt(golden_dir, module_dir, tmp_path_factory):
    path = write_ckpt(tmp_path_factory.mktemp("lightning") / "last.ckpt", config_module=module_dir)
    (module_dir / "IMPORTED").unlink()  # written when the test built the object
    return path


def test_reads_ema_raw_step_and_the_embedded_config_without_importing_it(ckpt, module_dir):
    with pytest.raises(Exception, match="weights_only|Unsupported global"):  # why torch.load will not do
        torch.load(ckpt, weights_only=True)
    assert detect_format(ckpt) == ("lightning", ckpt)
    model_cfg, settings, weights = read_checkpoint(ckpt, which="both")
    params = port_params_to_state_dict(_port_params())
    assert_same_weights(weights.raw, params)
    assert_same_weights(weights.ema, {k: v + 0.5 for k, v in params.items()})
    assert weights.step == 4 and weights.sampling is weights.ema
    assert (model_cfg.max_length, model_cfg.hidden_size, model_cfg.depth, model_cfg.encoder_dim) == (16, 64, 2, 32)
    assert settings.source == {
        "format": "lightning",
        "path": "last.ckpt",
        "step": 4,
        "config": "embedded",
        "weights": "ema",
    }
    assert settings.objective.latent_std == 0.2 and settings.objective.noise_scale == 2.0
    assert (settings.sample.method, settings.sample.steps, settings.sample.w) == ("ode", 6, 2.0)
    assert settings.encoder.weights == str(ckpt.absolute())  # the T5 weights come from the checkpoint
    assert not (module_dir / "IMPORTED").exists()


def test_from_pretrained_takes_the_encoder_from_the_checkpoint(ckpt, t5_tokenizer_dir):
    with pytest.warns(UserWarning, match="32100 tokens but the encoder embeds only 128"):
        model = ELF.from_pretrained(ckpt, tokenizer=t5_tokenizer_dir)
    g = load_npz("t5_encoder.npz")
    hidden = model.encoder.hidden(T(g, "uncond/input_ids"), T(g, "uncond/encoder_attention_mask"))
    assert_close(hidden, g["uncond/hidden_encmask"], 1e-5, "hidden")
    raw = ELF.from_pretrained(ckpt, raw=True, encoder=False)
    assert_same_weights(raw.state_dict(), port_params_to_state_dict(_port_params()))


def test_convert_needs_no_hub_and_the_folder_travels(ckpt, t5_tokenizer_dir, tmp_path):
    with pytest.warns(UserWarning, match="encoder embeds only 128"):
        out = ELF.convert(ckpt, tmp_path / "made", raw=True, tokenizer=t5_tokenizer_dir)
    enc = json.loads((out / "config.json").read_text())["encoder"]
    assert (enc["weights"], enc["tokenizer"]) == ("encoder", "encoder")
    assert (out / "encoder" / "model.safetensors").is_file() and (out / RAW_WEIGHTS).is_file()
    assert "library_name: elflm" in (out / "README.md").read_text()
    moved = shutil.move(str(out), str(tmp_path / "elsewhere" / "model"))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [sys.executable, "-m", "elflm.cli", "sample", "--checkpoint", moved, "--num-samples", "2", "--steps", "2"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(len(row["ids"]) == 16 for row in rows)
    assert_same_weights(
        load_file(Path(moved) / WEIGHTS), {k: v + 0.5 for k, v in port_params_to_state_dict(_port_params()).items()}
    )


def test_output_folder_and_config_beside(golden_dir, tmp_path):
    run = tmp_path / "outputs"
    run.mkdir()
    write_ckpt(run / "checkpoint_epoch00_step00000004.ckpt", encoder=False, extra={"_my_opt_step": 2})
    write_ckpt(run / "checkpoint_epoch01_step00000008.ckpt", encoder=False)
    with pytest.raises(CheckpointError, match="does not store max_length"):
        read_checkpoint(run)
    shutil.copy(FLAX_CONFIG, run / "config.yml")  # their train script writes config.yml into the output folder
    assert detect_format(run) == ("lightning", run / "checkpoint_epoch01_step00000008.ckpt")
    _, settings, weights = read_checkpoint(run)
    assert weights.step == 4 and settings.source["config"] == "config.yml" and settings.encoder.weights is not None
    assert settings.encoder.weights.endswith("t5_encoder_tiny.pkl")  # no encoder inside: the config's
    write_ckpt(run / "last.ckpt", encoder=False, extra={"_my_opt_step": 9})
    assert detect_format(run) == ("lightning", run / "last.ckpt")
    assert read_checkpoint(run)[2].step == 9


class _Runs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_nothing_the_file_names_is_run(golden_dir, tmp_path):
    marker = tmp_path / "RAN"
    path = write_ckpt(tmp_path / "evil.ckpt", encoder=False, extra={"hyper_parameters": {"x": _Runs(marker)}})
    with pytest.raises(CheckpointError, match="does not store max_length"):  # read, the payload left inert
        read_checkpoint(path)
    assert not marker.exists()
    payload, unpickler = lightning.open_archive(path)
    assert isinstance(payload["hyper_parameters"]["x"], lightning.Placeholder)
    assert f"{os.system.__module__}.system" in unpickler.names


def _rewrite_pickle(src: Path, dest: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, edit(data) if item.filename.endswith("data.pkl") else data)
    return dest


def test_bad_files_are_refused_naming_them(golden_dir, tmp_path):
    good = write_ckpt(tmp_path / "good.ckpt", encoder=False)
    bad_pid = _rewrite_pickle(
        good, tmp_path / "pid.ckpt", lambda d: d.replace(b"X\x07\x00\x00\x00storage", b"X\x07\x00\x00\x00storagf", 1)
    )
    with pytest.raises(CheckpointError, match="pid.ckpt.*only tensor storages"):
        lightning.read_lightning(bad_pid)
    missing = tmp_path / "missing.ckpt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(missing, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith("/data/0"):
                zout.writestr(item, zin.read(item.filename))
    with pytest.raises(CheckpointError, match="missing.ckpt: the archive has no storage"):
        lightning.read_lightning(missing, "both")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        ELF.from_pretrained(truncated, encoder=False, max_length=16)
