"""The training loop: one objective branch per step, Muon + clipping + warm-up, EMA, data
parallelism (DDP / FSDP2 under ``torchrun``), bf16 autocast, ``torch.compile``, logging and
checkpoints that resume the same run exactly.

Randomness is counter-based: the draws of micro-batch ``j`` of step ``s`` come from a generator
seeded with ``(seed, s, j)``, and the data order of an epoch from ``(seed, epoch)``. A step is
therefore a pure function of the weights, the optimizer state and ``s``, so resuming at ``s``
continues the same run, and K processes × 1 micro-batch equal 1 process × K micro-batches.

Previews and evaluations (``train.preview_every``, ``train.eval_every``) sample with a copy of the
network holding the EMA weights, from their own per-row streams, with the global random state
saved and restored around them: a run trains bit-identically with and without them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import distributed, objective, tracking
from . import evaluate as ev
from .checkpoint import TrainingCheckpoint
from .config import Config, dump_config
from .data import collate, encoder_mask, training_dataset
from .encoder import build_encoder
from .flow import seeded
from .model import ELF
from .optim import EMA, build_optimizer, clip_grad_norm_, lr_at


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of ``n`` rows that epoch ``epoch`` visits (the same on every rank)."""
    return torch.randperm(n, generator=seeded(seed, epoch))


