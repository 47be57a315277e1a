"""Adding up the per-tensor results of ``rlmonitor compare`` (:class:`Totals`) and
assembling the JSON report from them (:func:`assemble_report`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .common import ALPHA_GRID, SCHEMA, CompareResult, kind_order, ratio, sparsity

if TYPE_CHECKING:
    from .analysis import Inputs, Options, Plan
    from .per_tensor import Job

__all__ = ["Totals", "assemble_report"]


class _Acc:
    """Element counts ``[n_params, n_changed]`` keyed by anything."""

    def __init__(self) -> None:
        self.d: dict = {}

    def add(self, key, n: int, changed: int) -> None:
        c = self.d.setdefault(key, [0, 0])
        c[0] += n
        c[1] += changed


class Totals:
    """Everything the report needs, summed over tensors as their results arrive."""

    def __init__(self, R: int, pairs: list[tuple[int, int]]):
        self.tot = [_Acc() for _ in range(R)]  # key None: whole model
        self.by_layer = [_Acc() for _ in range(R)]
        self.by_kind = [_Acc() for _ in range(R)]
        self.by_lk = [_Acc() for _ in range(R)]
        self.stored = [[0, 0] for _ in range(R)]  # [n_params with same dtype, n exactly different]
        self.stored_ok = [True] * R
        self.dtypes: list[dict[str, int]] = [{} for _ in range(R)]
        self.base_dtypes: dict[str, int] = {}
        self.tensors: list[list[dict]] = [[] for _ in range(R)]
        self.bf16_cast = [False] * R
        self.records: list[list[dict]] = [[] for _ in range(R)]  # the engine's per-matrix records
        self.spec_rows: list[list[dict]] = [[] for _ in range(R)]
        self.ov_rows: list[list[dict]] = [[] for _ in range(R)]
        self.ov_acc: list[dict] = [{} for _ in range(R)]  # kind -> [n_changed, inter_p, inter_l, inter_pnl]
        self.ov_dens = [0, 0, 0, 0]  # n_params, |Mp|, |Ml|, |Mp & ~Ml| over analysed matrices
        self.curve = [{a: [0, 0, 0] for a in ALPHA_GRID} for _ in range(R)]  # a -> [n_changed, inter_p, inter_l]
        self.pairs = pairs
        self.jac_kind: dict = {p: {} for p in pairs}  # kind -> [inter, union]
        self.jac_lk: dict = {p: {} for p in pairs}
        self.jac_all = {p: [0, 0] for p in pairs}
        self.cons_rows: list[dict] = []

    def add(self, job: Job, out: dict, result: CompareResult, names: list[str]) -> None:
        """One tensor's results (``out`` of :func:`.per_tensor.process_tensor`)."""
        info0 = job.info0
        self.base_dtypes[info0.dtype_name] = self.base_dtypes.get(info0.dtype_name, 0) + info0.numel
        for i, ri in enumerate(job.rinfos):
            self._add_run(i, job, ri, out, result, names[i])
        self._add_shared(job, out, result)

    def _add_run(self, i: int, job: Job, ri, out: dict, result: CompareResult, name: str) -> None:
        kk, layer, kind, info0, numel = job.key, job.layer, job.kind, job.info0, job.info0.numel
        self.dtypes[i][ri.dtype_name] = self.dtypes[i].get(ri.dtype_name, 0) + numel
        if info0.dtype != "BF16" or ri.dtype != "BF16":
            self.bf16_cast[i] = True
        if out["stored_diff"][i] is None:
            self.stored_ok[i] = False
        else:
            self.stored[i][0] += numel
            self.stored[i][1] += out["stored_diff"][i]
        ch = out["changed"][i]
        for acc, key in ((self.tot[i], None), (self.by_layer[i], layer), (self.by_kind[i], kind),
                         (self.by_lk[i], (layer, kind))):  # fmt: skip
            acc.add(key, numel, ch)
        self.tensors[i].append({
            "name": kk, "layer": layer, "kind": kind, "shape": list(info0.shape),
            "dtype": ri.dtype_name if ri.dtype == info0.dtype else f"{info0.dtype_name}->{ri.dtype_name}",
            "n_params": numel, "n_changed": ch, "update_sparsity": sparsity(numel, ch),
        })  # fmt: skip
        if out["record"][i] is not None:
            self.records[i].append(out["record"][i])
        if out["spectral"][i] is not None:
            self.spec_rows[i].append(out["spectral"][i])
            row, inters = out["overlap"][i]
            self.ov_rows[i].append(row)
            c = self.ov_acc[i].setdefault(kind, [0, 0, 0, 0])
            for t, v in enumerate((ch, *inters)):
                c[t] += v
        if out["curve"][i] is not None:
            for a, vals in out["curve"][i].items():
                for t, v in enumerate(vals):
                    self.curve[i][a][t] += v
        if out["row_col"][i] is not None:
            result.row_col[(name, kk)] = out["row_col"][i]

    def _add_shared(self, job: Job, out: dict, result: CompareResult) -> None:
        """Masks' densities, pairwise Jaccard counts and consensus: one per tensor, not per run."""
        if out["dens"] is not None:
            for t, v in enumerate(out["dens"]):
                self.ov_dens[t] += v
        for p, (inter, union) in out["pairs"].items():
            for acc, key in ((self.jac_kind[p], job.kind), (self.jac_lk[p], (job.layer, job.kind))):
                c = acc.setdefault(key, [0, 0])
                c[0] += inter
                c[1] += union
            self.jac_all[p][0] += inter
            self.jac_all[p][1] += union
        if out["consensus"] is not None:
            row, pooled = out["consensus"]
            self.cons_rows.append(row)
            result.heatmaps[job.key] = pooled


