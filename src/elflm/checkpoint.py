"""The training checkpoint: the folder ``<run>/checkpoints/step_NNNNNNN/`` that the trainer writes
and that resuming, ``ELF.from_pretrained`` and ``elflm convert`` read, through one class,
:class:`TrainingCheckpoint`, which names every file:

* ``raw.safetensors`` – the trained weights (checkpoints of earlier versions: ``model.safetensors``);
* ``ema.safetensors`` – their EMA, the weights to sample with;
* ``optimizer.pt`` – the optimizer state, tensors and plain containers only (read back with
  ``torch.load(weights_only=True)``);
* ``config.yaml`` – the run's :class:`~elflm.config.Config`;
* ``trainer_state.json`` – step, epoch, samples seen, seed, world size, batch plan, model config;
* ``encoder/`` – the local files the encoder settings name (weights, tokenizer), copied in so that
  the checkpoint samples from anywhere (:mod:`elflm.portable`); Hub ids are kept as they are.

A checkpoint of an FSDP run is sharded instead: ``sharded/`` is a ``torch.distributed.checkpoint``
folder in which every rank wrote its own shards of the weights (``raw/<name>``), EMA (``ema/<name>``)
and optimizer state (``optimizer/<name>/<field>``), without gathering them, beside ``config.yaml``
and ``trainer_state.json`` (which then also holds the optimizer's ``optimizer_param_groups``;
tensors only in the shards, so reading them unpickles nothing). It resumes on any number of processes (the
shards are re-split on load) and reads back as full tensors through the same methods.

A checkpoint is written into a temporary folder and renamed, so a run killed mid-save keeps the
previous one; the last ``keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import portable
from .config import Config, dump_config, load_config
from .errors import ElflmError

_STEP = re.compile(r"step_(\d+)")


class CheckpointError(ElflmError, ValueError):
    """A checkpoint file or folder is missing, unreadable, of an unknown layout or does not fit
    the model; the message names the path and the problem."""


class TrainingCheckpoint:
    """One saved step of a training run, at ``path``."""

    FOLDER = "checkpoints"  # in the run folder
    RAW = "raw.safetensors"
    LEGACY_RAW = "model.safetensors"  # the raw weights, in checkpoints of earlier versions
    EMA = "ema.safetensors"
    OPTIMIZER = "optimizer.pt"
    CONFIG = "config.yaml"
    STATE = "trainer_state.json"
    SHARDED = "sharded"  # the torch.distributed.checkpoint folder of an FSDP run

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"TrainingCheckpoint({str(self.path)!r})"

    # ------------------------------------------------------------------ the run folder

    @classmethod
    def all(cls, run_dir: str | Path) -> list[TrainingCheckpoint]:
        """The complete checkpoints of the run folder ``run_dir``, oldest first."""
        root = Path(run_dir) / cls.FOLDER
        if not root.is_dir():
            return []
        steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name))]
        return [cls(p) for _, p in sorted(steps) if (p / cls.STATE).is_file()]

    @classmethod
    def latest(cls, run_dir: str | Path) -> TrainingCheckpoint | None:
        """The newest complete checkpoint of ``run_dir``, or None."""
        done = cls.all(run_dir)
        return done[-1] if done else None

    @classmethod
    def find(cls, path: str | Path) -> TrainingCheckpoint | None:
        """The checkpoint ``path`` names: a checkpoint folder, or the newest one of a run folder
        or of its ``checkpoints/`` folder; None when there is none."""
        path = Path(path)
        if (path / cls.STATE).is_file():
            return cls(path)
        return cls.latest(path.parent if path.name == cls.FOLDER else path)

    @classmethod
    def write(
        cls,
        run_dir: str | Path,
        step: int,
        *,
        raw: dict[str, torch.Tensor],
        ema: dict[str, torch.Tensor],
        optimizer: dict,
        config: Config,
        state: dict,
        keep_last: int,
    ) -> TrainingCheckpoint:
        """Write ``run_dir/checkpoints/step_{step}`` (into a temporary folder, then renamed) and
        delete all but the last ``keep_last`` checkpoints (0: keep all). The local encoder files
        of ``config`` are copied in and recorded relative to the checkpoint."""
        tmp, final = cls._staging(run_dir, step)
        save_file(raw, str(tmp / cls.RAW))
        save_file(ema, str(tmp / cls.EMA))
        torch.save(optimizer, tmp / cls.OPTIMIZER)
        return cls._publish(run_dir, tmp, final, config, state, keep_last)

    @classmethod
    def write_sharded(
        cls, run_dir: str | Path, step: int, *, tensors: dict, config: Config, state: dict, keep_last: int, main: bool
    ) -> TrainingCheckpoint | None:
        """Collective over the process group (when there is one): every rank writes its own shards of
        ``tensors`` (flat ``{key: tensor or DTensor}``; see the module docstring for the keys) into
        ``run_dir/checkpoints/step_{step}/sharded``; the ``main`` rank then writes the config and
        state, renames the folder into place and prunes as :meth:`write`. Returns the checkpoint on
        the main rank, None on the others."""
        tmp, final = cls._staging(run_dir, step) if main else (None, None)
        if dist.is_initialized():
            shared = [tmp]
            dist.broadcast_object_list(shared, src=0)  # also the barrier: the folder exists
            tmp = shared[0]
        with _single_process_quiet():
            dcp.save(tensors, checkpoint_id=tmp / cls.SHARDED, no_dist=not dist.is_initialized())
        if not main:
            return None
        return cls._publish(run_dir, tmp, final, config, state, keep_last)

    @classmethod
    def _staging(cls, run_dir: str | Path, step: int) -> tuple[Path, Path]:
        root = Path(run_dir) / cls.FOLDER
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:07d}"
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp, final

    @classmethod
    def _publish(
        cls, run_dir: str | Path, tmp: Path, final: Path, config: Config, state: dict, keep_last: int
    ) -> TrainingCheckpoint:
        dump_config(replace(config, encoder=portable.bundle_encoder(config.encoder, tmp)), tmp / cls.CONFIG)
        _write_json(tmp / cls.STATE, state)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in cls.all(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old.path, ignore_errors=True)
        return cls(final)

    # ------------------------------------------------------------------ reading

    def _read(self, name: str, read: Callable[[Path], object]):
        try:
            return read(self.path / name)
        except (Exception, CheckpointException) as e:  # missing, truncated or corrupted files raise many types
            raise CheckpointError(f"cannot read training checkpoint {self.path}: {name}: {e}") from e

    def state(self) -> dict:
        """``trainer_state.json``: ``step``, ``epoch``, ``samples_seen``, ``seed``, ``world``,
        ``plan``, ``model_config`` (sharded checkpoints: also ``optimizer_param_groups``)."""
        return self._read(self.STATE, lambda f: json.loads(f.read_text()))

    @property
    def is_sharded(self) -> bool:
        """Whether this is the sharded checkpoint of an FSDP run (``sharded/``)."""
        return (self.path / self.SHARDED).is_dir()

    def raw(self) -> dict[str, torch.Tensor]:
        """The trained weights (full CPU tensors, also from a sharded checkpoint)."""
        if self.is_sharded:
            return self._gathered("raw/")
        name = self.RAW if (self.path / self.RAW).is_file() else self.LEGACY_RAW
        return self._read(name, lambda f: load_file(str(f)))

    def ema(self) -> dict[str, torch.Tensor]:
        """The EMA weights (full CPU tensors, also from a sharded checkpoint)."""
        if self.is_sharded:
            return self._gathered("ema/")
        return self._read(self.EMA, lambda f: load_file(str(f)))

    def optimizer(self) -> dict:
        """The optimizer state on the CPU: ``state`` per parameter index and ``param_groups``; from a
        sharded checkpoint ``state`` is keyed by parameter name (full tensors)."""
        if self.is_sharded:
            state: dict[str, dict] = {}
            for key, value in self._gathered("optimizer/").items():
                name, field = key.rsplit("/", 1)
                state.setdefault(name, {})[field] = value
            return {"state": state, "param_groups": self.state()["optimizer_param_groups"]}
        return self._read(self.OPTIMIZER, lambda f: torch.load(f, map_location="cpu", weights_only=True))

    def sharded_entries(self) -> dict[str, TensorStorageMetadata]:
        """The tensors of a sharded checkpoint: key → ``TensorStorageMetadata`` (global ``size``,
        ``properties.dtype``)."""
        return self._read(self.SHARDED, lambda f: dcp.FileSystemReader(f).read_metadata().state_dict_metadata)

    def load_sharded(self, targets: dict, collective: bool = True) -> None:
        """Fill ``targets`` (``{key: tensor or DTensor}``, a subset of :meth:`sharded_entries`) in
        place from a sharded checkpoint, re-splitting the shards to the targets' layout (any number
        of processes). With
        ``collective`` and a process group, every rank must call (each reads its own part)."""
        no_dist = not (collective and dist.is_initialized())
        with _single_process_quiet():
            self._read(self.SHARDED, lambda f: dcp.load(targets, checkpoint_id=f, no_dist=no_dist))

    def _gathered(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` of a sharded checkpoint as full CPU tensors (read on this
        process alone), keyed without the prefix."""
        full = {
            k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in self.sharded_entries().items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
        }
        self.load_sharded(full, collective=False)
        return {k[len(prefix) :]: v for k, v in full.items()}

    def config(self) -> Config:
        """The run's config, its encoder paths resolved inside the checkpoint."""
        cfg = self._read(self.CONFIG, load_config)
        return replace(cfg, encoder=portable.resolve_encoder(cfg.encoder, self.path))


@contextlib.contextmanager
def _single_process_quiet():
    """Silence torch.distributed.checkpoint's warning that it runs in one process (intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
