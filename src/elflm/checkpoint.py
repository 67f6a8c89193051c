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

A checkpoint is written into a temporary folder, its files flushed to disk, and renamed into
place, so a run killed mid-save keeps the previous one; the last ``keep_last`` are kept.
``sha256.json`` records the size and SHA-256 of every other file of the checkpoint: reading a file
verifies it first (:meth:`TrainingCheckpoint.verify`), and resuming a run picks the newest
checkpoint that verifies (:meth:`TrainingCheckpoint.resumable`), setting damaged newer ones aside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
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

from . import files, portable
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
    MANIFEST = "sha256.json"  # size and SHA-256 of every other file
    DAMAGED = "damaged-"  # prefix of a damaged checkpoint set aside by resuming

    def __init__(self, path: str | Path, verified: bool = False):
        """``verified``: the files were checked already (e.g. by the main rank): reads skip it."""
        self.path = Path(path)
        self._verified: set[str] = {""} if verified else set()

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
    def start_over(cls, run_dir: str | Path, overwrite: bool) -> None:
        """Make ``run_dir`` ready for a run from step 0: when it holds checkpoints of an earlier run
        they need ``overwrite`` (else :class:`~elflm.files.OutputExistsError` naming the newest and
        how to go on), and are then removed (``checkpoints/`` renamed away in one step first)."""
        root = Path(run_dir) / cls.FOLDER
        files.clean_strays(root)  # what a kill during an earlier removal left
        if not root.is_dir() or not any(root.iterdir()):
            return
        if not overwrite:
            last = cls.latest(run_dir)
            newest = f" (the newest: step {last.path.name.removeprefix('step_').lstrip('0') or 0})" if last else ""
            raise files.OutputExistsError(
                f"train.output_dir {run_dir} holds the checkpoints of an earlier run{newest}: continue it with "
                "--resume, or pass --overwrite to start over (its checkpoints are removed), or choose another folder"
            )
        gone = files.temporary_path(root)
        os.rename(root, gone)
        shutil.rmtree(gone, ignore_errors=True)

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
        need = tensor_bytes(raw) + tensor_bytes(ema) + tensor_bytes(optimizer)
        tmp, final = cls._staging(run_dir, step, need)
        try:
            with files.resource_errors(final, need, tmp):
                save_file(raw, str(tmp / cls.RAW))
                save_file(ema, str(tmp / cls.EMA))
                torch.save(optimizer, tmp / cls.OPTIMIZER)
                return cls._publish(run_dir, tmp, final, config, state, keep_last)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def write_sharded(
        cls, run_dir: str | Path, step: int, *, tensors: dict, config: Config, state: dict, keep_last: int, main: bool
    ) -> TrainingCheckpoint | None:
        """Collective over the process group (when there is one): every rank writes its own shards of
        ``tensors`` (flat ``{key: tensor or DTensor}``; see the module docstring for the keys) into
        ``run_dir/checkpoints/step_{step}/sharded``; the ``main`` rank then writes the config and
        state, renames the folder into place and prunes as :meth:`write`. Returns the checkpoint on
        the main rank, None on the others."""
        tmp, final = cls._staging(run_dir, step, tensor_bytes(tensors)) if main else (None, None)
        if dist.is_initialized():
            shared = [tmp]
            dist.broadcast_object_list(shared, src=0)  # also the barrier: the folder exists
            tmp = shared[0]
        try:
            with files.resource_errors(final or tmp, None, tmp), _single_process_quiet():
                dcp.save(tensors, checkpoint_id=tmp / cls.SHARDED, no_dist=not dist.is_initialized())
                if not main:
                    return None
                return cls._publish(run_dir, tmp, final, config, state, keep_last)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def _staging(cls, run_dir: str | Path, step: int, need: int) -> tuple[Path, Path]:
        """A fresh temporary folder for step ``step`` and the final path; temporaries of earlier,
        interrupted saves are removed (the run folder is the trainer's alone: it holds its lock)."""
        root = Path(run_dir) / cls.FOLDER
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:07d}"
        for stray in root.glob(".tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)
        files.clean_strays(final)
        files.check_space(final, need)
        tmp = root / f".tmp-{final.name}"
        tmp.mkdir()
        return tmp, final

    @classmethod
    def _publish(
        cls, run_dir: str | Path, tmp: Path, final: Path, config: Config, state: dict, keep_last: int
    ) -> TrainingCheckpoint:
        """Complete ``tmp`` (config, state, manifest), flush it to disk, move it to ``final`` in one
        step and prune to the last ``keep_last``; pruned folders are renamed away before removal."""
        dump_config(replace(config, encoder=portable.bundle_encoder(config.encoder, tmp)), tmp / cls.CONFIG)
        (tmp / cls.STATE).write_text(json.dumps(state, indent=1))
        (tmp / cls.MANIFEST).write_text(json.dumps({"files": _hashes(tmp, skip=cls.MANIFEST)}, indent=1))
        files.sync_tree(tmp)
        files.publish(tmp, final)
        for old in cls.all(run_dir)[:-keep_last] if keep_last > 0 else []:
            gone = old.path.parent / f".tmp-pruned-{old.path.name}"
            os.rename(old.path, gone)
            shutil.rmtree(gone, ignore_errors=True)
        return cls(final)

    # ------------------------------------------------------------------ integrity

    def damage(self, name: str | None = None) -> str | None:
        """What is wrong with the files of this checkpoint (only ``name``, a file or a folder of
        it, when given) against ``sha256.json``: None when every file has its recorded size and
        SHA-256, or when the checkpoint predates the manifest; else a short description."""
        if not (self.path / self.STATE).is_file():
            return f"incomplete: no {self.STATE}"
        manifest = self.path / self.MANIFEST
        if not manifest.is_file():
            return None
        try:
            recorded = json.loads(manifest.read_text())["files"]
            recorded = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in recorded.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{self.MANIFEST} is unreadable ({e})"
        wanted = [k for k in recorded if name is None or k == name or k.startswith(name + "/")]
        for rel in sorted(wanted):
            size, digest = recorded[rel]
            file = self.path / rel
            if not file.is_file():
                return f"{rel} is missing"
            if file.stat().st_size != size:
                return f"{rel} has {file.stat().st_size} bytes, {size} were written (truncated or damaged)"
            if _sha256(file) != digest:
                return f"{rel} does not match its recorded SHA-256 (damaged on disk)"
        return None

    def verify(self, name: str | None = None) -> None:
        """Raise :class:`CheckpointError` naming the damaged file when :meth:`damage` finds one."""
        key = name or ""
        if key in self._verified or "" in self._verified:
            return
        problem = self.damage(name)
        if problem is not None:
            raise CheckpointError(f"cannot read training checkpoint {self.path}: {problem}")
        self._verified.add(key)

    @classmethod
    def resumable(cls, path: str | Path, report=None) -> TrainingCheckpoint | None:
        """The checkpoint to resume from for ``path``: a checkpoint folder must verify (else
        :class:`CheckpointError`, naming the newest valid one of its run); for a run folder (or its
        ``checkpoints/``) the newest checkpoint that verifies, with every newer damaged or partial
        one renamed to ``damaged-step_…`` beside it and reported through ``report(message)``
        (default: stderr). None when the run folder has no checkpoint at all."""
        path = Path(path)
        report = report or (lambda message: print(message, file=sys.stderr, flush=True))
        if (path / cls.STATE).is_file() or _STEP.fullmatch(path.name):
            problem = cls(path).damage()
            if problem is None:
                return cls(path, verified=True)
            good = cls._newest_valid(path.parent.parent, below=path)
            hint = f"; the newest valid checkpoint of the run is {good.path}" if good else ""
            raise CheckpointError(f"cannot resume from {path}: the checkpoint is damaged: {problem}{hint}")
        run = path.parent if path.name == cls.FOLDER else path
        root = run / cls.FOLDER
        folders = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP.fullmatch(p.name)))
        for _, folder in reversed(folders):
            problem = cls(folder).damage()
            if problem is None:
                return cls(folder, verified=True)
            aside = folder.parent / f"{cls.DAMAGED}{folder.name}"
            files.publish(folder, aside)  # replaces an earlier damaged copy of the same step
            report(f"warning: checkpoint {folder} is damaged ({problem}); set aside as {aside}")
        if folders:
            raise CheckpointError(f"no valid checkpoint in {root}: every one is damaged (set aside as {cls.DAMAGED}*)")
        return None

    @classmethod
    def _newest_valid(cls, run_dir: Path, below: Path) -> TrainingCheckpoint | None:
        for ckpt in reversed(cls.all(run_dir)):
            if ckpt.path != below and ckpt.damage() is None:
                return ckpt
        return None

    # ------------------------------------------------------------------ reading

    def _read(self, name: str, read: Callable[[Path], object]):
        self.verify(name)
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


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists and tuples of tensors)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _hashes(folder: Path, skip: str) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder`` except ``skip``."""
    out = {}
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if file.is_file() and rel != skip:
            out[rel] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    return out
