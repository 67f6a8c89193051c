"""Reading and writing what elflm exchanges with users: UTF-8 lines (``.gz`` too) and JSON lines
with line-numbered errors (``-`` is stdin / stdout), and the one place for all-or-nothing outputs:
files and folders written beside their target and moved into place in one step
(:func:`write_atomic`, :func:`staged_folder`, :func:`publish`), stray temporaries of dead writers
cleaned (:func:`clean_strays`), per-output locks that a crashed owner does not leave stuck
(:func:`locked`), refused overwrites (:func:`check_overwrite`) and clear errors for a full disk or
the file-size limit (:func:`resource_errors`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import socket
import sys
import time
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


# ----------------------------------------------------------------------------- all-or-nothing outputs
#
# Every file or folder elflm produces is written beside its target under a temporary name
# (``.<name>.tmp-<pid>-<token>@<host>``), flushed to disk and moved into place in one step, so
# that the target always holds the complete old or the complete new content. A folder replaces
# an existing one by an atomic exchange (renameat2 RENAME_EXCHANGE; elsewhere two renames, the
# old one kept as ``.<name>.old-…`` until the new one is in place). Temporaries of a process that
# no longer runs are removed by the next writer of the same target (an ``old`` one is put back
# when the target is missing). Writers of one target hold ``.<name>.lock`` beside it: a POSIX
# record lock that the kernel releases when the owner dies, with the owner's pid, host, start time
# and command in the file for the message of the writer that is refused.

_HOST = socket.gethostname()
_STRAY = re.compile(r"\.(?P<stem>.*)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})@(?P<host>[^/]*)", re.S)
_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}
_TOO_BIG = errno.EFBIG
_MESSAGES = {
    "No space left": errno.ENOSPC,
    "StorageFull": errno.ENOSPC,
    "Disk quota": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "FileTooLarge": errno.EFBIG,
}


class OutputExistsError(FileExistsError, ValueError):
    """The output a command would write exists and ``--overwrite`` was not given (a bad argument as
    much as a file condition: both a ``FileExistsError`` and a ``ValueError``)."""


class OutputLockedError(OSError):
    """Another process is writing the same output (it holds the output's lock file)."""


class NoSpaceError(OSError):
    """The disk is full, the quota exceeded or a file over the file-size limit (``ulimit -f``)
    while writing an output; the message names the output, the space it needs and what is free."""


def _stem(target: Path) -> str:
    """The target's name as it appears in the names of its temporaries and lock (shortened with a
    digest when long, so that those names stay within the file-name limit)."""
    name = target.name
    return name if len(name.encode()) <= 160 else name[:80] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]


