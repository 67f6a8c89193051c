"""All-or-nothing outputs (elflm.files): atomic files and staged folders hold the complete old or
the complete new content after a SIGKILL at any moment, stray temporaries of dead writers are
cleaned (an old copy put back), locks refuse a second writer and are not left stuck by a killed
one, the user's umask applies, and a file-size limit is a clear error. Writers run in forked
children killed after random delays (no interpreter start-up per kill)."""

import errno
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from elflm import files, interrupts


def forked(body) -> int:
    """Run ``body()`` in a forked child; returns its pid (the child exits 0, or 1 on an error)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            interrupts.own_progress_locks()  # a kill while it holds tqdm's lock must not freeze us
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def kill_at_random(write_forever, check, times: int, window: float, seed: int = 0) -> None:
    """``times`` times: fork a child running ``write_forever()``, SIGKILL it after a random delay
    in [0, window) s, then ``check()`` the target."""
    rng = random.Random(seed)
    for _ in range(times):
        pid = forked(write_forever)
        time.sleep(rng.uniform(0, window))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        check()


def dead_pid() -> int:
    """The pid of a process that has ended."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_write_atomic_survives_kills_at_any_moment(tmp_path):
    target = tmp_path / "out.jsonl"
    versions = {n: [{"n": n, "text": "x" * 2000, "k": k} for k in range(300)] for n in range(2)}
    files.write_jsonl(target, versions[0])
    expected = {n: "".join(json.dumps(r) + "\n" for r in v) for n, v in versions.items()}

    def write_forever():
        n = 0
        while True:
            n = 1 - n
            files.write_jsonl(target, versions[n])

    kill_at_random(write_forever, lambda: assert_in(target.read_text(), expected.values()), times=12, window=0.25)
    files.write_jsonl(target, versions[1])  # the next writer removes what the killed ones left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def assert_in(value, allowed) -> None:
    assert value in list(allowed), "a mix of old and new content"


