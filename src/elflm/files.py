"""Reading and writing the text files elflm exchanges with users: UTF-8 lines (``.gz`` too), JSON
lines with line-numbered errors, and JSONL outputs written to a temporary file beside the target
and moved into place in one step (a reader never sees half a file). ``-`` is stdin / stdout."""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file (``.gz`` read through gzip; ``-``: stdin), without line ends; a
    final line break does not add an empty line. Invalid UTF-8 is an error naming the line."""
    if str(path) == "-":
        raw = sys.stdin.buffer.read()
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); expected a UTF-8 text file"
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [s[:-1] if s.endswith("\r") else s for s in lines]


def is_jsonl(path: str | Path) -> bool:
    """Whether ``path`` names a JSON-lines file (``.jsonl`` or ``.jsonl.gz``)."""
    return Path(str(path).removesuffix(".gz")).suffix == ".jsonl"


def parse_jsonl(lines: list[str], path: str | Path) -> list[tuple[int, object]]:
    """``(line number, value)`` of each non-blank line of JSON ``lines`` read from ``path``."""
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line") from None
    return rows


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file."""
    return parse_jsonl(read_lines(path), path)


def _starts_with_object(lines: list[str]) -> bool:
    first = next((line for line in lines if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: str | Path) -> tuple[list[tuple[int, object]], bool]:
    """The records of a text or JSON-lines file and whether it is JSON lines: ``(line number,
    object)`` of each non-blank line of a ``.jsonl[.gz]`` file, else ``(line number, line)`` of
    every line. Stdin (``-``) is JSON lines when its first non-blank line is a JSON object."""
    lines = read_lines(path)
    if is_jsonl(path) or (str(path) == "-" and _starts_with_object(lines)):
        return parse_jsonl(lines, path), True
    return list(enumerate(lines, 1)), False


def first_field(records: list[tuple[int, object]], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` that the first JSON object of ``records`` has, else None."""
    first = records[0][1] if records else None
    return next((f for f in candidates if isinstance(first, dict) and f in first), None)


def column(
    records: list[tuple[int, object]],
    jsonl: bool,
    path: str | Path,
    field: str,
    *,
    what: str = "text",
    allow_empty: bool = True,
    option: str = "",
) -> list[str]:
    """Texts of :func:`read_records`' output: the lines, or for JSON lines the string ``field``
    of each object. ``allow_empty=False`` makes an empty text an error; no texts at all is always
    one. ``option`` names the command-line option that chooses ``field``."""
    if jsonl:
        texts = []
        for n, obj in records:
            if not isinstance(obj, dict) or field not in obj:
                hint = f" (see {option})" if option else ""
                raise ValueError(f"{path}:{n}: expected a JSON object with a string field {field!r}{hint}")
            if not isinstance(obj[field], str):
                raise ValueError(f"{path}:{n}: field {field!r} must be a string, got {type(obj[field]).__name__}")
            texts.append((n, obj[field]))
    else:
        texts = records
    if not allow_empty:
        for n, text in texts:
            if not text.strip():
                raise ValueError(f"{path}:{n}: empty {what}")
    if not texts:
        raise ValueError(f"{path}: no {what}s found (the file is empty)")
    return [t for _, t in texts]


def read_texts(
    path: str | Path, field: str, *, what: str = "text", allow_empty: bool = True, option: str = ""
) -> list[str]:
    """Texts from a file (``-``: stdin): its lines, or for JSON lines the string ``field`` of each
    object (blank lines skipped); see :func:`column`."""
    records, jsonl = read_records(path)
    return column(records, jsonl, path, field, what=what, allow_empty=allow_empty, option=option)


def write_atomic(path: str | Path, write) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` (text mode, UTF-8), flush it to
    disk and rename it to ``path``: the target holds the old or the new content, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped) to ``path`` (atomically) or stdout (``-``)."""

    def write(f):
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    if str(path) == "-":
        write(sys.stdout)
        sys.stdout.flush()
    else:
        write_atomic(path, write)


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path`` atomically (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text))
