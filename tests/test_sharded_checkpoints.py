"""Sharded (rank-local) checkpoints of FSDP2 runs: every rank writes its own shards, and a run
resumes from them exactly, on the same or on a different number of processes (2 → 2 bit for bit,
2 → 1 and 1 → 2 within the 1-vs-2-process tolerance). Real torch.distributed (gloo, torchrun)."""

import json

import pytest
import torch

from elflm.checkpoint import CheckpointError, TrainingCheckpoint
from elflm.config import ConfigError
from elflm.train import Trainer, train

from train_fixtures import cli, final_weights, make_corpus, make_tiny_t5, max_diff, tiny_run_config, write_config

pytestmark = pytest.mark.slow

OVER = {"train.max_steps": 6, "train.save_every": 3, "train.batch_size": 2, "train.branch": "per_step"}


def torchrun(n: int, config, *extra):
    r = cli(
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "elflm.cli",
        "train",
        "--config",
        str(config),
        "--no-progress",
        *extra,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def optimizer_state(ckpt: TrainingCheckpoint) -> dict:
    return {f"{name}/{f}": v for name, s in ckpt.optimizer()["state"].items() for f, v in s.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("data")
    return {
        "enc": make_tiny_t5(base / "enc", t5_tokenizer_dir),
        "data": make_corpus(base, assets_dir, t5_tokenizer_dir),
    }


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """A 2-process FSDP run of 6 steps (sharded checkpoints at 3 and 6) and a plain one-process run."""
    base = tmp_path_factory.mktemp("sharded")
    fsdp = tiny_run_config(base / "fsdp2", env["data"], env["enc"], {**OVER, "train.distributed": "fsdp"})
    torchrun(2, write_config(fsdp, base / "fsdp2.yaml"))
    train(tiny_run_config(base / "plain", env["data"], env["enc"], OVER), progress=False)
    return base


def test_fsdp_checkpoints_are_sharded_and_read_back_whole(runs):
    ckpt = TrainingCheckpoint.latest(runs / "fsdp2")
    assert ckpt.is_sharded and ckpt.path.name == "step_0000006"
    shards = sorted(p.name for p in (ckpt.path / TrainingCheckpoint.SHARDED).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank, nothing gathered
    assert not (ckpt.path / TrainingCheckpoint.RAW).exists()
    plain = TrainingCheckpoint.latest(runs / "plain")
    raw, ref = ckpt.raw(), plain.raw()
    assert raw.keys() == ref.keys() and all(raw[k].shape == ref[k].shape and raw[k].dtype == torch.float32 for k in raw)
    assert max_diff(final_weights(runs / "fsdp2"), final_weights(runs / "plain")) < 2e-5
    opt, opt_ref = optimizer_state(ckpt), plain.optimizer()
    assert len(opt) == sum(len(s) for s in opt_ref["state"].values())
    assert ckpt.optimizer()["param_groups"][0]["lr"] == opt_ref["param_groups"][0]["lr"]


def test_sharded_resume_on_two_processes_is_bit_identical(env, runs, tmp_path):
    cfg = tiny_run_config(tmp_path / "again", env["data"], env["enc"], {**OVER, "train.distributed": "fsdp"})
    torchrun(2, write_config(cfg, tmp_path / "again.yaml"), "--resume", str(runs / "fsdp2/checkpoints/step_0000003"))
    a, b = final_weights(runs / "fsdp2"), final_weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)
    opt_a = optimizer_state(TrainingCheckpoint.latest(runs / "fsdp2"))
    opt_b = optimizer_state(TrainingCheckpoint.latest(tmp_path / "again"))
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert losses(tmp_path / "again") == losses(runs / "fsdp2")[3:]


def test_sharded_resume_from_two_processes_on_one(env, runs, tmp_path):
    """2 → 1: the two ranks' shards are re-split into one process's full (unsharded) tensors."""
    cfg = tiny_run_config(
        tmp_path / "one",
        env["data"],
        env["enc"],
        {**OVER, "train.resume": str(runs / "fsdp2/checkpoints/step_0000003")},
    )
    train(cfg, progress=False)
    assert max_diff(final_weights(runs / "fsdp2"), final_weights(tmp_path / "one")) < 2e-5
    assert losses(tmp_path / "one") == pytest.approx(losses(runs / "fsdp2")[3:], rel=1e-5)
    assert not TrainingCheckpoint.latest(tmp_path / "one").is_sharded  # one plain process writes full tensors


def test_sharded_resume_from_one_process_on_two(env, runs, tmp_path):
    """1 → 2: FSDP on one process (torchrun --nproc_per_node=1) writes one shard; two ranks split it."""
    one = tiny_run_config(tmp_path / "fsdp1", env["data"], env["enc"], {**OVER, "train.distributed": "fsdp"})
    torchrun(1, write_config(one, tmp_path / "fsdp1.yaml"))
    ckpt = TrainingCheckpoint.all(tmp_path / "fsdp1")[0]
    assert ckpt.is_sharded and ckpt.path.name == "step_0000003"
    two = tiny_run_config(tmp_path / "two", env["data"], env["enc"], {**OVER, "train.distributed": "fsdp"})
    torchrun(2, write_config(two, tmp_path / "two.yaml"), "--resume", str(ckpt.path))
    assert max_diff(final_weights(tmp_path / "fsdp1"), final_weights(tmp_path / "two")) < 2e-5
    assert max_diff(final_weights(runs / "plain"), final_weights(tmp_path / "two")) < 2e-5
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "fsdp1")[3:], rel=1e-5)


def test_sharded_checkpoint_of_another_model_is_refused(env, runs, tmp_path):
    cfg = tiny_run_config(tmp_path / "x", env["data"], env["enc"], {**OVER, "model.depth": 3})
    with pytest.raises(ConfigError, match="changes what the checkpoint was trained as: model.depth: 2 → 3"):
        Trainer(cfg).load(runs / "fsdp2")  # refused from its config.yaml, before a shard is read
    shard = TrainingCheckpoint.latest(runs / "fsdp2").path / TrainingCheckpoint.SHARDED / "__1_0.distcp"
    data = shard.read_bytes()
    try:
        shard.write_bytes(data[:16])  # truncated
        with pytest.raises(CheckpointError, match="cannot read training checkpoint"):
            TrainingCheckpoint.latest(runs / "fsdp2").raw()
    finally:
        shard.write_bytes(data)
