"""Interruptions: SIGINT (Ctrl-C) and SIGTERM (``kill``, schedulers) end a command promptly, with
one line saying what state it left, never a traceback, and with the worker processes it started.

:func:`ends_cleanly` wraps a command: inside it the first SIGINT or SIGTERM raises
:class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread, so that ``finally`` blocks and
all-or-nothing writers (:mod:`elflm.files`) clean up on the way out; the child processes the
command started are then ended, the line ``<command>: interrupted (SIGTERM); <state>`` is printed
on stderr and the process exits with status 128 + the signal number (130 for SIGINT, 143 for
SIGTERM). A second signal during that clean-up exits at once.

Worker processes call :func:`worker_setup` first: they leave SIGINT to their parent (a Ctrl-C
reaches the whole process group), end on SIGTERM without a traceback, and are killed by the kernel
when their parent dies, whatever ended it (Linux ``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command received ``signum`` (SIGINT or SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_STATE = {"interrupted": False, "line": ""}


def _on_signal(signum, frame) -> None:
    if _STATE["interrupted"]:  # a second signal while cleaning up: leave now
        sys.stderr.write(f"{_STATE['line']}: {signal.Signals(signum).name} again; exiting at once\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    _STATE["interrupted"] = True
    if hasattr(signal, "SIGCHLD"):  # workers ending now is expected: no "worker killed" errors (DataLoader)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise Interrupted(signum)


def end_children(timeout: float = 3.0) -> None:
    """End the child processes this process started through multiprocessing (pool and loader
    workers): SIGTERM, then SIGKILL for those still running after ``timeout`` seconds."""
    children = multiprocessing.active_children()
    for p in children:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in children:
        with contextlib.suppress(Exception):
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(1)


def close_progress_bars() -> None:
    """Close the progress bars still open (they would otherwise redraw themselves after the last
    line, when the interrupted command's frames are freed)."""
    std = sys.modules.get("tqdm.std")
    if std is not None:
        for bar in list(std.tqdm._instances):
            with contextlib.suppress(Exception):
                bar.close()


@contextlib.contextmanager
def ends_cleanly(command: str, state: Callable[[], str]):
    """Run the body with SIGINT / SIGTERM turned into :class:`Interrupted`; on an interruption end
    the child processes, print ``<command>: interrupted (<SIGNAL>); <state()>`` on stderr and exit
    with status 128 + the signal number. Outside the main thread the body runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _STATE.update(interrupted=False, line=command)
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    except KeyboardInterrupt as e:  # Interrupted, or a KeyboardInterrupt raised before our handler ran
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        _STATE["interrupted"] = True
        end_children()
        close_progress_bars()
        try:
            what = state()
        except Exception as err:  # the state could not be read: say so rather than fail here
            what = f"(the state could not be read: {err})"
        print(f"{command}: interrupted ({signal.Signals(signum).name}); {what}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _STATE["interrupted"] = False


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def own_progress_locks() -> None:
    """Give this forked process tqdm write locks of its own. tqdm's lock holds a semaphore that fork
    shares with the parent (every progress bar takes it, even a disabled one): a child ended while
    holding it would freeze the parent at its next progress bar."""
    std = sys.modules.get("tqdm.std")
    if std is None:  # not imported: nothing was inherited
        return
    std.TqdmDefaultWriteLock.mp_lock = multiprocessing.RLock()
    std.TqdmDefaultWriteLock.th_lock = threading.RLock()  # the parent's copy may be held by a thread gone here
    classes = [std.tqdm]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if "_lock" in vars(cls):
            cls._lock = std.TqdmDefaultWriteLock()


def worker_setup(parent: int, *_) -> None:
    """Set up a worker process of ``parent`` (its pid): SIGINT ignored (the parent ends the
    workers), SIGTERM ends it quietly, the kernel kills it when the parent dies, progress-bar locks
    of its own. Extra arguments (a DataLoader's worker id) are ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    own_progress_locks()
    _die_with_parent(parent)
