"""Training data (SPEC §1): ``elflm prepare`` (tokenise, pack, shard), conditional rows, the batch
masks, a memory-mapped dataset and a resumable distributed sampler.

A prepared dataset is a folder of row shards plus ``meta.json`` (written last; it marks the folder
complete and records the tokenizer, lengths, counts, dtype, sources and every option):

* ``ids-00000.bin``: (rows, L) token ids, little-endian ``uint16`` (``int32`` for vocabularies
  over 65536 ids), row-major.
* ``lengths-00000.bin``: (rows, 2) little-endian ``int32`` ``[cond_len, total_len]`` per row, from
  which the masks are rebuilt: position ``i`` is condition if ``i < cond_len``, valid if
  ``i < total_len``.

Rows follow the official collate (``utils/data_utils.py``): a row is
``condition[:max_input_length] ++ target`` truncated / padded to ``max_length`` with the pad id
(EOS for conditional data, ``pad_token: eos``); an unconditional row has ``cond_len = 0``.
Unconditional text is packed (``concat``): the token stream of all documents, in input order, is
cut into rows of ``max_length``; an over-long document simply continues in the next row, and only
the last row may be padded. ``separator="eos"`` puts an EOS after every document; the default
``none`` puts nothing between documents: the official code does not pack, and the samples the
authors' OpenWebText model generates run across document changes without an EOS although their
decoding cuts at the first EOS, so their rows evidently hold none. Data that already hold
token ids (the authors' ``openwebtext-t5``, ``wmt14_de-en_*_t5``, ``xsum_*_t5`` layouts: columns
``input_ids`` and, for conditional sets, ``condition_input_ids``) are used as stored, one example
per row (``rows``), exactly as the official loader batches them. Conditional text is tokenised
like those sets: source and target each followed by EOS (their ``tokenizer(text)`` default).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from .encoder import encoder_attention_mask, load_tokenizer

FORMAT = "elflm-packed"
FORMAT_VERSION = 1
META = "meta.json"
WORK = ".prepare-work"
FORMATS = ("auto", "text", "jsonl", "tsv", "parallel", "hf")
_EXTENSIONS = {".txt": "text", ".txt.gz": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".tsv": "tsv", ".tsv.gz": "tsv"}
_SHARD_BYTES = 1 << 29  # default shard size: 512 MiB of ids
_HF_BATCH = 1000  # rows per Arrow batch read from a datasets.Dataset
DEFAULT_CHUNK = 1 << 22  # characters (token ids for pre-tokenised data) per tokenisation chunk
_PIECE = 1 << 14  # packed documents are tokenised in pieces of about this many characters, cut at
# line ends: the same ids for tokenizers that split words at whitespace (T5), and 1.5x faster


def default_workers() -> int:
    """Tokenisation processes used when none are asked for: the CPU count, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- rows and batches


