"""``elflm prepare``: tokenise a corpus and pack it into a prepared dataset (row shards +
``meta.json``, :mod:`elflm.data.dataset`). :func:`prepare` runs four stages:

1. validate the options;
2. plan: resolve the sources (:mod:`elflm.data.readers`), load the tokenizer, fix every option the
   result depends on, and decide what to resume: a dataset already prepared with the same plan is
   kept, the chunks of an interrupted run with the same plan are reused;
3. tokenise: the records, grouped into chunks, in a pool of worker processes; every chunk is saved
   atomically under ``OUTPUT/.prepare-work``, so a killed run resumes where it stopped, and the
   result does not depend on the number of workers;
4. pack: the chunks, in input order, into row shards and ``meta.json`` in a folder beside
   ``OUTPUT``, which then replaces it in one step (:func:`elflm.files.staged_folder`): a reader
   sees the previous dataset or the complete new one, never a mix.

The output folder is locked while prepare runs (a second prepare into it is refused); the worker
processes end with the command, whatever ends it.

Rows follow the official row rule (:mod:`elflm.data.rows`). Unconditional text is packed
(``concat``): the token stream of all documents, in input order, is cut into rows of
``max_length``; an over-long document simply continues in the next row, and only the last row may
be padded. ``separator="eos"`` puts an EOS after every document; the default ``none`` puts nothing
between documents: the official code does not pack, and the samples the authors' OpenWebText model
generates run across document changes without an EOS although their decoding cuts at the first
EOS, so their rows evidently hold none. Data that already hold token ids (the authors'
pre-tokenised sets) are used as stored, one example per row (``rows``), exactly as the official
loader batches them. Conditional text is tokenised like those sets: source and target each followed
by EOS (their ``tokenizer(text)`` default).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

# the module, not its names: elflm.encoder imports the mask rules from .rows, so while it is first
# imported this package is loaded before encoder's own names exist
from .. import files, hub, interrupts
from ..config import MAX_WORKERS
from ..encoder import load_tokenizer
from ..errors import DataError, check_int
from ..version import __version__
from .dataset import FORMAT, FORMAT_VERSION, META, PackedDataset, check_dataset, read_meta, vocab_fingerprint
from .readers import chunks, hf_columns, records, resolve_sources, source_fingerprint
from .rows import rows_from_flat

WORK = ".prepare-work"
_SHARD_BYTES = 1 << 29  # default shard size: 512 MiB of ids
DEFAULT_CHUNK = 1 << 22  # characters (token ids for pre-tokenised data) per tokenisation chunk
_PIECE = 1 << 14  # packed documents are tokenised in pieces of about this many characters, cut at
# line ends: the same ids for tokenizers that split words at whitespace (T5), and 1.5x faster


def default_workers() -> int:
    """Tokenisation processes used when none are asked for: the CPU count, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


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
    eos_token: str | None = None,
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
    default). ``eos_token`` names the end-of-text token for a tokenizer without EOS (e.g. ``[SEP]``
    of BERT-like encoders such as MiniLM). Dataset columns that are not read are listed in
    ``meta["ignored_columns"]``; a ``condition_input_ids`` column without ``max_input_length`` is
    refused. Tokenisation runs in ``workers`` processes over chunks of about ``chunk_size``
    characters, each saved atomically under ``output/.prepare-work``, so a killed run resumes where
    it stopped; the result does not depend on ``workers``. Empty lines / documents, invalid UTF-8
    (replaced) and truncations are counted in ``meta["counts"]``."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    workers = default_workers() if workers is None else workers
    fields = {"text": text_field, "source": source_field, "target": target_field}
    asked = {
        "max_length": max_length,
        "max_input_length": max_input_length,
        "format": format,
        "fields": fields,
        "split": split,
        "line_docs": line_docs,
        "delimiter": delimiter,
        "separator": separator,
        "packing": packing,
        "pad_token": pad_token,
        "eos_token": eos_token,
        "shard_rows": shard_rows,
        "chunk_size": chunk_size,
    }
    out = Path(output)
    _validate(asked, workers, out)
    with files.locked(out):
        _check_output(out, overwrite)
        plan = _plan(inputs, tokenizer, asked)
        meta = _prepared_meta(plan, out, overwrite, keep_work, progress)
        if meta is not None:
            return meta
        work = _work_folder(plan, out, progress)
        counts: Counter = Counter()
        try:
            stats = _tokenise(plan, work, workers, counts, progress)
        except files.NoSpaceError as e:
            raise files.NoSpaceError(
                f"{e}; preparing {out}: the chunks tokenised so far are kept in {work}, the same command resumes"
            ) from e
        if stats.chunks == 0:
            raise ValueError(f"no documents found in {', '.join(str(i) for i in inputs)} (empty corpus)")
        need = _pack_bytes(plan, work, stats.chunks)
        with files.staged_folder(out, overwrite=True, need=need) as staged:
            meta = _pack(plan, staged, work, stats.chunks, counts)
            if keep_work:
                os.rename(work, staged / WORK)
    if progress:
        _print_summary(meta, out, stats, workers)
    return meta


