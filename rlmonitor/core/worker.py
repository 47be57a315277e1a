"""The monitoring agent's thread: runs metric jobs off the training loop.

Jobs are plain callables. The queue is bounded: when the worker is still busy
with earlier snapshots, a new job is *dropped* (counted, warned once) rather than
stalling training. Waits are bounded (:meth:`MonitorWorker.flush` takes a timeout),
so a metric that never returns cannot hang the training run. A job that raises is counted and warned about; the worker
keeps going. With ``async_=False`` jobs run inline (deterministic, for debugging).
``threads`` caps the MKL/OpenMP threads of the worker thread only (see
:func:`limit_thread_math`); ``nice`` lowers its CPU priority only (see
:func:`lower_thread_priority`).
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable

__all__ = ["MonitorWorker", "limit_thread_math", "lower_thread_priority"]


def limit_thread_math(n: int) -> bool:
    """Cap MKL and OpenMP parallelism *of the calling thread* at ``n`` threads.

    LAPACK/BLAS calls (SVD, QR, GEMM) made from a second Python thread start a
    second MKL/OpenMP thread team; on a machine with few cores it competes with
    the training thread's team and slows every later step (measured here: +60%
    on a 2-core CPU run). ``MKL_Set_Num_Threads_Local`` (the C entry point; the lowercase
    symbol is the Fortran one, taking a pointer) and libgomp's
    ``omp_set_num_threads`` are thread-local, so the training thread keeps its
    threads. Returns False when neither library could be reached (no effect).
    """
    import ctypes
    import glob
    import os

    import torch

    ok = False
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for pattern, symbol in (("libtorch_cpu*.so*", "MKL_Set_Num_Threads_Local"), ("libgomp*.so*", "omp_set_num_threads")):
        for path in glob.glob(os.path.join(libdir, pattern)):
            try:
                getattr(ctypes.CDLL(path), symbol)(ctypes.c_int(n))
                ok = True
                break
            except (OSError, AttributeError):
                continue
    return ok


def lower_thread_priority(nice: int) -> bool:
    """Raise the niceness *of the calling thread* by ``nice`` (Linux: niceness is a
    per-thread attribute, set here through the thread's id; threads it starts inherit it).

    Off the training thread is not off the training's cores: on a CPU-bound run the
    worker's metric math takes cores from training's thread team, and every parallel
    region then waits for its slowest thread (measured here: a 0.5B-shaped CPU GRPO run's
    steps took 3x longer while the worker computed the step-0 base). At a higher niceness
    the scheduler gives the worker the cycles training leaves idle (a GPU run leaves the
    CPU mostly idle). Other systems: nothing is changed (``setpriority`` there would
    renice the whole process). Returns True when the priority was lowered.
    """
    import os
    import sys

    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except (OSError, AttributeError):
        return False


class MonitorWorker:
    def __init__(
        self,
        async_: bool = True,
        max_pending: int = 1,
        name: str = "rlmonitor-worker",
        threads: int | None = None,
        nice: int = 0,
    ) -> None:
        self.async_ = async_
        self.threads = threads
        self.nice = nice
        self.errors = 0
        self.dropped = 0
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(1, max_pending))
        self._thread: threading.Thread | None = None
        self._abandoned = False  # closed with jobs left: the thread skips what is still queued
        if async_:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as e:
            self.errors += 1
            warnings.warn(f"rlmonitor: a monitoring job failed ({type(e).__name__}: {e}); training continues",
                          RuntimeWarning, stacklevel=2)

    def _loop(self) -> None:
        if self.threads is not None:
            limit_thread_math(self.threads)
        lower_thread_priority(self.nice)
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if not self._abandoned:
                    self._run(job)
            finally:
                self._queue.task_done()
            if self._abandoned and self._queue.empty():
                return

    def has_room(self) -> bool:
        return not self.async_ or not self._queue.full()

    def submit(self, job: Callable[[], None], *, block: bool = False, timeout: float | None = None) -> bool:
        """Run ``job`` (inline or queued). With ``block``, wait for room at most ``timeout``
        seconds. Returns False if it was dropped (counted)."""
        if not self.async_:
            self._run(job)
            return True
        try:
            self._queue.put(job, block=block, timeout=timeout if block else None)
            return True
        except queue.Full:
            self.drop()
            return False

    def drop(self) -> None:
        """Count a snapshot skipped because the worker is busy (warned once)."""
        self.dropped += 1
        if self.dropped == 1:
            warnings.warn("rlmonitor: the monitor is still busy with an earlier snapshot; dropping this one "
                          "(raise every_n_steps or disable spectral metrics to keep up)",
                          RuntimeWarning, stacklevel=3)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._queue.unfinished_tasks if self.async_ else 0

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every queued job has run, at most ``timeout`` seconds (None: no
        limit). Returns the number of jobs still queued or running (0: all done)."""
        if not self.async_:
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._queue.all_tasks_done
        with cond:
            while self._queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                cond.wait(remaining)
            return self._queue.unfinished_tasks

    def close(self, timeout: float | None = None) -> int:
        """Stop the thread after the queued jobs (waiting at most ``timeout`` seconds);
        returns the jobs abandoned. A thread that does not stop in time is left behind
        (it is a daemon: it never keeps the process alive); once its current job returns
        it skips the abandoned ones and ends."""
        left = self.flush(timeout)
        if self._thread is not None and self._thread.is_alive():
            if left:
                self._abandoned = True
            else:
                self._queue.put(None)
                self._thread.join(timeout)
        self._thread = None
        return left