def _offsets(lens: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else np.zeros(0, np.int64)


def _rows(ids, lens, max_length: int, pad_id: int, dtype, cond=None, cond_lens=None, max_input_length=None):
    """Vectorised official row rule on flat id arrays: row ``n`` is
    ``cond_n[:max_input_length] ++ ids_n`` truncated / padded to ``max_length`` with ``pad_id``.
    ``ids`` is the concatenation of the ``lens`` sequences (same for ``cond``/``cond_lens``).
    Returns ``rows (N, L)`` and ``lengths (N, 2) int32 [cond_len, total_len]``."""
    lens = np.asarray(lens, dtype=np.int64)
    n, L = len(lens), max_length
    rows = np.full((n, L), pad_id, dtype=dtype)
    c = np.zeros(n, np.int64)
    if cond is not None:
        cond_lens = np.asarray(cond_lens, dtype=np.int64)
        keep_c = cond_lens if max_input_length is None else np.minimum(cond_lens, max_input_length)
        c = np.minimum(keep_c, L)
        pos = np.arange(len(cond)) - np.repeat(_offsets(cond_lens), cond_lens)
        row = np.repeat(np.arange(n), cond_lens)
        keep = pos < np.repeat(c, cond_lens)
        rows[row[keep], pos[keep]] = np.asarray(cond)[keep]
    pos = np.arange(len(ids)) - np.repeat(_offsets(lens), lens) + np.repeat(c, lens)
    row = np.repeat(np.arange(n), lens)
    keep = pos < L
    rows[row[keep], pos[keep]] = np.asarray(ids)[keep]
    return rows, np.stack([c, np.minimum(c + lens, L)], axis=1).astype(np.int32)


def build_rows(
    sequences: Sequence[Sequence[int]],
    max_length: int,
    pad_id: int,
    conditions: Sequence[Sequence[int]] | None = None,
    max_input_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows from token-id lists, as the official collate builds them: row ``n`` is
    ``conditions[n][:max_input_length] ++ sequences[n]`` (no condition when ``conditions`` is
    None) truncated / padded to ``max_length`` with ``pad_id``.

    Returns ``rows (N, L) int64`` and ``lengths (N, 2) int32`` = ``[cond_len, total_len]``."""
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")

    def flat(seqs):
        lens = np.array([len(s) for s in seqs], dtype=np.int64)
        return (np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if lens.sum() else np.zeros(0, np.int64)), lens

    ids, lens = flat(sequences)
    if conditions is None:
        return _rows(ids, lens, max_length, pad_id, np.int64)
    if len(conditions) != len(sequences):
        raise ValueError(f"expected one condition per sequence, got {len(conditions)} and {len(sequences)}")
    cond, cond_lens = flat(conditions)
    return _rows(ids, lens, max_length, pad_id, np.int64, cond, cond_lens, max_input_length)


def batch_from_rows(rows, lengths) -> dict[str, torch.Tensor]:
    """The model batch (SPEC §1) from rows (B, L) of ids and lengths (B, 2) ``[cond_len,
    total_len]``: ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) float32 (``i < total_len``),
    ``cond_seq_mask`` (B, L) float32 (``i < cond_len``) and ``encoder_attention_mask`` (B, L, L)
    float32 (a condition row attends only to condition columns, any other row to every valid
    column)."""
    ids = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    if ids.dim() != 2 or lengths.shape != (ids.shape[0], 2):
        raise ValueError(f"expected rows (B, L) and lengths (B, 2), got {tuple(ids.shape)} and {tuple(lengths.shape)}")
    pos = torch.arange(ids.shape[1])
    attention_mask = (pos < lengths[:, 1:]).float()
    cond_seq_mask = (pos < lengths[:, :1]).float()
    return {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "cond_seq_mask": cond_seq_mask,
        "encoder_attention_mask": encoder_attention_mask(attention_mask, cond_seq_mask),
    }


def collate(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Batch of :class:`PackedDataset` items (``input_ids`` (L,), ``cond_len``, ``total_len``);
    see :func:`batch_from_rows` for the keys."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    rows = np.stack([np.asarray(it["input_ids"]) for it in items])
    lengths = np.array([[it["cond_len"], it["total_len"]] for it in items], dtype=np.int64)
    return batch_from_rows(rows, lengths)


# ----------------------------------------------------------------------------- dataset


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
        raise ValueError(f"{path / META}: expected format {FORMAT!r} version {FORMAT_VERSION}, got {meta.get('format')!r} {meta.get('version')!r}")
    return meta


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset over a folder written by :func:`prepare`. Shards are memory-mapped and an
    item is a zero-copy view: ``{"input_ids": (L,) array, "cond_len": int, "total_len": int}``;
    :func:`collate` turns a list of items into a batch. Picklable without copying the data (worker
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
                    raise ValueError(f"{f}: expected {expected} bytes ({shape} {dt}), found {'no file' if size is None else size}")
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


# ----------------------------------------------------------------------------- reading inputs


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((ext for ext in sorted(_EXTENSIONS, key=len, reverse=True) if name.endswith(ext)), "")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _require_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "Hugging Face datasets input needs the optional 'datasets' package: pip install 'elflm[data]'"
        ) from e
    return datasets


def _looks_like_saved_metadata(ds) -> bool:
    """A Hub repo uploaded with ``save_to_disk`` loads through ``load_dataset`` as one row of its
    own metadata columns (``_data_files``, ``_fingerprint``, ...), as the official loader notes."""
    return len(ds) == 1 and all(c.startswith("_") for c in ds.column_names)


def load_hf_dataset(name: str, split: str | None = None):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder or a ``load_dataset`` name (Hub
    repos saved with ``save_to_disk`` are downloaded and loaded from disk, like the official
    loader). A dataset with several splits needs ``split``."""
    datasets = _require_datasets()
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name)
    ds = _one_split(ds, name, split, datasets)
    if _looks_like_saved_metadata(ds):
        from huggingface_hub import snapshot_download

        ds = _one_split(datasets.load_from_disk(snapshot_download(repo_id=name, repo_type="dataset")), name, split, datasets)
    return ds


def _one_split(ds, name, split, datasets):
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) != 1:
            raise ValueError(f"dataset {name!r} has splits {splits}: choose one with --split")
        key = split if split is not None else splits[0]
        if key not in ds:
            raise ValueError(f"dataset {name!r} has no split {key!r}; it has {splits}")
        return ds[key]
    if split is not None and getattr(ds, "split", None) not in (None, split):
        raise ValueError(f"dataset {name!r} is split {ds.split!r}, not {split!r}")
    return ds


