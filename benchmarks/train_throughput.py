"""Training-step throughput of the fast and the reference paths of the ELF model and objective.

Each path runs in a fresh process (so peak memory is its own) on random latents and ids of one
micro-batch: ``--warmup`` then ``--steps`` denoise steps and as many decode steps (forward +
backward), timed apart and combined as the expected step ``(1 − p)·denoise + p·decode`` with
``p = decoder_prob`` (0.2). The optimizer step (Muon + clipping + EMA; the reference path runs
Newton–Schulz in the plain official form, the fast paths take the Gram form for the unembedding
on CPU) is timed per path and, with ``--encoder``, the frozen encoder's forward once; both are
added for the full step.

    python benchmarks/train_throughput.py                                   # tiny, CPU
    python benchmarks/train_throughput.py --device cuda --model elf-b --length 1024 --batch 64
    python benchmarks/train_throughput.py --paths reference,fast --json out.json

MFU uses ``elflm.plan.step_flops_per_token`` (denoise: 4 forward-equivalents, decode: 3) and
``peak_flops`` (known GPUs only; bf16 or TF32 peak). Peak memory: CUDA ``max_memory_allocated``,
on CPU the process's peak RSS (``resource.getrusage``, includes the Python/torch baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from common import peak_memory_gb, sync

# path name -> settings; "fast" is the default training configuration in fp32
PATHS = {
    "reference": dict(sdpa=False, bf16=False, compile=False, reuse=False, fused_ce=False, ns_gram=False),
    "fast": dict(sdpa=True, bf16=False, compile=False, reuse=True, fused_ce=True, ns_gram=None),
    "fast/ref-attention": dict(sdpa=False, bf16=False, compile=False, reuse=True, fused_ce=True, ns_gram=None),
    "fast/official-passes": dict(sdpa=True, bf16=False, compile=False, reuse=False, fused_ce=True, ns_gram=None),
    "fast/full-ce": dict(sdpa=True, bf16=False, compile=False, reuse=True, fused_ce=False, ns_gram=None),
    "fast/plain-ns": dict(sdpa=True, bf16=False, compile=False, reuse=True, fused_ce=True, ns_gram=False),
    "fast+bf16": dict(sdpa=True, bf16=True, compile=False, reuse=True, fused_ce=True, ns_gram=None),
    "fast+compile": dict(sdpa=True, bf16=False, compile=True, reuse=True, fused_ce=True, ns_gram=None),
    "fast+bf16+compile": dict(sdpa=True, bf16=True, compile=True, reuse=True, fused_ce=True, ns_gram=None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", help="preset: tiny, elf-b, elf-m, elf-l")
    p.add_argument("--batch", type=int, default=None, help="rows per micro-batch (default: 8 on CPU, 64 on CUDA)")
    p.add_argument("--length", type=int, default=None, help="tokens per row (default: 64 for tiny, else 1024)")
    p.add_argument("--encoder-dim", type=int, default=512, help="C (T5-small: 512)")
    p.add_argument("--vocab", type=int, default=32128, help="V (T5-small: 32128)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per branch")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per branch (compilation happens here)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over all paths (interleaved); the fastest round of each path is kept",
    )
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {list(PATHS)}")
    p.add_argument("--encoder", default=None, help="T5 tokenizer folder: also time a random-weight T5 encoder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        help="write the results as JSON to a file, or alone to stdout (the table then goes to stderr)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch = a.batch or (64 if a.device == "cuda" else 8)
    a.length = a.length or (64 if a.model == "tiny" else 1024)
    unknown = set(a.paths.split(",")) - set(PATHS) - {"encoder"}
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}; expected some of {list(PATHS)}")
    return a


def model_config(a):
    from elflm.config import model_preset

    return model_preset(a.model, encoder_dim=a.encoder_dim, vocab_size=a.vocab, max_length=a.length)


def build_model(a, device, path):
    from elflm.model import ELF

    torch.manual_seed(0)
    model = ELF(model_config(a)).to(device).train().set_fast_attention(path["sdpa"])
    if path["compile"]:
        for block in model.blocks:
            block.compile()
    return model


def fake_batch(a, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, a.vocab, (a.batch, a.length), generator=g)
    ones = torch.ones(a.batch, a.length, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": ones,
        "cond_seq_mask": torch.zeros_like(ones),
        "encoder_attention_mask": ones,
    }
    return {k: v.to(device) for k, v in batch.items()}


def time_branch(a, device, model, path, decode: bool) -> tuple[float, float]:
    """Median seconds of one forward + backward of the branch, and peak memory (GB)."""
    from elflm.config import ObjectiveConfig
    from elflm.objective import draw, loss_from_latents

    cfg = ObjectiveConfig()
    batch = fake_batch(a, device)
    x0 = 0.2 * torch.randn(a.batch, a.length, a.encoder_dim, generator=torch.Generator().manual_seed(1)).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(a.warmup + a.steps):
        d = draw(cfg, a.batch, a.length, a.encoder_dim, generator=torch.Generator().manual_seed(100 + i))
        d.decode = decode
        d = type(d)(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(d).items()})
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=path["bf16"]):
            out = loss_from_latents(model, x0, batch, cfg, d, reuse_prediction=path["reuse"], fused_ce=path["fused_ce"])
        out.loss.backward()
        sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times), peak_memory_gb(device)


def time_optimizer(a, device, model, path) -> float:
    """Seconds of one Muon step (Newton–Schulz as ``path["ns_gram"]``) + clipping + EMA update
    of ``model`` on random gradients."""
    from elflm.optim import EMA, Muon, clip_grad_norm_

    opt, ema = Muon(model.parameters(), lr=1e-4, ns_gram=path["ns_gram"]), EMA(model, 0.9999)
    times = []
    for i in range(a.warmup + a.steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        sync(device)
        t0 = time.perf_counter()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_encoder(a, device) -> dict:
    from elflm.encoder import TextEncoder

    enc = TextEncoder.t5(tokenizer=a.encoder).to(device)
    batch = fake_batch(a, device)
    times = []
    for i in range(a.warmup + a.steps):
        sync(device)
        t0 = time.perf_counter()
        enc.encode(batch["input_ids"].clamp(max=enc.vocab_size - 1), batch["encoder_attention_mask"])
        sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return {"path": "encoder", "step_s": statistics.median(times), "peak_memory_gb": peak_memory_gb(device)}


def run_path(a, name: str) -> dict:
    """One path, in this process."""
    from elflm.plan import peak_flops, step_flops_per_token

    device = torch.device(a.device)
    if name == "encoder":
        return time_encoder(a, device)
    path = PATHS[name]
    model = build_model(a, device, path)
    t_denoise, mem_denoise = time_branch(a, device, model, path, decode=False)
    t_decode, mem_decode = time_branch(a, device, model, path, decode=True)
    t_opt = time_optimizer(a, device, model, path)
    from elflm.config import ObjectiveConfig

    p = ObjectiveConfig().decoder_prob
    step = (1 - p) * t_denoise + p * t_decode
    tokens = a.batch * a.length
    flops = step_flops_per_token(model.config, a.length, p) * tokens
    peak = peak_flops(device, "bf16" if path["bf16"] else "fp32")
    return {
        "path": name,
        **path,
        "denoise_s": t_denoise,
        "decode_s": t_decode,
        "step_s": step,
        "optimizer_s": t_opt,
        "tokens_per_s": tokens / step,
        "samples_per_s": a.batch / step,
        "tflops_per_s": flops / step / 1e12,
        "mfu": flops / step / peak if peak else None,
        "peak_memory_gb": max(mem_denoise, mem_decode),
    }


def run_isolated(a, name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"path": name, "error": err[:300]}
    return json.loads(lines[-1])


def table(a, rows: list[dict], extra: dict) -> str:
    head = (
        f"{'path':22} {'denoise ms':>10} {'decode ms':>10} {'step ms':>9} {'tok/s':>9} {'samples/s':>9} {'MFU':>6} "
        f"{'peak GB':>8} "
        f"{'opt ms':>7} {'+opt tok/s':>10}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['path']:22} error: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        full = f"{r['full_tokens_per_s']:.0f}" if "full_tokens_per_s" in r else "-"
        out.append(
            f"{r['path']:22} {r['denoise_s'] * 1e3:10.1f} {r['decode_s'] * 1e3:10.1f} {r['step_s'] * 1e3:9.1f} "
            f"{r['tokens_per_s']:9.0f} {r['samples_per_s']:9.1f} {mfu:>6} {r['peak_memory_gb']:8.2f} "
            f"{r['optimizer_s'] * 1e3:7.1f} {full:>10}"
        )
    for name, r in extra.items():
        if "error" in r:
            out.append(f"{name}: error: {r['error']}")
        else:
            out.append(f"encoder forward: {r['step_s'] * 1e3:.1f} ms/step")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(run_path(a, a.worker)))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    names = a.paths.split(",")
    extra_names = ["encoder"] if a.encoder else []
    extra = {n: run_isolated(a, n, argv) for n in extra_names}
    overhead = sum(r["step_s"] for r in extra.values() if "error" not in r)
    best: dict[str, dict] = {}
    for round_ in range(a.repeat):
        for name in names:
            if name in extra_names:
                continue
            r = run_isolated(a, name, argv)
            if name not in best or "error" in best[name] or ("error" not in r and r["step_s"] < best[name]["step_s"]):
                best[name] = r
            print(
                f"  round {round_ + 1}/{a.repeat} {name}: {r.get('error') or '%.1f ms' % (r['step_s'] * 1e3)}",
                file=sys.stderr,
                flush=True,
            )
    rows = list(best.values())
    for r in rows:
        if "error" not in r:
            r["full_step_s"] = r["step_s"] + r["optimizer_s"] + overhead
            r["full_tokens_per_s"] = a.batch * a.length / r["full_step_s"]
    by = {r["path"]: r for r in rows if "error" not in r}
    summary = {}
    if "reference" in by:
        ref = by["reference"]
        for name, r in by.items():
            summary[name] = {k: ref[f"{k}_s"] / r[f"{k}_s"] for k in ("denoise", "decode", "step", "full_step")}
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    setup = {
        "device": device_name,
        "model": a.model,
        "batch": a.batch,
        "length": a.length,
        "encoder_dim": a.encoder_dim,
        "vocab": a.vocab,
        "steps": a.steps,
        "warmup": a.warmup,
        "repeat": a.repeat,
        "torch": torch.__version__,
    }
    report = sys.stderr if a.json == "-" else sys.stdout  # JSON alone on stdout
    print(
        f"{a.model} on {device_name}: batch {a.batch} x {a.length} tokens, C={a.encoder_dim}, V={a.vocab}", file=report
    )
    print(table(a, rows, extra), file=report)
    if summary:
        print(
            "speed-up over reference: denoise, decode, model step, full step "
            f"(+ optimizer{' + encoder' if a.encoder else ''})",
            file=report,
        )
        for name, s in summary.items():
            print(f"  {name:22} " + "  ".join(f"{v:5.2f}x" for v in s.values()), file=report)
    if a.json:
        doc = json.dumps({"setup": setup, "paths": rows, **extra, "speedup_vs_reference": summary}, indent=1)
        if a.json == "-":
            print(doc)
        else:
            with open(a.json, "w") as f:
                f.write(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
