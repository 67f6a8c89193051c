"""``torchrun -m elflm.cli sample|eval|sweep`` with 2 gloo processes on CPU: the sampler calls and
the judge's batches are shared over the ranks, rank 0 writes one output in row order, and the
output is that of one process: the same ids, texts, order and metrics."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elflm.cli import main

from tiny_model import make_tiny_model
from train_fixtures import make_tiny_judge

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread here and in the torchrun processes: kernels reduce in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory, t5_tokenizer_dir, assets_dir):
    root = tmp_path_factory.mktemp("torchrun")
    return {
        "uncond": make_tiny_model(root / "uncond", t5_tokenizer_dir, max_length=16),
        "cond": make_tiny_model(root / "cond", t5_tokenizer_dir, max_input_length=8, max_length=16),
        "judge": make_tiny_judge(root / "judge", assets_dir),
    }


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "elflm.cli"]
    r = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sample_on_two_processes_is_one_process_output(env, tmp_path):
    args = ["sample", "--checkpoint", str(env["uncond"]), "--num-samples", "5", "--seeds", "0,3"]
    args += ["--batch-size", "2", "--steps", "3"]
    assert main([*args, "-o", str(tmp_path / "one.jsonl")]) == 0
    r = torchrun(*args, "-o", str(tmp_path / "two.jsonl"))
    one, two = (tmp_path / "one.jsonl").read_bytes(), (tmp_path / "two.jsonl").read_bytes()
    assert one == two and len(one.splitlines()) == 10
    assert r.stderr.count("10 samples in") == 1 and "on 2 processes" in r.stderr  # rank 0 reports


def test_eval_on_two_processes_reduces_exactly(env, tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    args = ["sample", "--checkpoint", str(env["uncond"]), "--num-samples", "7", "--seeds", "1,2", "--steps", "2"]
    assert main([*args, "-o", str(samples)]) == 0
    ev = ["eval", str(samples), "--judge", str(env["judge"]), "--batch-size", "2", "--json"]
    capsys.readouterr()
    assert main(ev) == 0
    one = json.loads(capsys.readouterr().out)
    two = json.loads(torchrun(*ev).stdout)  # printed once, by rank 0
    assert two == one
    assert one["per_seed"][0]["num_tokens"] > 0 and len(one["per_seed"][1]["per_sample_ppl"]) == 7


def test_sweep_on_two_processes_is_one_process_sweep(env, tmp_path):
    pairs = [{"input": f"Condition number {k} is here", "output": f"Reference {k}"} for k in range(5)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    args = ["sweep", "--checkpoint", str(env["cond"]), "--input", str(tmp_path / "pairs.jsonl"), "--no-plots"]
    args += ["--steps", "2,3", "--cfg-scale", "1,2", "--method", "ode", "--batch-size", "2"]
    args += ["--judge", str(env["judge"]), "--judge-batch-size", "2"]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    torchrun(*args, "-o", str(tmp_path / "two"))

    def table(folder):
        with open(folder / "sweep.csv", newline="", encoding="utf-8") as f:
            return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in csv.DictReader(f)]

    one, two = table(tmp_path / "one"), table(tmp_path / "two")
    assert one == two and len(one) == 4 and all(r["bleu"] != "" and r["gen_ppl"] != "" for r in one)
    for r in one:
        assert (tmp_path / "one" / r["samples"]).read_bytes() == (tmp_path / "two" / r["samples"]).read_bytes()
