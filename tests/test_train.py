"""The training loop: resume, torchrun DDP / FSDP2 equivalence, crash-safe checkpoints, a pinned
loss curve and clear errors. Real tokenizer, real prepared data, real torch.distributed (gloo)."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elflm.checkpoint import CheckpointError, TrainingCheckpoint
from elflm.config import ConfigError
from elflm.data import collate
from elflm.flow import seeded
from elflm.train import Trainer, make_plan, train

from train_fixtures import (
    ROOT,
    SAME_THREADS,
    cli,
    final_weights,
    make_corpus,
    make_tiny_t5,
    max_diff,
    tiny_run_config,
    write_config,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("train")
    enc = make_tiny_t5(base / "enc", t5_tokenizer_dir)
    data = make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir)
    return {"enc": enc, "data": data}


def run(cfg, progress=False) -> Trainer:
    return train(cfg, progress=progress)


def test_pinned_loss_curve(env, tmp_path):
    """A short deterministic run; the numbers are pinned (a change to the objective, optimizer or
    data order shows up here)."""
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"train.max_steps": 6})
    trainer = run(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    pinned = json.loads(LOSS_CURVE.read_text())
    assert losses == pytest.approx(pinned["loss"], rel=2e-3), losses
    assert recs[0]["lr"] == 0.0 and recs[1]["lr"] == pytest.approx(2e-3)
    assert trainer.step == 6 and TrainingCheckpoint.latest(tmp_path / "run").path.name == "step_0000006"


LOSS_CURVE = Path(__file__).parent / "assets" / "loss_curve_tiny.json"


def logged(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl without the timings."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "max_memory_gb")} for r in recs]


def test_resume_after_kill_is_bit_identical(env, tmp_path):
    """3 steps, SIGKILL, resume for 3 more == 6 uninterrupted steps, bit for bit; metrics.jsonl
    too, line for line, with a log window (2 steps) that the checkpoint interval (3) cuts in two
    and records of later steps the killed run left behind."""
    over = {"train.max_steps": 6, "train.save_every": 3, "train.log_every": 2}
    straight = tiny_run_config(tmp_path / "a", env["data"], env["enc"], over)
    run(straight)
    cfg_b = tiny_run_config(tmp_path / "b", env["data"], env["enc"], over)
    path = write_config(cfg_b, tmp_path / "b.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "elflm.cli", "train", "--config", str(path), "--no-progress"],
        cwd=ROOT,
        env=SAME_THREADS,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not any(
        c.path.name == "step_0000003" for c in TrainingCheckpoint.all(tmp_path / "b")
    ):
        assert proc.poll() is None or proc.returncode == 0, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for c in TrainingCheckpoint.all(tmp_path / "b"):  # as if it died right after step 3's checkpoint
        if c.path.name != "step_0000003":
            shutil.rmtree(c.path)
    assert TrainingCheckpoint.latest(tmp_path / "b").path.name == "step_0000003"
    with open(tmp_path / "b/metrics.jsonl", "a") as f:  # records after the checkpoint, the last one half-written
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    r = cli("-m", "elflm.cli", "train", "--config", str(path), "--no-progress", "--resume")
    assert r.returncode == 0, r.stderr
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)
    opt_a = TrainingCheckpoint.latest(tmp_path / "a").optimizer()
    opt_b = TrainingCheckpoint.latest(tmp_path / "b").optimizer()
    for k, s in opt_a["state"].items():
        for n, v in s.items():
            assert torch.equal(v, opt_b["state"][k][n]), (k, n)
    assert [r["step"] for r in logged(tmp_path / "a")] == [2, 4, 6]
    assert logged(tmp_path / "b") == logged(tmp_path / "a")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(env, tmp_path, strategy):
    """torchrun with 2 CPU processes × 4 rows == 1 process × 2 micro-batches of 4 rows."""
    over = {"train.max_steps": 3, "train.batch_size": 4}
    if strategy == "fsdp":  # FSDP takes one branch per step on all ranks
        over["train.branch"] = "per_step"
    single = tiny_run_config(tmp_path / "one", env["data"], env["enc"], over)
    run(single)
    multi = tiny_run_config(tmp_path / "two", env["data"], env["enc"], {**over, "train.distributed": strategy})
    path = write_config(multi, tmp_path / "two.yaml")
    r = cli(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "elflm.cli",
        "train",
        "--config",
        str(path),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max_diff(a, b) < 2e-5
    la = [json.loads(line)["loss"] for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


KILLER = r"""
import sys, time
sys.path.insert(0, {tests!r})
from train_fixtures import tiny_run_config
from elflm.train import Trainer
from pathlib import Path
cfg = tiny_run_config(Path({out!r}), Path({data!r}), Path({enc!r}), {{"model.hidden_size": 256, "model.depth": 4}})
t = Trainer(cfg)
t.train_step(); t.save()
print("saved", flush=True)
while True:
    t.save()
