"""End to end through the command line: ``elflm sample`` (unconditional, conditional, every sampler
option, precisions, reproducibility, bad inputs), ``elflm eval`` with a tiny random GPT-2 judge,
and ``elflm sweep`` (grid, CSV / Markdown tables, PNG plots, resuming). The models are tiny random
ELFs over a tiny random T5 encoder with the real T5 tokenizer, saved as elflm folders."""

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elflm import evaluate
from elflm.cli import main
from elflm.config import DataConfig, EncoderConfig, ModelConfig, SampleConfig, Settings
from elflm.encoder import build_encoder
from elflm.generate import generate
from elflm.model import ELF, RMSNorm
from elflm.sampling import Sampler
from elflm.sweep import grid_settings, setting_name

from conftest import skip_unless
from train_fixtures import make_tiny_t5

LENGTH, MAX_IN = 24, 8
OPTS = ["--steps", "3", "--batch-size", "4"]


def make_model(folder: Path, encoder: Path, max_input_length: int | None) -> Path:
    """A random 2-layer ELF (C = 32, V = 32128, 24 tokens) with every weight perturbed, so that
    samples depend on the noise; conditional when ``max_input_length`` is given."""
    torch.manual_seed(0)
    model = ELF(
        ModelConfig(
            encoder_dim=32, vocab_size=32128, max_length=LENGTH, hidden_size=32, depth=2, num_heads=2, bottleneck_dim=8
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    settings = Settings(
        encoder=EncoderConfig(kind="t5", name_or_path=str(encoder), weights=str(encoder)),
        data=DataConfig(max_length=LENGTH, max_input_length=max_input_length),
        sample=SampleConfig(steps=4, cfg_scale=2.0 if max_input_length else 1.0),
    )
    return model.save_pretrained(folder, settings=settings, encoder=build_encoder(settings.encoder))


@pytest.fixture(scope="module")
def models(tmp_path_factory, t5_tokenizer_dir):
    root = tmp_path_factory.mktemp("models")
    t5 = make_tiny_t5(root / "t5", t5_tokenizer_dir)
    return {"uncond": make_model(root / "uncond", t5, None), "cond": make_model(root / "cond", t5, MAX_IN)}


@pytest.fixture(scope="module")
def judge(tmp_path_factory, assets_dir):
    """A random 2-layer GPT-2 (64 positions) with the real GPT-2 tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(assets_dir / "tokenizers" / "gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tok), initializer_range=0.3)
    )
    folder = tmp_path_factory.mktemp("judge")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are tiny: one thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sample(args, out: Path) -> list[dict]:
    assert main(["sample", *args, "-o", str(out)]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def fails(capsys, args) -> str:
    """Run the CLI expecting exit code 2; returns stderr."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse rejects the value
        code = e.code
    assert code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- elflm sample


def test_unconditional_samples_carry_text_ids_settings_and_seed(models, tmp_path, t5_tokenizer_dir):
    from transformers import AutoTokenizer

    args = [
        "--checkpoint",
        str(models["uncond"]),
        "--num-samples",
        "5",
        "--batch-size",
        "2",
        "--method",
        "sde",
        "--steps",
        "3",
        "--grid",
        "uniform",
        "--gamma",
        "1.0",
        "--w",
        "2",
        "--seed",
        "7",
    ]
    rows = sample(args, tmp_path / "u.jsonl")
    tok = AutoTokenizer.from_pretrained(t5_tokenizer_dir)
    assert [r["index"] for r in rows] == list(range(5))
    for r in rows:
        assert len(r["ids"]) == LENGTH and all(isinstance(i, int) for i in r["ids"])
        assert r["text"] == tok.decode(r["ids"], skip_special_tokens=True) and r["text"].strip()
        assert (r["seed"], r["method"], r["steps"], r["grid"], r["gamma"], r["w"]) == (7, "sde", 3, "uniform", 1.0, 2.0)
        assert (r["length"], r["precision"]) == (LENGTH, "fp32")
        assert r["checkpoint"] == str(models["uncond"]) and "source" not in r
        assert "cfg_scale" not in r and "p_mean" not in r  # only the settings that were used
    assert len({tuple(r["ids"]) for r in rows}) == 5  # every sample its own noise


@pytest.mark.parametrize("method,grid", [("sde", "logit-normal"), ("ode", "uniform")])
def test_same_seed_same_samples_other_seed_other_samples(models, tmp_path, method, grid):
    base = ["--checkpoint", str(models["uncond"]), "--num-samples", "3", "--method", method, "--grid", grid, *OPTS]
    a = sample([*base, "--seed", "1"], tmp_path / "a.jsonl")
    b = sample([*base, "--seed", "1"], tmp_path / "b.jsonl")
    c = sample([*base, "--seed", "2"], tmp_path / "c.jsonl")
    assert [r["ids"] for r in a] == [r["ids"] for r in b]
    assert all(x["ids"] != y["ids"] for x, y in zip(a, c))
    assert {r["grid"] for r in a} == {grid.replace("-", "_")}
    assert all(("gamma" in r) == (method == "sde") for r in a)  # ODE records report no churn


def test_sampler_options_change_the_samples(models, tmp_path):
    base = ["--checkpoint", str(models["uncond"]), "--num-samples", "2", "--batch-size", "2"]
    runs = {
        name: [r["ids"] for r in sample([*base, *extra], tmp_path / f"{i}.jsonl")]
        for i, (name, extra) in enumerate(
            {
                "default": [],
                "ode": ["--method", "ode"],
                "steps": ["--steps", "2"],
                "uniform": ["--grid", "uniform"],
                "gamma": ["--gamma", "0.5"],
                "w": ["--w", "1"],
            }.items()
        )
    }
    for name, ids in runs.items():
        assert name == "default" or ids != runs["default"], f"--{name} had no effect"


def test_the_authors_sampling_config_file(models, tmp_path, capsys):
    """Their sampling-config YAML: sample takes its first setting (flags override it)."""
    import yaml

    entries = [
        {"sampling_method": "ode", "num_sampling_steps": [2], "cfgs": [1], "self_cond_cfg_scales": [2]},
        {"sampling_method": "sde", "num_sampling_steps": [3], "sde_gamma": 1.0, "self_cond_cfg_scales": [3]},
    ]
    (tmp_path / "s.yml").write_text(yaml.safe_dump(entries))
    base = ["--checkpoint", str(models["uncond"]), "--num-samples", "2", "--sampling-config", str(tmp_path / "s.yml")]
    rows = sample(base, tmp_path / "a.jsonl")
    assert {(r["method"], r["steps"], r["w"]) for r in rows} == {("ode", 2, 2.0)}
    assert "lists 2 settings; using the first (ode 2 steps w=2 cfg=1 logit_normal)" in capsys.readouterr().err
    assert {r["steps"] for r in sample([*base, "--steps", "4"], tmp_path / "b.jsonl")} == {4}
    sweep = ["sweep", "--checkpoint", str(models["uncond"]), "-o", str(tmp_path / "sw"), "--num-samples", "2"]
    assert "drop --steps" in fails(capsys, [*sweep, "--sampling-config", str(tmp_path / "s.yml"), "--steps", "2,4"])
    (tmp_path / "bad.yml").write_text("[1, 2]\n")
    assert "bad.yml: expected the authors' sampling-config list" in fails(
        capsys, ["sample", *base[:-1], str(tmp_path / "bad.yml")]
    )


def test_sampler_presets_by_name(models, judge, tmp_path, capsys):
    """--preset fewstep --steps N: the authors' few-step setting for N steps (flags override it); in a
    sweep, one setting per --steps value."""
    base = ["--checkpoint", str(models["uncond"]), "--num-samples", "2", "--preset", "fewstep"]
    settings = lambda rows: {(r["method"], r["steps"], r["gamma"], r["w"]) for r in rows}  # noqa: E731
    assert settings(sample([*base, "--steps", "4"], tmp_path / "a.jsonl")) == {("sde", 4, 1.5, 2.5)}
    assert settings(sample([*base, "--steps", "16", "--w", "1"], tmp_path / "b.jsonl")) == {("sde", 16, 2.0, 1.0)}
    assert settings(sample(base, tmp_path / "c.jsonl")) == {("sde", 1, 1.5, 2.5)}
    assert "give --preset or --sampling-config, not both" in fails(
        capsys, ["sample", *base, "--sampling-config", "x.yml", "-o", str(tmp_path / "d.jsonl")]
    )
    assert "invalid choice: 'nope'" in fails(capsys, ["sample", *base[:-1], "nope"])
    sweep = ["sweep", "--checkpoint", str(models["uncond"]), "--num-samples", "2", "--judge", str(judge)]
    sweep += ["--preset", "fewstep", "--no-plots"]
    assert main([*sweep, "--steps", "2,16", "-o", str(tmp_path / "sw")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "sw/sweep.csv").read_text())))
    got = [(int(r["steps"]), float(r["gamma"]), float(r["w"])) for r in rows]
    assert got == [(2, 1.5, 2.5), (16, 2.0, 2.0)]
    assert "drop --gamma" in fails(capsys, [*sweep, "--gamma", "1", "-o", str(tmp_path / "x")])


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp64", torch.float64)])
def test_precision_runs_the_model_in_that_dtype(models, tmp_path, precision, dtype):
    rows = sample(
        ["--checkpoint", str(models["uncond"]), "--num-samples", "2", "--precision", precision, *OPTS],
        tmp_path / "p.jsonl",
    )
    assert {r["precision"] for r in rows} == {precision} and all(len(r["ids"]) == LENGTH for r in rows)
    model = ELF.from_pretrained(models["uncond"], dtype=torch.float64 if dtype == torch.float64 else None)
    enc, settings = model.encoder, model.pretrained
    ref = ELF.from_pretrained(models["uncond"], encoder=False)
    seen = set()
    for m in model.blocks.modules():
        if isinstance(m, (torch.nn.Linear, RMSNorm)):
            m.register_forward_hook(lambda mod, i, o: seen.add((type(mod).__name__, i[0].dtype, o.dtype)))
    assert (
        len(generate(model, enc, replace(settings.sample, steps=2), num_samples=2, length=12, precision=precision)) == 2
    )
    # bf16: the blocks' matmuls run in bf16 under autocast (norms in float32), as in training; fp64: all float64
    want = (
        {
            ("Linear", torch.float32, torch.bfloat16),
            ("Linear", torch.bfloat16, torch.bfloat16),
            ("RMSNorm", torch.float32, torch.float32),
            ("RMSNorm", torch.bfloat16, torch.bfloat16),
        }
        if dtype == torch.bfloat16
        else {("Linear", dtype, dtype), ("RMSNorm", dtype, dtype)}
    )
    assert seen <= want and any(o == dtype for _, _, o in seen)
    # the same integration in fp32 and in the low / high precision: close, bf16 to bf16 rounding
    cfg = replace(settings.sample, steps=3, method="ode", grid="uniform")
    want = Sampler(ref, cfg).sample(Sampler(ref, cfg).start([0, 1], 12, 0))
    low = Sampler(model if dtype == torch.float64 else ref, cfg, precision=precision)
    got = low.sample(low.start([0, 1], 12, 0))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < (5e-2 if dtype == torch.bfloat16 else 1e-5) and torch.isfinite(got).all()


