"""CPU speed of elflm side by side with the authors' two implementations (issue 17, item 5).

Three implementations, each in its own long-lived worker process (built and warmed up once, JAX
compilation included), timed on the same work per call:

* ``jax``: the authors' JAX code (github lillian039/ELF, ``main``): their pmapped ``train_step``
  (encoder, self-conditioning passes, loss, gradients, clipping + Muon, EMA) and their sampler
  (``_make_pmap_pair``: ``lax.scan`` over the SDE steps, the last step ODE, then the decode pass
  and argmax);
* ``torch``: their PyTorch port (branch ``pytorch_elf``): ``train_step`` (encoder, the shared
  no-grad passes, one forward with both heads, backward, clipping, Muon, EMA) and
  ``_generate_samples_single_batch`` + ``_dlm_decode_batch``;
* ``elflm``: this library as a user runs it by default (``Trainer.train_step`` of a config with
  ``train.precision: fp32``, no compile; ``elflm.generate`` with ``precision="fp32"``).

Per size: the denoise training step (``decoder_prob`` 0 in every implementation), the decode
training step (``decoder_prob`` 1), and sampling ``--batch`` rows with ``--steps`` SDE steps
(γ 1.5, logit-normal grid, self-conditioning-CFG scale 3) plus the decode pass. Every model has
T5-small's C = 512 and V = 32128, a random T5-small encoder (the same config in all three), the
official objective settings (σ 2, decoder σ 5, P_mean −1.5, self_cond_prob 0.5). Rounds are
interleaved (each round runs every implementation's calls in a rotated order); the table reports
medians over all rounds and the 1-minute load average seen at each round.

    python benchmarks/official_compare.py --jax-src /work/official-elf/src \\
        --torch-src /work/official-elf-torch/src --official-python /work/venv-official/bin/python

The official checkouts and their virtual environment are not part of elflm (see
docs/performance.md for how they were installed); ``--impls elflm`` runs elflm alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared"
IMPLS = ("jax", "torch", "elflm")
TASKS = ("denoise", "decode", "sample")
# name -> (depth, hidden, heads, bottleneck, seq length, batch)
SIZES = {
    "tiny": (2, 64, 4, 16, 128, 8),
    "small": (4, 256, 4, 128, 256, 8),
    "elf-b": (12, 768, 12, 128, 256, 4),
}
OBJECTIVE = dict(
    noise_scale=2.0, p_mean=-1.5, p_std=0.8, decoder_noise_scale=5.0, decoder_p_mean=0.8, decoder_p_std=0.8
)
SAMPLER = dict(gamma=1.5, w=3.0)


# ---------------------------------------------------------------------------- workers
class Worker:
    """A worker's build (``__init__``) and its tasks: ``call(task)`` runs one call, blocking until done."""

    def timed(self, task: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.call(task)
            out.append(time.perf_counter() - t0)
        return out


class JaxWorker(Worker):
    def __init__(self, a, size):
        sys.path.insert(0, a.jax_src)
        import copy
        from functools import partial

        import jax
        import jax.numpy as jnp
        from configs.config import Config, SamplingConfig
        from flax import jax_utils
        from modules.model import ELF
        from modules.t5_encoder import T5Encoder, T5EncoderConfig, init_t5_encoder
        from train_step import train_step
        from utils.generation_utils import _make_pmap_pair, _shard_noise, _shard_timesteps, mask_after_eos
        from utils.train_utils import TrainState, get_optimizer

        depth, hidden, heads, bottleneck, L, B = size
        self.jax, self.jnp, self.B, self.L = jax, jnp, B, L
        cfg = Config()
        for k, v in dict(
            max_length=L,
            latent_mean=0.0,
            latent_std=0.2,
            denoiser_p_mean=OBJECTIVE["p_mean"],
            denoiser_p_std=OBJECTIVE["p_std"],
            denoiser_noise_scale=OBJECTIVE["noise_scale"],
            decoder_noise_scale=OBJECTIVE["decoder_noise_scale"],
            self_cond_prob=0.5,
            label_drop_prob=0.0,
            pad_token="pad",
            optimizer="muon",
            grad_accum_steps=1,
        ).items():
            setattr(cfg, k, v)
        enc_cfg = T5EncoderConfig.from_pretrained("t5-small")
        encoder = T5Encoder(config=enc_cfg)
        rng = jax.random.PRNGKey(0)
        enc_params = init_t5_encoder(encoder, rng, max_seq_length=L)["params"]
        model = ELF(
            text_encoder_dim=512,
            max_length=L,
            depth=depth,
            hidden_size=hidden,
            num_heads=heads,
            bottleneck_dim=bottleneck,
            num_model_mode_tokens=4,
            vocab_size=32128,
        )
        params = model.init(
            rng, jnp.ones((1, L, 1024)), jnp.ones((1,)), deterministic=True, self_cond_cfg_scale=jnp.ones((1,))
        )["params"]
        tx = get_optimizer(cfg, lambda step: 1e-4)
        state = TrainState.create(
            apply_fn=model.apply, params=params, tx=tx, dropout_rng=rng, ema_params1=copy.deepcopy(params)
        )
        self.state = jax_utils.replicate(state)
        self.enc_params = jax_utils.replicate(enc_params)
        self.steps = {}
        for task, p in (("denoise", 0.0), ("decode", 1.0)):
            c = copy.copy(cfg)
            c.decoder_prob = p
            self.steps[task] = jax.pmap(
                partial(train_step, encoder_apply_fn=encoder.apply, config=c), axis_name="batch", donate_argnums=(0,)
            )
        ids = jax.random.randint(rng, (1, B, L), 3, 32128, dtype=jnp.int32)
        ones = jnp.ones((1, B, L), jnp.float32)
        self.batch = {
            "input_ids": ids,
            "encoder_attention_mask": jnp.ones((1, B, L, L), jnp.float32),
            "attention_mask": ones,
            "cond_seq_mask": jnp.zeros_like(ones),
            "label_drop_mask": jnp.zeros((1, B), bool),
        }
        self.cfg = cfg
        sc = SamplingConfig(
            sampling_method="sde",
            num_sampling_steps=[a.steps],
            self_cond_cfg_scales=[SAMPLER["w"]],
            time_schedule="logit_normal",
            sde_gamma=SAMPLER["gamma"],
        )
        self.p_generate, self.p_decode = _make_pmap_pair(model.apply, cfg, sc, 1, SAMPLER["w"])
        self.shard_noise, self.shard_times, self.mask_after_eos = _shard_noise, _shard_timesteps, mask_after_eos
        self.sample_steps, self.rng = a.steps, rng

    def call(self, task):
        jax = self.jax
        if task in self.steps:
            self.state, metrics = self.steps[task](self.state, self.enc_params, batch=self.batch)
            jax.block_until_ready((self.state, metrics))
            return
        self.rng, r = jax.random.split(self.rng)
        noise_rng, t_rng = jax.random.split(r)
        device_rngs = jax.random.split(noise_rng, 1)
        t = self.shard_times(t_rng, 1, self.sample_steps, "logit_normal", self.cfg)
        z = self.shard_noise(device_rngs, 1, self.B, self.L, 512, self.cfg.denoiser_noise_scale)
        params = self.state.ema_params1
        z = self.p_generate(model_params=params, rng=device_rngs, z=z, t_steps=t, cond_seq=None, cond_seq_mask=None)
        ids = self.p_decode(z=z, model_params=params, t_final_val=t[:, -1])
        jax.block_until_ready(self.mask_after_eos(ids.reshape(-1, self.L), 1, 0))


class TorchPortWorker(Worker):
    def __init__(self, a, size):
        sys.path.insert(0, a.torch_src)
        import torch
        from configs.config import Config, SamplingConfig
        from modules.model import ELF
        from modules.t5_encoder import T5Encoder, T5EncoderConfig
        from train_step import train_step
        from utils.generation_utils import _dlm_decode_batch, _generate_samples_single_batch, mask_after_eos
        from utils.muon_utils import muon_with_aux_adam
        from utils.sampling_utils import get_sampling_steps
        from utils.train_utils import TrainState

        torch.set_num_threads(a.threads)
        depth, hidden, heads, bottleneck, L, B = size
        self.torch, self.B, self.L = torch, B, L
        cfg = Config()
        for k, v in dict(
            max_length=L,
            latent_mean=0.0,
            latent_std=0.2,
            denoiser_p_mean=OBJECTIVE["p_mean"],
            denoiser_p_std=OBJECTIVE["p_std"],
            denoiser_noise_scale=OBJECTIVE["noise_scale"],
            decoder_noise_scale=OBJECTIVE["decoder_noise_scale"],
            self_cond_prob=0.5,
            label_drop_prob=0.0,
            pad_token="pad",
            optimizer="muon",
            grad_accum_steps=1,
        ).items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        t5 = str(SHARED / "assets" / "tokenizers" / "t5-small")
        self.encoder = T5Encoder(T5EncoderConfig.from_pretrained(t5), pretrained=False).eval()
        self.encoder.requires_grad_(False)
        model = ELF(
            text_encoder_dim=512,
            max_length=L,
            depth=depth,
            hidden_size=hidden,
            num_heads=heads,
            bottleneck_dim=bottleneck,
            num_model_mode_tokens=4,
            vocab_size=32128,
        )
        opt = muon_with_aux_adam(model, lr=1e-4)
        self.state = TrainState(
            model=model, optimizer=opt, ema_params1=TrainState.init_ema(model), dropout_generator=torch.Generator()
        )
        ones = torch.ones(B, L)
        self.batch = {
            "input_ids": torch.randint(3, 32128, (B, L)),
            "encoder_attention_mask": torch.ones(B, L, L),
            "attention_mask": ones,
            "cond_seq_mask": torch.zeros_like(ones),
            "label_drop_mask": torch.zeros(B, dtype=torch.bool),
        }
        self.cfg, self.train_step = cfg, train_step
        self.sc = SamplingConfig(
            sampling_method="sde",
            num_sampling_steps=[a.steps],
            self_cond_cfg_scales=[SAMPLER["w"]],
            time_schedule="logit_normal",
            sde_gamma=SAMPLER["gamma"],
        )
        self.generate, self.decode, self.mask_after_eos = (
            _generate_samples_single_batch,
            _dlm_decode_batch,
            mask_after_eos,
        )
        self.grid = get_sampling_steps
        self.sample_steps, self.gen = a.steps, torch.Generator().manual_seed(0)

    def call(self, task):
        torch, cfg = self.torch, self.cfg
        if task != "sample":
            cfg.decoder_prob = 0.0 if task == "denoise" else 1.0
            self.state, _ = self.train_step(self.state, self.encoder, self.batch, cfg)
            return
        model = self.state.model.eval()
        with torch.no_grad():
            z = torch.randn(self.B, self.L, 512, generator=self.gen) * cfg.denoiser_noise_scale
            t = self.grid(self.sample_steps, "logit_normal", cfg.denoiser_p_mean, cfg.denoiser_p_std)
            z = self.generate(model, self.gen, z, t, None, None, cfg, self.sc, 1, SAMPLER["w"])
            ids = self.decode(z, model, t[-1], cfg, SAMPLER["w"])
            self.mask_after_eos(ids, 1, 0)


class ElflmWorker(Worker):
    def __init__(self, a, size):
        sys.path.insert(0, str(HERE.parents[1] / "src"))
        from dataclasses import replace

        import torch

        from elflm.config import SampleConfig, from_dict
        from elflm.data import prepare
        from elflm.generate import generate
        from elflm.train import Trainer

        torch.set_num_threads(a.threads)
        depth, hidden, heads, bottleneck, L, B = size
        self.tmp = tempfile.TemporaryDirectory()
        tmp = Path(self.tmp.name)
        t5 = SHARED / "assets" / "tokenizers" / "t5-small"
        prepare(
            SHARED / "assets" / "text" / "gutenberg" / "val-00.txt.gz",
            tmp / "data",
            tokenizer=str(t5),
            max_length=L,
            workers=1,
            progress=False,
        )
        cfg = from_dict(
            {
                "model": {"hidden_size": hidden, "depth": depth, "num_heads": heads, "bottleneck_dim": bottleneck},
                "encoder": {"kind": "t5", "name_or_path": str(t5), "weights": "random"},
                "data": {"train_path": str(tmp / "data"), "max_length": L},
                "objective": dict(OBJECTIVE),
                "train": {
                    "global_batch_size": B,
                    "max_steps": 10**6,
                    "lr": 1e-4,
                    "warmup_steps": 1,
                    "log_every": 10**6,
                    "save_every": 0,
                    "output_dir": str(tmp / "run"),
                    "device": "cpu",
                },
            }
        )
        self.trainer = Trainer(cfg)
        self.objectives = {
            task: replace(cfg, objective=replace(cfg.objective, decoder_prob=p))
            for task, p in (("denoise", 0.0), ("decode", 1.0))
        }
        self.sample_cfg = SampleConfig(method="sde", steps=a.steps, **SAMPLER)
        self.model = self.trainer.ema_model().eval()  # what sampling uses (the weights do not change the time)
        self.generate, self.B, self.L, self.seed = generate, B, L, 0

    def call(self, task):
        tr = self.trainer
        if task != "sample":
            tr.cfg = self.objectives[task]
            tr.train_step()
            return
        self.seed += 1
        self.generate(self.model, tr.encoder, self.sample_cfg, self.B, seed=self.seed, batch_size=self.B, length=self.L)


WORKERS = {"jax": JaxWorker, "torch": TorchPortWorker, "elflm": ElflmWorker}


def serve(a) -> int:
    """Worker loop: build, warm up every task, then answer ``TASK N`` lines with JSON timings."""
    t0 = time.perf_counter()
    w = WORKERS[a.worker](a, SIZES[a.size])
    build = time.perf_counter() - t0
    warm = {task: sum(w.timed(task, a.warmup)) for task in a.tasks.split(",")}
    print(json.dumps({"ready": True, "build_s": build, "warmup_s": warm}), flush=True)
    for line in sys.stdin:
        task, n = line.split()
        print(json.dumps({"task": task, "times": w.timed(task, int(n))}), flush=True)
    return 0


# ---------------------------------------------------------------------------- orchestration
def load() -> float:
    return os.getloadavg()[0]


class Proc:
    def __init__(self, a, impl: str, size: str, argv: list[str]):
        python = a.official_python if impl in ("jax", "torch") else sys.executable
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        if impl == "jax":
            env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={a.threads}"
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [python, str(HERE), *argv, "--worker", impl, "--size", size]
        self.impl, self.p = (
            impl,
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env),
        )
        self.info = self.read()

    def read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.impl} worker exited with code {self.p.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, task: str, n: int) -> list[float]:
        self.p.stdin.write(f"{task} {n}\n")
        self.p.stdin.flush()
        return self.read()["times"]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def measure(a, argv: list[str]) -> dict:
    tasks = a.tasks.split(",")
    results = {}
    for size in a.sizes.split(","):
        procs = []
        for impl in a.impls.split(","):
            print(f"[{size}] building {impl} (load {load():.2f})", file=sys.stderr, flush=True)
            procs.append(Proc(a, impl, size, argv))
            print(f"[{size}] {impl}: {procs[-1].info}", file=sys.stderr, flush=True)
        times = {p.impl: {t: [] for t in tasks} for p in procs}
        loads = []
        for r in range(a.rounds):
            loads.append(load())
            order = procs[r % len(procs) :] + procs[: r % len(procs)]
            for task in tasks:
                for p in order:
                    times[p.impl][task] += p.run(task, a.calls)
            summary = {p.impl: {t: round(statistics.median(times[p.impl][t]), 4) for t in tasks} for p in procs}
            print(f"[{size}] round {r + 1}/{a.rounds} load {loads[-1]:.2f}: {summary}", file=sys.stderr, flush=True)
        for p in procs:
            p.close()
        results[size] = {
            "medians_s": {i: {t: statistics.median(v) for t, v in ts.items()} for i, ts in times.items()},
            "times_s": times,
            "load_1min": loads,
            "build": {p.impl: p.info for p in procs},
        }
    return results


