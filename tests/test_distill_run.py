"""Distillation runs: ``DistillTrainer`` (the Trainer with the PD step), ``elflm distill`` and the
curriculum, which resumes where a SIGKILL stopped it, bit for bit; 2 gloo processes equal one. A
tiny teacher trained here, real tokenizer, real prepared data."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elflm import distill
from elflm.checkpoint import TrainingCheckpoint
from elflm.cli import main
from elflm.config import ConfigError, load_config, to_dict
from elflm.data import device_batch
from elflm.flow import seeded
from elflm.model import ELF
from elflm.plan import flops_per_token
from elflm.train import train

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
    """A tiny T5 encoder, Gutenberg rows of 32 tokens and a teacher trained for 6 steps on them."""
    base = tmp_path_factory.mktemp("distill")
    enc = make_tiny_t5(base / "enc", t5_tokenizer_dir)
    data = make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir)
    train(tiny_run_config(base / "teacher", data, enc, {"train.max_steps": 6, "train.lr": 1e-2}), progress=False)
    return {"enc": enc, "data": data, "teacher": base / "teacher"}


def distill_config(env, out: Path, over: dict | None = None):
    over = {"distill.teacher": str(env["teacher"]), "train.max_steps": 3, **(over or {})}
    return tiny_run_config(out, env["data"], env["enc"], over)


def test_student_starts_as_the_teacher_and_steps_on_the_pd_loss(env, tmp_path, capsys):
    cfg = distill_config(env, tmp_path / "run", {"model.depth": 3, "distill.pd_teacher_steps": 3})
    trainer = distill.DistillTrainer(cfg)
    assert (
        "model.depth: the config says 3, the teacher has 2; the student keeps the teacher's" in capsys.readouterr().err
    )
    teacher = ELF.from_pretrained(env["teacher"], encoder=False)
    assert trainer.model_config.depth == 2 and trainer.cfg.model.depth == 2
    start = teacher.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in trainer.net.state_dict().items())
    assert all(torch.equal(v, start[k]) for k, v in trainer.ema.state_dict().items())
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())

    # the first step's loss is the PD objective on the first micro-batch with the draws of (seed, 0, 0)
    batch = device_batch(next(iter(trainer.loader(0))), trainer.dist.device)
    B, L = batch["input_ids"].shape
    d = distill.draw(cfg.objective, cfg.distill, B, L, trainer.model_config.encoder_dim, seeded(cfg.train.seed, 0, 0))
    student = ELF(trainer.model_config)
    student.load_state_dict(start)
    want = distill.training_loss(
        student.train(), trainer.teacher, trainer.encoder, batch, cfg.objective, cfg.distill, d
    )
    stats = trainer.train_step()
    assert stats["loss"].item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert stats["l2_loss"].item() == pytest.approx(distill.logged_losses(want)["l2_loss"].item(), rel=1e-6)
    trainer.train_step()  # the first update has learning rate 0 (warm-up from 0)
    assert any(not torch.equal(v, start[k]) for k, v in trainer.net.state_dict().items())  # the student moved
    assert all(torch.equal(v, start[k].to(v.device)) for k, v in trainer.teacher.state_dict().items())
    assert trainer.flops_per_token(L) > 3 * flops_per_token(trainer.model_config, L, False)


def test_distill_cli_one_round_then_sampling_with_its_steps(env, tmp_path):
    cfg = distill_config(env, tmp_path / "run", {"distill.pd_step_size": 0.25, "sample.steps": 4})
    path = write_config(replace(cfg, distill=replace(cfg.distill, teacher=None)), tmp_path / "d.yaml")
    assert main(["distill", "--config", str(path), "--teacher", str(env["teacher"]), "--no-progress"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] > 0 for r in recs)
    saved = TrainingCheckpoint.latest(tmp_path / "run").config()
    assert saved.distill.teacher == str(env["teacher"]) and saved.distill.pd_step_size == 0.25
    student = ELF.from_pretrained(tmp_path / "run")
    assert student.pretrained.sample.steps == 4
    assert (
        main(["sample", "--checkpoint", str(tmp_path / "run"), "--num-samples", "2", "-o", str(tmp_path / "s.jsonl")])
        == 0
    )
    assert [json.loads(line)["steps"] for line in (tmp_path / "s.jsonl").read_text().splitlines()] == [4, 4]


@pytest.mark.slow
def test_curriculum_resumes_after_a_sigkill_bit_identically(env, tmp_path):
    """Rounds 2, 1 (teacher resolution 2), killed in round 2 after its first checkpoint and run
    again, equals the uninterrupted curriculum bit for bit, in both round folders."""
    over = {"train.max_steps": 4, "train.save_every": 2}
    straight = distill.run_curriculum(distill_config(env, tmp_path / "a", over), [2, 1], 2, progress=False)
    assert [p.name for p in straight] == ["round1_2step", "round2_1step"]
    state = json.loads((tmp_path / "a" / distill.STATE).read_text())
    assert state["done"] == 2 and state["rounds"] == [2, 1] and state["teacher_steps"] == [1, 2]
    round2 = TrainingCheckpoint.latest(straight[1]).config()
    assert round2.distill.student_init == str(straight[0]) and round2.distill.pd_teacher_steps == 2
    assert round2.sample.steps == 1 and round2.distill.teacher == str(env["teacher"])

    cfg = distill_config(env, tmp_path / "b", over)
    path = write_config(cfg, tmp_path / "b.yaml")
    args = ["-m", "elflm.cli", "distill", "--config", str(path), "--curriculum", "2,1", "--teacher-resolution", "2"]
    proc = subprocess.Popen(
        [sys.executable, *args, "--no-progress"],
        cwd=ROOT,
        env=SAME_THREADS,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    b1, b2 = tmp_path / "b/round1_2step", tmp_path / "b/round2_1step"
    deadline = time.time() + 240
    while time.time() < deadline and TrainingCheckpoint.latest(b2) is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "b" / distill.STATE).read_text())["done"] == 1
    assert TrainingCheckpoint.latest(b2).path.name == "step_0000002"  # killed mid round 2
    assert distill.run_curriculum(cfg, [2, 1], 2, progress=False) == [b1, b2]
    for a, b in zip(straight, (b1, b2)):
        wa, wb = final_weights(a), final_weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (b.name, max_diff(wa, wb))
    mtime = (b2 / "metrics.jsonl").stat().st_mtime_ns
    assert distill.run_curriculum(cfg, [2, 1], 2, progress=False) == [b1, b2]  # finished: nothing to do
    assert (b2 / "metrics.jsonl").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="holds another curriculum"):
        distill.run_curriculum(cfg, [4, 1], 4)


@pytest.mark.slow
def test_two_gloo_processes_match_one(env, tmp_path):
    over = {"train.max_steps": 2, "train.batch_size": 4, "distill.pd_teacher_steps": 2}
    distill.distill(distill_config(env, tmp_path / "one", over), progress=False)
    path = write_config(
        distill_config(env, tmp_path / "two", {**over, "train.distributed": "ddp"}), tmp_path / "t.yaml"
    )
    r = cli(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "elflm.cli", "distill", "--config", str(path), "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two")) < 2e-5
    loss = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss("one") == pytest.approx(loss("two"), rel=1e-5)


def test_curriculum_rounds_and_their_configs(env, tmp_path):
    rounds = distill.curriculum_rounds()
    assert [(r.steps, r.teacher_steps) for r in rounds] == [(16, 4), (8, 8), (4, 16), (2, 32), (1, 64)]
    assert all(1 / r.steps / r.teacher_steps == 1 / 64 for r in rounds)  # a teacher sub-step of 1/64
    assert rounds[2].folder("out") == Path("out/round3_4step")
    cfg = distill_config(env, tmp_path / "c")
    r3 = distill.round_config(cfg, rounds[2], Path("out/round2_8step"))
    assert (r3.distill.pd_step_size, r3.distill.pd_teacher_steps, r3.distill.student_init) == (
        0.25,
        16,
        "out/round2_8step",
    )
    assert r3.train.output_dir == str(tmp_path / "c/round3_4step") and r3.train.resume == "auto"
    assert r3.sample.steps == 4 and r3.distill.teacher == cfg.distill.teacher
    for steps, res, msg in [
        ([], 64, "expected student step counts"),
        ([4, 0], 64, "expected student step counts"),
        ([4, 8], 64, "must shrink"),
        ([4, 4], 64, "must shrink"),
        ([3, 1], 64, "3 does not divide the teacher resolution 64"),
        ([4, 1], 0, "teacher resolution 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            distill.curriculum_rounds(steps, res)
    with pytest.raises(ValueError, match="a curriculum resumes from its own state"):
        distill.run_curriculum(distill_config(env, tmp_path / "c", {"train.resume": "somewhere"}), [2, 1], 2)
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c" / distill.STATE).write_text("{")
    with pytest.raises(ValueError, match="cannot read the curriculum state"):
        distill.run_curriculum(cfg, [2, 1], 2)


def test_errors_name_the_setting(env, tmp_path, capsys):
    cfg = distill_config(env, tmp_path / "e", {"distill.teacher": None})
    with pytest.raises(ConfigError, match="distill.teacher is not set.*--teacher"):
        distill.DistillTrainer(cfg)
    with pytest.raises(ConfigError, match="distill.teacher is not set"):
        distill.run_curriculum(cfg, [2, 1], 2)
    with pytest.raises(ValueError, match=f"distill.teacher='{tmp_path}/missing': .*no such file or folder"):
        distill.DistillTrainer(replace(cfg, distill=replace(cfg.distill, teacher=str(tmp_path / "missing"))))
    long = replace(
        cfg, data=replace(cfg.data, max_length=80), distill=replace(cfg.distill, teacher=str(env["teacher"]))
    )
    with pytest.raises(ConfigError, match="data.max_length=80 exceeds the teacher's max_length 32"):
        distill.DistillTrainer(long)
    teacher = ELF.from_pretrained(env["teacher"], encoder=False)
    other = ELF(replace(teacher.config, hidden_size=32)).save_pretrained(
        tmp_path / "other", settings=teacher.pretrained
    )
    with pytest.raises(ValueError, match="distill.student_init=.* does not fit the student: hidden_size 32 vs 64"):
        distill.DistillTrainer(replace(long, data=cfg.data, distill=replace(long.distill, student_init=str(other))))
    path = write_config(cfg, tmp_path / "e.yaml")
    for extra, msg in [
        (["--curriculum", "2,1", "--resume"], "--resume applies to one round"),
        (["--teacher-resolution", "8"], "--teacher-resolution sets the rounds of --curriculum"),
        ([], "distill.teacher is not set"),
        (["--teacher", str(env["teacher"]), "--curriculum", "3,1"], "3 does not divide the teacher resolution 64"),
    ]:
        assert main(["distill", "--config", str(path), "--no-progress", *extra]) == 2
        assert msg in capsys.readouterr().err


def test_the_authors_distillation_yaml_maps_to_the_distill_section(tmp_path):
    """The flat distill_curriculum_ELF-B.yml fields (values as the authors set them) land in
    ``distill``; the bundled config says the same."""
    import yaml

    flat = {
        "model": "ELF-B", "max_length": 1024, "decoder_prob": 0.2, "self_cond_prob": 0.5,
        "pd_teacher_steps": 4, "pd_step_size": 0.0625, "pd_student_schedule": "logit_normal",
        "pd_teacher_schedule": "logit_normal", "teacher_path": "embedded-language-flows/ELF-B-owt-torch",
        "initialize_student_from_teacher": True, "teacher_use_ema": True, "student_init_from_checkpoint": None,
        "epochs": 1, "global_batch_size": 512, "blr": 0.001, "warmup_epochs": 0.1, "warmup_steps": -1, "seed": 42,
    }  # fmt: skip
    (tmp_path / "d.yml").write_text(yaml.safe_dump(flat))
    lines = []
    cfg = load_config(tmp_path / "d.yml", ["distill.pd_step_size=0.25"], log=lines.append)
    assert cfg.distill == distill.DistillConfig(
        pd_step_size=0.25, pd_teacher_steps=4, teacher="embedded-language-flows/ELF-B-owt-torch"
    )
    assert "  pd_step_size: 0.0625 -> distill.pd_step_size = 0.0625" in lines
    assert any(line.startswith("  not used: initialize_student_from_teacher") for line in lines)
    bundled = load_config("distill-elf-b-owt")
    assert bundled.distill == replace(cfg.distill, pd_step_size=0.0625)
    assert (bundled.train.epochs, bundled.train.warmup_epochs, bundled.train.seed) == (1, 0.1, 42)
    assert (bundled.sample.method, bundled.sample.gamma, bundled.sample.w) == ("sde", 1.5, 2.5)
    assert to_dict(bundled)["distill"]["teacher"] == "embedded-language-flows/ELF-B-owt-torch"