# ---------------------------------------------------------------------------
# the report


def _run_notes(i: int, inp: Inputs, plan: Plan, t: Totals) -> list[str]:
    rnotes = list(inp.run_cks[i].notes)
    left = plan.left_out[i]
    if left:
        rnotes.append(
            f"{len(left)} tensor(s) of this RUN are not in BASE ({inp.base_ck.kind}: it holds only the monitored "
            f"matrices) and are left out (e.g. {left[0]}); every number here covers the {len(plan.keys)} "
            "tensor(s) of BASE"
        )
    if t.bf16_cast[i]:
        parts = ", ".join(f"{d} {v}" for d, v in sorted(t.dtypes[i].items()))
        bparts = ", ".join(f"{d} {v}" for d, v in sorted(t.base_dtypes.items()))
        rnotes.append(
            f"not all tensors are stored as bf16 (BASE: {bparts}; RUN: {parts} params): the bf16 test was "
            "applied to the bf16 casts of the stored values (metrics.md section 1); "
            "stored_dtype_sparsity gives exact equality of the stored values"
        )
    return rnotes


def _run_report(i: int, inp: Inputs, opts: Options, plan: Plan, t: Totals, kinds_all: list[str]) -> dict:
    n, ch = t.tot[i].d.get(None, [0, 0])
    entry: dict[str, Any] = {
        "name": inp.names[i], "path": inp.runs[i], "format": inp.run_cks[i].kind, "dtypes": t.dtypes[i],
        "bf16_cast": t.bf16_cast[i], "n_params": n, "n_changed": ch, "update_sparsity": sparsity(n, ch),
        "stored_dtype_sparsity": sparsity(t.stored[i][0], t.stored[i][1]) if t.stored_ok[i] else None,
        "notes": _run_notes(i, inp, plan, t),
        "by_layer": [
            {"layer": lay, "n_params": v[0], "n_changed": v[1], "update_sparsity": sparsity(*v)}
            for lay, v in sorted(t.by_layer[i].d.items(), key=lambda e: (e[0] is None, e[0] or 0))
        ],
        "by_kind": [
            {"kind": kd, "n_params": t.by_kind[i].d[kd][0], "n_changed": t.by_kind[i].d[kd][1],
             "update_sparsity": sparsity(*t.by_kind[i].d[kd])}
            for kd in kinds_all
        ],
        "by_layer_kind": [
            {"layer": lay, "kind": kd, "n_params": v[0], "n_changed": v[1], "update_sparsity": sparsity(*v)}
            for (lay, kd), v in sorted(
                t.by_lk[i].d.items(), key=lambda e: (e[0][0] is None, e[0][0] or 0, kinds_all.index(e[0][1]))
            )
        ],
        "tensors": t.tensors[i],
        "spectral": None,
        "overlap": None,
    }  # fmt: skip
    if t.records[i]:
        from rlmonitor.core.aggregate import aggregate

        # the live callback's keys over the same monitored matrices, by the same code
        entry["scalars"], entry["info"] = aggregate(opts.geometry, t.records[i])
        entry["matrices"] = t.records[i]
    if not opts.sparsity_only and t.spec_rows[i]:
        entry["spectral"] = _spectral_summary(t.spec_rows[i], opts.k, opts.full_spectrum, kinds_all)
        entry["overlap"] = _overlap_summary(t.ov_rows[i], t.ov_acc[i], t.ov_dens, opts.alpha, opts.low_alpha,
                                            kinds_all, t.curve[i], sorted(plan.focus))  # fmt: skip
    return entry