def table(results: dict, tasks: list[str]) -> str:
    lines = [
        "| size | impl | " + " | ".join(f"{t} (s)" for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    ratio_lines = [
        "| size | " + " | ".join(f"{t}: speed-up" for t in tasks) + " | load (1 min) |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for size, r in results.items():
        m = r["medians_s"]
        for impl, ts in m.items():
            lines.append(f"| {size} | {impl} | " + " | ".join(f"{ts[t]:.3f}" for t in tasks) + " |")
        official = [i for i in m if i != "elflm"]
        if "elflm" in m and official:
            cells = []
            for t in tasks:
                best = min(official, key=lambda i: m[i][t])
                cells.append(f"{m[best][t] / m['elflm'][t]:.2f}× ({best})")
            loads = r["load_1min"]
            ratio_lines.append(f"| {size} | " + " | ".join(cells) + f" | {min(loads):.2f}–{max(loads):.2f} |")
    return "\n".join(lines) + "\n\nspeed-up of elflm (faster official time ÷ elflm time):\n\n" + "\n".join(ratio_lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jax-src", default="/work/official-elf/src", help="src/ of a checkout of lillian039/ELF main")
    p.add_argument("--torch-src", default="/work/official-elf-torch/src", help="src/ of the pytorch_elf branch")
    p.add_argument(
        "--official-python",
        default="/work/venv-official/bin/python",
        help="python of a venv with jax, flax, optax, orbax, torch, transformers<4.45, einops, muon-optimizer",
    )
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    p.add_argument("--steps", type=int, default=8, help="SDE sampler steps (the last one ODE, as in every impl)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per task after building (JAX compiles here)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=1, help="timed calls per task per implementation per round")
    p.add_argument("--json", default=None, help="write all timings to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, allowed in (("impls", IMPLS), ("sizes", SIZES), ("tasks", TASKS)):
        bad = set(getattr(a, key).split(",")) - set(allowed)
        if bad:
            p.error(f"--{key}: unknown {sorted(bad)}; expected some of {list(allowed)}")
    if a.worker:
        return serve(a)
    results = measure(a, argv)
    print(table(results, a.tasks.split(",")))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