def test_conditional_text_lines_with_truncation_warning(models, tmp_path, capsys):
    long = "one two three four five six seven eight nine ten eleven twelve"
    (tmp_path / "in.txt").write_text(f"Hello world\nA short one\n{long}\n", encoding="utf-8")
    base = ["--checkpoint", str(models["cond"]), "--input", str(tmp_path / "in.txt"), *OPTS]
    rows = sample(base, tmp_path / "c.jsonl")
    err = capsys.readouterr().err
    assert "1 condition(s) longer than 8 tokens" in err and "condition no. 3" in err
    assert [r["source"] for r in rows] == ["Hello world", "A short one", long]
    assert all(len(r["ids"]) == LENGTH - MAX_IN and r["cfg_scale"] == 2.0 for r in rows)  # the checkpoint's default
    guided = sample([*base, "--cfg-scale", "4"], tmp_path / "g.jsonl")
    assert {r["cfg_scale"] for r in guided} == {4.0} and [r["ids"] for r in guided] != [r["ids"] for r in rows]
    (tmp_path / "short.txt").write_text("Hello world\n", encoding="utf-8")
    capsys.readouterr()
    sample([*base[:3], str(tmp_path / "short.txt")], tmp_path / "s.jsonl")
    assert "longer than" not in capsys.readouterr().err


