"""Inputs of ``elflm prepare``: finding them, reading them as records and grouping records into
tokenisation chunks.

Sources are ``.txt``/``.jsonl``/``.tsv`` files (optionally ``.gz``), folders of them, two
line-aligned files (``parallel``: source, target) or Hugging Face datasets (``hf``). Records come in
input order as ``(kind, item, size)``: ``text`` (a document piece and whether it ends the
document), ``pairs`` ((source, target) texts), or ``ids`` / ``id_pairs`` (flat id arrays of an Arrow
batch). Datasets that already hold token ids (the authors' ``openwebtext-t5``,
``wmt14_de-en_*_t5``, ``xsum_*_t5`` layouts: columns ``input_ids`` and, for conditional sets,
``condition_input_ids``) are read as those ids. Empty lines and invalid UTF-8 are counted in a
``collections.Counter`` the caller passes.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from inspect import signature
from pathlib import Path

import numpy as np

from .. import hub

FORMATS = ("auto", "text", "jsonl", "tsv", "parallel", "hf")
_EXTENSIONS = {
    ".txt": "text",
    ".txt.gz": "text",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
}
_HF_BATCH = 1000  # rows per Arrow batch read from a datasets.Dataset


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((ext for ext in sorted(_EXTENSIONS, key=len, reverse=True) if name.endswith(ext)), "")


def _is_saved_dataset(path: Path) -> bool:
    if (path / "dataset_dict.json").is_file():
        return True
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


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
        why = hub.unavailable()
        if why is not None and not datasets.config.HF_HUB_OFFLINE:  # datasets would retry the network
            raise hub.offline_error(f"the dataset {name!r}", why, repo=f"{name} --repo-type dataset")
        # no dataset loading script is ever run (datasets >= 4 has none; older versions are told so)
        scripts = (
            {"trust_remote_code": False} if "trust_remote_code" in signature(datasets.load_dataset).parameters else {}
        )
        try:
            ds = datasets.load_dataset(name, **scripts)
        except (OSError, ConnectionError) as e:
            why = why or f"{type(e).__name__}: {e}"
            raise hub.offline_error(f"the dataset {name!r}", why, repo=f"{name} --repo-type dataset") from e
    ds = _one_split(ds, name, split, datasets)
    if _looks_like_saved_metadata(ds):
        ds = datasets.load_from_disk(str(hub.download(name, repo_type="dataset")))
        ds = _one_split(ds, name, split, datasets)
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


def resolve_sources(inputs, fmt: str, conditional: bool, split: str | None) -> list[tuple[str, object]]:
    """``[(format, source)]`` for the inputs: files (folders expanded, sorted), a pair of
    line-aligned files (``parallel``) or datasets (``hf``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not inputs:
        raise ValueError("no inputs given")
    if fmt == "parallel":
        if len(inputs) != 2:
            raise ValueError(
                f"--format parallel takes two line-aligned files (source, target), got {len(inputs)} inputs"
            )
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
            raise ValueError(
                f"{src}: plain text holds no (source, target) pairs; use JSONL, TSV, --format parallel or a dataset"
            )
        if kind in ("tsv", "parallel") and not conditional:
            raise ValueError(f"{kind} input holds (source, target) pairs: give --max-input-length for conditional data")
    return sources


def source_fingerprint(kind: str, src) -> dict:
    """What identifies a source in ``meta.json``: a dataset's fingerprint and size, or each file's
    resolved path, size and modification time (a changed input is prepared again)."""
    if kind == "hf":
        return {
            "format": "hf",
            "dataset": _dataset_name(src),
            "split": str(getattr(src, "split", None)),
            "fingerprint": src._fingerprint,
            "rows": len(src),
        }
    paths = src if kind == "parallel" else (src,)
    files = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
    return {"format": kind, "files": files}


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
                raise ValueError(
                    f"{path}:{lineno}: no field {f!r} (fields: {sorted(obj)}); choose it with --text-field / "
                    "--source-field / --target-field"
                )
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
            raise ValueError(
                f"{path}:{lineno}: expected at least {max(cols) + 1} tab-separated columns, found {len(cells)}"
            )
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
    ids = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return ids, col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def hf_columns(ds, conditional: bool, fields: dict) -> list[str]:
    """The columns of a dataset that prepare reads: ``condition_input_ids`` + ``input_ids``
    (conditional ids), ``input_ids`` (unconditional ids), else the text fields; a conditional
    column under unconditional options is refused (it would be dropped)."""
    cols, name = ds.column_names, source_fingerprint("hf", ds)["dataset"]
    if not conditional and "condition_input_ids" in cols:
        raise ValueError(
            f"dataset {name} has a condition_input_ids column (conditional data): give --max-input-length N "
            "(condition tokens kept: De-En 64, XSum 1024), or remove the column to keep only the targets"
        )
    if conditional and "condition_input_ids" in cols and "input_ids" in cols:
        return ["condition_input_ids", "input_ids"]
    if not conditional and "input_ids" in cols:
        return ["input_ids"]
    names = [fields["source"], fields["target"]] if conditional else [fields["text"]]
    missing = [n for n in names if n not in cols]
    if missing:
        raise ValueError(
            f"dataset {name} has no column {missing[0]!r} (columns: {cols}); choose it with --text-field / "
            "--source-field / --target-field (data.text_field / source_field / target_field)"
        )
    return names


def _hf_records(ds, conditional: bool, fields: dict, limit: float):
    cols = hf_columns(ds, conditional, fields)
    batches = ds.with_format("arrow").iter(batch_size=_HF_BATCH)
    if cols == ["condition_input_ids", "input_ids"]:
        for tbl in batches:
            src, src_lens = _arrow_lists(tbl.column("condition_input_ids"))
            ids, lens = _arrow_lists(tbl.column("input_ids"))
            yield "id_pairs", (src, src_lens, ids, lens), len(src) + len(ids)
    elif cols == ["input_ids"]:
        for tbl in batches:
            ids, lens = _arrow_lists(tbl.column("input_ids"))
            yield "ids", (ids, lens), len(ids)
    else:
        for tbl in batches:
            values = [tbl.column(n).to_pylist() for n in cols]
            for row in zip(*values):
                row = tuple("" if v is None else str(v) for v in row)
                if conditional:
                    yield "pairs", row, len(row[0]) + len(row[1])
                else:
                    for piece in _pieces(row[0].split("\n"), limit):
                        yield "text", piece, len(piece[0])


def records(sources, conditional: bool, fields: dict, line_docs: bool, delimiter: str, limit: float, counts: Counter):
    """All ``sources`` (from :func:`resolve_sources`) as ``(kind, item, size)`` in input order;
    kinds: ``text`` ((piece, is_last), documents cut into pieces of about ``limit`` characters at
    line ends), ``pairs`` ((source, target)), ``ids`` / ``id_pairs`` (flat id arrays of an Arrow
    batch). ``fields``: the ``text`` / ``source`` / ``target`` field or column names."""
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


def chunks(stream: Iterable[tuple[str, object, int]], size: int) -> Iterator[tuple[str, list]]:
    """Group :func:`records` into ``(kind, items)`` chunks of about ``size`` characters / ids; the
    boundaries depend only on the inputs and ``size`` (not on the number of workers)."""
    kind, items, total = None, [], 0
    for k, item, n in stream:
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
