"""The training loop: one objective branch per step, Muon + clipping + warm-up, EMA, data
parallelism (DDP / FSDP2 under ``torchrun``), bf16 autocast, ``torch.compile``, logging and
checkpoints that resume the same run exactly.

Randomness is counter-based: the draws of micro-batch ``j`` of step ``s`` come from a generator
seeded with ``(seed, s, j)``, and the data order of an epoch from ``(seed, epoch)``. A step is
therefore a pure function of the weights, the optimizer state and ``s``, so resuming at ``s``
continues the same run, and K processes × 1 micro-batch equal 1 process × K micro-batches.

Per step the loop pays only for the step: batches come from a ``DataLoader`` (``data.num_workers``
workers, pinned memory, non-blocking copies; the order is the plan's, whatever the number of
workers), their masks are built on the device (the (B, L, L) encoder mask only for rows with a
condition), and the logged statistics stay on the device until ``log_every``, where they are
reduced over processes and read once.

Previews and evaluations (``train.preview_every``, ``train.eval_every``) sample with a copy of the
network holding the EMA weights, from their own per-row streams, with the global random state
saved and restored around them: a run trains bit-identically with and without them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import distributed, files, interrupts, objective, portable, tracking
from . import evaluate as ev
from .checkpoint import CheckpointError, TrainingCheckpoint
from .config import Config, ConfigError, config_changes, dump_config, format_changes, resume_changes
from .data import collate, collate_rows, device_batch, encoder_mask, training_dataset
from .encoder import build_encoder, normalize_latent
from .errors import TrainingError
from .flow import seeded
from .latents import LatentCache
from .model import ELF
from .optim import EMA, build_optimizer, clip_grad_norm_, lr_at
from .plan import peak_flops, step_flops_per_token

STATS = ("loss", "l2_loss", "ce_loss", "grad_norm")  # the logged statistics of a step, in this order


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


class MicroBatches(torch.utils.data.Sampler):
    """The ``DataLoader`` batch sampler of one rank: the dataset rows of its micro-batches
    ``j = rank·accum + m`` (m < ``accum``) of step ``start``, then of every later step, in training
    order (an endless stream; :meth:`Plan.indices`)."""

    def __init__(self, plan: Plan, n_rows: int, seed: int, rank: int, start: int):
        self.plan, self.n_rows, self.seed, self.rank, self.start = plan, n_rows, seed, rank, start

    def __iter__(self):
        for step in itertools.count(self.start):
            for m in range(self.plan.accum):
                yield self.plan.indices(self.n_rows, self.seed, step, self.rank * self.plan.accum + m).tolist()


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
        self.dist = distributed.setup(device or cfg.train.device, group=cfg.train.distributed == "fsdp")
        dev = self.dist.device
        self.encoder = build_encoder(cfg.encoder, device=dev)
        self.dataset = training_dataset(cfg, self.encoder, progress=self.dist.main)  # checked against cfg
        self.latents_estimated = cfg.encoder.latent_mean is None or cfg.encoder.latent_std is None
        if self.latents_estimated:
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
        self.latent_cache = None
        if cfg.train.cache_latents:
            shape = (self.plan.micro, self.dataset.max_length)
            self.latent_cache = LatentCache(
                self.encoder, self.dataset, cfg.train.cache_latents, shape, cfg.train.latent_cache_dir
            )
        self.bf16 = cfg.train.precision == "bf16"
        strategy = cfg.train.distributed
        self.shared_branch = cfg.train.branch == "per_step" or (cfg.train.branch == "auto" and strategy == "fsdp")
        if strategy == "fsdp" and not self.shared_branch:
            raise ValueError(
                "train.distributed=fsdp needs train.branch=per_step (or auto): FSDP ranks must run the same passes"
            )
        if dev.type == "cuda":  # float32 heads and encoder run on TF32 tensor cores
            torch.set_float32_matmul_precision("high")
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        if cfg.train.compile:  # per block, before sharding: FSDP's hooks stay outside the compiled code
            model.compile_blocks()
        self.model = distributed.wrap(model, self.dist, strategy, cfg.train.precision)
        self.net = distributed.unwrap(self.model)
        self.sharded = distributed.sharded(self.net)
        self.optimizer = build_optimizer(self.net, cfg.train)
        self.param_names = [n for n, p in self.net.named_parameters() if p.requires_grad]  # the optimizer's order
        self.ema = EMA(self.net, decay=cfg.train.ema_decay)
        self.step = 0
        self.out = Path(cfg.train.output_dir)
        self.tracker = None
        self.ema_net: ELF | None = None  # the EMA weights in a plain copy, for sampling
        self._batches, self._batches_step = None, None  # the loader's iterator, the step it is at
        self.window: list[dict] = []  # train_step results since the last log step (the log window)

    # ------------------------------------------------------------------ state
    def save(self) -> Path | None:
        """Write model, EMA, optimizer, step and config. Under FSDP every rank writes its own shards
        (collective, nothing gathered); otherwise the main rank writes full tensors."""
        if self.latent_cache is not None:  # every rank: its own rows
            self.latent_cache.save()
        state = {
            "step": self.step,
            "epoch": self.step // self.plan.steps_per_epoch,
            "samples_seen": self.step * self.plan.global_batch,
            "seed": self.cfg.train.seed,
            "world": self.dist.world,
            "plan": vars(self.plan),
            "model_config": vars(self.model_config),
            "data_sha256": data_fingerprint(self.dataset.meta),
            "log_window": self.window_state(),  # collective when the window has steps not yet reduced
        }
        keep = self.cfg.train.keep_last
        if self.sharded:
            ckpt = TrainingCheckpoint.write_sharded(
                self.out,
                self.step,
                tensors=self.sharded_state(),
                config=self.cfg,
                state={**state, "optimizer_param_groups": self.optimizer.state_dict()["param_groups"]},
                keep_last=keep,
                main=self.dist.main,
            )
            return ckpt.path if ckpt is not None else None
        if not self.dist.main:
            return None
        copy = lambda t: t.detach().cpu().clone()  # noqa: E731
        sd = self.optimizer.state_dict()
        optimizer = {
            "state": {
                k: {n: copy(v) if torch.is_tensor(v) else v for n, v in s.items()} for k, s in sd["state"].items()
            },
            "param_groups": sd["param_groups"],
        }
        ckpt = TrainingCheckpoint.write(
            self.out,
            self.step,
            raw={k: copy(v) for k, v in self.net.state_dict().items()},
            ema={k: copy(v) for k, v in self.ema.state_dict().items()},
            optimizer=optimizer,
            config=self.cfg,
            state=state,
            keep_last=keep,
        )
        return ckpt.path

    def sharded_state(self) -> dict:
        """The live training tensors as the flat dict of a sharded checkpoint: ``raw/<name>``,
        ``ema/<name>``, ``optimizer/<name>/<field>`` (DTensor shards under FSDP)."""
        out = {f"raw/{k}": v for k, v in self.net.state_dict().items()}
        out.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        sd = self.optimizer.state_dict()
        for i, fields in sd["state"].items():
            out.update({f"optimizer/{self.param_names[i]}/{f}": v for f, v in fields.items()})
        return out

    def resume_checkpoint(self) -> TrainingCheckpoint | None:
        """The checkpoint ``train.resume`` names (``auto``: ``train.output_dir``), chosen and
        verified on the main rank (:meth:`TrainingCheckpoint.resumable`: a run folder falls back to
        its newest valid checkpoint, setting damaged newer ones aside with a warning; a damaged
        checkpoint folder is an error). None when ``auto`` finds no checkpoint (a fresh start)."""
        resume = self.cfg.train.resume
        target = self.out if resume == "auto" else Path(resume)
        choice: tuple = ("none", None)
        if self.dist.main:
            try:
                ckpt = TrainingCheckpoint.resumable(target)
                if ckpt is None and resume != "auto":
                    raise FileNotFoundError(
                        f"train.resume={resume}: no complete training checkpoint there (a folder with "
                        f"{TrainingCheckpoint.STATE}, or a run folder with {TrainingCheckpoint.FOLDER}/step_*)"
                    )
                choice = ("ok", None if ckpt is None else str(ckpt.path))
            except (CheckpointError, OSError) as e:
                choice = ("error", e)
        kind, value = distributed.gather_objects(choice, self.dist)[0]
        if kind == "error":
            raise value
        return None if value is None else TrainingCheckpoint(value, verified=True)

    def load(self, path: str | Path | TrainingCheckpoint) -> None:
        """Restore a checkpoint folder written by :meth:`save` (or the run's latest), full or
        sharded, whatever the number of processes and the strategy that wrote it (collective under
        FSDP and for sharded checkpoints). Its files are verified against their SHA-256 as read."""
        ckpt = path if isinstance(path, TrainingCheckpoint) else TrainingCheckpoint.find(path)
        if ckpt is None:
            raise FileNotFoundError(
                f"no complete training checkpoint at {path} (a folder with "
                f"{TrainingCheckpoint.STATE}, or a run folder with {TrainingCheckpoint.FOLDER}/step_*)"
            )
        meta = ckpt.state()
        if not isinstance(meta, dict) or type(meta.get("step")) is not int or meta["step"] < 0:
            raise CheckpointError(
                f"{ckpt.path / ckpt.STATE}: expected a JSON object with an integer 'step'; the file is damaged"
            )
        saved = self.check_resume(ckpt, meta)
        same_optimizer = saved.train.optimizer == self.cfg.train.optimizer
        if not same_optimizer and self.dist.main:
            print(f"train.optimizer changed to {self.cfg.train.optimizer}: its state starts afresh", file=sys.stderr)
        if ckpt.is_sharded:
            self._load_sharded(ckpt, same_optimizer)
        else:
            self._load_full(ckpt, same_optimizer)
        self.step = int(meta["step"])
        self.window = self.restored_window(meta.get("log_window"), ckpt)

    def check_resume(self, ckpt: TrainingCheckpoint, meta: dict) -> Config:
        """Compare the checkpoint's saved config with this run's (before any weight is read) and
        return it. Changes to the model, encoder, data or objective are refused with the list of
        them; optimizer, schedule, batch, seed or precision changes need
        ``train.allow_config_change`` (``--allow-config-change``) and are printed; the rest
        (devices, logging, checkpoints, evaluation, the sampler defaults, the run's length under a
        constant schedule) may change. The encoder counts as unchanged when its files are the
        same (also as the copy inside the checkpoint), the data when it is the same prepared
        dataset (``meta.json``), wherever it lies; estimated latent statistics are taken from the
        checkpoint."""
        saved = ckpt.config()
        if self.latents_estimated:  # the run's own estimate, whatever this process computed
            self.encoder.latent_mean, self.encoder.latent_std = saved.encoder.latent_mean, saved.encoder.latent_std
            latents = dict(latent_mean=saved.encoder.latent_mean, latent_std=saved.encoder.latent_std)
            self.cfg = replace(self.cfg, encoder=replace(self.cfg.encoder, **latents))
        same_data = meta.get("data_sha256") == data_fingerprint(self.dataset.meta)
        preparation = ("data.train_path", "data.text_field", "data.source_field", "data.target_field")
        changes = [
            c
            for c in config_changes(saved, self.cfg)
            if not (c[0].startswith("encoder.") and portable.same_files(c[1], c[2]))
            and not (same_data and c[0] in preparation)
        ]
        if "data_sha256" in meta and not same_data and not any(c[0] == "data.train_path" for c in changes):
            changes.append(("data.train_path", f"{saved.data.train_path} as trained", "the same path, other data"))
        refused, optimisation, _ = resume_changes(saved, self.cfg, changes)
        where = f"--resume {ckpt.path}"
        if refused:
            raise ConfigError(
                f"{where}: this run's config changes what the checkpoint was trained as: {format_changes(refused)}. "
                f"A resumed run keeps the model, encoder, data and objective of {ckpt.path / ckpt.CONFIG}: resume "
                "with those values, or start a new run in another train.output_dir",
                refused[0][0],
            )
        if optimisation and not self.cfg.train.allow_config_change:
            raise ConfigError(
                f"{where}: this run's config changes the optimisation: {format_changes(optimisation)}. To train on "
                "with the new values pass --allow-config-change (train.allow_config_change=true); otherwise resume "
                f"with the values of {ckpt.path / ckpt.CONFIG}",
                optimisation[0][0],
            )
        if optimisation and self.dist.main:
            print(f"{where} with changed settings: {format_changes(optimisation, limit=100)}", file=sys.stderr)
        return saved

    def restored_window(self, saved, ckpt: TrainingCheckpoint) -> list[dict]:
        """The log window a checkpoint saved (:meth:`window_state`): its steps, rank-averaged, so that
        the next logged record averages the same steps as an uninterrupted run. Empty when the
        checkpoint has none or ``train.log_every`` changed."""
        if not isinstance(saved, dict) or saved.get("log_every") != self.cfg.train.log_every:
            return []
        steps = saved.get("steps")
        ok = isinstance(steps, list) and all(
            isinstance(e, dict)
            and (e.get("skipped") is True or (isinstance(e.get("stats"), list) and len(e["stats"]) == len(STATS)))
            for e in steps
        )
        if not ok:
            raise CheckpointError(f"{ckpt.path / ckpt.STATE}: a malformed log_window; the file is damaged")
        dev = self.dist.device
        return [
            {"skipped": True, "reduced": True}
            if e.get("skipped")
            else {"row": torch.tensor(e["stats"], dtype=torch.float64, device=dev), "reduced": True}
            for e in steps
        ]

    def window_state(self) -> dict:
        """The log window for a checkpoint: the steps since the last log step, each ``stats`` (the
        :data:`STATS` averaged over processes) or ``skipped`` (collective: reduces the window)."""
        self.reduce_window(self.window)
        steps = [{"skipped": True} if w.get("skipped") else {"stats": w["row"].tolist()} for w in self.window]
        return {"log_every": self.cfg.train.log_every, "steps": steps}

    def _load_full(self, ckpt: TrainingCheckpoint, with_optimizer: bool = True) -> None:
        raw_sd, ema_sd = ckpt.raw(), ckpt.ema()
        distributed.load_full_state_dict(self.net, raw_sd)
        params = dict(self.net.named_parameters())
        self.ema.load_state_dict({k: _shard_like(v, params[k]) for k, v in ema_sd.items()})
        if not with_optimizer:
            return
        optim_sd = ckpt.optimizer()
        for k, s in optim_sd["state"].items():
            ref = params[self.param_names[int(k)]] if isinstance(k, (int, str)) and str(k).isdigit() else None
            for n, v in s.items():
                if ref is not None and torch.is_tensor(v) and v.shape == ref.shape:
                    s[n] = _shard_like(v, ref)
        self.load_optimizer(optim_sd)

    def load_optimizer(self, state_dict: dict) -> None:
        """The optimizer's state (moments, step counts) from a checkpoint; its hyper-parameters stay
        this run's (they differ only when the run resumes with ``--allow-config-change``)."""
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state_dict)
        for group, own in zip(self.optimizer.param_groups, hyper):
            group.update(own)

    def _load_sharded(self, ckpt: TrainingCheckpoint, with_optimizer: bool = True) -> None:
        """Fill the live weights and EMA in place and the optimizer from a sharded checkpoint; the
        optimizer's tensors are made like their parameter (sharded under FSDP), scalars on the CPU."""
        entries = ckpt.sharded_entries()
        raw = dict(self.net.state_dict())
        have = {k[len("raw/") :] for k in entries if k.startswith("raw/")}
        if have != raw.keys():
            diff = sorted(have ^ raw.keys())
            raise CheckpointError(f"{ckpt.path}: the checkpoint's weights do not fit this model: {diff[:5]}")
        targets = {f"raw/{k}": v for k, v in raw.items()}
        targets.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        params = dict(self.net.named_parameters())
        fields: dict[int, dict[str, str]] = {}
        for key, m in entries.items():
            if key.startswith("optimizer/") and with_optimizer:  # made like their parameter, scalars on the CPU
                name, field = key[len("optimizer/") :].rsplit("/", 1)
                ref = params[name]
                size, dtype = tuple(m.size), m.properties.dtype
                targets[key] = _zeros_like(ref, dtype) if size == tuple(ref.shape) else torch.zeros(size, dtype=dtype)
                fields.setdefault(self.param_names.index(name), {})[field] = key
        ckpt.load_sharded(targets)
        if with_optimizer:
            state = {i: {f: targets[k] for f, k in fs.items()} for i, fs in fields.items()}
            self.load_optimizer({"state": state, "param_groups": ckpt.state()["optimizer_param_groups"]})

    # ------------------------------------------------------------------ loop
    def loader(self, start: int) -> DataLoader:
        """The batches of this rank from step ``start`` on, in training order (:class:`MicroBatches`):
        ``data.num_workers`` workers collate :func:`~elflm.data.collate_rows` (ids and lengths
        only), pinned on CUDA; the same batches whatever the number of workers. The workers end
        with this process, whatever ends it (:func:`elflm.interrupts.worker_setup`)."""
        workers = self.cfg.data.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=MicroBatches(self.plan, len(self.dataset), self.cfg.train.seed, self.dist.rank, start),
            collate_fn=collate_rows,
            num_workers=workers,
            pin_memory=self.dist.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            worker_init_fn=functools.partial(interrupts.worker_setup, os.getpid()) if workers else None,
        )

    def flops_per_token(self, length: int) -> float:
        """Expected model FLOPs per token of one step on rows of ``length`` tokens (for the MFU)."""
        return step_flops_per_token(self.model_config, length, self.cfg.objective.decoder_prob)

    def micro_loss(self, batch: dict, j: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of micro-batch ``j`` (0 ≤ j < world·accum) of the current step and its logged
        parts (``loss``, ``l2_loss``, ``ce_loss``: 0-dim tensors or floats); every draw comes from
        ``(seed, step, j)``."""
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
        x0 = self.latents(batch, j, draws.label_drop)
        out = objective.loss_from_latents(self.model, x0, batch, cfg.objective, draws)
        return out.loss, objective.logged_losses(out, cfg.objective)

    def latents(self, batch: dict, j: int, label_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Clean latents (B, L, C) of micro-batch ``j`` of the current step (``label_drop`` (B,)
        bool: rows encoded without their condition): encoded by the frozen encoder, or read from
        the latent cache (``train.cache_latents``; bit-identical)."""
        if self.latent_cache is None:
            return objective.encode_batch(self.encoder, batch, label_drop)
        rows = self.plan.indices(len(self.dataset), self.cfg.train.seed, self.step, j)
        h = self.latent_cache.hidden(batch, rows, label_drop)
        return normalize_latent(h, self.encoder.latent_mean, self.encoder.latent_std)

    def train_step(self) -> dict:
        """One optimizer step over ``accum`` micro-batches (:meth:`micro_loss` each). Returns this
        rank's statistics: ``loss``, ``l2_loss``, ``ce_loss`` (means over the micro-batches) and
        ``grad_norm`` as 0-dim float64 tensors on the device, ``lr`` a float, ``skipped`` a bool.

        One host read per step checks that the gradient norm is finite: a non-finite loss makes it so,
        and it is the same on every process (computed from the all-reduced gradients), so all
        processes decide alike without another collective. A step where it is not changes nothing
        (weights, optimizer, EMA) and, with ``train.on_nonfinite: stop``, raises
        :class:`~elflm.errors.TrainingError` naming the step, the loss parts and the last
        checkpoint; with ``skip`` it counts as skipped."""
        cfg, plan, d = self.cfg, self.plan, self.dist
        self.model.train()
        step = self.step
        if self._batches is None or self._batches_step != step:  # first step, or the step changed (load)
            self._batches = iter(self.loader(step))
        self._batches_step = None  # mid-step until every micro-batch is taken
        parts = []
        for m in range(plan.accum):
            j = d.rank * plan.accum + m
            batch = device_batch(next(self._batches), d.device, non_blocking=True)
            torch.manual_seed(int(seeded(cfg.train.seed, step, j, 1).initial_seed()))  # dropout
            sync = m == plan.accum - 1 or not hasattr(self.model, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx, torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss, logged = self.micro_loss(batch, j)
                (loss / plan.accum).backward()
            parts.append(
                torch.stack([torch.as_tensor(logged[k], dtype=torch.float64, device=d.device) for k in STATS[:3]])
            )
        self._batches_step = step + 1
        grad_norm = clip_grad_norm_(self.net.parameters(), cfg.train.clip)
        means = torch.stack(parts).mean(0)
        grad_norm = torch.as_tensor(grad_norm).to(d.device, torch.float64)
        stats = {**dict(zip(STATS[:3], means.unbind())), "grad_norm": grad_norm}
        lr = lr_at(
            step,
            peak=cfg.train.peak_lr,
            warmup=plan.warmup_steps,
            total=plan.total_steps,
            schedule=cfg.train.lr_schedule,
            min_lr=cfg.train.min_lr,
        )
        if not math.isfinite(grad_norm.item()):
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.train.on_nonfinite == "stop":
                raise TrainingError(self.nonfinite_message(stats))
            self.step += 1
            return {**stats, "lr": lr, "skipped": True}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net)
        self.step += 1
        return {**stats, "lr": lr, "skipped": False}

    def nonfinite_message(self, stats: dict) -> str:
        """What :meth:`train_step` says when it stops: the step, the loss parts, the last checkpoint."""
        last = TrainingCheckpoint.latest(self.out)
        resume = f"the last good checkpoint is {last.path}" if last else "no checkpoint was written yet"
        parts = ", ".join(f"{k} {float(v):.4g}" for k, v in stats.items())
        who = f" on process {self.dist.rank}" if self.dist.world > 1 else ""
        return (
            f"step {self.step + 1}: the loss or the gradient norm is not finite ({parts}{who}); training stopped "
            f"before this update ({resume}). Lower train.lr or train.clip, or check the data, and resume with "
            "--resume; or set train.on_nonfinite=skip to skip such steps"
        )

    def reduce_window(self, window: list[dict]) -> None:
        """Average the statistics of the steps of ``window`` (:meth:`train_step` results) not yet
        averaged over processes, in place: each becomes ``{"row": (4,) float64 tensor of
        STATS, "reduced": True}``; one all-reduce for all of them (none when there are none)."""
        fresh = [i for i, w in enumerate(window) if not w.get("reduced") and not w.get("skipped")]
        if fresh:
            rows = torch.stack([torch.stack([window[i][k] for k in STATS]) for i in fresh])
            losses = distributed.all_reduce_mean(rows[:, :3], self.dist)
            rows = torch.cat([losses, rows[:, 3:]], 1)
            for i, row in zip(fresh, rows.unbind()):
                window[i] = {"row": row, "reduced": True}
        for i, w in enumerate(window):
            if w.get("skipped"):
                window[i] = {"skipped": True, "reduced": True}

    def reduce_stats(self, window: list[dict]) -> dict[str, float | None]:
        """The means over the steps of ``window`` (:meth:`train_step` results, or steps a checkpoint
        kept) of :data:`STATS`, skipped steps left out (None when all were): every step's losses
        averaged over processes first (:meth:`reduce_window`), one host read (at ``log_every``)."""
        self.reduce_window(window)
        rows = [w["row"] for w in window if not w.get("skipped")]
        if not rows:
            return dict.fromkeys(STATS)
        return dict(zip(STATS, torch.stack(rows).mean(0).tolist()))

    def fit(self, progress: bool = True) -> list[dict]:
        """Train until ``plan.total_steps``; returns the logged records. The main rank holds the
        run folder's lock meanwhile (:func:`elflm.files.locked`): a second run writing the same
        ``train.output_dir`` is refused."""
        with files.locked(self.out) if self.dist.main else contextlib.nullcontext():
            return self._fit(progress)

    def _fit(self, progress: bool) -> list[dict]:
        cfg, plan, d = self.cfg, self.plan, self.dist
        if cfg.train.resume:
            ckpt = self.resume_checkpoint()
            if ckpt is not None:
                self.load(ckpt)
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out / "config.yaml")
            self.tracker = tracking.open_trackers(self.cfg, self.out, start=self.step)  # cut back to this step
        L = self.dataset.max_length
        tokens_per_step = plan.global_batch * L
        flops = self.flops_per_token(L) * tokens_per_step
        peak = peak_flops(d.device, cfg.train.precision)
        bar = None
        if progress and d.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        # a log window holds the steps since the last multiple of log_every (a resumed run starts
        # with those its checkpoint kept), so a resumed run logs the same records as an uninterrupted one
        records, timed, t0 = [], 0, time.perf_counter()
        try:
            while self.step < plan.total_steps:
                stats = self.train_step()
                self.window.append(stats)
                timed += 1
                if bar is not None:
                    bar.update(1)
                last = self.step == plan.total_steps
                if self.step % cfg.train.log_every == 0 or last:
                    skipped = sum(bool(w.get("skipped")) for w in self.window)
                    rec = {"step": self.step, **self.reduce_stats(self.window), "lr": stats["lr"]}
                    if cfg.train.on_nonfinite == "skip":
                        rec["skipped"] = skipped
                    dt = time.perf_counter() - t0  # after the host read: the window's work is done
                    rec["tokens_per_s"] = tokens_per_step * timed / dt
                    rec["mfu"] = flops * timed / dt / (peak * d.world) if peak else None
                    if d.device.type == "cuda":
                        rec["max_memory_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                    records.append(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    if d.main:
                        self.tracker.log(rec)
                    self.window, timed, t0 = [], 0, time.perf_counter()
                t_sampling = time.perf_counter()
                if cfg.train.preview_every and self.step % cfg.train.preview_every == 0:
                    self.preview(bar)  # every rank: under FSDP the forwards are collective
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    rec = self.evaluation.evaluate(self.ema_model(), self.step)
                    records.append(rec)
                    if d.main:
                        self.tracker.log(rec)
                t0 += time.perf_counter() - t_sampling  # tokens/s counts training time only
                if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or last:
                    self.save()
        finally:
            self._batches = None  # stops the loader's workers
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


def data_fingerprint(meta: dict) -> str:
    """The identity of a prepared dataset: the sha256 of its ``meta.json`` (shards, counts,
    tokenizer, sources and options), wherever the folder lies."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _shard_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) on ``ref``'s device, split like ``ref`` when that is a DTensor."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements)
    return value.to(ref.device)


def _zeros_like(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeros shaped, placed and (for a DTensor) sharded like ``ref``, without a full-size tensor."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import zeros

        return zeros(ref.shape, dtype=dtype, device_mesh=ref.device_mesh, placements=ref.placements)
    return torch.zeros(ref.shape, dtype=dtype, device=ref.device)


def train(cfg: Config, device: str | None = None, progress: bool = True) -> Trainer:
    """Build a :class:`Trainer` from ``cfg`` and run it to the end; returns the trainer."""
    trainer = Trainer(cfg, device)
    try:
        trainer.fit(progress=progress)
    finally:
        distributed.teardown()
    return trainer
