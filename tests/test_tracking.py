"""Experiment tracking: the console line, metrics.jsonl, TensorBoard event files read back, and a
real offline Weights & Biases run (WANDB_MODE=offline) written by a training run and resumed."""

import json
import re
import sys

import pytest

from elflm.config import ConfigError, from_dict
from elflm.tracking import JsonLines, format_record, open_trackers
from elflm.train import train

from conftest import need_module
from train_fixtures import make_corpus, make_tiny_t5, tiny_run_config

INSTALL = "pip install 'elflm[track]'"


def record(step: int) -> dict:
    return {
        "step": step,
        "loss": 1.0 / step,
        "l2_loss": 0.5,
        "ce_loss": 0.25,
        "grad_norm": 1.5,
        "lr": 1e-3,
        "tokens_per_s": 1000.0,
        "mfu": None,
    }


def test_console_and_jsonl(tmp_path, capsys):
    trackers = open_trackers(from_dict({}), tmp_path / "run")
    for step in (1, 2):
        trackers.log(record(step))
    trackers.text("preview", "a sample", 2)
    trackers.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record(1), record(2)]
    out = capsys.readouterr().out
    assert format_record(record(2)) in out and "step 2 loss 0.5000 (l2 0.5000 ce 0.2500)" in out
    JsonLines(tmp_path / "other" / "m.jsonl").log(record(3))
    assert json.loads((tmp_path / "other" / "m.jsonl").read_text()) == record(3)


def test_logger_setting_and_missing_packages(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.logger='mlflow': expected null or a comma-separated list of"):
        from_dict({"train": {"logger": "mlflow"}})
    for name in ("wandb", "tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
        with pytest.raises(ImportError, match=re.escape(f"train.logger={name} needs the {name} package: {INSTALL}")):
            open_trackers(from_dict({"train": {"logger": name}}), tmp_path / name)


def test_tensorboard_scalars_read_back(tmp_path):
    need_module("tensorboard", INSTALL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = open_trackers(from_dict({"train": {"logger": "tensorboard"}}), tmp_path)
    for step in (1, 2, 3):
        trackers.log(record(step))
    trackers.text("preview", "a sample", 3)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, pytest.approx(1 / s)) for s in (1, 2, 3)]
    assert "train/mfu" not in events.Tags()["scalars"]  # None is not a number


def test_training_writes_an_offline_wandb_run_and_resumes_it(assets_dir, t5_tokenizer_dir, tmp_path, monkeypatch):
    need_module("wandb", INSTALL)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    enc = make_tiny_t5(tmp_path / "enc", t5_tokenizer_dir)
    data = make_corpus(tmp_path / "corpus", assets_dir, t5_tokenizer_dir, chars=20_000)
    over = {"train.logger": "wandb", "train.wandb_tags": "tiny,test", "train.preview_every": 2}
    out = tmp_path / "run"
    train(tiny_run_config(out, data, enc, {**over, "train.max_steps": 2, "train.save_every": 2}), progress=False)
    run_id = (out / "wandb-run-id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    history = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for name in (b"train/loss", b"train/ce_loss", b"train/grad_norm", b"train/lr", b"tiny"):
        assert name in history, name
    assert list((runs[0] / "files" / "media" / "html").glob("preview_2_*.html"))  # the sample preview
    train(tiny_run_config(out, data, enc, {**over, "train.max_steps": 3, "train.resume": "auto"}), progress=False)
    assert (out / "wandb-run-id").read_text().strip() == run_id  # the same W&B run continues
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