def _resolve_sources(inputs, fmt: str, conditional: bool, split: str | None) -> list[tuple[str, object]]:
    """``[(format, source)]`` for the inputs: files (folders expanded, sorted), a pair of
    line-aligned files (``parallel``) or datasets (``hf``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not inputs:
        raise ValueError("no inputs given")
    if fmt == "parallel":
        if len(inputs) != 2:
            raise ValueError(f"--format parallel takes two line-aligned files (source, target), got {len(inputs)} inputs")
        paths = tuple(Path(p) for p in inputs)
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"input not found: {p}")
        sources = [("parallel", paths)]
    else:
        sources = []
        for item in inputs:
            p = Path(item)
            if fmt == "hf" or (fmt == "auto" and p.is_dir() and _is_saved_dataset(p)):
                sources.append(("hf", load_hf_dataset(str(item), split)))
            elif p.is_file():
                kind = fmt if fmt != "auto" else _EXTENSIONS.get(_suffix(p))
                if kind is None:
                    raise ValueError(
                        f"unknown input format: {p} (expected .txt, .jsonl or .tsv, optionally .gz, a folder of "
                        "those, a datasets save_to_disk folder, or --format text|jsonl|tsv|parallel|hf)"
                    )
                sources.append((kind, p))
            elif p.is_dir():
                wanted = (fmt,) if fmt != "auto" else ("jsonl", "tsv") if conditional else ("text", "jsonl")
                files = sorted(f for f in p.rglob("*") if f.is_file() and _EXTENSIONS.get(_suffix(f)) in wanted)
                if not files:
                    raise ValueError(f"no {' or '.join(wanted)} files (optionally .gz) found under {p}")
                sources.extend((_EXTENSIONS[_suffix(f)], f) for f in files)
            else:
                raise FileNotFoundError(f"input not found: {item} (for a Hugging Face Hub dataset pass --format hf)")
    for kind, src in sources:
        if kind == "text" and conditional:
            raise ValueError(f"{src}: plain text holds no (source, target) pairs; use JSONL, TSV, --format parallel or a dataset")
        if kind in ("tsv", "parallel") and not conditional:
            raise ValueError(f"{kind} input holds (source, target) pairs: give --max-input-length for conditional data")
    return sources


def _source_fingerprint(kind: str, src) -> dict:
    if kind == "hf":
        return {"format": "hf", "dataset": _dataset_name(src), "split": str(getattr(src, "split", None)), "fingerprint": src._fingerprint, "rows": len(src)}
    paths = src if kind == "parallel" else (src,)
    return {"format": kind, "files": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]}


def _dataset_name(ds) -> str:
    files = [f["filename"] for f in getattr(ds, "cache_files", [])]
    return str(Path(files[0]).parent) if files else str(getattr(ds.info, "dataset_name", None))


def _lines(path: Path, counts: Counter) -> Iterator[str]:
    """Lines of a (gzipped) file without their line ends; invalid UTF-8 is replaced by U+FFFD and
    counted in ``counts["decode_errors"]`` (lines)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    counts["decode_errors"] += 1
                yield line.rstrip("\r\n")
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e


def _pieces(lines: Iterable[str], limit: float) -> Iterator[tuple[str, bool]]:
    """One document given as lines → ``(text, is_last)`` pieces of about ``limit`` characters cut
    at line ends; the pieces concatenate to ``"\\n".join(lines)``. No lines, no pieces."""
    buf, size = [], 0
    for line in lines:
        if buf and size + len(line) > limit:
            yield "\n".join(buf) + "\n", False
            buf, size = [], 0
        buf.append(line)
        size += len(line) + 1
    if buf:
        yield "\n".join(buf), True


def _text_records(path: Path, counts: Counter, line_docs: bool, delimiter: str, limit: float):
    if line_docs:
        for line in _lines(path, counts):
            if line.strip():
                yield "text", (line, True), len(line)
            else:
                counts["empty_lines"] += 1
        return
    it = iter(_lines(path, counts))
    more = [True]

    def doc_lines():
        for line in it:
            if line.strip() == delimiter:
                return
            yield line
        more[0] = False

    while more[0]:
        for piece in _pieces(doc_lines(), limit):
            yield "text", piece, len(piece[0])


def _json_records(path: Path, counts: Counter, fields: tuple[str, ...]):
    for lineno, line in enumerate(_lines(path, counts), 1):
        if not line.strip():
            counts["empty_lines"] += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        values = []
        for f in fields:
            if f not in obj:
                raise ValueError(f"{path}:{lineno}: no field {f!r} (fields: {sorted(obj)}); choose it with --text-field / --source-field / --target-field")
            if not isinstance(obj[f], str):
                raise ValueError(f"{path}:{lineno}: field {f!r} must be a string, got {type(obj[f]).__name__}")
            values.append(obj[f])
        yield lineno, values