"""


def test_sigkill_during_checkpoint_write_keeps_last_good(env, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(
        KILLER.format(tests=str(ROOT / "tests"), out=str(tmp_path / "run"), data=str(env["data"]), enc=str(env["enc"]))
    )
    root = tmp_path / "run/checkpoints"
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "saved", proc.stderr.read()
        deadline = time.time() + 30
        while time.time() < deadline and not list(root.glob(".tmp-*")):
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if list(root.glob(".tmp-*")):
            break
    assert list(root.glob(".tmp-*")), "never caught the process mid-write"
    assert TrainingCheckpoint.latest(tmp_path / "run") is not None
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"model.hidden_size": 256, "model.depth": 4})
    t = Trainer(cfg)
    t.load(tmp_path / "run")
    assert t.step == 1


def test_plan_and_config_errors(env, tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size"):
        tiny_run_config(tmp_path / "x", env["data"], env["enc"], {"train.global_batch_size": 10, "train.batch_size": 4})
    cfg = tiny_run_config(tmp_path / "x", env["data"], env["enc"], {"train.batch_size": 4})
    with pytest.raises(ConfigError, match="processes \\(3\\)"):
        make_plan(cfg, 1000, 3)
    cfg = tiny_run_config(tmp_path / "x", env["data"], env["enc"], {"train.global_batch_size": 4096})
    with pytest.raises(ValueError, match="fewer than train.global_batch_size"):
        Trainer(cfg)
    cfg = tiny_run_config(tmp_path / "x", tmp_path / "nope", env["enc"])
    with pytest.raises(FileNotFoundError, match="prepared dataset not found"):
        Trainer(cfg)
    cfg = tiny_run_config(tmp_path / "x", env["data"], env["enc"], {"data.max_length": 16, "model.max_length": 16})
    with pytest.raises(ValueError, match="max_length"):
        Trainer(cfg)


def test_corrupt_checkpoint_is_refused(env, tmp_path):
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"train.max_steps": 1})
    run(cfg)
    last = TrainingCheckpoint.latest(tmp_path / "run").path
    data = (last / TrainingCheckpoint.RAW).read_bytes()
    (last / TrainingCheckpoint.RAW).write_bytes(data[: len(data) // 2])
    t = Trainer(cfg)
    with pytest.raises(CheckpointError, match="cannot read training checkpoint"):
        t.load(last)
    with pytest.raises(FileNotFoundError, match="no complete training checkpoint"):
        t.load(tmp_path / "elsewhere")


def test_resume_from_a_checkpoint_of_an_earlier_version(env, tmp_path):
    """Checkpoints written before raw.safetensors (raw weights in model.safetensors) still resume."""
    trainer = run(tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"train.max_steps": 2}))
    ckpt = TrainingCheckpoint.latest(tmp_path / "run")
    (ckpt.path / TrainingCheckpoint.RAW).rename(ckpt.path / TrainingCheckpoint.LEGACY_RAW)
    resumed = Trainer(tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"train.max_steps": 2}))
    resumed.load(tmp_path / "run")
    assert resumed.step == 2
    for name, ref in (("raw", trainer.net.state_dict()), ("ema", trainer.ema.state_dict())):
        got = resumed.net.state_dict() if name == "raw" else resumed.ema.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    ref_opt, got_opt = trainer.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(got_opt[k][n], v) for k, s in ref_opt.items() for n, v in s.items() if torch.is_tensor(v))


def test_cli_train_reports_bad_override(env, tmp_path):
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"])
    path = write_config(cfg, tmp_path / "c.yaml")
    from elflm.cli import main

    assert main(["train", "--config", str(path), "train.max_stepz=3"]) == 2


def test_latent_stats_estimated_when_left_open(env, tmp_path, capsys):
    cfg = tiny_run_config(
        tmp_path / "run",
        env["data"],
        env["enc"],
        {
            "encoder.latent_mean": None,
            "encoder.latent_std": None,
            "train.max_steps": 1,
            "train.preview_every": 1,
            "train.preview_samples": 2,
        },
    )
    t = train(cfg, progress=False)
    assert capsys.readouterr().out.count("[step 1]") == 2  # the EMA preview
    assert t.cfg.encoder.latent_std is not None and t.encoder.latent_std == t.cfg.encoder.latent_std
    # the same rows (the run's seeded choice of up to 256), their valid tokens, numpy's mean and std
    rows = torch.randperm(len(t.dataset), generator=seeded(cfg.train.seed, 2**31))[:256]
    b = collate([t.dataset[int(i)] for i in rows])
    h = t.encoder.hidden(b["input_ids"], b["attention_mask"])[b["attention_mask"].bool()].double().numpy()
    assert t.cfg.encoder.latent_mean == pytest.approx(float(np.mean(h)), rel=1e-9, abs=1e-12)
    assert t.cfg.encoder.latent_std == pytest.approx(float(np.std(h)), rel=1e-7)
    saved = TrainingCheckpoint.latest(tmp_path / "run").config()
    assert saved.encoder.latent_std == pytest.approx(t.cfg.encoder.latent_std)


def test_plan_slices_are_disjoint_and_cover_the_epoch():
    from elflm.train import Plan

    plan = Plan(global_batch=12, micro=3, accum=2, world=2, steps_per_epoch=4, total_steps=8, warmup_steps=0)
    rows = [plan.indices(50, 0, s, j) for s in range(4) for j in range(4)]
    flat = torch.cat(rows).tolist()
    assert len(flat) == len(set(flat)) == 48
    assert torch.equal(plan.indices(50, 0, 1, 2), plan.indices(50, 0, 1, 2))
    assert not torch.equal(plan.indices(50, 0, 4, 0), plan.indices(50, 0, 0, 0))  # next epoch, new order