def temporary_path(target: str | Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``target`` for a temporary of this process:
    ``.<name>.<kind>-<pid>-<token>@<host>``."""
    target = Path(target)
    return target.parent / f".{_stem(target)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}@{_HOST}"


def lock_path(target: str | Path) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` beside it."""
    target = Path(target)
    return target.parent / f".{_stem(target)}.lock"


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when unknown (not Linux, or
    no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime "))
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def owner_alive(pid: int, host: str, since: float | None) -> bool:
    """Whether process ``pid`` on ``host`` may still own something it made at ``since`` (seconds
    since the epoch): false only when that host is this one and the pid is gone, or now belongs to a
    process started after ``since``. Owners on other hosts count as alive (this host cannot tell)."""
    if host != _HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = process_started(pid)
    return started is None or since is None or started <= since + 1.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def dead_temporaries(target: str | Path) -> list[tuple[Path, str]]:
    """``(path, kind)`` of the temporaries of ``target`` (kind ``tmp`` or ``old``) whose writer no
    longer runs, ``old`` ones first."""
    target = Path(target)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    stem, dead = _stem(target), []
    for path in entries:
        m = _STRAY.fullmatch(path.name)
        if not m or m["stem"] != stem:
            continue
        try:
            since = path.lstat().st_ctime  # creation, or the rename that made an old copy
        except FileNotFoundError:
            continue
        if not owner_alive(int(m["pid"]), m["host"], since):
            dead.append((path, m["kind"]))
    return sorted(dead, key=lambda pk: pk[1] != "old")


def clean_strays(target: str | Path) -> list[Path]:
    """Remove the temporaries of ``target`` left by processes that no longer run (a kill during a
    write); when ``target`` itself is missing, a kept ``old`` copy of it is put back first. Returns
    the paths removed."""
    target = Path(target)
    removed = []
    for path, kind in dead_temporaries(target):
        if kind == "old" and not os.path.lexists(target):
            os.rename(path, target)
            continue
        _remove(path)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- locks

_HELD: dict[str, list] = {}  # lock file -> [fd, depth] of the locks this process holds


def _lock_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _owner_text(info: dict) -> str:
    if not isinstance(info.get("pid"), int):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") else "?"
    return f"another process (pid {info['pid']} on {info.get('host')}, started {since}: {info.get('command', '?')})"


def _locked_error(target: Path, path: Path, info: dict) -> OutputLockedError:
    return OutputLockedError(
        f"{target} is being written by {_owner_text(info)}; wait until it ends or write elsewhere "
        f"(the lock {path} is released when that process ends)"
    )


def _acquire(target: Path, path: Path, wait: bool) -> int:
    info = {
        "pid": os.getpid(),
        "host": _HOST,
        "started": process_started(os.getpid()) or time.time(),
        "command": " ".join(sys.argv),
    }
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise _locked_error(target, path, _lock_info(path)) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # a file system without record locks: the recorded owner decides
            held = _lock_info(path)
            other = isinstance(held.get("pid"), int) and held["pid"] != os.getpid()
            if other and owner_alive(held["pid"], str(held.get("host")), held.get("started")):
                raise _locked_error(target, path, held) from None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner removed the file between our open and lock: take the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return fd


@contextlib.contextmanager
def locked(target: str | Path, wait: bool = False):
    """Hold the lock of ``target`` (``.<name>.lock`` beside it; the folder is created): another
    process that asks for it gets :class:`OutputLockedError` naming the owner, or with ``wait``
    blocks until it is free. Re-entrant within a process. A crashed owner leaves no lock held: the
    kernel releases it with the process, and the next owner reuses the file."""
    target = Path(target)
    path = lock_path(target)
    key = os.path.abspath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(target, path, wait)
    except OutputLockedError:
        raise
    except OSError as e:  # name what the user asked for, not our lock file
        raise OSError(e.errno, f"cannot write {target}: {e.strerror or e}") from e
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- resource faults


def size_text(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``3.1 MiB``, ``1.20 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


def _bytes_in(path: Path) -> tuple[int, int]:
    """(total, largest) size of the files at ``path`` (a file or a folder)."""
    if path.is_file():
        n = path.stat().st_size
        return n, n
    sizes = [f.stat().st_size for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
    return sum(sizes), max(sizes, default=0)


def _fault(e: BaseException, written: Path | None) -> int | None:
    """The errno of a full disk / quota / file-size fault behind ``e`` (its chain, the message of
    a library that wraps it, or, for errors that hide it, the state of the disk and of the files
    being ``written``), else None."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno in _FULL or seen.errno == _TOO_BIG):
            return seen.errno
        for text, code in _MESSAGES.items():
            if text in str(seen):
                return code
        seen = seen.__cause__ or seen.__context__
    if written is None or not written.exists():
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and _bytes_in(written)[1] >= limit:
        return _TOO_BIG
    if shutil.disk_usage(written if written.is_dir() else written.parent).free < 2**20:
        return errno.ENOSPC
    return None


def _fault_message(target: Path, code: int, need: int | None, written: Path | None) -> str:
    done, largest = _bytes_in(written) if written is not None and written.exists() else (0, 0)
    need_text = f"about {size_text(need)}" if need else f"more than the {size_text(done)} written before it failed"
    where = target.parent if target.parent.exists() else Path(".")
    if code == _TOO_BIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        cap = "" if limit == resource.RLIM_INFINITY else f" of {size_text(limit)}"
        problem = f"a file reached the file-size limit{cap} (ulimit -f); the output needs {need_text}"
        fix = "raise the limit or write elsewhere"
    else:
        free = shutil.disk_usage(where).free
        problem = f"{_FULL.get(code, 'no space left')} ({size_text(free)} free in {where}; it needs {need_text})"
        fix = "free some space or write elsewhere"
    return f"cannot write {target}: {problem}; {fix}. {target} was left as it was"


@contextlib.contextmanager
def resource_errors(target: str | Path, need: int | None = None, written: str | Path | None = None):
    """Turn a full disk, an exceeded quota or the file-size limit met while writing ``target``
    (into the temporary ``written``) into :class:`NoSpaceError`, naming ``target``, the space it
    ``need``\\ s (bytes, when known) and the space free."""
    target = Path(target)
    written = Path(written) if written is not None else None
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as e:
        code = _fault(e, written)
        if code is None:
            raise
        raise NoSpaceError(_fault_message(target, code, need, written)) from e


def check_space(target: str | Path, need: int | None) -> None:
    """Raise :class:`NoSpaceError` before writing when ``target``'s folder has less than ``need``
    bytes free."""
    if not need:
        return
    where = Path(target).parent
    if shutil.disk_usage(where).free < need:
        raise NoSpaceError(_fault_message(Path(target), errno.ENOSPC, need, None))


# ----------------------------------------------------------------------------- writing


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | Path) -> None:
    """Flush every file and folder under ``folder`` (and itself) to disk."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(root)


def check_overwrite(target: str | Path, overwrite: bool, option: str = "output", folder: bool = False) -> None:
    """Refuse an output that exists unless ``overwrite`` (:class:`OutputExistsError`), and one of
    the wrong kind (a folder where a file is written, or the reverse) always; ``option`` names the
    argument in the message. An empty folder counts as absent."""
    target = Path(target)
    if not os.path.lexists(target) or (folder and target.is_dir() and not any(target.iterdir())):
        return
    if folder and not target.is_dir():
        raise OutputExistsError(f"{option} {target} exists and is not a folder; remove it or choose another path")
    if not folder and target.is_dir():
        raise OutputExistsError(f"{option} {target} is a folder; expected a file name")
    if not overwrite:
        raise OutputExistsError(
            f"{option} {target} already exists; pass --overwrite to replace it (replaced only once the new "
            "one is complete), or choose another path"
        )


_LIBC = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.renameat2  # noqa: B018  (glibc >= 2.28)
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    at_cwd, exchange = -100, 2
    if _LIBC.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(staged: str | Path, target: str | Path) -> None:
    """Move the complete ``staged`` folder (or file) to ``target`` in one step, replacing what is
    there (folders: an atomic exchange, then the old content is removed)."""
    staged, target = Path(staged), Path(target)
    if not os.path.lexists(target):
        os.rename(staged, target)
    elif not _exchange(staged, target):
        old = temporary_path(target, "old")
        os.rename(target, old)
        os.rename(staged, target)
        staged = old
    fsync_folder(target.parent)
    if os.path.lexists(staged):
        _remove(staged)


@contextlib.contextmanager
def staged_folder(target: str | Path, *, overwrite: bool = False, need: int | None = None, option: str = "output"):
    """Write a folder all-or-nothing: yields a new empty temporary folder beside ``target`` to
    fill; on success its files are flushed to disk and it replaces ``target`` in one step. An
    existing ``target`` needs ``overwrite`` (:func:`check_overwrite`); the target is locked
    meanwhile (:func:`locked`), stray temporaries of dead writers are removed first, and ``need``
    (bytes, when known) is checked against the free space. On any error or interruption the
    temporary is removed and ``target`` is untouched; a full disk or the file-size limit raise
    :class:`NoSpaceError`."""
    target = Path(target)
    with locked(target):
        clean_strays(target)
        check_overwrite(target, overwrite, option, folder=True)
        check_space(target, need)
        tmp = temporary_path(target)
        os.mkdir(tmp, 0o777)  # the user's umask applies
        try:
            with resource_errors(target, need, tmp):
                yield tmp
                sync_tree(tmp)
                publish(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


def write_atomic(path: str | Path, write, binary: bool = False, need: int | None = None) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` (text mode, UTF-8; ``binary``:
    bytes), flush it to disk and rename it to ``path``: the target holds the old or the new
    content, never a mix. The file gets the user's umask; the target is locked meanwhile; a full
    disk or the file-size limit raise :class:`NoSpaceError` naming ``path``."""
    path = Path(path)
    with locked(path):
        clean_strays(path)
        tmp = temporary_path(path)
        try:
            with resource_errors(path, need, tmp):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                fsync_folder(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


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


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=1) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a line break to ``path`` in one write (a log such as ``metrics.jsonl``):
    a kill leaves whole lines only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        with resource_errors(path, len(line) + 1, path):
            os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def drop_partial_line(path: str | Path) -> None:
    """Cut a line-oriented log back to its last complete line (what a kill during an append by
    another writer than :func:`append_line` could leave)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