def _tsv_records(path: Path, counts: Counter, fields: tuple[str, str]):
    cols = None
    for lineno, line in enumerate(_lines(path, counts), 1):
        if not line.strip():
            counts["empty_lines"] += 1
            continue
        cells = line.split("\t")
        if cols is None:
            cols = (0, 1)
            if fields[0] in cells and fields[1] in cells:  # a header row naming the columns
                cols = (cells.index(fields[0]), cells.index(fields[1]))
                continue
        if len(cells) <= max(cols):
            raise ValueError(f"{path}:{lineno}: expected at least {max(cols) + 1} tab-separated columns, found {len(cells)}")
        yield cells[cols[0]], cells[cols[1]]


def _parallel_records(paths: tuple[Path, Path], counts: Counter):
    for lineno, (s, t) in enumerate(itertools.zip_longest(_lines(paths[0], counts), _lines(paths[1], counts)), 1):
        if s is None or t is None:
            raise ValueError(f"{paths[0]} and {paths[1]} are not line-aligned: one ends at line {lineno - 1}")
        if not s.strip() and not t.strip():
            counts["empty_lines"] += 1
            continue
        yield s, t


def _arrow_lists(column) -> tuple[np.ndarray, np.ndarray]:
    col = column.combine_chunks()
    if col.null_count:
        raise ValueError("a token-id column has missing (null) rows")
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.int64), col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def _hf_records(ds, conditional: bool, fields: dict, limit: float):
    cols = ds.column_names
    batches = ds.with_format("arrow").iter(batch_size=_HF_BATCH)
    if conditional and "condition_input_ids" in cols and "input_ids" in cols:
        for tbl in batches:
            src, src_lens = _arrow_lists(tbl.column("condition_input_ids"))
            ids, lens = _arrow_lists(tbl.column("input_ids"))
            yield "id_pairs", (src, src_lens, ids, lens), len(src) + len(ids)
    elif not conditional and "input_ids" in cols:
        for tbl in batches:
            ids, lens = _arrow_lists(tbl.column("input_ids"))
            yield "ids", (ids, lens), len(ids)
    else:
        names = (fields["source"], fields["target"]) if conditional else (fields["text"],)
        missing = [n for n in names if n not in cols]
        if missing:
            raise ValueError(f"dataset has no column {missing[0]!r} (columns: {cols}); choose it with --text-field / --source-field / --target-field")
        for tbl in batches:
            values = [tbl.column(n).to_pylist() for n in names]
            for row in zip(*values):
                row = tuple("" if v is None else str(v) for v in row)
                if conditional:
                    yield "pairs", row, len(row[0]) + len(row[1])
                else:
                    for piece in _pieces(row[0].split("\n"), limit):
                        yield "text", piece, len(piece[0])


def _records(sources, conditional: bool, fields: dict, line_docs: bool, delimiter: str, limit: float, counts: Counter):
    """All inputs as ``(kind, item, size)`` in input order; kinds: ``text`` ((piece, is_last)),
    ``pairs`` ((source, target)), ``ids`` / ``id_pairs`` (flat id arrays of an Arrow batch)."""
    for kind, src in sources:
        if kind == "hf":
            yield from _hf_records(src, conditional, fields, limit)
        elif kind == "text":
            yield from _text_records(src, counts, line_docs, delimiter, limit)
        elif kind == "jsonl":
            if conditional:
                for _, (s, t) in _json_records(src, counts, (fields["source"], fields["target"])):
                    yield "pairs", (s, t), len(s) + len(t)
            else:
                for _, (text,) in _json_records(src, counts, (fields["text"],)):
                    for piece in _pieces(text.split("\n"), limit):
                        yield "text", piece, len(piece[0])
        elif kind == "tsv":
            for s, t in _tsv_records(src, counts, (fields["source"], fields["target"])):
                yield "pairs", (s, t), len(s) + len(t)
        else:
            for s, t in _parallel_records(src, counts):
                yield "pairs", (s, t), len(s) + len(t)


def _chunks(records, size: int) -> Iterator[tuple[str, list]]:
    """Group records into ``(kind, items)`` chunks of about ``size`` characters / ids; the
    boundaries depend only on the inputs and ``size`` (not on the number of workers)."""
    kind, items, total = None, [], 0
    for k, item, n in records:
        if items and k != kind:
            yield kind, items
            items, total = [], 0
        kind = k
        items.append(item)
        total += n
        if total >= size:
            yield kind, items
            items, total = [], 0
    if items:
        yield kind, items


# ----------------------------------------------------------------------------- tokenising (workers)

_WORKER: dict = {}


def _worker_init(tokenizer: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    _WORKER["tokenizer"] = load_tokenizer(tokenizer)


def _flatten(lists, dtype) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(lens.sum())), lens


