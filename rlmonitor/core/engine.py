"""The analysis engine: one matrix's geometry against its step-0 base.

Framework-free (torch only). Both front-ends use it: the live monitor feeds it
snapshots (:class:`GeometryAnalyzer`, which also keeps the previous snapshot and
rotating-layer state), ``rlmonitor compare`` feeds it tensors streamed from
checkpoints (:func:`prepare_base` and :func:`measure_matrix`, one matrix at a
time). Both aggregate with :func:`rlmonitor.core.aggregate.aggregate`, so the same
weights give the same numbers under the same keys.

All math is delegated to :mod:`rlmonitor.metrics`. A metric that raises is counted
(:class:`Guard`) with one warning per metric; the others still run. Per-matrix
record fields are documented in :data:`rlmonitor.core.keys.MATRIX_FIELDS`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from rlmonitor.metrics import (
    changed_mask_and_ratios,
    count_changed,
    count_true,
    low_magnitude_mask,
)

from . import keys
from . import spectral as spectral_engine
from .aggregate import aggregate
from .config import GeometryConfig
from .naming import MatrixSpec

__all__ = ["BaseState", "GeometryAnalyzer", "GeometryRecord", "Guard", "MatrixSpec", "measure_matrix", "prepare_base"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class GeometryRecord:
    """What one snapshot produced: aggregated scalars (registry keys), per-matrix
    records, and the arrays behind the dashboards."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # non-numeric facts (local records only)
    matrices: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    angle_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class BaseState:
    """The step-0 facts of one matrix that every later measurement needs."""

    weight: torch.Tensor
    norm2: float
    spectrum: Any = None  # rlmonitor.core.spectral base spectrum (exact step-0 factors)
    principal: torch.Tensor | None = None
    low: torch.Tensor | None = None
    principal_not_low: torch.Tensor | None = None
    finite: bool = True

    def nbytes(self) -> int:
        total = 0
        for t in (self.weight, self.principal, self.low, self.principal_not_low):
            if t is not None:
                total += t.numel() * t.element_size()
        return total + spectral_engine.nbytes(self.spectrum)


