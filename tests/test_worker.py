"""The monitor's worker thread: thread-local math limits, drops, failures."""

from __future__ import annotations

import ctypes
import glob
import os
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
