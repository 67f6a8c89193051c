"""The training checkpoint: what the trainer writes is what every reader reads, under the file
names of :class:`TrainingCheckpoint`; checkpoints of earlier versions still load; the run folder
keeps the last ``keep_last``; bad files fail with errors naming the checkpoint."""

import os

import pytest
import torch

from elflm.checkpoint import CheckpointError, TrainingCheckpoint
from elflm.config import Config, SampleConfig


def _content(step: int) -> dict:
    raw = {"w": torch.full((2, 3), float(step)), "b": torch.arange(3.0)}
    return dict(
        raw=raw,
        ema={k: v / 2 for k, v in raw.items()},
        optimizer={"state": {0: {"momentum": torch.ones(2, 3) * step}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        config=Config(sample=SampleConfig(steps=step + 1)),
        state={"step": step, "model_config": {}},
    )


def _write(run, step, keep_last=0) -> TrainingCheckpoint:
    return TrainingCheckpoint.write(run, step, keep_last=keep_last, **_content(step))


def test_write_then_read(tmp_path):
    ckpt = _write(tmp_path / "run", 3)
    assert ckpt.path == tmp_path / "run" / "checkpoints" / "step_0000003"
    names = {
        TrainingCheckpoint.RAW,
        TrainingCheckpoint.EMA,
        TrainingCheckpoint.OPTIMIZER,
        TrainingCheckpoint.CONFIG,
        TrainingCheckpoint.STATE,
        TrainingCheckpoint.MANIFEST,
    }
    assert {p.name for p in ckpt.path.iterdir()} == names and TrainingCheckpoint.LEGACY_RAW not in names
    want = _content(3)
    for got, ref in ((ckpt.raw(), want["raw"]), (ckpt.ema(), want["ema"])):
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert torch.equal(ckpt.optimizer()["state"][0]["momentum"], want["optimizer"]["state"][0]["momentum"])
    assert ckpt.state() == want["state"] and ckpt.config() == want["config"]


def test_raw_weights_of_earlier_versions(tmp_path):
    """Checkpoints written before raw.safetensors kept the raw weights in model.safetensors."""
    ckpt = _write(tmp_path / "run", 2)
    (ckpt.path / TrainingCheckpoint.RAW).rename(ckpt.path / TrainingCheckpoint.LEGACY_RAW)
    assert torch.equal(ckpt.raw()["w"], _content(2)["raw"]["w"]) and torch.equal(
        ckpt.ema()["w"], _content(2)["ema"]["w"]
    )


def test_run_folder(tmp_path):
    run = tmp_path / "run"
    assert TrainingCheckpoint.latest(run) is None and TrainingCheckpoint.find(run) is None
    for step in (1, 2, 10, 11):
        _write(run, step, keep_last=3)
    assert [c.path.name for c in TrainingCheckpoint.all(run)] == ["step_0000002", "step_0000010", "step_0000011"]
    (run / "checkpoints" / ".tmp-step_0000012").mkdir()  # a save killed mid-write
    (run / "checkpoints" / "step_0000013").mkdir()  # incomplete: no trainer_state.json
    latest = run / "checkpoints" / "step_0000011"
    assert TrainingCheckpoint.latest(run).path == latest
    assert TrainingCheckpoint.find(run).path == latest and TrainingCheckpoint.find(run / "checkpoints").path == latest
    assert TrainingCheckpoint.find(run / "checkpoints" / "step_0000002").path.name == "step_0000002"
    assert TrainingCheckpoint.find(tmp_path) is None
    _write(run, 11)  # rewriting a step replaces it
    assert len(TrainingCheckpoint.all(run)) == 3


def test_bad_files_name_the_checkpoint(tmp_path):
    ckpt = _write(tmp_path / "run", 1)
    data = (ckpt.path / TrainingCheckpoint.RAW).read_bytes()
    (ckpt.path / TrainingCheckpoint.RAW).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read training checkpoint {ckpt.path}: raw.safetensors"):
        ckpt.raw()
    (ckpt.path / TrainingCheckpoint.EMA).unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        ckpt.ema()


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_optimizer_state_is_loaded_without_unpickling_objects(tmp_path):
    ckpt = _write(tmp_path / "run", 1)
    target = tmp_path / "pwned"
    (ckpt.path / TrainingCheckpoint.MANIFEST).unlink()  # as in a checkpoint without one: the unpickler is the guard
    torch.save({"state": {}, "param_groups": [_Evil(str(target))]}, ckpt.path / TrainingCheckpoint.OPTIMIZER)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        ckpt.optimizer()
    assert not target.exists()
