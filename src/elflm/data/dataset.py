"""The prepared dataset on disk and the memory-mapped dataset that reads it.

A prepared dataset is a folder of row shards plus ``meta.json`` (written last; it marks the folder
complete and records the tokenizer, lengths, counts, dtype, sources and every option):

* ``ids-00000.bin``: (rows, L) token ids, little-endian ``uint16`` (``int32`` for vocabularies
  over 65536 ids), row-major.
* ``lengths-00000.bin``: (rows, 2) little-endian ``int32`` ``[cond_len, total_len]`` per row, from
  which the masks are rebuilt (:mod:`elflm.data.rows`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

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
    file = path / META
    redo = f"prepare the data again (`elflm prepare ... -o {path} --overwrite`)"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({' '.join(str(e).split())}); the file is damaged: {redo}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{file}: expected a JSON object, got {type(meta).__name__}; the file is damaged: {redo}")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{file}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
            f"got {meta.get('format')!r} {meta.get('version')!r}"
        )
    for key, ok, expected in _META_FIELDS:
        if key not in meta or not ok(meta[key]):
            got = "nothing" if key not in meta else repr(meta[key])[:80]
            raise DataError(f"{file}: {key!r} must be {expected}, got {got}; the file is damaged: {redo}")
    if meta["max_input_length"] is not None and not meta["max_input_length"] < meta["max_length"]:
        raise DataError(f"{file}: 'max_input_length' must be below 'max_length'; the file is damaged: {redo}")
    for k, shard in enumerate(meta["shards"]):
        for key, ok, expected in _SHARD_FIELDS:
            if not isinstance(shard, dict) or key not in shard or not ok(shard[key]):
                raise DataError(f"{file}: shards[{k}].{key} must be {expected}; the file is damaged: {redo}")
    if sum(shard["rows"] for shard in meta["shards"]) != meta["rows"]:
        raise DataError(f"{file}: the shards' rows do not add up to 'rows' ({meta['rows']}): {redo}")
    return meta


def _count(v, low: int = 0) -> bool:
    return type(v) is int and v >= low


def _file_name(v) -> bool:  # a file of the folder itself (no path that leads elsewhere)
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v and "\\" not in v


# what reading the rows and checking them against a config rely on: key, check, what it must be
_META_FIELDS = [
    ("conditional", lambda v: isinstance(v, bool), "true or false"),
    ("max_length", lambda v: _count(v, 1), "an integer >= 1"),
    ("max_input_length", lambda v: v is None or _count(v, 1), "null or an integer >= 1"),
    ("dtype", lambda v: v in ("uint16", "int32"), "'uint16' or 'int32'"),
    ("pad_id", _count, "an integer >= 0"),
    ("eos_id", lambda v: v is None or _count(v), "null or an integer >= 0"),
    ("pad_token", lambda v: v in ("pad", "eos"), "'pad' or 'eos'"),
    ("rows", _count, "an integer >= 0"),
    ("shards", lambda v: isinstance(v, list), "a list of shards"),
    (
        "tokenizer",
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("name_or_path"), str)
            and isinstance(v.get("class"), str)
            and _count(v.get("size"), 1)
        ),
        "an object with name_or_path, class and size",
    ),
]
_SHARD_FIELDS = [
    ("ids", _file_name, "a file name in the folder"),
    ("lengths", _file_name, "a file name in the folder"),
    ("rows", _count, "an integer >= 0"),
]


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token → id), the same for its slow and fast
    versions and wherever its files are."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def _base_class(name: str) -> str:
    return name.removesuffix("Fast")


def check_dataset(dataset: PackedDataset, cfg, encoder) -> None:
    """Refuse training on ``dataset`` (a :class:`PackedDataset`) with the config ``cfg`` (a
    :class:`~elflm.config.Config`) and its frozen ``encoder`` when they do not fit: conditional
    data under an unconditional config or the reverse, another ``max_input_length`` or
    ``pad_token``, rows longer than ``data.max_length``, ids tokenised with another tokenizer than
    the encoder's, or another end-of-text id. Each error says how to fix it."""
    meta, d, where = dataset.meta, cfg.data, dataset.path / META
    redo = f"prepare the data again (`elflm prepare ... -o {dataset.path}`)"
    if dataset.conditional and not d.conditional:
        raise ValueError(
            f"{where}: conditional data (rows of condition[:{dataset.max_input_length}] ++ target) but an "
            f"unconditional config: set data.max_input_length={dataset.max_input_length} "
            f"(and data.pad_token={meta['pad_token']}), or {redo} without --max-input-length"
        )
    if d.conditional and not dataset.conditional:
        raise ValueError(
            f"{where}: unconditional data but data.max_input_length={d.max_input_length} (a conditional config): "
            f"set data.max_input_length=null, or {redo} with --max-input-length {d.max_input_length}"
        )
    info, tok, name = meta["tokenizer"], encoder.tokenizer, cfg.encoder.tokenizer_name
    made = f"{info['name_or_path']} ({info['class']}, {info['size']} tokens)"
    fix = f"{redo} with --tokenizer {name}, or set the encoder section to the encoder the data was made for"
    if tok is not None:
        ours = f"{name} ({type(tok).__name__}, {len(tok)} tokens)"
        same = _base_class(info["class"]) == _base_class(type(tok).__name__) and info["size"] == len(tok)
        if same and "vocab_sha256" in info:
            same = info["vocab_sha256"] == vocab_fingerprint(tok)
        if not same:
            raise ValueError(
                f"{where}: the data was tokenised with {made} but the encoder's tokenizer is {ours}: {fix}"
            )
    if info["size"] > encoder.vocab_size:
        raise ValueError(
            f"{where}: the data's tokenizer {made} has more ids than the encoder embeds ({encoder.vocab_size}): {fix}"
        )
    if dataset.max_input_length != d.max_input_length:
        raise ValueError(
            f"{where}: the data keeps {dataset.max_input_length} condition tokens but data.max_input_length="
            f"{d.max_input_length}: set data.max_input_length={dataset.max_input_length}, or {redo} "
            f"with --max-input-length {d.max_input_length}"
        )
    if meta["pad_token"] != d.pad_token:
        raise ValueError(
            f"{where}: rows padded with {meta['pad_token']} but data.pad_token={d.pad_token} (the loss mask depends "
            f"on it): set data.pad_token={meta['pad_token']}, or {redo} with --pad-token {d.pad_token}"
        )
    if dataset.max_length > d.max_length:
        raise ValueError(
            f"{where}: rows of {dataset.max_length} tokens but data.max_length={d.max_length}: "
            f"set data.max_length={dataset.max_length}, or {redo} with --max-length {d.max_length}"
        )
    if (d.conditional or d.pad_token == "eos") and meta["eos_id"] != encoder.eos_id:
        raise ValueError(
            f"{where}: the rows end texts with id {meta['eos_id']} but the encoder's end-of-text id is "
            f"{encoder.eos_id} (sampling stops there): {redo} with the encoder's EOS token"
            + (
                f" (--eos-token {tok.convert_ids_to_tokens(encoder.eos_id)})"
                if tok is not None and encoder.eos_id is not None
                else ""
            )
        )


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
                    raise DataError(
                        f"{f}: expected {expected} bytes ({shape} {dt}), found {found}; the dataset is incomplete "
                        f"or damaged: prepare it again (`elflm prepare ... -o {self.path} --overwrite`)"
                    )
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
