"""The frozen encoder's hidden states of training rows, computed once and reused (``train.cache_latents``).

The encoder is frozen, so a row's hidden state (L, C) only depends on the row, on how it is encoded
(its *variant*: a (B, L) padding mask; the (B, L, L) condition mask; that mask with the row's label
dropped, SPEC §1) and on the shape of the batch it is encoded in (kernels may reduce in another
order for other shapes). A cache entry is filled the first time a micro-batch encodes the row and
read whenever a later micro-batch consists of cached rows only; every micro-batch of a run has the
same shape, so training with and without the cache is bit-identical. Rows are cached unnormalised:
the latent statistics may change without invalidating anything.

The key is the SHA-256 of the encoder (class, config, every weight's bytes), of the prepared
dataset's shard files, of the micro-batch shape, the device type and the torch version: another
encoder, other data or another batch shape never meet an old entry. ``disk`` keeps the entries in
``<train.latent_cache_dir>/<key>.<part>.safetensors`` (default ``$XDG_CACHE_HOME/elflm/latents``):
each save adds one part with the entries new since the last one, written atomically
(:func:`elflm.files.write_atomic`), so a killed run leaves only whole parts; a later run with the
same key loads them all. ``memory`` keeps them for the run only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .data import encoder_mask
from .errors import DataError
from .files import write_atomic

PLAIN, CONDITION, DROPPED = 0, 1, 2  # the variants: (B, L) mask; (B, L, L) mask; the same, label dropped


def default_directory() -> Path:
    """Where ``disk`` caches go unless ``train.latent_cache_dir`` says: ``$XDG_CACHE_HOME/elflm/latents``
    (``~/.cache/elflm/latents``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "elflm" / "latents"


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def cache_key(encoder, dataset, batch_shape: tuple[int, int], device: torch.device) -> str:
    """The SHA-256 (hex) naming the cached latents of ``dataset`` (a
    :class:`~elflm.data.PackedDataset`) under the frozen ``encoder`` (a
    :class:`~elflm.encoder.TextEncoder`) in micro-batches of ``batch_shape`` (B, L) on ``device``."""
    h = hashlib.sha256(b"elflm-latents-1")
    model = encoder.model
    h.update(json.dumps([type(model).__name__, model.config.to_json_string(), torch.__version__]).encode())
    h.update(json.dumps([list(batch_shape), device.type]).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    meta = dataset.meta
    h.update(json.dumps([meta["max_length"], meta["dtype"], meta["rows"]]).encode())
    for shard in meta["shards"]:
        _hash_file(h, dataset.path / shard["ids"])
        _hash_file(h, dataset.path / shard["lengths"])
    return h.hexdigest()


class LatentCache:
    """Hidden states (L, C) float32 of training rows by ``(row, variant)``, on the CPU.

    ``mode``: ``memory`` or ``disk`` (then ``directory`` holds the parts; see the module doc).
    :meth:`hidden` replaces ``encoder.hidden(ids, encoder_mask(batch, label_drop))`` for the
    micro-batch of dataset rows ``rows``; :meth:`save` writes the new entries (``disk``)."""

    def __init__(self, encoder, dataset, mode: str, batch_shape: tuple[int, int], directory=None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"train.cache_latents: expected 'memory' or 'disk', got {mode!r}")
        self.encoder, self.dataset, self.mode = encoder, dataset, mode
        self.key = cache_key(encoder, dataset, batch_shape, encoder.device)
        self.directory = Path(directory) if directory else default_directory()
        self.entries: dict[tuple[int, int], torch.Tensor] = {}
        self.new: list[tuple[int, int]] = []  # entries not yet on disk
        self.hits = self.misses = 0  # micro-batches read from the cache / encoded
        if mode == "disk":
            for part in sorted(self.directory.glob(f"{self.key}.*.safetensors")):
                self._load(part)

    def _load(self, part: Path) -> None:
        fix = f"delete {part} (it is a cache: the entries are computed again)"
        try:
            tensors = load_file(part)
        except (SafetensorError, OSError) as e:
            raise DataError(f"{part}: not a readable latent cache part ({e}); {fix}") from None
        hidden, slots = tensors.get("hidden"), tensors.get("slots")
        L, C = self.dataset.max_length, self.encoder.dim
        rows, variants = (slots[:, 0], slots[:, 1]) if slots is not None and slots.dim() == 2 else (None, None)
        ok = (
            hidden is not None
            and rows is not None
            and hidden.dtype == torch.float32
            and slots.dtype == torch.int64
            and hidden.dim() == 3
            and tuple(hidden.shape[1:]) == (L, C)
            and tuple(slots.shape) == (hidden.shape[0], 2)
            and bool(((rows >= 0) & (rows < len(self.dataset))).all())
            and bool(((variants >= PLAIN) & (variants <= DROPPED)).all())
        )
        if not ok:
            raise DataError(
                f"{part}: expected 'hidden' (K, {L}, {C}) float32 and 'slots' (K, 2) int64 rows and variants "
                f"of this dataset; {fix}"
            )
        for (row, variant), h in zip(slots.tolist(), hidden.unbind()):
            self.entries[(row, variant)] = h

    def variants(self, batch: dict, label_drop: torch.Tensor | None) -> list[int]:
        """The variant of each row of ``batch``: how :func:`~elflm.data.encoder_mask` encodes it."""
        B = batch["input_ids"].shape[0]
        if encoder_mask(batch, label_drop).dim() == 2:
            return [PLAIN] * B
        has_cond = batch["cond_seq_mask"].any(-1).cpu()
        drop = torch.zeros(B, dtype=torch.bool) if label_drop is None else label_drop.cpu().bool()
        return [DROPPED if d and c else CONDITION for d, c in zip(drop.tolist(), has_cond.tolist())]

    def hidden(self, batch: dict, rows: torch.Tensor, label_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised hidden states (B, L, C) float32 of ``batch`` whose rows are the dataset rows
        ``rows`` (B,): cached when every row is, else encoded (and cached)."""
        keys = list(zip(rows.tolist(), self.variants(batch, label_drop)))
        if all(k in self.entries for k in keys):
            self.hits += 1
            return torch.stack([self.entries[k] for k in keys]).to(batch["input_ids"].device)
        self.misses += 1
        h = self.encoder.hidden(batch["input_ids"], encoder_mask(batch, label_drop))
        for k, row in zip(keys, h.detach().cpu().unbind()):
            if k not in self.entries:
                self.entries[k] = row.clone()
                self.new.append(k)
        return h

    def save(self) -> Path | None:
        """``disk``: write the entries added since the last save as one new part (atomically);
        returns its path (None when there was nothing new, or in ``memory`` mode)."""
        if self.mode != "disk" or not self.new:
            return None
        data = save({"hidden": torch.stack([self.entries[k] for k in self.new]), "slots": torch.tensor(self.new)})
        self.directory.mkdir(parents=True, exist_ok=True)
        part = self.directory / f"{self.key}.{os.getpid()}-{time.time_ns()}.safetensors"
        write_atomic(part, lambda f: f.write(data), binary=True, need=len(data))
        self.new = []
        return part
