"""The step-0 base of a live run: taken (or loaded on resume), saved, adopted and, in a
sharded run, gathered. A part of :class:`~rlmonitor.core.monitor.GeometryMonitor` (it
uses the monitor's state: config, specs, shards, analyzer, worker, local sink).

What it guarantees (README "Failure behaviour"): the base is saved once, from step-0
weights only, never overwritten (an older run's base is moved aside first); a resumed
run loads it after an identity check; monitored matrices it lacks are named in one
warning and not measured; with no usable base the resumed weights serve as base,
flagged ``geometry/base_is_resumed``.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from . import spectral as spectral_engine
from .basestore import identity_problem, load_base, save_base, save_spectra, set_aside_base, write_index
from .snapshot import Snapshot

__all__ = ["BaseKeeping"]


class BaseKeeping:
    """The monitor's step-0 base (mixed into :class:`~rlmonitor.core.monitor.GeometryMonitor`)."""

    def _take_or_load_base(self, step: int, read) -> None:
        """At train start: a fresh run takes the base (saved by the worker); a resumed run
        loads the saved one, or takes the resumed weights as base (flagged)."""
        base_dir = self.folder / "base"
        if step == 0 and self.main:
            self._set_aside_old_base(base_dir)
        if self.shards.distributed:  # rank 0 has moved an old base aside before anyone writes
            self.shards.agree(True)
        loaded = self._load_base(base_dir) if step > 0 else None
        if step > 0 and not self.shards.agree(loaded is not None):
            loaded = None  # every rank takes the same path (each rank's job gathers once)
        if loaded is not None:
            self._adopt_base(loaded, base_dir)
            return
        if step > 0:
            self.base_is_resumed = True
            warnings.warn(f"rlmonitor: resuming at step {step} without a usable saved base in {base_dir}; measuring "
                          "against the resumed weights (geometry/base_is_resumed=1)", RuntimeWarning, stacklevel=3)  # fmt: skip
        snap = self.taker.take(step, self._read_mine(read, self.specs), pooled=False)
        meta = {"run_id": self.local.run_id if self.local else None, "step": step, "fingerprint": self.fingerprint,
                "created": time.time(), "matrices": {s.name: list(s.shape) for s in self.specs},
                "config": asdict(self.config)}  # fmt: skip
        self._submit(lambda: self._base_job(snap, base_dir, meta, save=step == 0), snap, block=True)

    def _set_aside_old_base(self, base_dir: Path) -> None:
        """A fresh run: move an older run's base (and its KL probe) aside now, on this
        thread, before anything (the probe, the worker) writes into ``base_dir``."""
        try:
            set_aside_base(base_dir)
        except OSError as e:
            self.fail("setting the previous base aside", e)

    def _load_base(self, base_dir: Path):
        """The saved base if it passes its identity check, else None (warned; left in place)."""
        try:
            loaded = load_base(base_dir, {s.name for s in self.mine} if self.shards.distributed else None)
        except Exception as e:  # unreadable files: measured against the resumed weights, flagged
            self.fail("loading the saved base", e)
            return None
        problem = identity_problem(loaded) if loaded is not None else None
        if problem is not None:
            warnings.warn(f"rlmonitor: the saved base in {base_dir} fails its identity check ({problem}); it is not "
                          "used and left in place", RuntimeWarning, stacklevel=4)  # fmt: skip
            return None
        return loaded

    def _adopt_base(self, loaded, base_dir: Path) -> None:
        shapes = {s.name: s.shape for s in self.mine}
        have = {n for n, w in loaded.weights.items() if shapes.get(n) == tuple(w.shape)}
        self.without_base = [s.name for s in self.mine if s.name not in have]
        if self.without_base:
            warnings.warn(
                f"rlmonitor: the saved base in {base_dir} lacks {len(self.without_base)} of the monitored matrices: "
                f"{_name_list(self.without_base)}. They are not measured in this run (flagged no_base in "
                "matrices.jsonl, counted in geometry/matrices_without_base). The base is never overwritten; to "
                "measure them, resume with the original include/exclude or start a fresh run.",
                RuntimeWarning,
                stacklevel=4,
            )
        if loaded.step != 0:
            self.base_is_resumed = True
            warnings.warn(f"rlmonitor: the saved base in {base_dir} holds step {loaded.step}, not step 0 "
                          "(written by an older rlmonitor); geometry/base_is_resumed=1", RuntimeWarning, stacklevel=4)  # fmt: skip
        if loaded.meta.get("fingerprint") not in (None, self.fingerprint) and not self.without_base:
            warnings.warn("rlmonitor: the saved base was written for a different model fingerprint; matrices are "
                          "matched by name and shape", RuntimeWarning, stacklevel=4)  # fmt: skip
        self.analyzer.restrict(have)
        weights = {n: loaded.weights[n] for n in have}
        spectra = {n: spectral_engine.from_tensors(t) for n, t in loaded.spectra.items() if n in have}

        def job() -> None:
            self.analyzer.set_base(weights, spectra or None)
            self._held_bytes = self.analyzer.memory_bytes()
            self._base_gather(None, None)

        if not self.worker.submit(job, block=True, timeout=self.config.flush_timeout_s):
            self.fail("loading the saved base", TimeoutError("the worker did not take the job"))

    def _base_job(self, snap: Snapshot, base_dir: Path, meta: dict, save: bool) -> None:
        snap.wait()
        shard = (self.shards.rank, self.shards.world) if self.shards.distributed else None
        if save:
            try:
                save_base(base_dir, snap.tensors, {}, meta if shard is None else None, shard=shard)
            except Exception as e:
                self.fail("saving the base", e)
        self.analyzer.set_base(snap.tensors)
        self._held_bytes = self.analyzer.memory_bytes()
        if save:
            try:
                spectra = {n: spectral_engine.to_tensors(s) for n, s in self.analyzer.base_spectra().items()}
                save_spectra(base_dir, spectra, shard=shard)
            except Exception as e:
                self.fail("saving the base spectra", e)
        self._base_gather(base_dir if save and shard else None, meta)

    def _base_gather(self, index_dir: Path | None, meta: dict | None) -> None:
        """Sharded runs: every rank reports its base (matrices without one, errors); rank 0
        then writes the index and identity of a sharded base (every part is on disk)."""
        if not self.shards.distributed:
            return
        parts = self.shards.gather({"without_base": self.without_base, "errors": self._own_errors()})
        if parts is None:
            return
        self.without_base = [n for part in parts for n in part["without_base"]]
        if index_dir is not None:
            try:
                write_index(index_dir, self.shards.owner, self.shards.world, meta)
            except Exception as e:
                self.fail("saving the base index", e)


def _name_list(names: list[str], full: int = 24) -> str:
    """``names`` in full when there are at most ``full``, else with the layer index
    folded (``layers.{0,1,2}.mlp.gate_proj``) so that every matrix is still named."""
    if len(names) <= full:
        return ", ".join(names)
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"(?<=\.)\d+(?=\.)", n)
        key = n if m is None else n[: m.start()] + "<>" + n[m.end() :]
        groups.setdefault(key, []).append(m.group(0) if m else "")
    return ", ".join(k.replace("<>", "{" + ",".join(v) + "}") for k, v in groups.items())