# ----------------------------------------------------------------------------- training data


def training_dataset(cfg, encoder, progress: bool = True, key: str = "data.train_path") -> PackedDataset:
    """The rows ``cfg.data.train_path`` names (``key="data.eval_path"``: the held-out rows), checked
    against ``cfg`` (a :class:`~elflm.config.Config`) and its frozen ``encoder``
    (:func:`~elflm.data.dataset.check_dataset`). The path is a prepared folder, or inputs
    :func:`prepare` reads (a Hugging Face dataset folder or Hub id, text / JSONL files or folders),
    prepared on first use with the encoder's tokenizer, the config's lengths, padding and
    ``data.*_field`` names into ``$ELFLM_CACHE/data/`` (once; by the first process under torchrun,
    the others wait)."""
    given = getattr(cfg.data, key.split(".")[1])
    if given is None:
        raise ValueError(f"{key} is not set: give a prepared folder (elflm prepare) or a dataset to prepare")
    path = Path(given).expanduser()
    half_done = path.is_dir() and ((path / WORK).exists() or any(path.glob("ids-*.bin*")))
    if not (path / META).is_file() and not half_done and (path.exists() or hub.is_hub_id(given)):
        path = _prepare_cached(cfg, encoder, given, progress)
    dataset = PackedDataset(path)
    try:
        check_dataset(dataset, cfg, encoder)
    except ValueError as e:
        raise ValueError(f"{key}={given}: {e}") from None
    return dataset