@dataclass
class Plan:
    """How a global batch splits: ``world`` processes × ``accum`` micro-batches of ``micro`` rows."""

    global_batch: int
    micro: int
    accum: int
    world: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def indices(self, n: int, seed: int, step: int, j: int) -> torch.Tensor:
        """Dataset rows of micro-batch ``j`` (0 ≤ j < world·accum) of ``step``: a slice of the
        step's global batch in the epoch's seeded permutation; disjoint across j."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + j * self.micro
        return epoch_order(n, seed, epoch)[start : start + self.micro]


def make_plan(cfg: Config, n_rows: int, world: int) -> Plan:
    """Resolve batch sizes and schedule lengths, with errors naming the config keys."""
    t = cfg.train
    G = t.global_batch_size
    micro, accum = t.micro_batch(world)
    if n_rows < G:
        raise ValueError(f"the training data has {n_rows} rows, fewer than train.global_batch_size={G}")
    spe = n_rows // G
    total = t.max_steps if t.max_steps else math.ceil(t.epochs * spe)
    warm = t.warmup_steps if t.warmup_steps is not None else round((t.warmup_epochs or 0) * spe)
    return Plan(G, micro, accum, world, spe, total, warm)


def flops_per_token(m, length: int, decode: bool) -> float:
    """Forward FLOPs per text token of the ELF network (matmuls + attention), control tokens
    counted in the sequence."""
    H, C, D = m.hidden_size, m.encoder_dim, m.depth
    hidden = int(int(H * m.mlp_ratio) * 2 / 3)
    n = length + m.num_time_tokens + m.num_self_cond_cfg_tokens + m.num_mode_tokens
    per_block = 2 * (3 * H * H + H * H + 3 * H * hidden) + 4 * n * H
    io = 2 * (2 * C * C + C * m.bottleneck_dim + m.bottleneck_dim * H + H * C)
    head = 2 * (H * C + C * m.vocab_size) if decode else 0
    return (D * per_block + io) * n / length + head


def step_flops_per_token(m, length: int, decoder_prob: float) -> float:
    """Expected training FLOPs per token of one step: the denoise branch runs a no-grad forward
    on the self-conditioned half of the rows and one forward + backward (3.5 forwards), the decode
    branch forward + backward (3)."""
    return (1 - decoder_prob) * 3.5 * flops_per_token(m, length, False) + decoder_prob * 3 * flops_per_token(
        m, length, True
    )


PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 495.0},
    "H200": {"bf16": 989.0, "fp32": 495.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU (TF32 for fp32), or None (CPU / unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision] * 1e12
    return None


@torch.no_grad()
def estimate_latent_stats(
    encoder, dataset, device, rows: int = 256, batch: int = 32, seed: int = 0
) -> tuple[float, float]:
    """Scalar mean and std of the encoder's hidden states over the valid tokens of up to ``rows``
    training rows (a seeded random subset): the latent normalisation when the config leaves it open."""
    pick = torch.randperm(len(dataset), generator=seeded(seed, 2**31))[:rows]
    total, sq, count = 0.0, 0.0, 0
    for i in range(0, len(pick), batch):
        b = collate([dataset[int(j)] for j in pick[i : i + batch]])
        h = encoder.hidden(b["input_ids"].to(device), encoder_mask(b).to(device)).double()
        valid = b["attention_mask"].to(device).bool()
        total += h[valid].sum().item()
        sq += h[valid].pow(2).sum().item()
        count += int(valid.sum()) * h.shape[-1]
    mean = total / count
    return mean, math.sqrt(max(sq / count - mean * mean, 1e-12))


class Trainer:
    """Builds everything from a :class:`Config` and runs :meth:`fit`."""

    def __init__(self, cfg: Config, device: str | None = None):
        self.cfg = cfg
        self.dist = distributed.setup(device or cfg.train.device)
        dev = self.dist.device
        self.encoder = build_encoder(cfg.encoder, device=dev)
        self.dataset = training_dataset(cfg, self.encoder, progress=self.dist.main)  # checked against cfg
        if cfg.encoder.latent_mean is None or cfg.encoder.latent_std is None:
            mean, std = estimate_latent_stats(self.encoder, self.dataset, dev, seed=cfg.train.seed)
            mean = mean if cfg.encoder.latent_mean is None else cfg.encoder.latent_mean
            std = std if cfg.encoder.latent_std is None else cfg.encoder.latent_std
            self.encoder.latent_mean, self.encoder.latent_std = mean, std
            cfg = self.cfg = replace(cfg, encoder=replace(cfg.encoder, latent_mean=mean, latent_std=std))
        self.evaluation = ev.TrainingEvaluation(cfg, self.dataset, self.encoder, self.dist)  # checked up front
        torch.manual_seed(cfg.train.seed)
        self.model_config = cfg.resolved_model(self.encoder.dim, self.encoder.vocab_size)
        if self.dataset.max_length > self.model_config.max_length:
            raise ValueError(
                f"data rows have {self.dataset.max_length} tokens "
                f"but model.max_length is {self.model_config.max_length}"
            )
        model = ELF(self.model_config).to(dev)
        self.plan = make_plan(cfg, len(self.dataset), self.dist.world)
        self.bf16 = cfg.train.precision == "bf16"
        strategy = cfg.train.distributed
        self.shared_branch = cfg.train.branch == "per_step" or (cfg.train.branch == "auto" and strategy == "fsdp")
        if strategy == "fsdp" and not self.shared_branch:
            raise ValueError(
                "train.distributed=fsdp needs train.branch=per_step (or auto): FSDP ranks must run the same passes"
            )
        if dev.type == "cuda":  # float32 heads and encoder run on TF32 tensor cores
            torch.set_float32_matmul_precision("high")
        self.model = distributed.wrap(model, self.dist, cfg.train.distributed)
        self.net = distributed.unwrap(self.model)
        if cfg.train.compile:
            for block in self.net.blocks:  # in place: parameter names stay the same
                block.compile()
        self.optimizer = build_optimizer(self.net, cfg.train)
        self.ema = EMA(self.net, decay=cfg.train.ema_decay)
        self.step = 0
        self.out = Path(cfg.train.output_dir)
        self.tracker = None
        self.ema_net: ELF | None = None  # the EMA weights in a plain copy, for sampling

    # ------------------------------------------------------------------ state
    def save(self) -> Path | None:
        """Write model, EMA, optimizer, step and config; collective under FSDP."""
        raw = distributed.full_state_dict(self.net)
        ema = {k: distributed.full_tensor(v).detach().cpu().clone() for k, v in self.ema.state_dict().items()}
        optimizer = self._full_optimizer_state()
        if not self.dist.main:
            return None
        state = {
            "step": self.step,
            "epoch": self.step // self.plan.steps_per_epoch,
            "samples_seen": self.step * self.plan.global_batch,
            "seed": self.cfg.train.seed,
            "world": self.dist.world,
            "plan": vars(self.plan),
            "model_config": vars(self.model_config),
        }
        ckpt = TrainingCheckpoint.write(
            self.out,
            self.step,
            raw=raw,
            ema=ema,
            optimizer=optimizer,
            config=self.cfg,
            state=state,
            keep_last=self.cfg.train.keep_last,
        )
        return ckpt.path

    def _full_optimizer_state(self) -> dict:
        sd = self.optimizer.state_dict()
        state = {
            k: {n: distributed.full_tensor(v).cpu() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in sd["state"].items()
        }
        return {"state": state, "param_groups": sd["param_groups"]}

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint folder written by :meth:`save` (or the run's latest)."""
        ckpt = TrainingCheckpoint.find(path)
        if ckpt is None:
            raise FileNotFoundError(
                f"no complete training checkpoint at {path} (a folder with "
                f"{TrainingCheckpoint.STATE}, or a run folder with {TrainingCheckpoint.FOLDER}/step_*)"
            )
        raw_sd, ema_sd, optim_sd, meta = ckpt.raw(), ckpt.ema(), ckpt.optimizer(), ckpt.state()
        distributed.load_full_state_dict(self.net, raw_sd)
        self.ema.load_state_dict({k: self._like_param(k, v) for k, v in ema_sd.items()})
        params = dict(self.net.named_parameters())
        order = [n for n, _ in self.net.named_parameters()]
        for k, s in optim_sd["state"].items():
            ref = params[order[int(k)]] if isinstance(k, (int, str)) and str(k).isdigit() else None
            for n, v in s.items():
                if ref is not None and torch.is_tensor(v) and v.shape == ref.shape:
                    s[n] = self._shard_like(v, ref)
        self.optimizer.load_state_dict(optim_sd)
        self.step = int(meta["step"])

    def _like_param(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return self._shard_like(value, dict(self.net.named_parameters())[name])

    @staticmethod
    def _shard_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if hasattr(ref, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements)
        return value.to(ref.device)

    # ------------------------------------------------------------------ loop
    def batch(self, rows: torch.Tensor) -> dict:
        return {
            k: v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in collate([self.dataset[int(i)] for i in rows]).items()
        }

    def micro_loss(self, batch: dict, j: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of micro-batch ``j`` (0 ≤ j < world·accum) of the current step and its logged
        parts (``loss``, ``l2_loss``, ``ce_loss``); every draw comes from ``(seed, step, j)``."""
        cfg, d = self.cfg, self.dist
        B, L = batch["input_ids"].shape
        draws = objective.draw(
            cfg.objective,
            B,
            L,
            self.model_config.encoder_dim,
            generator=seeded(cfg.train.seed, self.step, j, device=d.device),
            device=d.device,
        )
        if self.shared_branch:
            draws.decode = bool(
                torch.rand((), generator=seeded(cfg.train.seed, self.step)) < cfg.objective.decoder_prob
            )
        out = objective.training_loss(self.model, self.encoder, batch, cfg.objective, draws)
        return out.loss, objective.logged_losses(out, cfg.objective)

    def train_step(self) -> dict:
        """One optimizer step over ``accum`` micro-batches (:meth:`micro_loss` each); returns logged metrics."""
        cfg, plan, d = self.cfg, self.plan, self.dist
        self.model.train()
        losses, parts = [], {"l2_loss": [], "ce_loss": []}
        for m in range(plan.accum):
            j = d.rank * plan.accum + m
            batch = self.batch(plan.indices(len(self.dataset), cfg.train.seed, self.step, j))
            torch.manual_seed(int(seeded(cfg.train.seed, self.step, j, 1).initial_seed()))  # dropout
            sync = m == plan.accum - 1 or not hasattr(self.model, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx, torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss, logged = self.micro_loss(batch, j)
                (loss / plan.accum).backward()
            losses.append(logged["loss"])
            for k in parts:
                parts[k].append(logged[k])
        grad_norm = clip_grad_norm_(self.net.parameters(), cfg.train.clip)
        lr = lr_at(
            self.step,
            peak=cfg.train.peak_lr,
            warmup=plan.warmup_steps,
            total=plan.total_steps,
            schedule=cfg.train.lr_schedule,
            min_lr=cfg.train.min_lr,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net)
        self.step += 1
        stats = torch.tensor(
            [np.mean(losses), np.mean(parts["l2_loss"]), np.mean(parts["ce_loss"])], dtype=torch.float64
        )
        stats = distributed.all_reduce_mean(stats.to(d.device), d).cpu()
        return {
            "loss": stats[0].item(),
            "l2_loss": stats[1].item(),
            "ce_loss": stats[2].item(),
            "grad_norm": float(grad_norm),
            "lr": lr,
        }

    def fit(self, progress: bool = True) -> list[dict]:
        """Train until ``plan.total_steps``; returns the logged records."""
        cfg, plan, d = self.cfg, self.plan, self.dist
        if cfg.train.resume:
            target = cfg.train.resume if cfg.train.resume != "auto" else self.out
            if cfg.train.resume != "auto" or TrainingCheckpoint.latest(self.out) is not None:
                self.load(target)
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out / "config.yaml")
            self.tracker = tracking.open_trackers(self.cfg, self.out)
        L = self.dataset.max_length
        tokens_per_step = plan.global_batch * L
        flops = step_flops_per_token(self.model_config, L, cfg.objective.decoder_prob) * tokens_per_step
        peak = peak_flops(d.device, cfg.train.precision)
        bar = None
        if progress and d.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        records, window, t0 = [], [], time.perf_counter()
        while self.step < plan.total_steps:
            stats = self.train_step()
            window.append(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            last = self.step == plan.total_steps
            if self.step % cfg.train.log_every == 0 or last:
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                dt = time.perf_counter() - t0
                rec = {
                    "step": self.step,
                    **{k: float(np.mean([w[k] for w in window])) for k in ("loss", "l2_loss", "ce_loss", "grad_norm")},
                    "lr": stats["lr"],
                }
                rec["tokens_per_s"] = tokens_per_step * len(window) / dt
                rec["mfu"] = flops * len(window) / dt / (peak * d.world) if peak else None
                if d.device.type == "cuda":
                    rec["max_memory_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                records.append(rec)
                if d.main:
                    self.tracker.log(rec)
                window, t0 = [], time.perf_counter()
            t_sampling = time.perf_counter()
            if cfg.train.preview_every and self.step % cfg.train.preview_every == 0:
                self.preview(bar)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                rec = self.evaluation.evaluate(self.ema_model(), self.step)
                records.append(rec)
                if d.main:
                    self.tracker.log(rec)
            t0 += time.perf_counter() - t_sampling  # tokens/s counts training time only
            if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or last:
                self.save()
        if bar is not None:
            bar.close()
        if self.tracker is not None:
            self.tracker.close()
        return records

    def ema_model(self) -> ELF:
        """The network with the EMA weights, in eval mode: a plain (unwrapped, unsharded) copy kept
        for sampling, refreshed from the averages on every call (gathered from the shards under
        FSDP: collective). The training model is not touched."""
        state = {k: distributed.full_tensor(v) for k, v in self.ema.state_dict().items()}
        if self.ema_net is None:
            with ev.kept_random_state(self.dist.device):
                self.ema_net = ELF(self.model_config).to(self.dist.device).eval().requires_grad_(False)
        self.ema_net.load_state_dict(state)
        return self.ema_net

    def preview(self, bar=None) -> list[str]:
        """Print a few samples of the EMA weights (:meth:`TrainingEvaluation.preview`; collective)."""
        lines = self.evaluation.preview(self.ema_model(), self.step)
        if self.dist.main:
            for line in lines:
                (bar.write if bar is not None else print)(line)
            if self.tracker is not None:
                self.tracker.text("preview", "\n\n".join(lines), self.step)
        return lines


def train(cfg: Config, device: str | None = None, progress: bool = True) -> Trainer:
    """Build a :class:`Trainer` from ``cfg`` and run it to the end; returns the trainer."""
    trainer = Trainer(cfg, device)
    try:
        trainer.fit(progress=progress)
    finally:
        distributed.teardown()
    return trainer