def test_staged_folder_survives_kills_at_any_moment(tmp_path):
    target = tmp_path / "model"
    contents = {n: {f"f{k}.bin": bytes([n]) * 200_000 for k in range(6)} for n in range(2)}

    def write(n):
        with files.staged_folder(target, overwrite=True) as tmp:
            for name, data in contents[n].items():
                (tmp / name).write_bytes(data)

    def write_forever():
        n = 0
        while True:
            n = 1 - n
            write(n)

    def check():
        got = {p.name: p.read_bytes() for p in target.iterdir()}
        assert_in(got, contents.values())

    write(0)
    kill_at_random(write_forever, check, times=12, window=0.3, seed=1)
    write(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_outputs_need_overwrite(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/x").write_text("keep")
    with pytest.raises(files.OutputExistsError, match="--overwrite"), files.staged_folder(tmp_path / "a"):
        pass
    assert (tmp_path / "a/x").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    with files.staged_folder(tmp_path / "empty") as tmp:  # an empty folder counts as absent
        (tmp / "y").write_text("new")
    assert (tmp_path / "empty/y").read_text() == "new"
    with pytest.raises(files.OutputExistsError, match="is a folder"):
        files.check_overwrite(tmp_path / "a", True, "--output")
    with pytest.raises(files.OutputExistsError, match="not a folder"):
        files.check_overwrite(tmp_path / "a/x", True, "--output", folder=True)
    with pytest.raises(RuntimeError), files.staged_folder(tmp_path / "a", overwrite=True) as tmp:  # a failed writer
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x"] and len(list(tmp_path.iterdir())) == 2


def test_stray_temporaries_of_dead_writers_are_cleaned_or_put_back(tmp_path):
    target = tmp_path / "out"
    pid, host = dead_pid(), socket.gethostname()
    stray = tmp_path / f".out.tmp-{pid}-0123abcd@{host}"
    stray.mkdir()
    old = tmp_path / f".out.old-{pid}-89abcdef@{host}"
    old.mkdir()
    (old / "complete").write_text("old")
    alive = tmp_path / f".out.tmp-{os.getpid()}-00000000@{host}"  # a live writer's: kept
    alive.mkdir()
    elsewhere = tmp_path / ".out.tmp-1-00000000@another-host"  # another host's: cannot tell, kept
    elsewhere.mkdir()
    assert files.clean_strays(target) == [stray]
    assert (target / "complete").read_text() == "old"  # the target was missing: the old copy is back
    assert alive.exists() and elsewhere.exists()


def test_lock_refuses_a_second_writer_and_is_not_left_by_a_killed_one(tmp_path):
    target = tmp_path / "run"
    ready = tmp_path / "ready"

    def hold():
        with files.locked(target):
            ready.touch()
            time.sleep(60)

    pid = forked(hold)
    while not ready.exists():
        time.sleep(0.01)
    busy = rf"{target} is being written by another process \(pid {pid} on"
    with pytest.raises(files.OutputLockedError, match=busy), files.locked(target):
        pass
    with pytest.raises(files.OutputLockedError):
        files.write_text(target, "x")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert files.lock_path(target).exists()  # the killed owner's file stays, but holds no lock
    with files.locked(target), files.locked(target):  # free again, and re-entrant in one process
        info = json.loads(files.lock_path(target).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not files.lock_path(target).exists()


def test_a_child_killed_holding_the_progress_lock_does_not_freeze_this_process(tmp_path):
    from tqdm import tqdm

    tqdm(disable=True).close()  # this process's lock exists before the fork, as after any earlier bar
    held = tmp_path / "held"

    def hold():
        with tqdm.get_lock():
            held.touch()
            time.sleep(60)

    pid = forked(hold)
    while not held.exists():
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    bar = threading.Thread(target=lambda: tqdm(disable=True).close(), daemon=True)
    bar.start()
    bar.join(20)
    assert not bar.is_alive(), "a progress bar waits for a lock held by a dead child"


def test_an_output_that_cannot_be_created_is_named_not_its_lock():
    with pytest.raises(OSError, match=r"cannot write /proc/elflm-out\.jsonl: No such file or directory"):
        files.write_text("/proc/elflm-out.jsonl", "x")


def test_outputs_get_the_users_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        f = files.write_text(tmp_path / "f.txt", "x")
        with files.staged_folder(tmp_path / "d") as tmp:
            (tmp / "inside").write_text("y")
    finally:
        os.umask(previous)
    assert f.stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o775  # readable and writable by the group


def test_file_size_limit_is_a_clear_error_and_keeps_the_old_output(tmp_path):
    target = tmp_path / "big"
    with files.staged_folder(target) as tmp:
        (tmp / "data").write_bytes(b"old")
    report = tmp_path / "report.json"

    def write_too_much():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            with files.staged_folder(target, overwrite=True) as tmp, open(tmp / "data", "wb") as f:
                f.write(b"n" * 300_000)
        except files.NoSpaceError as e:
            report.write_text(json.dumps(str(e)))

    pid = forked(write_too_much)
    os.waitpid(pid, 0)
    message = json.loads(report.read_text())
    assert message.startswith(f"cannot write {target}: a file reached the file-size limit of 97.7 KiB (ulimit -f)")
    assert message.endswith(f"{target} was left as it was")
    assert (target / "data").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "big",
        "report.json",
    ]


def test_full_disk_errors_name_the_output_and_the_space(tmp_path):
    full = r"cannot write .*out: no space left on the device \(.* free in .*; it needs about 10.00 GiB\)"
    with pytest.raises(files.NoSpaceError, match=full), files.resource_errors(tmp_path / "out", 10 * 2**30):
        raise OSError(errno.ENOSPC, "No space left on device")
    quota = "the disk quota is exceeded .* it needs about 1.00 GiB"  # wrapped by a library, as torch does
    with pytest.raises(files.NoSpaceError, match=quota), files.resource_errors(tmp_path / "out", 2**30):
        raise RuntimeError("write failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(files.NoSpaceError, match="it needs about 1073741824.00 GiB"):  # refused before writing
        files.check_space(tmp_path / "out", 2**60)
    with pytest.raises(ValueError, match="unrelated"), files.resource_errors(tmp_path / "out", 1):
        raise ValueError("unrelated")  # other errors pass through


def test_exchange_fallback_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, monkeypatch):
    """Where renameat2 is missing, the old folder is renamed aside first; a writer killed between
    the two renames leaves it as an old copy that the next writer puts back."""
    target = tmp_path / "m"
    with files.staged_folder(target) as tmp:
        (tmp / "v").write_text("1")
    monkeypatch.setattr(files, "_LIBC", False)
    with files.staged_folder(target, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # as if killed between the renames: only the old copy is left, owned by a dead process
    os.rename(target, tmp_path / f".m.old-{dead_pid()}-00000001@{socket.gethostname()}")
    with files.locked(target):
        files.clean_strays(target)
    assert (target / "v").read_text() == "2"


@pytest.mark.parametrize("name", ["with space", "hash#tag", "new\nline", "ünï"])
def test_paths_are_taken_literally(tmp_path, name):
    target = tmp_path / name
    files.write_jsonl(target, [{"a": 1}])
    assert json.loads(target.read_text()) == {"a": 1}
    with files.staged_folder(tmp_path / f"{name}-dir") as tmp:
        (tmp / "x").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{name}-dir"])


def test_killed_python_writer_leaves_no_lock_behind(tmp_path):
    """A real interpreter killed while holding a lock (not a fork of this one)."""
    target = tmp_path / "out"
    code = (  # files.py alone (it imports no other elflm module): no torch import in the child
        "import importlib.util, sys, time\n"
        "spec = importlib.util.spec_from_file_location('files', sys.argv[2])\n"
        "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)\n"
        "with files.locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(target), files.__file__], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(files.OutputLockedError, match=f"pid {proc.pid}"):
        files.write_text(target, "x")
    proc.kill()
    proc.wait()
    files.write_text(target, "x")
    assert target.read_text() == "x"