def _prepare_cached(cfg, encoder, given: str, progress: bool) -> Path:
    d = cfg.data
    source = given if hub.is_hub_id(given) else str(Path(given).resolve())
    tokenizer = encoder.tokenizer
    if tokenizer is None:
        raise ValueError(f"{given!r} needs preparing, but the encoder has no tokenizer")
    key = {
        "source": source,
        "vocab": vocab_fingerprint(tokenizer),
        "max_length": d.max_length,
        "max_input_length": d.max_input_length,
        "pad_token": d.pad_token,
        "fields": [d.text_field, d.source_field, d.target_field],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = hub.cache_root() / "data" / f"{Path(source).name}-{digest}"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        with files.locked(out, wait=True):  # another run preparing the same data: wait, then reuse it
            _prepare_into(cfg, given, out, progress)
    if distributed:
        torch.distributed.barrier()
    return out


def _prepare_into(cfg, given: str, out: Path, progress: bool) -> None:
    d = cfg.data
    if progress:
        print(f"preparing {given} with the tokenizer {cfg.encoder.tokenizer_name} into {out}")
    prepare(
        given,
        out,
        tokenizer=cfg.encoder.tokenizer_name,
        max_length=d.max_length,
        max_input_length=d.max_input_length,
        format="hf" if hub.is_hub_id(given) else "auto",
        text_field=d.text_field,
        source_field=d.source_field,
        target_field=d.target_field,
        pad_token=d.pad_token,
        progress=progress,
    )


# ----------------------------------------------------------------------------- validate


def _validate(asked: dict, workers: int, out: Path) -> None:
    """Check the options of :func:`prepare` before any input is read."""
    max_length, max_input_length = asked["max_length"], asked["max_input_length"]
    separator, packing = asked["separator"], asked["packing"]
    conditional = max_input_length is not None
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")
    if conditional and not 0 < max_input_length < max_length:
        raise ValueError(
            f"conditional rows need 0 < max_input_length < max_length, got {max_input_length} and {max_length}"
        )
    if separator not in ("none", "eos"):
        raise ValueError(f"separator must be 'none' or 'eos', got {separator!r}")
    if packing not in (None, "concat", "rows"):
        raise ValueError(f"packing must be 'concat' or 'rows', got {packing!r}")
    if conditional and (packing == "concat" or separator != "none"):
        raise ValueError(
            "conditional data is one (source, target) pair per row: packing='concat' and separator apply to "
            "unconditional data only"
        )
    if asked["pad_token"] not in (None, "pad", "eos"):
        raise ValueError(f"pad_token must be 'pad' or 'eos', got {asked['pad_token']!r}")
    chunk_size, shard_rows = asked["chunk_size"], asked["shard_rows"]
    check_int("workers", workers, 1, MAX_WORKERS)
    check_int("chunk_size", chunk_size, 1)
    if shard_rows is not None:
        check_int("shard_rows", shard_rows, 1)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")


# ----------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """What :func:`prepare` fixed before tokenising: every option the result depends on (as
    ``meta.json`` records them), the sources and the tokenizer."""

    options: dict  # the options with their defaults resolved (meta["options"])
    sources: list[tuple[str, object]]  # (format, source) from readers.resolve_sources
    source_info: list[dict]  # meta["sources"]
    tokenizer: object
    tokenizer_info: dict  # meta["tokenizer"]
    pad_id: int
    dtype: np.dtype  # of the stored ids
    ignored_columns: dict  # dataset -> columns not read (meta["ignored_columns"])

    @property
    def conditional(self) -> bool:
        return self.options["max_input_length"] is not None

    @property
    def piece_chars(self) -> int | None:
        """Characters per piece of a packed document (None: documents are not cut)."""
        return None if self.options["packing"] == "rows" else min(self.options["chunk_size"], _PIECE)

    def chunk_plan(self) -> dict:
        """What the saved chunks depend on (``.prepare-work/plan.json``)."""
        o = self.options
        return {
            "version": FORMAT_VERSION,
            "sources": self.source_info,
            "tokenizer": self.tokenizer_info,
            "conditional": self.conditional,
            "fields": o["fields"],
            "line_docs": o["line_docs"],
            "delimiter": o["delimiter"],
            "chunk_size": o["chunk_size"],
            "piece_chars": self.piece_chars,
            "dtype": self.dtype.str,
        }


def end_of_text_id(tok, name, eos_token: str | None) -> int | None:
    """The id that ends a text: the token ``eos_token`` (e.g. ``[SEP]``) when given, else the
    tokenizer's EOS; None when it has none."""
    if eos_token is None:
        return tok.eos_token_id
    vocab = tok.get_vocab()
    if eos_token not in vocab:
        special = ", ".join(dict.fromkeys(tok.all_special_tokens)) or "none"
        raise ValueError(
            f"--eos-token {eos_token!r} is not a token of the tokenizer {name!r} (its special tokens: {special})"
        )
    return vocab[eos_token]