def _encode(kind: str, items: list, spec: dict) -> dict[str, np.ndarray]:
    """Token ids of one chunk: ``ids``/``lens`` (flat ids and per-record lengths), ``ends`` (the
    record ends a document) and, for pairs, ``src``/``src_lens``. Text is tokenised without special
    tokens; pair texts get an EOS appended to source and target."""
    dtype, vocab, eos = np.dtype(spec["dtype"]), spec["vocab"], spec["eos_id"]
    if kind in ("ids", "id_pairs"):
        out = {}
        names = ("src", "src_lens", "ids", "lens") if kind == "id_pairs" else ("ids", "lens")
        for i, name in enumerate(names):
            out[name] = np.concatenate([item[i] for item in items])
        for name in ("src", "ids"):
            if name in out and len(out[name]) and (out[name].min() < 0 or out[name].max() >= vocab):
                bad = out[name][(out[name] < 0) | (out[name] >= vocab)][0]
                raise ValueError(f"token id {bad} is outside the tokenizer's {vocab} ids: was the dataset tokenised with another tokenizer?")
            if name in out:
                out[name] = out[name].astype(dtype)
        if kind == "ids":
            out["ends"] = np.ones(len(out["lens"]), dtype=bool)
        return out
    tok = _WORKER["tokenizer"]

    def ids_of(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    first, second = (list(x) for x in zip(*items))
    if kind == "text":
        ids, lens = _flatten(ids_of(first), dtype)
        return {"ids": ids, "lens": lens, "ends": np.array(second, dtype=bool)}
    src, src_lens = _flatten([x + [eos] for x in ids_of(first)], dtype)
    ids, lens = _flatten([x + [eos] for x in ids_of(second)], dtype)
    return {"src": src, "src_lens": src_lens, "ids": ids, "lens": lens}


def _work(job) -> int:
    """Tokenise one chunk and write it atomically to ``path``; returns its number of ids."""
    kind, items, spec, path = job
    arrays = _encode(kind, items, spec)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return int(arrays["lens"].sum() + (arrays["src_lens"].sum() if "src_lens" in arrays else 0))


def _chunk_size(path: Path) -> int:
    with np.load(path, allow_pickle=False) as z:
        return int(z["lens"].sum() + (z["src_lens"].sum() if "src_lens" in z else 0))


# ----------------------------------------------------------------------------- packing and shards


class _ShardWriter:
    """Appends rows (n, L) and lengths (n, 2) to ``ids-XXXXX.bin`` / ``lengths-XXXXX.bin`` shards of
    ``rows_per_shard`` rows; a shard file gets its final name once complete."""

    def __init__(self, out: Path, max_length: int, dtype: np.dtype, rows_per_shard: int):
        self.out, self.L, self.dtype, self.rps = out, max_length, dtype, rows_per_shard
        self.shards: list[dict] = []
        self.files = None
        self.rows = 0

    def _names(self) -> tuple[str, str]:
        i = len(self.shards)
        return f"ids-{i:05d}.bin", f"lengths-{i:05d}.bin"

    def write(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        start = 0
        while start < len(rows):
            if self.files is None:
                self.files = [open(self.out / (name + ".tmp"), "wb") for name in self._names()]
                self.rows = 0
            take = min(self.rps - self.rows, len(rows) - start)
            self.files[0].write(np.ascontiguousarray(rows[start : start + take], dtype=self.dtype).tobytes())
            self.files[1].write(np.ascontiguousarray(lengths[start : start + take], dtype="<i4").tobytes())
            self.rows += take
            start += take
            if self.rows == self.rps:
                self._close_shard()

    def _close_shard(self) -> None:
        names = self._names()
        for f, name in zip(self.files, names):
            f.close()
            os.replace(self.out / (name + ".tmp"), self.out / name)
        self.shards.append({"ids": names[0], "lengths": names[1], "rows": self.rows})
        self.files = None

    def close(self) -> list[dict]:
        if self.files is not None:
            self._close_shard()
        return self.shards


class _Packer:
    """Turns chunk arrays into rows. ``concat``: one token stream cut into rows of ``L`` (an EOS
    after every document if ``sep`` is set; only the last row padded). ``rows``: one row per record
    with the official row rule (conditional pairs always)."""

    def __init__(self, writer: _ShardWriter, L: int, pad_id: int, packing: str, sep: int | None, max_input_length, counts: Counter):
        self.w, self.L, self.pad, self.packing, self.sep, self.mil, self.counts = writer, L, pad_id, packing, sep, max_input_length, counts
        self.carry = np.zeros(0, dtype=writer.dtype)
        self.open_doc = 0  # tokens of the document still open at the end of the previous chunk

    def feed(self, z: dict) -> None:
        c, L = self.counts, self.L
        if "src" in z:
            rows, lengths = _rows(z["ids"], z["lens"], L, self.pad, self.w.dtype, z["src"], z["src_lens"], self.mil)
            c["pairs"] += len(rows)
            c["truncated_conditions"] += int((z["src_lens"] > self.mil).sum())
            full = np.minimum(z["src_lens"], self.mil) + z["lens"]
            c["truncated_rows"] += int((full > L).sum())
            c["dropped_tokens"] += int((z["src_lens"] - np.minimum(z["src_lens"], self.mil)).sum() + (full - lengths[:, 1]).sum())
            return self._emit(rows, lengths)
        ids, lens, ends = z["ids"], z["lens"].astype(np.int64), z["ends"]
        if not len(lens):
            return
        doc = np.concatenate([[0], np.cumsum(ends[:-1])])  # document of each record, within the chunk
        totals = np.bincount(doc, weights=lens).astype(np.int64)
        totals[0] += self.open_doc
        closed = int(ends.sum())
        self.open_doc = 0 if ends[-1] else int(totals[-1])
        done = totals[:closed]
        c["documents"] += closed
        c["empty_documents"] += int((done == 0).sum())
        if self.packing == "rows":  # records are whole documents here
            keep = lens > 0
            rows, lengths = _rows(ids, lens[keep], L, self.pad, self.w.dtype)
            c["truncated_rows"] += int((lens > L).sum())
            c["dropped_tokens"] += int(np.clip(lens - L, 0, None).sum())
            return self._emit(rows, lengths)
        if self.sep is not None:
            last = np.flatnonzero(ends)[done > 0]  # the record closing each non-empty document
            ids = np.insert(ids, np.cumsum(lens)[last], self.sep)
        stream = np.concatenate([self.carry, ids])
        n = len(stream) // L
        self.carry = stream[n * L :]
        if n:
            self._emit(stream[: n * L].reshape(n, L), np.tile(np.array([0, L], np.int32), (n, 1)))

    def _emit(self, rows, lengths) -> None:
        self.counts["rows"] += len(rows)
        self.counts["tokens"] += int(lengths[:, 1].sum())
        self.w.write(rows, lengths)

    def finish(self) -> None:
        if len(self.carry):
            rows, lengths = _rows(self.carry, [len(self.carry)], self.L, self.pad, self.w.dtype)
            self.counts["padded_rows"] += 1
            self._emit(rows, lengths)
            self.carry = self.carry[:0]


# ----------------------------------------------------------------------------- prepare


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _remove_outputs(out: Path) -> None:
    for f in itertools.chain(out.glob("ids-*.bin*"), out.glob("lengths-*.bin*"), out.glob(META + "*")):
        f.unlink()


def prepare(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    tokenizer: str = "t5-small",
    max_length: int = 1024,
    max_input_length: int | None = None,
    format: str = "auto",
    text_field: str = "text",
    source_field: str = "source",
    target_field: str = "target",
    split: str | None = None,
    line_docs: bool = False,
    delimiter: str = "<|endoftext|>",
    separator: str = "none",
    packing: str | None = None,
    pad_token: str | None = None,
    shard_rows: int | None = None,
    workers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    keep_work: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise ``inputs`` and write memory-mapped row shards + ``meta.json`` to ``output``;
    returns the metadata. Conditional data iff ``max_input_length`` is given.

    Inputs: ``.txt``/``.jsonl``/``.tsv`` files (optionally ``.gz``), folders of them (searched
    recursively for the formats that fit: text and JSONL, or JSONL and TSV when conditional), two
    line-aligned files (``format="parallel"``: source, target), or Hugging Face datasets
    (``save_to_disk`` folders or, with ``format="hf"``, ``load_dataset`` names; ``split`` picks a
    split). Text files hold documents separated by lines equal to ``delimiter`` (or one per line
    with ``line_docs``); JSONL takes ``text_field`` (conditional: ``source_field``/``target_field``);
    TSV takes columns ``source``/``target`` of a header row, else the first two columns. Dataset
    columns ``input_ids`` (and ``condition_input_ids``) are used as already-tokenised ids.

    ``separator``: ``none`` or ``eos`` between packed documents. ``packing``: ``concat`` (default
    for text) or ``rows`` (one row per document; default for pre-tokenised ids; always for
    conditional data). ``pad_token``: ``pad`` (unconditional default) or ``eos`` (conditional
    default). Tokenisation runs in ``workers`` processes over chunks of about ``chunk_size``
    characters, each saved atomically under ``output/.prepare-work``, so a killed run resumes where
    it stopped; the result does not depend on ``workers``. Empty lines / documents, invalid UTF-8
    (replaced) and truncations are counted in ``meta["counts"]``."""
    conditional = max_input_length is not None
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")
    if conditional and not 0 < max_input_length < max_length:
        raise ValueError(f"conditional rows need 0 < max_input_length < max_length, got {max_input_length} and {max_length}")
    if separator not in ("none", "eos"):
        raise ValueError(f"separator must be 'none' or 'eos', got {separator!r}")
    if packing not in (None, "concat", "rows"):
        raise ValueError(f"packing must be 'concat' or 'rows', got {packing!r}")
    if conditional and (packing == "concat" or separator != "none"):
        raise ValueError("conditional data is one (source, target) pair per row: packing='concat' and separator apply to unconditional data only")
    if pad_token not in (None, "pad", "eos"):
        raise ValueError(f"pad_token must be 'pad' or 'eos', got {pad_token!r}")
    workers = default_workers() if workers is None else workers
    if workers < 1 or chunk_size < 1 or (shard_rows is not None and shard_rows < 1):
        raise ValueError(f"workers, chunk_size and shard_rows must be ≥ 1, got {workers}, {chunk_size}, {shard_rows}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    sources = _resolve_sources(inputs, format, conditional, split)
    tok = load_tokenizer(tokenizer)
    pad_token = pad_token or ("eos" if conditional else "pad")
    eos_id = tok.eos_token_id
    pad_id = eos_id if pad_token == "eos" else tok.pad_token_id
    if pad_id is None or (eos_id is None and (conditional or separator == "eos")):
        raise ValueError(f"tokenizer {tokenizer!r} has no {'pad' if pad_id is None else 'EOS'} token; choose --pad-token / --separator accordingly")
    vocab = len(tok)
    dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<i4")
    pretokenised = any(k == "hf" and "input_ids" in src.column_names for k, src in sources)
    packing = "rows" if conditional else (packing or ("rows" if pretokenised else "concat"))
    L = max_length
    rows_per_shard = shard_rows or max(1, _SHARD_BYTES // (L * dtype.itemsize))
    fields = {"text": text_field, "source": source_field, "target": target_field}
    source_info = [_source_fingerprint(k, s) for k, s in sources]
    tokenizer_info = {"name_or_path": str(tokenizer), "class": type(tok).__name__, "size": vocab, "eos_id": eos_id, "pad_id": tok.pad_token_id}
    options = {
        "max_length": L, "max_input_length": max_input_length, "format": format, "fields": fields, "split": split,
        "line_docs": line_docs, "delimiter": delimiter, "separator": separator, "packing": packing,
        "pad_token": pad_token, "shard_rows": rows_per_shard, "chunk_size": chunk_size,
    }
    if (out / META).is_file():
        meta = read_meta(out)
        if meta["options"] == options and meta["sources"] == source_info and meta["tokenizer"] == tokenizer_info:
            if not keep_work:  # left behind by a run stopped between meta.json and the clean-up
                shutil.rmtree(out / WORK, ignore_errors=True)
            if progress:
                print(f"{out} is already prepared with these options ({meta['rows']} rows); nothing to do")
            return meta
        if not overwrite:
            raise ValueError(f"{out} already holds a prepared dataset made from other inputs or options; pass --overwrite to replace it")
    if overwrite:
        _remove_outputs(out)
        shutil.rmtree(out / WORK, ignore_errors=True)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    plan = {"version": FORMAT_VERSION, "sources": source_info, "tokenizer": tokenizer_info, "conditional": conditional,
            "fields": fields, "line_docs": line_docs, "delimiter": delimiter, "chunk_size": chunk_size,
            "piece_chars": None if packing == "rows" else min(chunk_size, _PIECE), "dtype": dtype.str}
    plan_file = work / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        if progress:
            print(f"{work}: chunks from a run with other inputs or options; starting over")
        shutil.rmtree(work)
        work.mkdir()
    for stray in work.glob("*.tmp"):
        stray.unlink()
    _write_json(plan_file, plan)

    # 1. tokenise chunks (in input order; done chunks are skipped)
    counts: Counter = Counter()
    spec = {"dtype": dtype.str, "vocab": vocab, "eos_id": eos_id}
    limit = plan["piece_chars"] or math.inf
    tasks = _chunks(_records(sources, conditional, fields, line_docs, delimiter, limit, counts), chunk_size)
    t0 = time.perf_counter()
    n_chunks, reused, fresh_tokens = 0, 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenise", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def jobs():
        nonlocal n_chunks, reused
        for k, (kind, items) in enumerate(tasks):
            n_chunks = k + 1
            path = work / f"chunk-{k:06d}.npz"
            if path.is_file():
                reused += 1
                if bar is not None:
                    bar.update(_chunk_size(path))
                continue
            yield kind, items, spec, path

    def done(n):
        nonlocal fresh_tokens
        fresh_tokens += n
        if bar is not None:
            bar.update(n)

    try:
        if workers == 1:
            _WORKER["tokenizer"] = tok
            for job in jobs():
                done(_work(job))
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(str(tokenizer),)) as pool:
                pending = set()
                try:
                    for job in jobs():
                        pending.add(pool.submit(_work, job))
                        if len(pending) >= 2 * workers:
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for f in finished:
                                done(f.result())
                    for f in wait(pending).done:
                        done(f.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if n_chunks == 0:
        raise ValueError(f"no documents found in {', '.join(str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs))} (empty corpus)")

    # 2. pack chunks into row shards, then write meta.json (the completion marker)
    _remove_outputs(out)
    writer = _ShardWriter(out, L, dtype, rows_per_shard)
    packer = _Packer(writer, L, pad_id, packing, eos_id if separator == "eos" else None, max_input_length, counts)
    for k in range(n_chunks):
        with np.load(work / f"chunk-{k:06d}.npz", allow_pickle=False) as z:
            packer.feed({name: z[name] for name in z.files})
    packer.finish()
    shards = writer.close()
    if counts["rows"] == 0:
        _remove_outputs(out)
        raise ValueError("the inputs hold no tokens (empty corpus): every document is empty")
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "conditional": conditional,
        "max_length": L, "max_input_length": max_input_length, "dtype": dtype.name,
        "pad_id": pad_id, "eos_id": eos_id, "pad_token": pad_token,
        "rows": counts["rows"], "tokens": counts["tokens"], "shards": shards,
        "counts": {k: counts[k] for k in sorted(counts)}, "tokenizer": tokenizer_info,
        "sources": source_info, "options": options, "elflm_version": _version(),
    }
    _write_json(out / META, meta)
    if not keep_work:
        shutil.rmtree(work)
    if progress:
        _print_summary(meta, out, seconds, fresh_tokens, n_chunks, reused, workers)
    return meta


def _version() -> str:
    from . import __version__

    return __version__


def _print_summary(meta: dict, out: Path, seconds: float, fresh_tokens: int, n_chunks: int, reused: int, workers: int) -> None:
    c = meta["counts"]
    print(f"prepared {meta['rows']} rows × {meta['max_length']} tokens ({meta['tokens']} valid tokens) in {len(meta['shards'])} shard(s): {out}")
    details = [f"{k.replace('_', ' ')} {v}" for k, v in c.items() if k not in ("rows", "tokens")]
    if details:
        print("  " + ", ".join(details))
    rate = f" ({fresh_tokens / seconds:,.0f} tokens/s)" if seconds > 0 and fresh_tokens else ""
    print(f"  tokenised {fresh_tokens} tokens in {seconds:.1f} s{rate} with {workers} worker(s); reused {reused}/{n_chunks} chunks")


# ----------------------------------------------------------------------------- CLI


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``elflm prepare``."""
    p.add_argument("inputs", nargs="+", help=".txt/.jsonl/.tsv files (optionally .gz), folders, a datasets save_to_disk folder, or a Hub dataset with --format hf")
    p.add_argument("-o", "--output", required=True, help="output folder (shards + meta.json)")
    p.add_argument("--tokenizer", default="t5-small", help="tokenizer folder or Hub id (default: t5-small)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row (default 1024)")
    p.add_argument("--max-input-length", type=int, default=None, help="conditional data: condition tokens kept (De-En 64, XSum 1024)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: from the file extension)")
    p.add_argument("--text-field", default="text", help="JSONL field / dataset column of the text")
    p.add_argument("--source-field", default="source", help="conditional: field / column of the condition")
    p.add_argument("--target-field", default="target", help="conditional: field / column of the target")
    p.add_argument("--split", default=None, help="dataset split (needed when a dataset has several)")
    p.add_argument("--line-docs", action="store_true", help="text files: every non-empty line is a document")
    p.add_argument("--delimiter", default="<|endoftext|>", help="text files: the line that separates documents")
    p.add_argument("--separator", choices=["none", "eos"], default="none", help="token between packed documents (default none, as the authors' data)")
    p.add_argument("--packing", choices=["concat", "rows"], default=None, help="concat documents into rows, or one row per document")
    p.add_argument("--pad-token", choices=["pad", "eos"], default=None, help="padding id (default: pad; eos for conditional data)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: 512 MiB of ids)")
    p.add_argument("--workers", type=int, default=None, help=f"tokenisation processes (default {default_workers()})")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="characters per tokenisation chunk (the unit of resuming)")
    p.add_argument("--keep-work", action="store_true", help="keep the tokenised chunks in OUTPUT/.prepare-work")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset prepared with other options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")


def run_prepare(a: argparse.Namespace) -> int:
    """``elflm prepare``: :func:`prepare` with the parsed arguments."""
    prepare(
        a.inputs, a.output, tokenizer=a.tokenizer, max_length=a.max_length, max_input_length=a.max_input_length,
        format=a.format, text_field=a.text_field, source_field=a.source_field, target_field=a.target_field,
        split=a.split, line_docs=a.line_docs, delimiter=a.delimiter, separator=a.separator, packing=a.packing,
        pad_token=a.pad_token, shard_rows=a.shard_rows, workers=a.workers, chunk_size=a.chunk_size,
        keep_work=a.keep_work, overwrite=a.overwrite, progress=not a.no_progress,
    )
    return 0
