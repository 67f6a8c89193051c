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

A checkpoint is written into a temporary folder and renamed, so a run killed mid-save keeps the
previous one; the last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import portable
from .config import Config, dump_config, load_config

_STEP = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
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
        root = Path(run_dir) / cls.FOLDER
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:07d}"
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(raw, str(tmp / cls.RAW))
        save_file(ema, str(tmp / cls.EMA))
        torch.save(optimizer, tmp / cls.OPTIMIZER)
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
        except Exception as e:  # missing, truncated or corrupted files raise many types
            raise CheckpointError(f"cannot read training checkpoint {self.path}: {name}: {e}") from e

    def state(self) -> dict:
        """``trainer_state.json``: ``step``, ``epoch``, ``samples_seen``, ``seed``, ``world``,
        ``plan``, ``model_config``."""
        return self._read(self.STATE, lambda f: json.loads(f.read_text()))

    def raw(self) -> dict[str, torch.Tensor]:
        """The trained weights."""
        name = self.RAW if (self.path / self.RAW).is_file() else self.LEGACY_RAW
        return self._read(name, lambda f: load_file(str(f)))

    def ema(self) -> dict[str, torch.Tensor]:
        """The EMA weights."""
        return self._read(self.EMA, lambda f: load_file(str(f)))

    def optimizer(self) -> dict:
        """The optimizer state (``state`` per parameter index, ``param_groups``), on the CPU."""
        return self._read(self.OPTIMIZER, lambda f: torch.load(f, map_location="cpu", weights_only=True))

    def config(self) -> Config:
        """The run's config, its encoder paths resolved inside the checkpoint."""
        cfg = self._read(self.CONFIG, load_config)
        return replace(cfg, encoder=portable.resolve_encoder(cfg.encoder, self.path))


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