def test_conditional_jsonl_source_field(models, tmp_path):
    lines = [{"document": "Hello world", "id": 1}, {}, {"document": "Another condition"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n", encoding="utf-8")
    args = [
        "--checkpoint",
        str(models["cond"]),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--source-field",
        "document",
        "--cfg-scale",
        "1",
        "--seed",
        "3",
        *OPTS,
    ]
    rows = sample(args, tmp_path / "c.jsonl")
    assert [r["source"] for r in rows] == ["Hello world", "Another condition"]
    (tmp_path / "in.txt").write_text("Hello world\nAnother condition\n", encoding="utf-8")
    same = sample([*args[:3], str(tmp_path / "in.txt"), *args[6:]], tmp_path / "t.jsonl")
    assert [r["ids"] for r in same] == [r["ids"] for r in rows]  # text lines and JSONL: the same conditions


def bad_inputs(tmp: Path, models) -> dict:
    (tmp / "empty.txt").write_text("first\n\nthird\n")
    (tmp / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"source": "a"}\nnot json\n')
    (tmp / "num.jsonl").write_text('{"source": 5}\n')
    (tmp / "ok.txt").write_text("hello\n")
    u, c = str(models["uncond"]), str(models["cond"])
    return {
        "missing checkpoint": (
            ["--checkpoint", str(tmp / "nope"), "--num-samples", "1"],
            "nope: no such file or folder",
        ),
        "missing input": (["--checkpoint", c, "--input", str(tmp / "nope.txt")], "nope.txt: no such file"),
        "empty line": (["--checkpoint", c, "--input", str(tmp / "empty.txt")], "empty.txt:2: empty condition"),
        "not UTF-8": (["--checkpoint", c, "--input", str(tmp / "latin1.txt")], "latin1.txt:2: not valid UTF-8"),
        "bad JSONL": (["--checkpoint", c, "--input", str(tmp / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
        "non-string source": (["--checkpoint", c, "--input", str(tmp / "num.jsonl")], "must be a string"),
        "unconditional + input": (["--checkpoint", u, "--input", str(tmp / "ok.txt")], "is an unconditional model"),
        "input + num-samples": (["--checkpoint", c, "--input", str(tmp / "ok.txt"), "--num-samples", "2"], "not both"),
        "nothing to sample": (["--checkpoint", u], "give --num-samples N"),
        "cfg without input": (["--checkpoint", c, "--num-samples", "1", "--cfg-scale", "2"], "applies to conditional"),
        "too long": (
            ["--checkpoint", u, "--num-samples", "1", "--length", "99"],
            "length must be an integer in [1, 24]",
        ),
        "output folder missing": (
            ["--checkpoint", u, "--num-samples", "1", "-o", str(tmp / "no/x.jsonl")],
            "does not exist",
        ),
        "max input too long": (
            ["--checkpoint", c, "--input", str(tmp / "ok.txt"), "--max-input-length", "30"],
            "max_input_length < length",
        ),
        "steps 0": (
            ["--checkpoint", u, "--num-samples", "1", "--steps", "0"],
            "expected an integer in [1, 2**63), got '0'",
        ),
        "batch 0": (
            ["--checkpoint", u, "--num-samples", "1", "--batch-size", "0"],
            "expected an integer in [1, 2**63)",
        ),
        "negative gamma": (["--checkpoint", u, "--num-samples", "1", "--gamma", "-1"], "expected a finite number >= 0"),
        "unknown method": (["--checkpoint", u, "--num-samples", "1", "--method", "heun"], "invalid choice: 'heun'"),
        "unknown precision": (["--checkpoint", u, "--num-samples", "1", "--precision", "fp16"], "invalid choice"),
        "bad device": (["--checkpoint", u, "--num-samples", "1", "--device", "gpu0"], "expected auto, cpu, cuda"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing checkpoint",
        "missing input",
        "empty line",
        "not UTF-8",
        "bad JSONL",
        "non-string source",
        "unconditional + input",
        "input + num-samples",
        "nothing to sample",
        "cfg without input",
        "too long",
        "output folder missing",
        "max input too long",
        "steps 0",
        "batch 0",
        "negative gamma",
        "unknown method",
        "unknown precision",
        "bad device",
    ],
)
def test_bad_inputs_exit_2_with_a_message(models, tmp_path, capsys, case):
    args, message = bad_inputs(tmp_path, models)[case]
    out = ["-o", str(tmp_path / "out.jsonl")] if "-o" not in args else []
    err = fails(capsys, ["sample", *args, *out])
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_cuda_requested_without_cuda(models, judge, tmp_path, capsys):
    skip_unless(not torch.cuda.is_available(), "needs a machine without CUDA")
    err = fails(capsys, ["sample", "--checkpoint", str(models["uncond"]), "--num-samples", "1", "--device", "cuda"])
    assert "CUDA is not available" in err
    (tmp_path / "s.txt").write_text("hello there\n")
    assert "CUDA is not available" in fails(
        capsys, ["eval", str(tmp_path / "s.txt"), "--judge", str(judge), "--device", "cuda"]
    )


def test_console_entry_in_a_subprocess_matches_in_process(models, tmp_path):
    args = ["sample", "--checkpoint", str(models["uncond"]), "--num-samples", "2", "--seed", "5", *OPTS]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "elflm.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # default output: stdout
    assert "2 samples in" in proc.stderr
    assert [r["ids"] for r in rows] == [r["ids"] for r in sample(args[1:], tmp_path / "same.jsonl")]


# ----------------------------------------------------------------------------- elflm eval


def test_eval_end_to_end_with_a_tiny_judge(models, judge, tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    sample(["--checkpoint", str(models["uncond"]), "--num-samples", "4", *OPTS], samples)
    (tmp_path / "refs.txt").write_text("The quick brown fox.\nHello world, this is a test.\n", encoding="utf-8")
    capsys.readouterr()
    assert (
        main(["eval", str(samples), "--references", str(tmp_path / "refs.txt"), "--judge", str(judge), "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    s, r = report["samples"], report["references"]
    assert (s["count"], s["num_samples"], r["count"]) == (4, 4, 2)
    assert s["gen_ppl"] > 1 and s["num_tokens"] > 0 and s["entropy"] > 0 and r["gen_ppl"] > 1
    assert report["judge"]["name"] == str(judge) and report["judge"]["max_length"] == 64
    assert "bleu" not in report  # unconditional samples: references are data, not pairs
    assert main(["eval", str(samples), "--judge", str(judge)]) == 0
    table = capsys.readouterr().out
    assert "| samples (" in table and f"{s['gen_ppl']:.2f}" in table


def test_eval_conditional_samples_get_bleu_and_rouge(models, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("Hello world\nAnother one\n", encoding="utf-8")
    samples = tmp_path / "c.jsonl"
    rows = sample(["--checkpoint", str(models["cond"]), "--input", str(tmp_path / "in.txt"), *OPTS], samples)
    (tmp_path / "refs.txt").write_text(f"{rows[0]['text']}\nsomething else entirely\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(samples), "--references", str(tmp_path / "refs.txt"), "--judge", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["bleu"] <= 100 and 50 <= report["rouge1"] <= 100 and "gen_ppl" not in report["samples"]


@pytest.mark.parametrize(
    "judge_arg,message", [("/no/such/judge", "not found"), ("nope.gguf", "judge GGUF file 'nope.gguf' not found")]
)
def test_eval_unknown_judge(tmp_path, capsys, judge_arg, message):
    (tmp_path / "s.jsonl").write_text('{"text": "hello there"}\n')
    err = fails(capsys, ["eval", str(tmp_path / "s.jsonl"), "--judge", judge_arg])
    assert err.startswith("elflm eval: error:") and message in err


# ----------------------------------------------------------------------------- seeds, references, stdin


def stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))


def test_sample_and_eval_several_seeds(models, judge, tmp_path, capsys):
    base = ["--checkpoint", str(models["uncond"]), "--num-samples", "3", *OPTS]
    rows = sample([*base, "--seeds", "4,2"], tmp_path / "s.jsonl")
    assert [(r["seed"], r["index"]) for r in rows] == [(4, 0), (4, 1), (4, 2), (2, 0), (2, 1), (2, 2)]
    for seed in (4, 2):  # each seed's samples are those of --seed
        alone = sample([*base, "--seed", str(seed)], tmp_path / f"{seed}.jsonl")
        assert [r["ids"] for r in rows if r["seed"] == seed] == [r["ids"] for r in alone]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "s.jsonl"), "--judge", str(judge), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seeds"] == [4, 2] and [g["count"] for g in report["per_seed"]] == [3, 3]
    ppl = [g["gen_ppl"] for g in report["per_seed"]]
    assert report["summary"]["gen_ppl"]["mean"] == pytest.approx(sum(ppl) / 2)
    assert report["summary"]["gen_ppl"]["std"] == pytest.approx(abs(ppl[0] - ppl[1]) / 2)
    assert all(len(g["per_sample_ppl"]) == 3 for g in report["per_seed"])
    assert main(["eval", str(tmp_path / "s.jsonl"), "--judge", str(judge), "--seeds", "2"]) == 0
    table = capsys.readouterr().out
    assert f"{ppl[1]:.2f}" in table and "seed 2" in table and "mean ±" not in table
    assert main(["eval", str(tmp_path / "s.jsonl"), "--judge", str(judge)]) == 0
    assert "| mean ± std (2 seeds) |" in capsys.readouterr().out
    err = fails(capsys, ["eval", str(tmp_path / "s.jsonl"), "--judge", "none", "--seeds", "7"])
    assert "no samples of seed 7 (the file holds seeds 4, 2)" in err
    assert "expected comma-separated distinct integers" in fails(capsys, ["sample", *base, "--seeds", "1,1"])
    assert "not allowed with argument" in fails(capsys, ["sample", *base, "--seed", "1", "--seeds", "1,2"])


def test_references_travel_with_the_samples(models, tmp_path, capsys):
    pairs = [{"input": "Hello world", "output": "Hallo Welt"}, {"input": "Good morning", "output": "Guten Morgen"}]
    official = tmp_path / "pairs.jsonl"
    official.write_text("".join(json.dumps(x) + "\n" for x in pairs), encoding="utf-8")
    base = ["--checkpoint", str(models["cond"]), *OPTS]
    rows = sample([*base, "--input", str(official)], tmp_path / "c.jsonl")
    assert [(r["source"], r["reference"]) for r in rows] == [(x["input"], x["output"]) for x in pairs]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "c.jsonl"), "--judge", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    texts = [r["text"] for r in rows]
    assert report["bleu"] == pytest.approx(evaluate.bleu(texts, ["Hallo Welt", "Guten Morgen"]))
    assert {"rouge1_std", "rouge1_sem", "rougeL_sem"} <= set(report)
    # the official file as references of samples that carry none
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": t, "source": "x"}) + "\n" for t in texts), encoding="utf-8")
    assert main(["eval", str(plain), "--judge", "none", "--json", "--references", str(official)]) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] == report["bleu"]
    assert main(["eval", str(plain), "--judge", "none"]) == 0
    assert "note: conditional samples without references" in capsys.readouterr().err
    # other field names
    custom = tmp_path / "custom.jsonl"
    custom.write_text(
        "".join(json.dumps({"de": x["input"], "en": x["output"]}) + "\n" for x in pairs), encoding="utf-8"
    )
    args = [*base, "--input", str(custom), "--source-field", "de", "--reference-field", "en"]
    same = sample(args, tmp_path / "d.jsonl")
    assert [(r["ids"], r["reference"]) for r in same] == [(r["ids"], r["reference"]) for r in rows]
    assert main(["eval", str(custom), "--judge", "none", "--reference-field", "en"]) == 2  # no "text" field
    assert "string field 'text'" in capsys.readouterr().err
    (tmp_path / "in.txt").write_text("Hello world\n", encoding="utf-8")
    err = fails(capsys, ["sample", *base, "--input", str(tmp_path / "in.txt"), "--reference-field", "en"])
    assert "is a text file; references need JSONL" in err
    official.write_text(json.dumps(pairs[0]) + "\n" + json.dumps({"input": "x"}) + "\n", encoding="utf-8")
    err = fails(capsys, ["sample", *base, "--input", str(official), "-o", str(tmp_path / "x.jsonl")])
    assert "pairs.jsonl:2: expected a JSON object with a string field 'output' (see --reference-field)" in err


def test_stdin_input_and_samples(models, tmp_path, capsys, monkeypatch):
    base = ["--checkpoint", str(models["cond"]), *OPTS, "--seed", "2"]
    (tmp_path / "in.txt").write_text("Hello world\nAnother one\n", encoding="utf-8")
    want = sample([*base, "--input", str(tmp_path / "in.txt")], tmp_path / "f.jsonl")
    stdin(monkeypatch, "Hello world\nAnother one\n")
    assert [r["ids"] for r in sample([*base, "--input", "-"], tmp_path / "t.jsonl")] == [r["ids"] for r in want]
    stdin(monkeypatch, '{"source": "Hello world", "reference": "a"}\n{"source": "Another one", "reference": "b"}\n')
    got = sample([*base, "--input", "-"], tmp_path / "j.jsonl")
    assert [(r["ids"], r["reference"]) for r in got] == [(r["ids"], x) for r, x in zip(want, "ab")]
    stdin(monkeypatch, (tmp_path / "j.jsonl").read_text(encoding="utf-8"))
    capsys.readouterr()
    assert main(["eval", "-", "--judge", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"]["path"] == "-" and report["samples"]["count"] == 2 and "bleu" in report


def test_stdin_is_refused_under_torchrun():
    from elflm.cli import one_process_stdin
    from elflm.distributed import Dist

    one_process_stdin(Dist(0, 1), "-", None)  # one process reads stdin
    one_process_stdin(Dist(1, 2), "in.txt", None)
    with pytest.raises(ValueError, match="stdin .* reaches one process only: give a file when running 2 processes"):
        one_process_stdin(Dist(1, 2), "in.txt", "-")


@pytest.mark.slow
def test_compiled_sampling_matches_eager(models, tmp_path):
    """--compile runs every step and the decode pass through torch.compile: the same samples."""
    from torch._dynamo.utils import counters

    base = ["--checkpoint", str(models["uncond"]), "--num-samples", "2", "--steps", "2", "--length", "8"]
    eager = sample(base, tmp_path / "e.jsonl")
    graphs = counters["stats"]["unique_graphs"]
    compiled = sample([*base, "--compile"], tmp_path / "c.jsonl")
    assert [r["ids"] for r in compiled] == [r["ids"] for r in eager]
    assert counters["stats"]["unique_graphs"] - graphs >= 2  # the step forward and the decode forward
    model = ELF.from_pretrained(models["uncond"])
    sampler = Sampler(model, replace(model.pretrained.sample, steps=2), compiled=True)
    z = torch.randn(2, 8, 32)
    torch.testing.assert_close(sampler.decode(z), Sampler(model, sampler.cfg).decode(z), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- elflm sweep


def test_grid_settings_vary_gamma_only_for_sde():
    base = SampleConfig(steps=32, gamma=1.5, w=3.0)
    grid = grid_settings(base, steps=[8, 16], methods=["ode", "sde"], gammas=[1.0, 1.5], ws=[1, 3])
    assert len(grid) == 2 * 2 + 2 * 2 * 2
    assert {c.gamma for c in grid if c.method == "ode"} == {0.0}
    assert {(c.gamma, c.w, c.steps) for c in grid if c.method == "sde"} == {
        (g, w, s) for g in (1.0, 1.5) for w in (1.0, 3.0) for s in (8, 16)
    }
    assert grid_settings(base) == [base]
    assert len({setting_name(c) for c in grid}) == len(grid)
    assert setting_name(grid[0]) == "ode-steps8-w1-cfg1-logit_normal"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_sweep_unconditional_grid_tables_plots_and_resume(models, judge, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--checkpoint",
        str(models["uncond"]),
        "-o",
        str(out),
        "--num-samples",
        "3",
        "--batch-size",
        "3",
        "--length",
        "12",
        "--steps",
        "2,3",
        "--method",
        "ode,sde",
        "--gamma",
        "1.0,1.5",
        "--w",
        "1,3",
        "--judge",
        str(judge),
        "--seed",
        "4",
    ]
    assert main(args) == 0
    printed = capsys.readouterr()
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 4 + 8
    keys = {(r["method"], int(r["steps"]), r["gamma"] and float(r["gamma"]), float(r["w"])) for r in rows}
    assert keys == {("ode", s, "", w) for s in (2, 3) for w in (1.0, 3.0)} | {  # ODE takes no γ: none reported
        ("sde", s, g, w) for s in (2, 3) for g in (1.0, 1.5) for w in (1.0, 3.0)
    }
    for r in rows:
        assert float(r["gen_ppl"]) > 1 and float(r["entropy"]) > 0 and int(r["num_samples"]) == 3
        assert float(r["samples_per_s"]) > 0 and (out / r["samples"]).is_file()
    md = (out / "sweep.md").read_text()
    assert md.count("\n") == 2 + 12 and md.startswith("| method | steps | gamma | w |") and md.strip() in printed.out
    assert "| ode | 2 | – | 1 |" in md
    for png in ("ppl_vs_entropy.png", "ppl_vs_steps.png"):
        assert_png(out / png)
    assert "[12/12] sde-steps3-gamma1.5-w3-cfg1-logit_normal: gen_ppl" in printed.err
    # a setting's samples are exactly what `elflm sample` gives with the same options
    row = next(r for r in rows if r["name"] == "sde-steps3-gamma1.5-w3-cfg1-logit_normal")
    swept = [json.loads(line) for line in (out / row["samples"]).read_text().splitlines()]
    direct = sample(
        [
            "--checkpoint",
            str(models["uncond"]),
            "--num-samples",
            "3",
            "--batch-size",
            "3",
            "--length",
            "12",
            "--method",
            "sde",
            "--steps",
            "3",
            "--gamma",
            "1.5",
            "--w",
            "3",
            "--seed",
            "4",
        ],
        tmp_path / "d.jsonl",
    )
    assert [r["ids"] for r in swept] == [r["ids"] for r in direct]
    # run again: every setting's samples are reused, the metrics are the same
    stamps = {p: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    assert main(args) == 0
    assert "(reused)" in capsys.readouterr().err
    again = read_csv(out / "sweep.csv")
    assert [r["gen_ppl"] for r in again] == [r["gen_ppl"] for r in rows] and {r["samples_per_s"] for r in again} == {""}
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    # another seed is another sweep: refused in this folder, or with --overwrite redone and the folder replaced
    one = ["--steps", "2", "--method", "ode", "--w", "1"]
    assert main([*args[:11], *one, "--judge", str(judge), "--seed", "5"]) == 2
    assert "another sweep (seed 4 → 5); pass --overwrite" in capsys.readouterr().err
    assert main([*args[:11], *one, "--judge", str(judge), "--seed", "5", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] ode-steps2-w1-cfg1-logit_normal" in err and "(reused)" not in err
    assert read_csv(out / "sweep.csv")[0]["samples_per_s"] != ""
    assert [p.name for p in (out / "samples").iterdir()] == ["ode-steps2-w1-cfg1-logit_normal.jsonl"]


def test_sweep_conditional_with_references(models, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("Hello world\nAnother one\n", encoding="utf-8")
    (tmp_path / "refs.txt").write_text("Hello there\nAnother day\n", encoding="utf-8")
    out = tmp_path / "c"
    assert (
        main(
            [
                "sweep",
                "--checkpoint",
                str(models["cond"]),
                "-o",
                str(out),
                "--input",
                str(tmp_path / "in.txt"),
                "--references",
                str(tmp_path / "refs.txt"),
                "--steps",
                "2,3",
                "--cfg-scale",
                "1,2",
                "--method",
                "ode",
                "--judge",
                "none",
            ]
        )
        == 0
    )
    rows = read_csv(out / "sweep.csv")
    assert [(int(r["steps"]), float(r["cfg_scale"])) for r in rows] == [(2, 1.0), (3, 1.0), (2, 2.0), (3, 2.0)]
    assert all(0 <= float(r["bleu"]) <= 100 and r["rouge1"] != "" for r in rows) and "gen_ppl" not in rows[0]
    assert_png(out / "bleu_vs_steps.png")
    assert not (out / "ppl_vs_steps.png").exists()
    assert "| cfg_scale |" in (out / "sweep.md").read_text()


def test_sweep_takes_references_from_the_input_jsonl(models, tmp_path, capsys):
    pairs = [{"input": "Hello world", "output": "Hello there"}, {"input": "Another one", "output": "Another day"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs), encoding="utf-8")
    (tmp_path / "in.txt").write_text("Hello world\nAnother one\n", encoding="utf-8")
    (tmp_path / "refs.txt").write_text("Hello there\nAnother day\n", encoding="utf-8")
    common = ["sweep", "--checkpoint", str(models["cond"]), "--steps", "2", "--method", "ode", "--judge", "none"]
    common += ["--no-plots"]
    assert main([*common, "-o", str(tmp_path / "a"), "--input", str(tmp_path / "pairs.jsonl")]) == 0
    ref = ["--references", str(tmp_path / "refs.txt")]
    assert main([*common, "-o", str(tmp_path / "b"), "--input", str(tmp_path / "in.txt"), *ref]) == 0
    a, b = read_csv(tmp_path / "a" / "sweep.csv"), read_csv(tmp_path / "b" / "sweep.csv")
    assert [(r["bleu"], r["rouge1"]) for r in a] == [(r["bleu"], r["rouge1"]) for r in b] and a[0]["bleu"] != ""


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "0,2"], "expected a comma-separated list of integers >= 1, got '0,2'"),
        (["--method", "ode,euler"], "list of names from ode, sde"),
        (["--gamma", "1,x"], "list of numbers >= 0"),
        (["--judge", "none"], "nothing to measure"),
        (["--cfg-scale", "2"], "applies to conditional sampling"),
        (["--references", "r.txt"], "--references (BLEU / ROUGE) need --input"),
        (["--reference-field", "en"], "--references (BLEU / ROUGE) need --input"),
    ],
)
def test_sweep_bad_arguments(models, tmp_path, capsys, extra, message):
    args = ["sweep", "--checkpoint", str(models["uncond"]), "-o", str(tmp_path / "s"), "--num-samples", "2", *extra]
    assert message in fails(capsys, args)
    assert not (tmp_path / "s").exists()


def test_sweep_without_matplotlib_names_the_extra(models, judge, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    args = [
        "sweep",
        "--checkpoint",
        str(models["uncond"]),
        "-o",
        str(tmp_path / "s"),
        "--num-samples",
        "2",
        "--judge",
        str(judge),
        "--steps",
        "2",
        "--length",
        "8",
    ]
    assert "pip install 'elflm[plots]'" in fails(capsys, args)
    assert main([*args, "--no-plots"]) == 0
    assert (tmp_path / "s" / "sweep.csv").is_file() and not list((tmp_path / "s").glob("*.png"))
