"""Evaluation while training (``train.eval_every``): on the EMA weights, Gen PPL / entropy for
unconditional runs, BLEU / ROUGE on ``data.eval_path`` for conditional ones, logged like the losses,
and a run trains bit-identically with it on and off. Real tokenizers, data, judge and torchrun."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elflm import evaluate as ev
from elflm.checkpoint import TrainingCheckpoint
from elflm.config import ConfigError
from elflm.data import PackedDataset
from elflm.generate import dataset_rows, generate_rows
from elflm.model import ELF
from elflm.train import Trainer, train

from conftest import read_gzip_text
from train_fixtures import make_corpus, make_pairs, make_tiny_judge, make_tiny_t5, tiny_run_config, write_config

ROOT = Path(__file__).resolve().parents[1]
SAME_THREADS = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("train-eval")
    return {
        "enc": make_tiny_t5(base / "enc", t5_tokenizer_dir),
        "text": make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir),
        "pairs": make_pairs(base / "pairs", assets_dir, t5_tokenizer_dir, 0, 120),
        "held_out": make_pairs(base / "held-out", assets_dir, t5_tokenizer_dir, 500, 24),
        "judge": make_tiny_judge(base / "judge", assets_dir),
    }


def conditional(env, out: Path, over: dict | None = None):
    cond = {
        "data.train_path": str(env["pairs"]),
        "data.max_input_length": 16,
        "data.pad_token": "eos",
        "sample.method": "ode",
        "sample.cfg_scale": 2.0,
        "sample.gamma": 0.0,
    }
    return tiny_run_config(out, env["pairs"], env["enc"], {**cond, **(over or {})})


def metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(loss records without timings, eval records) of a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs if "loss" in r]
    return losses, [r for r in recs if "eval/num_samples" in r]


def final_weights(out: Path) -> dict:
    last = TrainingCheckpoint.latest(out)
    return {**{f"raw/{k}": v for k, v in last.raw().items()}, **{f"ema/{k}": v for k, v in last.ema().items()}}


def assert_same_training(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(a)[0] == metrics(b)[0]


def test_unconditional_eval_logs_gen_ppl_and_leaves_training_bit_identical(env, tmp_path, capsys):
    over = {"train.max_steps": 4, "train.log_every": 2}
    train(tiny_run_config(tmp_path / "off", env["text"], env["enc"], over), progress=False)
    on = {
        **over,
        "train.eval_every": 2,
        "train.eval_samples": 5,
        "train.eval_batch_size": 2,
        "train.eval_steps": 3,
        "train.eval_judge": str(env["judge"]),
        "train.preview_every": 1,
        "train.preview_samples": 2,
    }
    trainer = train(tiny_run_config(tmp_path / "on", env["text"], env["enc"], on), progress=False)
    assert_same_training(tmp_path / "off", tmp_path / "on")
    evals = metrics(tmp_path / "on")[1]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval/gen_ppl"] > 1 and r["eval/entropy"] > 0 and r["eval/num_samples"] == 5
        assert set(r) == {"step", "eval/gen_ppl", "eval/entropy", "eval/num_empty", "eval/num_samples", "eval/seconds"}
    printed = capsys.readouterr().out
    assert f"step 4 eval/gen_ppl {evals[1]['eval/gen_ppl']:.4g}" in printed and printed.count("[step 3]") == 2
    # the logged value is the judge's Gen PPL of the EMA weights' samples of rows (seed, 0..4)
    model = ELF.from_pretrained(tmp_path / "on")  # the last checkpoint's EMA weights
    cfg = replace(trainer.cfg.sample, steps=3)
    recs = generate_rows(model, model.encoder, trainer.evaluation.rows, cfg, batch_size=5, length=32)
    judge = ev.load_judge(env["judge"], device="cpu")
    want = ev.generative_perplexity([r["text"] for r in recs], *judge)
    assert evals[1]["eval/gen_ppl"] == pytest.approx(want["gen_ppl"], rel=1e-6)
    assert evals[1]["eval/entropy"] == pytest.approx(want["entropy"], rel=1e-12)


def test_conditional_eval_translates_eval_path_and_logs_bleu(env, tmp_path, capsys, assets_dir):
    over = {"train.max_steps": 2, "data.eval_path": str(env["held_out"])}
    train(conditional(env, tmp_path / "off", over), progress=False)
    on = {**over, "train.eval_every": 1, "train.eval_samples": 30, "train.eval_batch_size": 8, "train.eval_steps": 2}
    on |= {"train.preview_every": 2, "train.preview_samples": 2}
    trainer = train(conditional(env, tmp_path / "on", on), progress=False)
    assert_same_training(tmp_path / "off", tmp_path / "on")
    evals = metrics(tmp_path / "on")[1]
    assert [r["step"] for r in evals] == [1, 2] and all(r["eval/num_samples"] == 24 for r in evals)  # all 24 rows
    for r in evals:
        assert 0 <= r["eval/bleu"] <= 100 and 0 <= r["eval/rouge1"] <= 100 and "eval/gen_ppl" not in r
    # the rows hold the eval set's condition ids as prepared; the references are its targets
    data = PackedDataset(env["held_out"])
    tok = trainer.encoder.tokenizer
    for k in (0, 23):
        item = data[k]
        c, n = item["cond_len"], item["total_len"]
        assert list(trainer.evaluation.rows[k].source_ids) == [int(i) for i in item["input_ids"][:c]]
        assert trainer.evaluation.references[k] == tok.decode(item["input_ids"][c:n], skip_special_tokens=True)
    english = read_gzip_text(assets_dir / "text/multi30k/val.en.gz").splitlines()[500:524]
    assert (
        sum(ref == line for ref, line in zip(trainer.evaluation.references, english)) >= 12
    )  # the rest: truncated to fit
    assert all(line.startswith(ref.split(" ")[0]) for ref, line in zip(trainer.evaluation.references, english))
    # the logged BLEU is that of the EMA weights' translations of those rows
    model = ELF.from_pretrained(tmp_path / "on")
    rows, refs = dataset_rows(data, 30, trainer.cfg.train.seed, tok)
    cfg = replace(trainer.cfg.sample, steps=2)
    recs = generate_rows(model, model.encoder, rows, cfg, length=32, max_input_length=16, pad_token="eos")
    texts = [r["text"] for r in recs]
    assert refs == trainer.evaluation.references and evals[1]["eval/bleu"] == pytest.approx(ev.bleu(texts, refs))
    assert evals[1]["eval/rougeL"] == pytest.approx(ev.rouge(texts, refs)["rougeL"])
    # previews translate real sources
    printed = capsys.readouterr().out
    assert f"[step 2] {rows[0].source[:100]!r} → " in printed


def test_eval_settings_are_checked_before_training(env, tmp_path):
    with pytest.raises(ConfigError, match="needs data.eval_path") as e:
        Trainer(conditional(env, tmp_path / "a", {"train.eval_every": 5}))
    assert e.value.key == "data.eval_path"
    with pytest.raises(ConfigError, match="train.eval_judge=none") as e:
        Trainer(
            tiny_run_config(
                tmp_path / "b", env["text"], env["enc"], {"train.eval_every": 5, "train.eval_judge": "none"}
            )
        )
    assert e.value.key == "train.eval_judge"
    with pytest.raises(ValueError, match="data.eval_path=.*: unconditional data but"):
        Trainer(conditional(env, tmp_path / "c", {"train.eval_every": 5, "data.eval_path": str(env["text"])}))
    with pytest.raises(FileNotFoundError, match="data.eval_path .*: prepared dataset not found"):
        Trainer(conditional(env, tmp_path / "d", {"train.eval_every": 5, "data.eval_path": str(tmp_path / "none")}))
    with pytest.raises(OSError, match="not found"):
        Trainer(
            tiny_run_config(
                tmp_path / "e",
                env["text"],
                env["enc"],
                {"train.eval_every": 5, "train.eval_judge": str(tmp_path / "nope")},
            )
        )
    for key, value, words in [
        ("train.eval_every", -1, "a value >= 0"),
        ("train.eval_samples", 0, "an integer >= 1"),
        ("train.eval_steps", 0, "null or a value >= 1"),
        ("train.eval_batch_size", 0, "an integer >= 1"),
        ("train.eval_judge", " ", "a judge"),
    ]:
        with pytest.raises(ConfigError, match=words) as e:
            tiny_run_config(tmp_path / "f", env["text"], env["enc"], {key: value})
        assert e.value.key == key
    # eval off: an eval_path is not even opened
    Trainer(conditional(env, tmp_path / "g", {"data.eval_path": str(tmp_path / "none")}))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_eval_matches_one_process(env, tmp_path, strategy):
    """torchrun with 2 gloo processes, DDP and FSDP2 (the EMA copy gathered from the shards): the
    evaluation rows and the judge's batches are shared over the ranks; the logged eval records match
    one process (whose training they equal to ≤ 2e-5)."""
    over = {
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.eval_every": 2,
        "train.eval_samples": 7,
        "train.eval_batch_size": 2,
        "train.eval_steps": 2,
        "train.eval_judge": str(env["judge"]),
        "train.branch": "per_step",  # FSDP ranks run the same passes
    }
    train(tiny_run_config(tmp_path / "one", env["text"], env["enc"], over), progress=False)
    path = write_config(
        tiny_run_config(tmp_path / "two", env["text"], env["enc"], {**over, "train.distributed": strategy}),
        tmp_path / "two.yaml",
    )
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "elflm.cli", "train"]
    r = subprocess.run(
        [sys.executable, *args, "--config", str(path), "--no-progress"],
        cwd=ROOT,
        env=SAME_THREADS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (one,), (two,) = metrics(tmp_path / "one")[1], metrics(tmp_path / "two")[1]
    assert one["eval/num_samples"] == two["eval/num_samples"] == 7
    assert two["eval/gen_ppl"] == pytest.approx(one["eval/gen_ppl"], rel=1e-4)
    assert two["eval/entropy"] == pytest.approx(one["eval/entropy"], rel=1e-4)
