"""Flushing live monitors when the process ends: at interpreter exit (which an
exception escaping ``trainer.train()`` or Ctrl-C leads to) and on SIGTERM.

Handlers are installed when the first monitor starts, after the Trainer has started
its W&B run, so this flush runs before W&B's own exit hook and records still reach
the run. A previous SIGTERM handler is chained; with the default one, the process
then ends by SIGTERM as it would have without rlmonitor.
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
    flush_all("SIGTERM")
    if callable(_previous):
        _previous(signum, frame)
    elif _previous == signal.SIG_IGN:
        return
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
