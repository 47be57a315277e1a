"""The monitor's worker thread: thread-local math limits, drops, failures."""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import pytest
import torch

from rlmonitor.core.worker import MonitorWorker, limit_thread_math


def _gomp():
    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    if not libs:
        pytest.skip("this torch build does not use libgomp")
    return ctypes.CDLL(libs[0])


def test_limit_thread_math_is_thread_local():
    gomp = _gomp()
    before = gomp.omp_get_max_threads()
    seen = {}

    def work():
        seen["ok"] = limit_thread_math(1)
        seen["threads"] = gomp.omp_get_max_threads()
        seen["svd"] = torch.linalg.svdvals(torch.eye(64) * 3.0)[0].item()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"ok": True, "threads": 1, "svd": 3.0}
    assert gomp.omp_get_max_threads() == before  # the calling (training) thread keeps its threads


def test_worker_drops_when_busy_and_survives_failures():
    gate, started = threading.Event(), threading.Event()
    w = MonitorWorker(async_=True, max_pending=1, threads=1)
    ran = []
    assert w.submit(lambda: (started.set(), gate.wait()))  # occupies the thread
    assert started.wait(10)
    assert w.submit(lambda: ran.append(1))  # queued
    with pytest.warns(RuntimeWarning, match="busy"):
        assert not w.submit(lambda: ran.append(2))  # queue full: dropped, not blocking
    gate.set()
    with pytest.warns(RuntimeWarning, match="boom"):
        w.submit(lambda: (_ for _ in ()).throw(ValueError("boom")), block=True)
        w.flush()
    w.submit(lambda: ran.append(3), block=True)
    w.flush()
    w.close()
    assert ran == [1, 3] and w.dropped == 1 and w.errors == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_worker_runs_at_lower_priority_than_training():
    """The worker thread (and only it) runs ``nice`` steps below the training thread."""
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def job():
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    w = MonitorWorker(nice=5)
    w.submit(job, block=True)
    assert w.close(timeout=10) == 0
    assert seen["nice"] == min(19, here + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here  # training's priority unchanged
    assert os.getpriority(os.PRIO_PROCESS, 0) == here

    w = MonitorWorker(nice=0)
    w.submit(job, block=True)
    assert w.close(timeout=10) == 0
    assert seen["nice"] == here


@pytest.mark.parametrize("bad", [-1, 20, 2.5, True])
def test_worker_nice_is_validated(bad):
    from rlmonitor.core.config import GeometryConfig

    with pytest.raises(ValueError, match="worker_nice"):
        GeometryConfig(worker_nice=bad)
