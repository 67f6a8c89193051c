"""The prepared dataset on disk and the memory-mapped dataset that reads it.

A prepared dataset is a folder of row shards plus ``meta.json`` (written last; it marks the folder
complete and records the tokenizer, lengths, counts, dtype, sources and every option):

* ``ids-00000.bin``: (rows, L) token ids, little-endian ``uint16`` (``int32`` for vocabularies
  over 65536 ids), row-major.
* ``lengths-00000.bin``: (rows, 2) little-endian ``int32`` ``[cond_len, total_len]`` per row, from
  which the masks are rebuilt (:mod:`elflm.data.rows`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

FORMAT = "elflm-packed"
FORMAT_VERSION = 1
META = "meta.json"


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of a prepared dataset folder, with an error that says how to make one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"prepared dataset not found: {path} (make one with `elflm prepare INPUT -o {path}`)")
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete prepared dataset: {META} is missing (an interrupted `elflm prepare` "
            "leaves no meta.json; run the same command again to resume)"
        )
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / META}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
            f"got {meta.get('format')!r} {meta.get('version')!r}"
        )
    return meta


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset over a folder written by :func:`~elflm.data.prepare`. Shards are memory-mapped
    and an item is a zero-copy view: ``{"input_ids": (L,) array, "cond_len": int, "total_len": int}``;
    :func:`~elflm.data.collate` turns a list of items into a batch. Picklable without copying the data (worker
    processes reopen the maps)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self._open()

    def _open(self) -> None:
        L, dtype = self.meta["max_length"], np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._ids, self._lengths, counts = [], [], []
        for shard in self.meta["shards"]:
            n = shard["rows"]
            files = [(self.path / shard["ids"], dtype, (n, L)), (self.path / shard["lengths"], np.dtype("<i4"), (n, 2))]
            for f, dt, shape in files:
                expected = dt.itemsize * math.prod(shape)
                size = f.stat().st_size if f.is_file() else None
                if size != expected:
                    found = "no file" if size is None else size
                    raise ValueError(f"{f}: expected {expected} bytes ({shape} {dt}), found {found}")
            self._ids.append(np.memmap(files[0][0], dtype=dtype, mode="r", shape=(n, L)))
            self._lengths.append(np.memmap(files[1][0], dtype=np.dtype("<i4"), mode="r", shape=(n, 2)))
            counts.append(n)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_ids", "_lengths")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def max_length(self) -> int:
        return self.meta["max_length"]

    @property
    def max_input_length(self) -> int | None:
        return self.meta["max_input_length"]

    @property
    def conditional(self) -> bool:
        return self.meta["conditional"]

    @property
    def pad_id(self) -> int:
        return self.meta["pad_id"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """Occurrences (vocab_size,) int64 of every id in the rows' tokens (padding excluded)."""
        counts = np.zeros(vocab_size, np.int64)
        for ids, lengths in zip(self._ids, self._lengths):
            keep = np.arange(ids.shape[1])[None, :] < np.asarray(lengths[:, 1:2])
            counts += np.bincount(np.asarray(ids)[keep].astype(np.int64), minlength=vocab_size)[:vocab_size]
        return counts

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        index %= n
        s = int(np.searchsorted(self._starts, index, side="right")) - 1
        j = index - int(self._starts[s])
        cond_len, total_len = self._lengths[s][j]
        return {"input_ids": self._ids[s][j], "cond_len": int(cond_len), "total_len": int(total_len)}

    def __repr__(self) -> str:
        kind = "conditional" if self.conditional else "unconditional"
        return f"PackedDataset({str(self.path)!r}, {len(self)} {kind} rows of {self.max_length})"