def assemble_report(inp: Inputs, opts: Options, plan: Plan, t: Totals) -> dict:
    """The JSON report (schema in the package docstring), without ``elapsed_s``."""
    notes: list[str] = list(inp.base_ck.notes)
    if plan.skipped:
        notes.append(f"{len(plan.skipped)} non-floating tensor(s) skipped (e.g. {plan.skipped[0]})")
    kinds_all = kind_order(kind for _, kind in plan.classes.values())
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "base": {"path": inp.base, "format": inp.base_ck.kind, "n_tensors": len(plan.keys),
                 "n_params": sum(plan.infos[kk].numel for kk in plan.keys), "dtypes": t.base_dtypes},
        "settings": {
            "eta": opts.eta, "k": opts.k, "alpha": opts.alpha, "low_alpha": opts.low_alpha,
            "alpha_grid": list(ALPHA_GRID), "full_spectrum": opts.full_spectrum, "sparsity_only": opts.sparsity_only,
            "layers": sorted(plan.spectral_layers) if plan.spectral_layers is not None else None,
            "focus_layers": sorted(plan.focus),
            "drift_metric": "spectral_drift" if opts.full_spectrum else "spectral_drift_topk",
            "include": list(opts.geometry.include), "exclude": list(opts.geometry.exclude),
            "min_rel_gap": opts.geometry.min_rel_gap, "monitored": len(plan.monitored),
        },
        "runs": [_run_report(i, inp, opts, plan, t, kinds_all) for i in range(len(inp.run_cks))],
    }  # fmt: skip
    if len(inp.run_cks) > 1:
        from rlmonitor import metrics

        report["jaccard"], report["jaccard_by_layer"] = _jaccard_report(metrics, inp.names, t, kinds_all)
        report["consensus"] = {"runs": len(inp.run_cks), "layers": sorted(plan.focus), "matrices": t.cons_rows}
    report["notes"] = notes
    report["outputs"] = []
    return report


def _spectral_summary(rows: list[dict], k: int, full: bool, kinds_all: list[str]) -> dict:
    def agg(rs):
        drifts = [r["drift"] for r in rs if r["drift"] is not None]
        lefts = [r["max_angle_left_deg"] for r in rs if r["max_angle_left_deg"] is not None]
        rights = [r["max_angle_right_deg"] for r in rs if r["max_angle_right_deg"] is not None]
        return {
            "max_angle_left_deg": max(lefts) if lefts else None,
            "max_angle_right_deg": max(rights) if rights else None,
            "drift_mean": sum(drifts) / len(drifts) if drifts else None,
            "drift_max": max(drifts) if drifts else None,
        }

    by_kind = []
    for kd in kinds_all:
        rs = [r for r in rows if r["kind"] == kd]
        if rs:
            by_kind.append({"kind": kd, **agg(rs)})
    return {"k": k, "drift_metric": "spectral_drift" if full else "spectral_drift_topk", **agg(rows),
            "by_kind": by_kind, "matrices": rows}  # fmt: skip


def _overlap_summary(rows, acc, dens, alpha, low_alpha, kinds_all, curve, focus) -> dict:
    tot = [sum(v[t] for v in acc.values()) for t in range(4)]
    keys = ("principal", "low_magnitude", "principal_not_low")
    out: dict[str, Any] = {"alpha": alpha, "low_alpha": low_alpha}
    for t, key in enumerate(keys):
        out[key] = ratio(tot[t + 1], tot[0])
    for t, key in enumerate(keys):
        out["baseline_" + key] = ratio(dens[t + 1], dens[0])
    out["by_kind"] = [
        {"kind": kd, "n_changed": acc[kd][0], **{key: ratio(acc[kd][t + 1], acc[kd][0]) for t, key in enumerate(keys)}}
        for kd in kinds_all
        if kd in acc
    ]
    out["matrices"] = rows
    out["curve_layers"] = focus
    out["curve"] = [
        {"alpha": a, "principal": ratio(c[1], c[0]), "low_magnitude": ratio(c[2], c[0])}
        for a, c in curve.items()
        if c[0]
    ]
    return out


def _jaccard_report(M, names: list[str], t: Totals, kinds_all: list[str]) -> tuple[list[dict], list[dict]]:
    def row(inter_union, na, nb, n):
        inter, union = inter_union
        p, q = (na / n, nb / n) if n else (0.0, 0.0)
        return {
            "jaccard": ratio(inter, union),
            "random_baseline": M.jaccard_random_baseline(p, q) if (p + q) > 0 else None,
            "density_a": p, "density_b": q,
        }  # fmt: skip

    out, by_layer = [], []
    for i, j in t.pairs:
        n, na = t.tot[i].d[None]
        nb = t.tot[j].d[None][1]
        out.append({"run_a": names[i], "run_b": names[j], "kind": "all", "n_params": n,
                    **row(t.jac_all[(i, j)], na, nb, n)})  # fmt: skip
        for kd in kinds_all:
            if kd not in t.jac_kind[(i, j)]:
                continue
            n, na = t.by_kind[i].d[kd]
            nb = t.by_kind[j].d[kd][1]
            out.append({"run_a": names[i], "run_b": names[j], "kind": kd, "n_params": n,
                        **row(t.jac_kind[(i, j)][kd], na, nb, n)})  # fmt: skip
        for (lay, kd), iu in sorted(
            t.jac_lk[(i, j)].items(), key=lambda e: (e[0][0] is None, e[0][0] or 0, kinds_all.index(e[0][1]))
        ):
            n, na = t.by_lk[i].d[(lay, kd)]
            nb = t.by_lk[j].d[(lay, kd)][1]
            r = row(iu, na, nb, n)
            by_layer.append({"run_a": names[i], "run_b": names[j], "layer": lay, "kind": kd,
                             "jaccard": r["jaccard"], "random_baseline": r["random_baseline"]})  # fmt: skip
    return out, by_layer
