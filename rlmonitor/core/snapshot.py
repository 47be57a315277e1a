"""Weight snapshots: cheap copies taken on the training thread, read by the worker.

Design (GPU): snapshots live in *pinned CPU memory* and are filled by
asynchronous device-to-host copies on a side CUDA stream. The training thread
only enqueues the copies (no host sync); the training stream waits for the side
stream before its next kernel, so the optimizer cannot overwrite a weight that is
still being copied. GPU memory is untouched (a second copy of an 8B model would
not fit beside training), the math runs on the worker thread in CPU memory, and
the GPU cost is one PCIe transfer per interval (``geometry/snapshot_seconds`` is then
the time to enqueue the copies; the copy itself delays the next optimizer step).
Pinned buffers are reused from a small pool (allocating pinned memory is slow); the
pool's bytes count in ``geometry/snapshot_bytes``.

CPU tensors are simply copied (``Tensor.to(..., copy=True)``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Snapshot", "SnapshotTaker"]


@dataclass
class Snapshot:
    step: int
    tensors: dict[str, torch.Tensor]
    seconds: float = 0.0
    event: Any = None  # torch.cuda.Event when copies are in flight
    extra: dict[str, float] = field(default_factory=dict)
    partial: bool = False  # a rotating subset of the monitored matrices

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def wait(self) -> None:
        """Block until asynchronous copies have landed (call from the worker)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class SnapshotTaker:
    """Copies named tensors into snapshots.

    Args:
        dtype: storage dtype, or None to keep each tensor's own dtype.
        slots: pinned buffer sets in the pool (must cover base-free snapshots
            alive at once: the worker's current and previous, the queued one and
            the one being taken).
    """

    def __init__(self, dtype: torch.dtype | None = None, slots: int = 4) -> None:
        self.dtype = dtype
        self.slots = slots
        self._pool: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self._count = 0
        self._stream = None

    def pooled_bytes(self) -> int:
        """Pinned host memory held by the buffer pool (GPU snapshots; 0 on CPU)."""
        return sum(t.numel() * t.element_size() for slot in self._pool for t in slot.values())

    def take(self, step: int, tensors: Iterable[tuple[str, torch.Tensor]], *, pooled: bool = True) -> Snapshot:
        t0 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        slot = self._count % self.slots if pooled else None
        self._count += 1
        cuda_used = False
        for name, t in tensors:
            dtype = self.dtype or t.dtype
            if t.is_cuda:
                cuda_used = True
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device=t.device)
                if slot is not None:
                    buf = self._pool[slot].get(name)
                    if buf is None or buf.shape != t.shape or buf.dtype != dtype:
                        buf = torch.empty(t.shape, dtype=dtype, pin_memory=True)
                        self._pool[slot][name] = buf
                else:
                    buf = torch.empty(t.shape, dtype=dtype, pin_memory=True)
                self._stream.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(self._stream):
                    src = t if t.dtype == dtype else t.to(dtype)
                    buf.copy_(src, non_blocking=True)
                    src.record_stream(self._stream)
                out[name] = buf
            else:
                out[name] = t.detach().to(dtype=dtype, copy=True)
        event = None
        if cuda_used:
            event = self._stream.record_event()
            # the optimizer's next in-place update must wait for the copies (on the copies' device)
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        return Snapshot(step=step, tensors=out, seconds=time.perf_counter() - t0, event=event)
