"""The GPU validation suite (``benchmarks/gpu_suite.sh``): on one H100 / H200, in under 8 minutes,

1. ELF-B training steps (bf16 autocast, blocks compiled, Muon + clipping + EMA, the frozen
   T5-small encoder's forward included) of the denoise and the decode branch at micro-batch 32
   and at the largest micro-batch that fits (``elflm.plan``'s suggestion for 1 GPU, stepped down
   on out-of-memory): tokens/s, peak memory of each branch against the planner's estimate, MFU,
   and the expected step (80% denoise, 20% decode);
2. the wall time of 1000 unconditional 1024-token samples with 32 SDE steps and the final decode
   (``elflm.sampling.Sampler``, bf16), eager and compiled (CUDA graphs), compilation timed apart.

Random weights and ids (throughput and memory do not depend on them); a random T5-small encoder
(``transformers.T5Config()`` is t5-small), so nothing is downloaded. Results go to
``OUT/gpu_suite.json`` (rewritten after every part, so a run cut short keeps what it measured)
and ``OUT/gpu_suite.md``. Parts that would start after ``--budget`` seconds are skipped and
recorded as skipped. ``--smoke``: tiny sizes on the CPU, training blocks not compiled (the compiled
sampler still is), to test the code paths in about a minute.

    bash benchmarks/gpu_suite.sh                       # OUT=benchmarks/results
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

TARGETS = {
    "train_tokens_per_s": 400_000,  # ELF-B, one H100 (the official JAX code: 85k)
    "decode_batch_64_within_gib": 80,
    "sample_1000x1024_32_sde_s": 15.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests the code paths)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds after which no new part starts")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per branch (default 5; smoke 1)")
    p.add_argument("--sample-batch", type=int, default=None, help="samples per sampler call (default 200; smoke 4)")
    return p.parse_args(argv)


class Setup:
    """The sizes of a run: ELF-B on CUDA, or the tiny smoke sizes on the CPU."""

    def __init__(self, a):
        from transformers import T5Config

        from elflm.config import SampleConfig, TrainConfig, model_preset

        self.smoke = a.smoke
        if a.smoke:
            self.device = torch.device("cpu")
            self.encoder_config = T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
            self.length, self.batch, self.memory = 32, 4, 48 * 2**20
            self.model = model_preset("tiny", encoder_dim=32, vocab_size=512, max_length=32)
            self.num_samples, self.sample_steps = 8, 4
        else:
            if not torch.cuda.is_available():
                raise SystemExit("gpu_suite: no CUDA device (use --smoke to run the code paths on the CPU)")
            self.device = torch.device("cuda")
            self.encoder_config = T5Config()  # t5-small: C = 512, V = 32128
            self.length, self.batch = 1024, 32
            self.memory = torch.cuda.get_device_properties(self.device).total_memory
            self.model = model_preset("elf-b", encoder_dim=512, vocab_size=32128, max_length=1024)
            self.num_samples, self.sample_steps = 1000, 32
        self.steps = a.steps or (1 if a.smoke else 5)
        self.warmup = 1 if a.smoke else 3
        self.sample_batch = a.sample_batch or (4 if a.smoke else 200)
        self.train = TrainConfig(precision="bf16", compile=not a.smoke)  # (CPU compilation would take minutes)
        self.sample = SampleConfig(method="sde", steps=self.sample_steps, gamma=1.5)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- training


class TrainBench:
    """One ELF training state (model with compiled blocks, Muon, EMA, frozen encoder) stepped
    exactly as :meth:`elflm.train.Trainer.train_step` steps it, on random full-length rows."""

    def __init__(self, s: Setup):
        from transformers import T5EncoderModel

        from elflm.config import Config, DataConfig, EncoderConfig
        from elflm.encoder import TextEncoder
        from elflm.model import ELF
        from elflm.optim import EMA, build_optimizer

        self.s = s
        torch.manual_seed(0)
        if s.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.encoder = TextEncoder(T5EncoderModel(s.encoder_config)).to(s.device)
        self.model = ELF(s.model).to(s.device)
        if s.train.compile:
            self.model.compile_blocks()
        self.optimizer = build_optimizer(self.model, s.train)
        self.ema = EMA(self.model, s.train.ema_decay)
        self.config = Config(
            model=replace(s.model),
            encoder=EncoderConfig(),
            data=DataConfig(max_length=s.length),
            train=s.train,
        )
        self.steps_done = 0

    def step(self, batch: int, decode: bool) -> None:
        from elflm import objective
        from elflm.data import device_batch
        from elflm.flow import seeded
        from elflm.optim import clip_grad_norm_

        s, cfg = self.s, self.config
        g = torch.Generator().manual_seed(self.steps_done)
        host = {
            "input_ids": torch.randint(0, s.model.vocab_size, (batch, s.length), generator=g),
            "lengths": torch.tensor([0, s.length]).repeat(batch, 1),
        }
        b = device_batch(host, s.device, non_blocking=True, conditional=False)
        g = seeded(0, self.steps_done, device=s.device)
        d = objective.draw(cfg.objective, batch, s.length, s.model.encoder_dim, generator=g, device=s.device)
        d.decode = decode
        self.model.train()
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            loss = objective.training_loss(self.model, self.encoder, b, cfg.objective, d).loss
            loss.backward()
        clip_grad_norm_(self.model.parameters(), cfg.train.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.steps_done += 1

    def measure(self, batch: int, decode: bool) -> dict:
        """Seconds per step (median of the timed steps after warm-up, compilation included in the
        warm-up), tokens/s, peak memory of the branch."""
        s = self.s
        reset_peak(s.device)
        t0 = time.perf_counter()
        for _ in range(s.warmup):
            self.step(batch, decode)
        sync(s.device)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(s.steps):
            t0 = time.perf_counter()
            self.step(batch, decode)
            sync(s.device)
            times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        return {
            "batch": batch,
            "branch": "decode" if decode else "denoise",
            "step_s": step_s,
            "warmup_s": warm,
            "tokens_per_s": batch * s.length / step_s,
            "peak_memory_gib": peak_gib(s.device),
        }


def planned(s: Setup, bench: TrainBench, batch: int, suggest: bool) -> tuple[dict, int | None]:
    """The planner's bytes per branch for one GPU of the device's memory (bf16, activation
    checkpointing off) at ``batch``, and with ``suggest`` its largest micro-batch."""
    from elflm.plan import plan

    r = plan(bench.config, bench.encoder, gpus=1, gpu="H100", gpu_memory=s.memory, micro_batch=batch, suggest=suggest)
    return r.memory["none"]["ac_off"], r.largest_micro_batch["none"]["ac_off"] if suggest else None


def train_part(s: Setup, results: dict, write) -> None:
    from elflm.plan import flops_per_token, gpu_peak_flops

    bench = TrainBench(s)
    peak = gpu_peak_flops(s.device_name(), "bf16") if s.device.type == "cuda" else None
    per_token = {  # as elflm.plan.step_flops_per_token: 3.5 forwards for denoise, 3 for decode
        False: 3.5 * flops_per_token(bench.model.config, s.length, False),
        True: 3 * flops_per_token(bench.model.config, s.length, True),
    }
    plan_first, largest = planned(s, bench, s.batch, suggest=True)
    results["plan"] = {"largest_micro_batch": largest}
    write()
    rows = results.setdefault("train", [])
    batch, tries = s.batch, 0
    while batch:
        plan_b = plan_first if batch == s.batch else planned(s, bench, batch, suggest=False)[0]
        done = []
        for decode in (False, True):
            try:
                r = bench.measure(batch, decode)
            except torch.cuda.OutOfMemoryError:
                bench.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                r = {"batch": batch, "branch": "decode" if decode else "denoise", "error": "out of memory"}
            r["planned_gib"] = plan_b["decode" if decode else "denoise"] / 2**30
            if "step_s" in r:
                r["mfu"] = per_token[decode] * r["tokens_per_s"] / peak if peak else None
                done.append(r)
            rows.append(r)
            write()
        if len(done) == 2:
            step = 0.8 * done[0]["step_s"] + 0.2 * done[1]["step_s"]
            mix = {
                "batch": batch,
                "branch": "expected (80/20)",
                "step_s": step,
                "tokens_per_s": batch * s.length / step,
            }
            mix["mfu"] = (0.8 * per_token[False] + 0.2 * per_token[True]) * mix["tokens_per_s"] / peak if peak else None
            rows.append(mix)
            write()
        if batch == s.batch:  # then the largest that fits: the planner's, 10% smaller after an out-of-memory
            batch = largest if largest and largest > s.batch else 0
        elif len(done) < 2 and tries < 3:
            batch, tries = int(batch * 0.9), tries + 1
        else:
            batch = 0
    del bench
    reset_peak(s.device)


# ----------------------------------------------------------------------------- sampling


def sample_part(s: Setup, compiled: bool, results: dict, write) -> None:
    """Wall time of ``num_samples`` samples in batches of ``sample_batch`` (a first batch warms
    up, compiling when ``compiled``; it is timed apart)."""
    from elflm.model import ELF
    from elflm.sampling import Sampler

    torch.manual_seed(0)
    model = ELF(s.model).to(s.device).eval()
    sampler = Sampler(model, s.sample, precision="bf16", compiled=compiled)
    B = min(s.sample_batch, s.num_samples)

    def run(first: int, n: int) -> None:
        with torch.no_grad():
            state = sampler.start(rows=range(first, first + n), length=s.length, seed=0)
            while not state.done:
                state = sampler.step(state)
            sampler.decode(state.z).argmax(-1).cpu()

    reset_peak(s.device)
    t0 = time.perf_counter()
    run(0, B)  # warm-up (and compilation)
    sync(s.device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for first in range(0, s.num_samples, B):
        run(first, min(B, s.num_samples - first))
    sync(s.device)
    wall = time.perf_counter() - t0
    results.setdefault("sampling", []).append(
        {
            "mode": "compiled" if compiled else "eager",
            "samples": s.num_samples,
            "length": s.length,
            "steps": s.sample_steps,
            "method": "sde",
            "batch": B,
            "precision": "bf16",
            "wall_s": wall,
            "warmup_s": warm,
            "samples_per_s": s.num_samples / wall,
            "peak_memory_gib": peak_gib(s.device),
        }
    )
    write()


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    st = results["setup"]
    out = [
        f"# GPU suite: {st['device']} ({st['date']})",
        "",
        f"torch {st['torch']}, model {st['model']}, {st['length']} tokens per row; "
        f"largest micro-batch by the planner: {results.get('plan', {}).get('largest_micro_batch', '-')}",
        "",
        f"| training (bf16{' + compile' if st['compile'] else ''}) | batch | step ms | tokens/s | MFU | peak GiB | "
        "planned GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.get("train", []):
        if "error" in r:
            out.append(f"| {r['branch']} | {r['batch']} | {r['error']} | | | | {f(r.get('planned_gib'), '.2f')} |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        out.append(
            f"| {r['branch']} | {r['batch']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
            f"{f(r.get('peak_memory_gib'), '.2f')} | {f(r.get('planned_gib'), '.2f')} |"
        )
    out += [
        "",
        "| sampling (bf16) | samples × tokens | SDE steps | batch | wall s | warm-up s | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.get("sampling", []):
        out.append(
            f"| {r['mode']} | {r['samples']} × {r['length']} | {r['steps']} | {r['batch']} | {r['wall_s']:.2f} | "
            f"{r['warmup_s']:.1f} | {r['samples_per_s']:.1f} |"
        )
    if results.get("skipped"):
        out += ["", "skipped (time budget): " + ", ".join(results["skipped"])]
    out += ["", f"targets: {json.dumps(TARGETS)}; total {results.get('elapsed_s', 0):.0f} s"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    start = time.perf_counter()
    s = Setup(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "setup": {
            "device": s.device_name(),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "model": "tiny" if s.smoke else "elf-b",
            "length": s.length,
            "memory_gib": s.memory / 2**30,
            "smoke": s.smoke,
            "compile": s.train.compile,
        },
        "targets": TARGETS,
        "skipped": [],
    }

    def write() -> None:
        results["elapsed_s"] = time.perf_counter() - start
        (out / "gpu_suite.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "gpu_suite.md").write_text(markdown(results))

    parts = [
        ("training", lambda: train_part(s, results, write)),
        ("sampling eager", lambda: sample_part(s, False, results, write)),
        ("sampling compiled", lambda: sample_part(s, True, results, write)),
    ]
    for name, run in parts:
        if time.perf_counter() - start > a.budget:
            results["skipped"].append(name)
            continue
        print(f"gpu_suite: {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        run()
    write()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
