"""benchmarks/gpu_suite.sh runs its code paths on the CPU with --smoke (tiny sizes): every part
writes its rows to the JSON and the Markdown table, and parts past the time budget are skipped."""

import json
import os
import subprocess
import sys

import pytest

from train_fixtures import ROOT


def suite(tmp_path, *args):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--smoke", "--out", str(tmp_path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "gpu_suite.json").read_text()), (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_part(tmp_path):
    results, table = suite(tmp_path)
    assert results["setup"]["smoke"] and results["skipped"] == []
    largest = results["plan"]["largest_micro_batch"]
    assert largest > 4
    train = results["train"]
    assert [(r["batch"], r["branch"]) for r in train] == [
        (b, br) for b in (4, largest) for br in ("denoise", "decode", "expected (80/20)")
    ]
    assert all(r["tokens_per_s"] > 0 for r in train)
    assert all(r["planned_gib"] > 0 for r in train if r["branch"] != "expected (80/20)")
    sampling = results["sampling"]
    assert [r["mode"] for r in sampling] == ["eager", "compiled"]
    assert all(r["samples"] == 8 and r["steps"] == 4 and r["wall_s"] > 0 for r in sampling)
    assert "| denoise | 4 |" in table and "| compiled | 8 × 32 | 4 |" in table


def test_gpu_suite_skips_parts_past_the_budget(tmp_path):
    results, table = suite(tmp_path, "--budget", "0")
    assert results["skipped"] == ["training", "sampling eager", "sampling compiled"]
    assert "skipped (time budget): training" in table


def test_sample_throughput_over_step_counts(capsys):
    """benchmarks/sample_throughput.py --steps 1,2,4: a row per step count at one batch size, the
    speed-up against the most steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sample_throughput as bench

    a = bench.parse_args(["--runs", "tiny:cpu:fp32", "--steps", "1,2,4", "--batch", "2", "--batches", "1"])
    runs = bench.run(a, "tiny:cpu:fp32")
    assert [(x["steps"], x["batch"]) for x in runs] == [(1, 2), (2, 2), (4, 2)]
    assert runs[2]["speedup"] == 1.0 and all(x["samples_per_s"] > 0 and x["speedup"] > 0 for x in runs)
    table = bench.table(runs)
    assert "speed-up" in table and table.count("tiny:cpu:fp32") == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "4,0"])
    assert "--steps: expected comma-separated integers >= 1, got '4,0'" in capsys.readouterr().err
