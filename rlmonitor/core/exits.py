"""Flushing live monitors when the process ends: at interpreter exit (which an
exception escaping ``trainer.train()`` or Ctrl-C leads to) and on SIGTERM.

Handlers are installed when the first monitor starts, after the Trainer has started
its W&B run, so this flush runs before W&B's own exit hook and records still reach
the run.

SIGTERM while a monitor is live: with the default handler in place before ours, the
signal becomes ``SystemExit(143)`` (128 + SIGTERM, the status a shell reports for a
process killed by it) raised in the main thread, so training unwinds like on Ctrl-C
and the interpreter-exit flush runs with no lock held mid-write, followed by W&B's own
exit hook (a process that dies by the signal itself loses what W&B still buffers). A
previous Python handler is called after a flush; an ignored SIGTERM stays ignored.
With no live monitor the signal is handled as it would have been without rlmonitor.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref
from typing import Any

__all__ = ["flush_all", "register", "unregister"]

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_installed = {"atexit": False, "sigterm": False}
_previous: Any = signal.SIG_DFL


def register(monitor: Any) -> None:
    """Flush ``monitor`` (``monitor.close(reason)``) if the process ends before it closes."""
    _LIVE.add(monitor)
    _install()


def unregister(monitor: Any) -> None:
    _LIVE.discard(monitor)


def flush_all(reason: str) -> None:
    for monitor in list(_LIVE):
        with contextlib.suppress(Exception):  # ending anyway: never mask the original exit
            monitor.close(reason)


def _install() -> None:
    global _previous
    if not _installed["atexit"]:
        atexit.register(flush_all, "interpreter exit")
        _installed["atexit"] = True
    if not _installed["sigterm"] and threading.current_thread() is threading.main_thread():
        try:
            _previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            _installed["sigterm"] = True
        except (ValueError, OSError):  # not allowed here (embedded interpreters)
            pass


def _on_sigterm(signum: int, frame: Any) -> None:
    if callable(_previous):
        flush_all("SIGTERM")
        _previous(signum, frame)
    elif _previous == signal.SIG_IGN:
        return
    elif _LIVE:
        raise SystemExit(128 + signum)  # flushed at interpreter exit, before W&B's exit hook
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
