"""Sampling throughput of ``elflm.generate.generate``: samples/s, tokens/s and peak memory.

Each run ``model:device:precision`` samples unconditionally with random weights (throughput does
not depend on them) in a fresh process, so its peak memory is its own: one untimed warm-up batch,
then for each step count of ``--steps`` (comma-separated) ``--batches`` timed batches of that many
sampler steps (``--method``, default SDE) plus the final decode, all at the same batch size; the
``speed-up`` column is the samples/s against the run's largest step count (few-step sampling of a
distilled student against the teacher's 32 steps: ``--steps 1,2,4,8,32``). ``--batch max`` (the
CUDA default) finds the largest batch that fits by doubling, then bisecting, with 2-step probes
(every step holds the same tensors, the final decode's (B, L, V) logits being the largest).

    python benchmarks/sample_throughput.py                       # tiny on CPU (+ elf-b on CUDA when available)
    python benchmarks/sample_throughput.py --runs elf-b:cuda:bf16 --batch max --json out.json
    python benchmarks/sample_throughput.py --runs tiny:cpu:fp32,tiny:cpu:bf16 --batch 64
    python benchmarks/sample_throughput.py --runs elf-b:cuda:bf16 --steps 1,2,4,8,32 --batch 256

Models are the presets of :func:`elflm.config.model_preset` with T5-small's C = 512 and
V = 32128; ``tiny`` samples 64 tokens, the others ``--length`` (1024). The frozen encoder is a
random T5-small (used for EOS / PAD ids and detokenising). Peak memory: CUDA
``max_memory_allocated``; CPU the process's peak RSS (``resource.getrusage``, includes the
Python / torch baseline and the encoder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import peak_memory_gb, sync

SHARED_T5 = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tokenizers" / "t5-small"
PRECISIONS = ("fp32", "bf16", "fp64")  # bf16: autocast of the blocks (elflm.sampling.Sampler)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_runs = "tiny:cpu:fp32" + (",elf-b:cuda:fp32,elf-b:cuda:bf16" if torch.cuda.is_available() else "")
    p.add_argument("--runs", default=default_runs, help="comma-separated model:device:precision (default: %(default)s)")
    p.add_argument("--steps", default="32", help="sampler steps, or comma-separated step counts (default 32)")
    p.add_argument("--method", default="sde", choices=["ode", "sde"])
    p.add_argument("--length", type=int, default=1024, help="tokens per sample for non-tiny models (tiny: 64)")
    p.add_argument("--batch", default=None, help="samples per batch, or 'max' (default: 32 on CPU, max on CUDA)")
    p.add_argument("--max-batch", type=int, default=4096, help="upper bound of the --batch max search")
    p.add_argument("--batches", type=int, default=3, help="timed batches per run")
    p.add_argument(
        "--tokenizer",
        default=str(SHARED_T5) if SHARED_T5.is_dir() else "t5-small",
        help="T5 tokenizer folder or Hub id (its config.json gives the random encoder)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--json", nargs="?", const="-", default=None, help="write the results as JSON (to a file, or stdout)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for run in a.runs.split(","):
        parts = run.split(":")
        if len(parts) != 3 or parts[1] not in ("cpu", "cuda") or parts[2] not in PRECISIONS:
            p.error(f"--runs: expected model:cpu|cuda:fp32|bf16|fp64, got {run!r}")
    if a.batch not in (None, "max") and not (a.batch.isdigit() and int(a.batch) >= 1):
        p.error(f"--batch: expected an integer >= 1 or 'max', got {a.batch!r}")
    counts = [v.strip() for v in a.steps.split(",")]
    if not all(v.isdigit() and int(v) >= 1 for v in counts):
        p.error(f"--steps: expected comma-separated integers >= 1, got {a.steps!r}")
    a.steps = [int(v) for v in counts]
    return a


def build(a, name: str, device, precision: str):
    """Random ELF of preset ``name`` on ``device`` (float64 for fp64), a random T5-small encoder and
    the sampler settings."""
    from elflm.config import SampleConfig, model_preset
    from elflm.encoder import TextEncoder
    from elflm.model import ELF

    length = 64 if name == "tiny" else a.length
    torch.manual_seed(0)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    model = ELF(model_preset(name, encoder_dim=512, vocab_size=32128, max_length=length)).to(device, dtype).eval()
    encoder = TextEncoder.t5(tokenizer=a.tokenizer)
    return model, encoder, SampleConfig(method=a.method, steps=max(a.steps)), length


def sample(model, encoder, cfg, batch: int, batches: int = 1, precision: str = "fp32") -> float:
    """Seconds to sample ``batches`` batches of ``batch``."""
    from elflm.generate import generate

    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    generate(model, encoder, cfg, num_samples=batch * batches, batch_size=batch, precision=precision)
    sync(device)
    return time.perf_counter() - t0


def fits(model, encoder, cfg, batch: int) -> bool:
    try:
        sample(model, encoder, replace(cfg, steps=2), batch)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(model, encoder, cfg, limit: int) -> int:
    """The largest batch (a multiple of 8 above 8) that samples without running out of CUDA memory."""
    ok, bad = 0, None
    b = 8
    while b <= limit:
        if not fits(model, encoder, cfg, b):
            bad = b
            break
        ok, b = b, b * 2
    if ok == 0:
        b = 4
        while b >= 1 and not fits(model, encoder, cfg, b):
            b //= 2
        if b < 1:
            raise RuntimeError("not even one sample fits in CUDA memory")
        return b
    hi = bad if bad is not None else ok
    while hi - ok > 8:
        mid = (ok + hi) // 2 // 8 * 8
        if mid <= ok:
            break
        ok, hi = (mid, hi) if fits(model, encoder, cfg, mid) else (ok, mid)
    return ok


def run(a, spec: str) -> list[dict]:
    """One run in this process: a row per step count of ``--steps``."""
    name, dev, prec = spec.split(":")
    device = torch.device(dev)
    model, encoder, cfg, length = build(a, name, device, prec)
    want = a.batch or ("max" if device.type == "cuda" else "32")
    if want == "max" and device.type != "cuda":
        raise SystemExit("--batch max needs CUDA (on CPU the search would only stop when the process is killed)")
    batch = largest_batch(model, encoder, cfg, a.max_batch) if want == "max" else int(want)
    sample(model, encoder, replace(cfg, steps=2), batch, precision=prec)  # warm-up: kernels, allocator, RoPE tables
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = [measure(a, spec, model, encoder, replace(cfg, steps=n), batch, length, want == "max") for n in a.steps]
    slowest = rows[a.steps.index(max(a.steps))]["samples_per_s"]
    for r in rows:
        r["speedup"] = r["samples_per_s"] / slowest
    return rows


def measure(a, spec: str, model, encoder, cfg, batch: int, length: int, searched: bool) -> dict:
    """Time ``--batches`` batches of ``cfg`` sampling; the row of the table."""
    name, dev, prec = spec.split(":")
    device = next(model.parameters()).device
    seconds = sample(model, encoder, cfg, batch, a.batches, prec)
    n = batch * a.batches
    return {
        "run": spec,
        "model": name,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "precision": prec,
        "params_m": model.num_params() / 1e6,
        "length": length,
        "steps": cfg.steps,
        "method": cfg.method,
        "batch": batch,
        "batch_search": searched,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "tokens_per_s": n * length / seconds,
        "ms_per_forward": seconds / (a.batches * (cfg.steps + 1)) * 1e3,
        "peak_memory_gb": peak_memory_gb(device),
    }


def run_isolated(spec: str, argv: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", spec], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"run": spec, "error": err[:300]}]
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = (
        f"{'run':20} {'params M':>8} {'length':>6} {'steps':>5} {'batch':>6} {'samples/s':>10} {'speed-up':>8} "
        f"{'tokens/s':>10} {'ms/fwd':>8} {'peak GB':>8}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['run']:20} error: {r['error']}")
            continue
        batch = f"{r['batch']}{'*' if r['batch_search'] else ''}"
        out.append(
            f"{r['run']:20} {r['params_m']:8.1f} {r['length']:6d} {r['steps']:5d} {batch:>6} "
            f"{r['samples_per_s']:10.2f} {r['speedup']:7.2f}x "
            f"{r['tokens_per_s']:10.0f} {r['ms_per_forward']:8.1f} {r['peak_memory_gb']:8.2f}"
        )
    if any(r.get("batch_search") for r in rows):
        out.append("* largest batch that fits")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(run(a, a.worker)))
        return 0
    specs = a.runs.split(",")
    if any(":cuda:" in s for s in specs) and not torch.cuda.is_available():
        print("--runs asks for cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    rows = []
    for spec in specs:
        rows += run_isolated(spec, argv)
        for r in rows[-len(a.steps) :]:
            rate = r.get("error") or f"{r['steps']} steps {r['samples_per_s']:.2f} samples/s"
            print(f"  {spec}: {rate}", file=sys.stderr, flush=True)
    steps = ",".join(map(str, a.steps))
    print(
        f"unconditional sampling, {a.method.upper()} {steps} steps + decode, {a.batches} timed batches, "
        f"torch {torch.__version__}"
    )
    print(table(rows))
    if a.json:
        doc = json.dumps(
            {
                "setup": {"steps": a.steps, "method": a.method, "batches": a.batches, "torch": torch.__version__},
                "runs": rows,
            },
            indent=1,
        )
        if a.json == "-":
            print(doc)
        else:
            with open(a.json, "w") as f:
                f.write(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
