"""The monitoring agent's math: per-snapshot weight geometry against the step-0 base.

:class:`GeometryAnalyzer` is framework-agnostic: it takes ``{name: tensor}``
snapshots (effective weights, any float dtype, one device) and returns a
:class:`GeometryRecord` of scalars aggregated per matrix, layer, module kind and
whole model. All math is delegated to :mod:`rlmonitor.metrics`. A metric that
raises is counted in ``geometry/errors`` with a warning; the others still run.

Logged metrics (``<kind>`` in q/k/v/o/gate/up/down or a leaf module name;
``<i>`` a layer index):

- ``geometry/update_sparsity``: fraction of monitored weights whose bf16 value is
  unchanged vs the base, element-weighted (paper Def. 2.2, metrics.md section 1).
- ``geometry/update_sparsity/<kind>``: the same per module kind.
- ``geometry/update_sparsity_vs_prev``: the same vs the previous snapshot.
- ``geometry/rel_frobenius``: ``sqrt(sum ||dW||_F^2) / sqrt(sum ||W0||_F^2)`` over
  monitored matrices (the fp32 truth when snapshots keep fp32); ``/<kind>`` too.
- ``geometry/weight_step_fro2``: ``sum ||W_t - W_prev||_F^2`` since the previous
  snapshot (the weight step of KL Gate I, metrics.md section 6).
- ``geometry/principal_angle_max_deg``: largest principal angle between the
  top-k singular subspaces of ``W0`` and ``W_t``, max over matrices and both sides
  (section 4); ``_left`` / ``_right`` per side and ``/<kind>`` per kind.
- ``geometry/spectral_drift_topk``: mean over matrices of
  ``||sigma_1..k(W_t) - sigma_1..k(W0)|| / ||sigma_1..k(W0)||`` (top-k NSS); ``/<kind>``.
- ``geometry/principal_overlap_ratio``: ``|M_princ n M| / |M| / alpha`` pooled
  over matrices (1 = random; RLVR < 1, SFT > 1; section 5).
- ``geometry/low_magnitude_overlap_ratio``: the same for ``M_low`` (RLVR > 1).
- ``geometry/principal_not_low_overlap_ratio``: the same for
  ``M_princ n not M_low`` against its own density.
- ``geometry/row_profile_stability`` / ``geometry/col_profile_stability``: mean
  Pearson correlation of each matrix's row (column) update-ratio profile with
  the previous snapshot's (section 2: the pattern appears early and stays).
- ``geometry/nonfinite_weights``: count of NaN/Inf entries in the snapshot.
- ``geometry/errors``: cumulative count of metric computations that failed.
- ``geometry/metric_seconds``: worker time spent on this snapshot.
- ``geometry/rotation_staleness_steps``: with a rotating layer subset, the age in
  steps of the oldest measurement in the aggregates.
- ``geometry/layers/<i>/{update_sparsity,principal_angle_max_deg,
  spectral_drift_topk,rel_frobenius}``: per-layer detail.
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
    TopKSVD,
    changed_mask_and_ratios,
    count_changed,
    count_true,
    low_magnitude_mask,
    principal_mask,
    subspace_angles,
    top_k_svd,
)

from .config import GeometryConfig
from .naming import MODULE_KINDS

__all__ = ["GeometryAnalyzer", "GeometryRecord", "MatrixSpec"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_RAD2DEG = 180.0 / math.pi
_ROW_KINDS = {"q", "k", "v", "gate", "up"}  # heads/features along the output (row) axis


@dataclass(frozen=True)
class MatrixSpec:
    """Static facts about one monitored matrix."""

    name: str
    layer: int | None
    kind: str
    shape: tuple[int, int]
    head_dim: int | None = None  # size of one attention head along the head axis

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def head_axis(self) -> str:
        """'rows' for q/k/v (heads stacked along outputs), 'cols' for o/down."""
        return "rows" if self.kind in _ROW_KINDS else "cols"


@dataclass
class GeometryRecord:
    """What one snapshot produced."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    matrices: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    angle_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class _Base:
    weight: torch.Tensor
    norm2: float
    factors: TopKSVD | None = None
    principal: torch.Tensor | None = None
    low: torch.Tensor | None = None
    principal_not_low: torch.Tensor | None = None


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation; 1.0 for identical profiles (constant ones included),
    None when one profile is constant and the other is not (undefined)."""
    if torch.equal(x, y):
        return 1.0
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return None if den == 0.0 else float((x * y).sum()) / den


class GeometryAnalyzer:
    """Holds the base state and computes :class:`GeometryRecord` s.

    Args:
        config: the monitor's :class:`~rlmonitor.config.GeometryConfig`.
        specs: the monitored matrices.
        profile_names: matrices whose full row/column profiles are kept in
            records (for heat maps); profiles of all matrices feed stability.
    """

    def __init__(
        self, config: GeometryConfig, specs: Sequence[MatrixSpec], profile_names: Iterable[str] = ()
    ) -> None:
        self.config = config
        self.specs = {s.name: s for s in specs}
        if not self.specs:
            raise ValueError("no matrices to monitor: check GeometryConfig.include/exclude against the model")
        self.profile_names = set(profile_names)
        self.errors = 0
        self._warned: set[str] = set()
        self.base: dict[str, _Base] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self._prev_profiles: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prev_factors: dict[str, TopKSVD] = {}
        self._latest: dict[str, dict[str, Any]] = {}

    # -- failures ---------------------------------------------------------
    def _guard(self, metric: str, name: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as e:
            self.errors += 1
            if metric not in self._warned:
                self._warned.add(metric)
                warnings.warn(
                    f"rlmonitor: metric '{metric}' failed on {name}: {type(e).__name__}: {e}. "
                    "Training continues; failures are counted in geometry/errors (warned once per metric).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                logger.debug("metric %s failed on %s: %s", metric, name, e)
            return None

    # -- base -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.config.k + self.config.oversample

    def _rank_for(self, spec: MatrixSpec) -> int:
        return min(self.rank, min(spec.shape))

    def set_base(self, weights: Mapping[str, torch.Tensor], factors: Mapping[str, TopKSVD] | None = None) -> None:
        """Take ``weights`` as the step-0 base; compute (or adopt) top-k factors and masks."""
        missing = set(self.specs) - set(weights)
        if missing:
            raise ValueError(f"base snapshot lacks {len(missing)} monitored matrices, e.g. {sorted(missing)[:3]}")
        cfg = self.config
        for name, spec in self.specs.items():
            w0 = weights[name]
            base = _Base(weight=w0, norm2=float(w0.float().square().sum()))
            self.base[name] = base
            if not bool(torch.isfinite(w0).all()):
                self.errors += 1
                warnings.warn(f"rlmonitor: base weight {name} holds NaN/Inf; its metrics will fail", stacklevel=2)
                continue
            if cfg.spectral:
                f = factors.get(name) if factors else None
                if f is None:
                    f = self._guard("base_svd", name, lambda w0=w0, spec=spec: top_k_svd(w0, self._rank_for(spec)))
                base.factors = f
                if f is not None:
                    k = min(cfg.k, f.k)
                    base.principal = self._guard(
                        "principal_mask", name, lambda f=f, k=k: principal_mask(f, k, cfg.principal_alpha)
                    )
            base.low = self._guard("low_magnitude_mask", name, lambda w0=w0: low_magnitude_mask(w0, cfg.low_alpha))
            if base.principal is not None and base.low is not None:
                base.principal_not_low = base.principal & ~base.low
        self._prev = {}
        self._prev_profiles = {}
        self._prev_factors = {n: b.factors for n, b in self.base.items() if b.factors is not None}

    def base_factors(self) -> dict[str, TopKSVD]:
        return {n: b.factors for n, b in self.base.items() if b.factors is not None}

    def memory_bytes(self) -> int:
        """Bytes held by the base state and the previous snapshot."""
        total = 0
        for b in self.base.values():
            for t in (b.weight, b.principal, b.low, b.principal_not_low, *(b.factors or ())):
                if t is not None:
                    total += t.numel() * t.element_size()
        total += sum(t.numel() * t.element_size() for t in self._prev.values())
        return total

    # -- one snapshot -----------------------------------------------------
    def analyze(self, step: int, weights: Mapping[str, torch.Tensor], partial: bool = False) -> GeometryRecord:
        """Measure a snapshot against the base.

        ``partial=False``: ``weights`` must hold every monitored matrix (a missing
        one counts as an error). ``partial=True`` (rotating layer subsets): only the
        given matrices are measured; the aggregates combine each matrix's most
        recent measurement, and ``geometry/rotation_staleness_steps`` says how
        old the oldest one is. "Previous" then means the previous time that matrix
        was measured.
        """
        if not self.base:
            raise RuntimeError("GeometryAnalyzer.analyze called before set_base")
        t0 = time.perf_counter()
        rec = GeometryRecord(step=step)
        for name, spec in self.specs.items():
            w1 = weights.get(name)
            if w1 is None:
                if not partial:
                    self._guard("snapshot", name, lambda name=name: (_ for _ in ()).throw(KeyError(name)))
                continue
            d = self._analyze_matrix(spec, w1, rec)
            d["step"] = step
            self._latest[name] = d
            rec.matrices.append(d)
        if self.config.compare_previous:
            if not partial:
                self._prev = {}
            self._prev.update((n, w) for n, w in weights.items() if n in self.specs)
        rec.scalars = self._aggregate(list(self._latest.values()) if partial else rec.matrices)
        if partial and self._latest:
            rec.scalars["geometry/rotation_staleness_steps"] = float(step - min(d["step"] for d in self._latest.values()))
        rec.scalars["geometry/errors"] = float(self.errors)
        rec.scalars["geometry/metric_seconds"] = time.perf_counter() - t0
        return rec

    def _analyze_matrix(self, spec: MatrixSpec, w1: torch.Tensor, rec: GeometryRecord) -> dict[str, Any]:
        cfg, name = self.config, spec.name
        base = self.base[name]
        w0 = base.weight
        d: dict[str, Any] = {"name": name, "layer": spec.layer, "kind": spec.kind, "numel": spec.numel}
        nonfinite = self._guard("nonfinite", name, lambda: int((~torch.isfinite(w1)).sum()))
        d["nonfinite"] = nonfinite
        if nonfinite:
            self.errors += 1
            return d  # every metric below is undefined on NaN/Inf weights

        # mask + row/column ratios in one pass over the weights (on CPU: one cache-blocked walk)
        got_mask = self._guard(
            "changed_mask", name, lambda: changed_mask_and_ratios(w0, w1, cfg.eta, check_finite_values=False)
        )
        if got_mask is not None:
            mask, rows, cols = got_mask
            changed = count_true(mask)
            d["changed"] = changed
            d["update_sparsity"] = 1.0 - changed / spec.numel
            if changed:
                for key, m in (
                    ("principal", base.principal),
                    ("low", base.low),
                    ("principal_not_low", base.principal_not_low),
                ):
                    if m is not None:
                        d[f"overlap_{key}_count"] = count_true(m & mask)
                        d[f"{key}_density"] = count_true(m) / spec.numel
            prev_rc = self._prev_profiles.get(name)
            if prev_rc is not None:
                d["row_stability"] = _pearson(rows, prev_rc[0])
                d["col_stability"] = _pearson(cols, prev_rc[1])
            self._prev_profiles[name] = (rows, cols)
            if spec.head_dim:
                axis = rows if spec.head_axis == "rows" else cols
                if axis.numel() % spec.head_dim == 0:
                    d["head_ratios"] = axis.view(-1, spec.head_dim).mean(dim=1).tolist()
            if name in self.profile_names:
                rec.profiles[name] = {"rows": rows.tolist(), "cols": cols.tolist()}

        def norms() -> tuple[float, float | None]:
            f1 = w1.float()
            dw2 = float((f1 - w0.float()).square().sum())
            prev = self._prev.get(name)
            step2 = None if prev is None else float((f1 - prev.float()).square().sum())
            return dw2, step2

        got = self._guard("frobenius", name, norms)
        if got is not None:
            d["dw_fro2"], d["step_fro2"] = got
            d["w0_fro2"] = base.norm2
            d["rel_frobenius"] = math.sqrt(got[0] / base.norm2) if base.norm2 > 0 else None

        prev = self._prev.get(name)
        if prev is not None:
            n_prev = self._guard(
                "changed_mask_vs_prev", name, lambda: count_changed(prev, w1, cfg.eta, check_finite_values=False)
            )
            if n_prev is not None:
                d["changed_vs_prev"] = n_prev

        if cfg.spectral and base.factors is not None:
            if d.get("dw_fro2") == 0.0:  # bitwise-identical to the base: nothing rotated or drifted
                d["angle_left_max_deg"] = d["angle_right_max_deg"] = d["spectral_drift_topk"] = 0.0
            else:
                self._spectral(spec, w1, base.factors, d, rec)
        return d

    def _spectral(self, spec: MatrixSpec, w1: torch.Tensor, f0: TopKSVD, d: dict, rec: GeometryRecord) -> None:
        name = spec.name
        warm = self._prev_factors.get(name)
        f1 = self._guard(
            "top_k_svd",
            name,
            lambda: top_k_svd(w1, self._rank_for(spec), init=None if warm is None else warm.V),
        )
        if f1 is None:
            return
        self._prev_factors[name] = f1
        k = min(self.config.k, f0.k, f1.k)

        def angles() -> tuple[torch.Tensor, torch.Tensor]:
            return subspace_angles(f0.U[:, :k], f1.U[:, :k]), subspace_angles(f0.V[:, :k], f1.V[:, :k])

        got = self._guard("principal_angles", name, angles)
        if got is not None:
            left, right = (t.mul(_RAD2DEG) for t in got)
            d["angle_left_max_deg"] = float(left.max())
            d["angle_right_max_deg"] = float(right.max())
            rec.angle_curves[name] = {"left": left.tolist(), "right": right.tolist()}

        def drift() -> float:
            s0, s1 = f0.S[:k], f1.S[:k]
            return float(torch.linalg.vector_norm(s1 - s0) / torch.linalg.vector_norm(s0))

        d["spectral_drift_topk"] = self._guard("spectral_drift_topk", name, drift)

    # -- aggregation ------------------------------------------------------
    def _aggregate(self, mats: list[dict[str, Any]]) -> dict[str, float]:
        cfg = self.config
        out: dict[str, float] = {}
        nonfinite = sum(m.get("nonfinite") or 0 for m in mats)
        out["geometry/nonfinite_weights"] = float(nonfinite)

        def pooled(group: list[dict], prefix: str, suffix: str = "") -> None:
            have = [m for m in group if "changed" in m]
            numel = sum(m["numel"] for m in have)
            if numel:
                out[f"{prefix}update_sparsity{suffix}"] = 1.0 - sum(m["changed"] for m in have) / numel
            fro = [m for m in group if m.get("dw_fro2") is not None and m.get("w0_fro2")]
            if fro:
                out[f"{prefix}rel_frobenius{suffix}"] = math.sqrt(
                    sum(m["dw_fro2"] for m in fro) / sum(m["w0_fro2"] for m in fro)
                )
            angles = [m[s] for m in group for s in ("angle_left_max_deg", "angle_right_max_deg") if m.get(s) is not None]
            if angles:
                out[f"{prefix}principal_angle_max_deg{suffix}"] = max(angles)
            drifts = [m["spectral_drift_topk"] for m in group if m.get("spectral_drift_topk") is not None]
            if drifts:
                out[f"{prefix}spectral_drift_topk{suffix}"] = sum(drifts) / len(drifts)

        pooled(mats, "geometry/")
        for side in ("left", "right"):
            vals = [m[f"angle_{side}_max_deg"] for m in mats if m.get(f"angle_{side}_max_deg") is not None]
            if vals:
                out[f"geometry/principal_angle_max_deg_{side}"] = max(vals)
        kinds = sorted({m["kind"] for m in mats}, key=lambda k: (MODULE_KINDS.index(k) if k in MODULE_KINDS else 99, k))
        for kind in kinds:
            pooled([m for m in mats if m["kind"] == kind], "geometry/", f"/{kind}")
        if cfg.per_layer_keys:
            for layer in sorted({m["layer"] for m in mats if m["layer"] is not None}):
                pooled([m for m in mats if m["layer"] == layer], f"geometry/layers/{layer}/")

        with_prev = [m for m in mats if "changed_vs_prev" in m]
        if with_prev:
            out["geometry/update_sparsity_vs_prev"] = 1.0 - sum(m["changed_vs_prev"] for m in with_prev) / sum(
                m["numel"] for m in with_prev
            )
        steps = [m["step_fro2"] for m in mats if m.get("step_fro2") is not None]
        if steps:
            out["geometry/weight_step_fro2"] = float(sum(steps))

        for key, metric in (
            ("principal", "principal_overlap_ratio"),
            ("low", "low_magnitude_overlap_ratio"),
            ("principal_not_low", "principal_not_low_overlap_ratio"),
        ):
            group = [m for m in mats if f"overlap_{key}_count" in m]
            changed = sum(m["changed"] for m in group)
            if changed:
                # pooled overlap |Mx n M| / |M| over the pooled density of Mx
                density = sum(m[f"{key}_density"] * m["numel"] for m in group) / sum(m["numel"] for m in group)
                out[f"geometry/{metric}"] = sum(m[f"overlap_{key}_count"] for m in group) / changed / density

        for axis in ("row", "col"):
            vals = [m[f"{axis}_stability"] for m in mats if m.get(f"{axis}_stability") is not None]
            if vals:
                out[f"geometry/{axis}_profile_stability"] = sum(vals) / len(vals)
        return out