def _plan(inputs: list, tokenizer: str, asked: dict) -> _Plan:
    """Resolve the sources, load the tokenizer and fill in the options left open (end-of-text and
    padding ids, packing, shard size)."""
    conditional = asked["max_input_length"] is not None
    sources = resolve_sources(inputs, asked["format"], conditional, asked["split"])
    tok = load_tokenizer(tokenizer)
    pad_token = asked["pad_token"] or ("eos" if conditional else "pad")
    eos_id = end_of_text_id(tok, tokenizer, asked["eos_token"])
    pad_id = eos_id if pad_token == "eos" else tok.pad_token_id
    if eos_id is None and (conditional or asked["separator"] == "eos" or pad_token == "eos"):
        why = "conditional rows end source and target with one" if conditional else "--separator / --pad-token eos"
        sep = f" (e.g. --eos-token {tok.sep_token})" if getattr(tok, "sep_token", None) else ""
        raise ValueError(
            f"tokenizer {tokenizer!r} has no EOS token, and {why}: name the end-of-text token with --eos-token{sep}"
        )
    if pad_id is None:
        raise ValueError(f"tokenizer {tokenizer!r} has no pad token: use --pad-token eos")
    ignored = {}
    for kind, src in sources:
        if kind == "hf":
            used = hf_columns(src, conditional, asked["fields"])
            ignored[source_fingerprint(kind, src)["dataset"]] = [c for c in src.column_names if c not in used]
    vocab = len(tok)
    dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<i4")
    pretokenised = any(k == "hf" and "input_ids" in src.column_names for k, src in sources)
    packing = "rows" if conditional else (asked["packing"] or ("rows" if pretokenised else "concat"))
    rows_per_shard = asked["shard_rows"] or max(1, _SHARD_BYTES // (asked["max_length"] * dtype.itemsize))
    return _Plan(
        options={**asked, "packing": packing, "pad_token": pad_token, "shard_rows": rows_per_shard},
        sources=sources,
        source_info=[source_fingerprint(k, s) for k, s in sources],
        tokenizer=tok,
        tokenizer_info={
            "name_or_path": str(tokenizer),
            "class": type(tok).__name__,
            "size": vocab,
            "vocab_sha256": vocab_fingerprint(tok),
            "eos_id": eos_id,
            "pad_id": tok.pad_token_id,
        },
        pad_id=pad_id,
        dtype=dtype,
        ignored_columns={k: v for k, v in ignored.items() if v},
    )


def _prepared_meta(plan: _Plan, out: Path, overwrite: bool, keep_work: bool, progress: bool) -> dict | None:
    """The metadata of a dataset already prepared in ``out`` with ``plan``, or None when there is
    none (or ``overwrite`` replaces another one)."""
    if not (out / META).is_file():
        return None
    try:
        meta = read_meta(out)
    except DataError:
        if overwrite:  # a damaged dataset is replaced like any other
            return None
        raise
    recorded = (meta["options"], meta["sources"], meta["tokenizer"])
    if recorded == (plan.options, plan.source_info, plan.tokenizer_info):
        if not keep_work:  # left behind by a run stopped between meta.json and the clean-up
            shutil.rmtree(out / WORK, ignore_errors=True)
        if progress:
            print(f"{out} is already prepared with these options ({meta['rows']} rows); nothing to do")
        return meta
    if not overwrite:
        raise files.OutputExistsError(
            f"{out} already holds a prepared dataset made from other inputs or options; pass --overwrite to replace it "
            "(the new one replaces it once complete)"
        )
    return None


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse, without ``overwrite``, an output folder that holds anything but a prepared dataset
    and the work of an interrupted prepare (it would be replaced as a whole)."""
    if overwrite or not out.is_dir():
        return
    ours = re.compile(rf"{re.escape(META)}|{WORK}|(ids|lengths)-\d+\.bin(\.tmp)?|\..*\.(lock|tmp-.*)", re.S)
    other = sorted(p.name for p in out.iterdir() if not ours.fullmatch(p.name))
    if other:
        raise files.OutputExistsError(
            f"--output {out} holds files that are not a prepared dataset ({', '.join(other[:5])}); pass --overwrite "
            "to replace the whole folder, or choose another folder"
        )


def _work_folder(plan: _Plan, out: Path, progress: bool) -> Path:
    """``out/.prepare-work`` with the chunks a run with the same plan saved (all cleared when
    the plan differs), without half-written files."""
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    chunk_plan = plan.chunk_plan()
    plan_file = work / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != chunk_plan:
        if progress:
            print(f"{work}: chunks from a run with other inputs or options; starting over")
        shutil.rmtree(work)
        work.mkdir()
    for stray in [*work.glob(".chunk-*"), *work.glob("*.tmp")]:  # temporaries of chunks a killed run was writing
        stray.unlink()
    files.write_json(plan_file, chunk_plan)
    return work


def _pack_bytes(plan: _Plan, work: Path, n_chunks: int) -> int:
    """About the bytes the shards of ``n_chunks`` saved chunks take (ids and lengths)."""
    ids = records = 0
    for k in range(n_chunks):
        with np.load(_chunk_path(work, k), allow_pickle=False) as z:
            ids += int(z["lens"].sum() + (z["src_lens"].sum() if "src_lens" in z else 0))
            records += len(z["lens"])
    L, size = plan.options["max_length"], plan.dtype.itemsize
    rows = records if plan.options["packing"] == "rows" else ids // L + 1
    return max(ids, rows * L) * size + rows * 8


def _chunk_path(work: Path, k: int) -> Path:
    return work / f"chunk-{k:06d}.npz"


# ----------------------------------------------------------------------------- tokenise (workers)

_WORKER: dict = {}


def _worker_init(tokenizer: str, parent: int) -> None:
    interrupts.worker_setup(parent)  # Ctrl-C and the end of the parent end the workers quietly
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
                raise ValueError(
                    f"token id {bad} is outside the tokenizer's {vocab} ids: was the dataset tokenised with another "
                    "tokenizer?"
                )
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


def _tokenise_chunk(job) -> int:
    """Tokenise one chunk and write it atomically to ``path``; returns its number of ids."""
    kind, items, spec, path = job
    arrays = _encode(kind, items, spec)
    files.write_atomic(path, lambda f: np.savez(f, **arrays), binary=True)
    return int(arrays["lens"].sum() + (arrays["src_lens"].sum() if "src_lens" in arrays else 0))


def _chunk_tokens(path: Path) -> int:
    """Number of ids in a saved chunk."""
    with np.load(path, allow_pickle=False) as z:
        return int(z["lens"].sum() + (z["src_lens"].sum() if "src_lens" in z else 0))


@dataclass
class _Tokenised:
    """What the tokenise stage did."""

    chunks: int  # chunks of the inputs
    reused: int  # of them found saved by an earlier run
    tokens: int  # ids of the chunks tokenised now
    seconds: float


def _tokenise(plan: _Plan, work: Path, workers: int, counts: Counter, progress: bool) -> _Tokenised:
    """Tokenise the inputs chunk by chunk, in input order, into ``work/chunk-XXXXXX.npz``; chunks
    saved there already are skipped. Reading counts empty lines / invalid UTF-8 in ``counts``."""
    o = plan.options
    spec = {"dtype": plan.dtype.str, "vocab": plan.tokenizer_info["size"], "eos_id": plan.tokenizer_info["eos_id"]}
    limit = plan.piece_chars or math.inf
    stream = records(plan.sources, plan.conditional, o["fields"], o["line_docs"], o["delimiter"], limit, counts)
    tasks = chunks(stream, o["chunk_size"])
    t0 = time.perf_counter()
    n_chunks, reused, fresh_tokens = 0, 0, 0
    bar = tqdm(desc="tokenise", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr) if progress else None

    def jobs():
        nonlocal n_chunks, reused
        for k, (kind, items) in enumerate(tasks):
            n_chunks = k + 1
            path = _chunk_path(work, k)
            if path.is_file():
                reused += 1
                if bar is not None:
                    bar.update(_chunk_tokens(path))
                continue
            yield kind, items, spec, path

    def done(n):
        nonlocal fresh_tokens
        fresh_tokens += n
        if bar is not None:
            bar.update(n)

    try:
        if workers == 1:
            _WORKER["tokenizer"] = plan.tokenizer
            for job in jobs():
                done(_tokenise_chunk(job))
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            initargs = (plan.tokenizer_info["name_or_path"], os.getpid())
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=initargs) as pool:
                pending = set()
                try:
                    for job in jobs():
                        pending.add(pool.submit(_tokenise_chunk, job))
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
    return _Tokenised(n_chunks, reused, fresh_tokens, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- pack (shards)


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
                # open across write() calls until the shard is full or the writer is closed
                self.files = [open(self.out / (name + ".tmp"), "wb") for name in self._names()]  # noqa: SIM115
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

    def __init__(
        self,
        writer: _ShardWriter,
        L: int,
        pad_id: int,
        packing: str,
        sep: int | None,
        max_input_length,
        counts: Counter,
    ):
        self.w, self.L, self.pad, self.packing, self.sep = writer, L, pad_id, packing, sep
        self.mil, self.counts = max_input_length, counts
        self.carry = np.zeros(0, dtype=writer.dtype)
        self.open_doc = 0  # tokens of the document still open at the end of the previous chunk

    def feed(self, z: dict) -> None:
        c, L = self.counts, self.L
        if "src" in z:
            rows, lengths = rows_from_flat(
                z["ids"], z["lens"], L, self.pad, self.w.dtype, z["src"], z["src_lens"], self.mil
            )
            c["pairs"] += len(rows)
            c["truncated_conditions"] += int((z["src_lens"] > self.mil).sum())
            full = np.minimum(z["src_lens"], self.mil) + z["lens"]
            c["truncated_rows"] += int((full > L).sum())
            cut_conditions = z["src_lens"] - np.minimum(z["src_lens"], self.mil)
            c["dropped_tokens"] += int(cut_conditions.sum() + (full - lengths[:, 1]).sum())
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
            rows, lengths = rows_from_flat(ids, lens[keep], L, self.pad, self.w.dtype)
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
            rows, lengths = rows_from_flat(self.carry, [len(self.carry)], self.L, self.pad, self.w.dtype)
            self.counts["padded_rows"] += 1
            self._emit(rows, lengths)
            self.carry = self.carry[:0]


def _pack(plan: _Plan, out: Path, work: Path, n_chunks: int, counts: Counter) -> dict:
    """Pack the ``n_chunks`` saved chunks into row shards in the new folder ``out``, then write
    ``meta.json``; returns the metadata. ``counts`` gains the packing counts."""
    o, L = plan.options, plan.options["max_length"]
    eos_id = plan.tokenizer_info["eos_id"]
    writer = _ShardWriter(out, L, plan.dtype, o["shard_rows"])
    sep = eos_id if o["separator"] == "eos" else None
    packer = _Packer(writer, L, plan.pad_id, o["packing"], sep, o["max_input_length"], counts)
    for k in range(n_chunks):
        with np.load(_chunk_path(work, k), allow_pickle=False) as z:
            packer.feed({name: z[name] for name in z.files})
    packer.finish()
    shards = writer.close()
    if counts["rows"] == 0:
        raise ValueError("the inputs hold no tokens (empty corpus): every document is empty")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "conditional": plan.conditional,
        "max_length": L,
        "max_input_length": o["max_input_length"],
        "dtype": plan.dtype.name,
        "pad_id": plan.pad_id,
        "eos_id": eos_id,
        "pad_token": o["pad_token"],
        "rows": counts["rows"],
        "tokens": counts["tokens"],
        "shards": shards,
        "counts": {k: counts[k] for k in sorted(counts)},
        "tokenizer": plan.tokenizer_info,
        "sources": plan.source_info,
        "ignored_columns": plan.ignored_columns,
        "options": o,
        "elflm_version": __version__,
    }
    files.write_json(out / META, meta)
    return meta


def _print_summary(meta: dict, out: Path, stats: _Tokenised, workers: int) -> None:
    c = meta["counts"]
    print(
        f"prepared {meta['rows']} rows × {meta['max_length']} tokens ({meta['tokens']} valid tokens) "
        f"in {len(meta['shards'])} shard(s): {out}"
    )
    details = [f"{k.replace('_', ' ')} {v}" for k, v in c.items() if k not in ("rows", "tokens")]
    if details:
        print("  " + ", ".join(details))
    for name, columns in meta.get("ignored_columns", {}).items():
        print(f"  columns not used of {name}: {', '.join(columns)}")
    rate = f" ({stats.tokens / stats.seconds:,.0f} tokens/s)" if stats.seconds > 0 and stats.tokens else ""
    print(
        f"  tokenised {stats.tokens} tokens in {stats.seconds:.1f} s{rate} with {workers} worker(s); "
        f"reused {stats.reused}/{stats.chunks} chunks"
    )


# ----------------------------------------------------------------------------- CLI