class Guard:
    """Runs one metric; a failure is counted and warned about once per metric name."""

    def __init__(self) -> None:
        self.errors = 0
        self._warned: set[str] = set()

    def __call__(self, metric: str, name: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as e:
            self.fail(metric, name, e)
            return None

    def fail(self, metric: str, name: str, e: BaseException | str) -> None:
        self.errors += 1
        what = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        if metric not in self._warned:
            self._warned.add(metric)
            warnings.warn(
                f"rlmonitor: metric '{metric}' failed on {name}: {what}. Training continues; failures are "
                "counted in geometry/errors (warned once per metric).",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            logger.debug("metric %s failed on %s: %s", metric, name, what)


def prepare_base(
    config: GeometryConfig, spec: MatrixSpec, w0: torch.Tensor, guard: Guard, spectrum: Any = None
) -> BaseState:
    """The step-0 state of one matrix: its norm, exact spectrum (or the given one) and masks."""
    base = BaseState(weight=w0, norm2=float(w0.float().square().sum()))
    if not bool(torch.isfinite(w0).all()):
        guard.fail("base", spec.name, "the base weight holds NaN/Inf; its metrics are skipped")
        base.finite = False
        return base
    if config.spectral:
        if spectrum is None:
            spectrum = guard("base_spectrum", spec.name, lambda: spectral_engine.base(config, w0))
        base.spectrum = spectrum
        if spectrum is not None:
            base.principal = guard(
                "principal_mask", spec.name, lambda: spectral_engine.principal(config, spectrum, w0.shape)
            )
    base.low = guard("low_magnitude_mask", spec.name, lambda: low_magnitude_mask(w0, config.low_alpha))
    if base.principal is not None and base.low is not None:
        base.principal_not_low = base.principal & ~base.low
    return base


@dataclass
class MatrixMeasurement:
    """One matrix at one snapshot: its record and the arrays the dashboards use."""

    record: dict[str, Any]
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    angle_curves: dict[str, list[float]] | None = None


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation; 1.0 for identical profiles (constant ones included),
    None when one profile is constant and the other is not (undefined)."""
    if torch.equal(x, y):
        return 1.0
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return None if den == 0.0 else float((x * y).sum()) / den


def _masks(config, spec, base, w1, guard, d, prev_profile) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Change mask (one pass, with row/column ratios), overlaps and profile stability."""
    got = guard(
        "changed_mask", spec.name, lambda: changed_mask_and_ratios(base.weight, w1, config.eta, check_finite_values=False)
    )
    if got is None:
        return None, None
    mask, rows, cols = got
    changed = count_true(mask)
    d["changed"] = changed
    d["update_sparsity"] = 1.0 - changed / spec.numel
    if changed:
        for key, m in (("principal", base.principal), ("low", base.low), ("principal_not_low", base.principal_not_low)):
            if m is not None:
                d[f"overlap_{key}_count"] = count_true(m & mask)
                d[f"{key}_density"] = count_true(m) / spec.numel
    if prev_profile is not None:
        d["row_stability"] = _pearson(rows, prev_profile[0])
        d["col_stability"] = _pearson(cols, prev_profile[1])
    if spec.head_dim:
        axis = rows if spec.head_axis == "rows" else cols
        if axis.numel() % spec.head_dim == 0:
            d["head_ratios"] = axis.view(-1, spec.head_dim).mean(dim=1).tolist()
    return rows, cols


def _norms(base: BaseState, w1: torch.Tensor, prev: torch.Tensor | None) -> tuple[float, float | None]:
    f1 = w1.float()
    dw2 = float((f1 - base.weight.float()).square().sum())
    step2 = None if prev is None else float((f1 - prev.float()).square().sum())
    return dw2, step2


def measure_matrix(
    config: GeometryConfig,
    spec: MatrixSpec,
    base: BaseState,
    w1: torch.Tensor,
    guard: Guard,
    *,
    prev: torch.Tensor | None = None,
    prev_profile: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MatrixMeasurement:
    """Every per-matrix metric of ``w1`` against its base (and the previous snapshot)."""
    name = spec.name
    d: dict[str, Any] = {"name": name, "layer": spec.layer, "kind": spec.kind, "numel": spec.numel}
    out = MatrixMeasurement(record=d)
    nonfinite = guard("nonfinite", name, lambda: int((~torch.isfinite(w1)).sum()))
    d["nonfinite"] = nonfinite
    if nonfinite:
        guard.errors += 1
        return out  # every metric below is undefined on NaN/Inf weights
    if not base.finite:
        return out
    out.rows, out.cols = _masks(config, spec, base, w1, guard, d, prev_profile)
    got = guard("frobenius", name, lambda: _norms(base, w1, prev))
    if got is not None:
        d["dw_fro2"], d["step_fro2"] = got
        d["w0_fro2"] = base.norm2
        d["rel_frobenius"] = math.sqrt(got[0] / base.norm2) if base.norm2 > 0 else None
    if prev is not None:
        n_prev = guard("changed_mask_vs_prev", name, lambda: count_changed(prev, w1, config.eta, check_finite_values=False))
        if n_prev is not None:
            d["changed_vs_prev"] = n_prev
    if config.spectral and base.spectrum is not None:
        res = guard("spectral", name, lambda: spectral_engine.change(config, base, w1))
        if res is not None:
            fields_, out.angle_curves = res
            d.update(fields_)
    return out


class GeometryAnalyzer:
    """Stateful use of the engine for a live run: the base of every monitored matrix,
    the previous snapshot and profiles, and (with rotating layer subsets) each
    matrix's latest measurement.

    Args:
        config: the monitor's :class:`~rlmonitor.core.config.GeometryConfig`.
        specs: the monitored matrices.
        profile_names: matrices whose full row/column profiles are kept in records
            (for heat maps); profiles of all matrices feed stability.
    """

    def __init__(self, config: GeometryConfig, specs: Sequence[MatrixSpec], profile_names: Iterable[str] = ()) -> None:
        self.config = config
        self.specs = {s.name: s for s in specs}
        if not self.specs:
            raise ValueError("no matrices to monitor: check GeometryConfig.include/exclude against the model")
        self.profile_names = set(profile_names)
        self.guard = Guard()
        self.base: dict[str, BaseState] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self._prev_profiles: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._latest: dict[str, dict[str, Any]] = {}

    @property
    def errors(self) -> int:
        return self.guard.errors

    def set_base(self, weights: Mapping[str, torch.Tensor], spectra: Mapping[str, Any] | None = None) -> None:
        """Take ``weights`` as the step-0 base of the matrices it holds (every monitored
        matrix unless :meth:`restrict` was called); compute or adopt their spectra."""
        missing = set(self.specs) - set(weights)
        if missing:
            raise ValueError(f"base snapshot lacks {len(missing)} monitored matrices, e.g. {sorted(missing)[:3]}")
        for name, spec in self.specs.items():
            given = spectra.get(name) if spectra else None
            self.base[name] = prepare_base(self.config, spec, weights[name], self.guard, given)
        self._prev, self._prev_profiles, self._latest = {}, {}, {}

    def restrict(self, names: Iterable[str]) -> None:
        """Monitor only ``names`` from now on (e.g. the matrices a saved base holds)."""
        keep = set(names)
        self.specs = {n: s for n, s in self.specs.items() if n in keep}

    def base_spectra(self) -> dict[str, Any]:
        return {n: b.spectrum for n, b in self.base.items() if b.spectrum is not None}

    def memory_bytes(self) -> int:
        """Bytes held by the base state and the previous snapshot."""
        total = sum(b.nbytes() for b in self.base.values())
        return total + sum(t.numel() * t.element_size() for t in self._prev.values())

    def analyze(self, step: int, weights: Mapping[str, torch.Tensor], partial: bool = False) -> GeometryRecord:
        """Measure a snapshot against the base (:meth:`measure`) and aggregate it (:meth:`combine`).

        ``partial=False``: ``weights`` must hold every monitored matrix (a missing one
        counts as an error). ``partial=True`` (rotating layer subsets): only the given
        matrices are measured; the aggregates combine each matrix's most recent
        measurement, and ``geometry/rotation_staleness_steps`` says how old the oldest
        one is. "Previous" then means the previous time that matrix was measured.
        """
        t0 = time.perf_counter()
        rec = self.combine(self.measure(step, weights, partial), partial)
        rec.scalars[keys.METRIC_SECONDS] = time.perf_counter() - t0
        return rec

    def measure(self, step: int, weights: Mapping[str, torch.Tensor], partial: bool = False) -> GeometryRecord:
        """Per-matrix records (and profiles, angle curves) of the matrices this analyzer
        holds a base for; no aggregation. In a sharded run each rank measures its own
        matrices and rank 0 combines everyone's."""
        if not self.base:
            raise RuntimeError("GeometryAnalyzer.measure called before set_base")
        rec = GeometryRecord(step=step)
        for name in self.base:
            spec, w1 = self.specs[name], weights.get(name)
            if w1 is None:
                if not partial:
                    self.guard.fail("snapshot", name, "missing from the snapshot")
                continue
            m = measure_matrix(self.config, spec, self.base[name], w1, self.guard, prev=self._prev.get(name),
                               prev_profile=self._prev_profiles.get(name))  # fmt: skip
            if m.rows is not None:
                self._prev_profiles[name] = (m.rows, m.cols)
                if name in self.profile_names:
                    rec.profiles[name] = {"rows": m.rows.tolist(), "cols": m.cols.tolist()}
            if m.angle_curves is not None:
                rec.angle_curves[name] = m.angle_curves
            m.record["step"] = step
            rec.matrices.append(m.record)
        if self.config.compare_previous:
            if not partial:
                self._prev = {}
            self._prev.update((n, w) for n, w in weights.items() if n in self.base)
        return rec

    def combine(self, measured: GeometryRecord, partial: bool = False) -> GeometryRecord:
        """Aggregate measured records (one rank's, or every rank's merged) into the
        logged scalars; with rotating subsets, over each matrix's latest measurement."""
        for m in measured.matrices:
            self._latest[m["name"]] = m
        rec = measured
        rec.scalars, rec.info = aggregate(self.config, list(self._latest.values()) if partial else rec.matrices)
        if partial and self._latest:
            rec.scalars[keys.ROTATION_STALENESS] = float(rec.step - min(d["step"] for d in self._latest.values()))
        rec.scalars[keys.ERRORS] = float(self.errors)
        return rec
