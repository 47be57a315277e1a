"""``rlmonitor compare``: what did RL (or SFT) change in this model?

Compares one or more fine-tuned checkpoints (RUN) against their base (BASE),
streaming tensor by tensor from disk (safetensors' memory-mapped ``safe_open``,
see :mod:`rlmonitor.checkpoints`); a model is never materialised, large tensors
are read in blocks of rows, and peak memory stays at a few tensors whatever the
model size. All numbers come from :mod:`rlmonitor.metrics` (the contract is
``shared/docs/metrics.md``).

Usage::

    rlmonitor compare BASE RUN [RUN ...] [--out DIR] [--json PATH] [--wandb]
                      [--layers L ...] [--full-spectrum] [--k K] [--alpha A]
                      [--low-alpha A] [--eta ETA] [--sparsity-only]
                      [--adapter-base PATH] [--names NAME ...] [--threads N] [--no-progress]

BASE and RUN are local model directories (single or sharded safetensors), single
``.safetensors`` files, PEFT LoRA adapter directories (compared by their
effective weights ``W + s B A``; the base is ``--adapter-base``, else BASE when it
is a full model, else the adapter's ``base_model_name_or_path``), or Hub ids that
are already in the local cache (nothing is downloaded).

Reported per run:

* bf16-aware update sparsity (metrics.md section 1) over *all* floating
  parameters (embeddings and norms count, as the paper's Table 1), per layer,
  per module kind, per layer x kind and per tensor. Checkpoints not stored in
  bf16 are compared as their bf16 casts (the report says so) and
  ``stored_dtype_sparsity`` gives exact equality of the stored values.
* unless ``--sparsity-only``, for every 2-D matrix of a numbered block (or the
  ``--layers`` chosen): principal angles between the top-k left and right
  singular subspaces (curve and max, degrees), normalized spectral drift
  (``spectral_drift_topk`` over sigma_1..sigma_k, or the exact full-spectrum
  ``spectral_drift`` with ``--full-spectrum``), and the overlap of the update
  mask with the principal mask (top ``alpha`` of the rank-k reconstruction) and
  the low-magnitude mask (bottom ``low_alpha`` of ``|W0|``) against their random
  baseline (the masks' densities), plus an overlap-vs-alpha curve and row/column
  update ratios on the *focus* layers (``--layers``, default: the middle block).

Across two or more runs: pairwise Jaccard of the update masks per module kind
(and per layer x kind) with the random baseline ``pq / (p + q - pq)`` (paper
Table 2), and consensus ratios ``C_ij`` on the focus layers (histograms in the
JSON/CSV, heat maps as PNG).

Outputs: a rich table on the terminal; ``--json PATH`` (``-`` for stdout);
``--out DIR``: CSVs and PNGs; ``--wandb``: one W&B run (``job_type="compare"``,
respects ``WANDB_MODE``/``WANDB_PROJECT``) with the tables, images and summary.

JSON schema (``schema: "rlmonitor.compare/1"``; all sparsities, overlaps and
Jaccard indices are fractions in [0, 1]; ``null`` where a value is undefined,
e.g. the overlap of a matrix nothing changed in)::

    {
      "schema": "rlmonitor.compare/1",
      "base": {"path", "format", "n_tensors", "n_params", "dtypes": {dtype: n_params}},
      "settings": {"eta", "k", "alpha", "low_alpha", "alpha_grid", "full_spectrum",
                   "sparsity_only", "layers": [int] | null, "focus_layers": [int],
                   "drift_metric": "spectral_drift_topk" | "spectral_drift"},
      "runs": [{
        "name", "path", "format", "dtypes": {dtype: n_params},
        "bf16_cast": bool,            # some tensor was not stored as bf16 (BASE or RUN)
        "n_params", "n_changed",
        "update_sparsity",            # whole model, bf16-aware
        "stored_dtype_sparsity",      # exact equality of stored values (null: dtypes differ)
        "notes": [str],
        "by_layer":      [{"layer": int | null, "n_params", "n_changed", "update_sparsity"}],
        "by_kind":       [{"kind", "n_params", "n_changed", "update_sparsity"}],
        "by_layer_kind": [{"layer", "kind", "n_params", "n_changed", "update_sparsity"}],
        "tensors":       [{"name", "layer", "kind", "shape", "dtype", "n_params", "n_changed",
                           "update_sparsity"}],
        "spectral": null | {
          "k", "drift_metric", "max_angle_left_deg", "max_angle_right_deg",
          "drift_mean", "drift_max",
          "by_kind":  [{"kind", "max_angle_left_deg", "max_angle_right_deg", "drift_mean", "drift_max"}],
          "matrices": [{"name", "layer", "kind", "k", "max_angle_left_deg", "max_angle_right_deg",
                        "angles_left_deg": [k floats, ascending], "angles_right_deg": [...],
                        "drift"}]},
        "overlap": null | {
          "alpha", "low_alpha",
          "principal", "low_magnitude", "principal_not_low",      # |Mx n M| / |M|, pooled
          "baseline_principal", "baseline_low_magnitude", "baseline_principal_not_low",
          "by_kind":  [{"kind", "n_changed", "principal", "low_magnitude", "principal_not_low"}],
          "matrices": [{"name", "layer", "kind", "n_changed", "principal", "low_magnitude",
                        "principal_not_low"}],
          "curve_layers": [int],
          "curve": [{"alpha", "principal", "low_magnitude"}]}}],
      "jaccard": [{"run_a", "run_b", "kind", "n_params", "density_a", "density_b",
                   "jaccard", "random_baseline"}],              # 2+ runs; kind "all" = whole model
      "jaccard_by_layer": [{"run_a", "run_b", "layer", "kind", "jaccard", "random_baseline"}],
      "consensus": {"runs", "layers", "matrices": [{"name", "layer", "kind", "shape",
                     "mean", "histogram": [fraction of entries changed in r of R runs, r = 0..R],
                     "all_of_any"}]},                           # 2+ runs
      "notes": [str], "outputs": [path], "elapsed_s": float
    }

Bad input raises :class:`CompareError` (the CLI prints it and exits with 2):
architectures that do not match (missing/extra tensors, shape mismatches: the
first ones are listed with the counts), corrupt or truncated files (named),
missing inputs, Hub ids not in the local cache, unsupported adapters.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlmonitor.checkpoints.errors import CompareError

__all__ = ["ALPHA_GRID", "CompareError", "CompareResult", "add_parser", "compare", "parse_layers"]

SCHEMA = "rlmonitor.compare/1"
DEFAULT_K = 16
DEFAULT_ALPHA = 0.05
DEFAULT_ETA = 1e-3
#: alphas of the overlap-vs-alpha curve (focus layers)
ALPHA_GRID: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: elements per streamed block of a large tensor
CHUNK_ELEMS = 1 << 24
_HEATMAP_MAX = 256
# eta below which the bf16 test is bit-pattern equality (= metrics.masks.BITWISE_ETA_LIMIT;
# not imported from there, since rlmonitor.metrics imports torch)
_BITWISE_ETA_LIMIT = 2.0**-9
_TIED_HEADS = {"lm_head.weight": ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")}


@dataclass
class CompareResult:
    """The JSON report plus the arrays behind the figures."""

    report: dict
    #: focus-layer consensus heat maps, tensor name -> pooled 2-D float array
    heatmaps: dict[str, Any] = field(default_factory=dict)
    #: (run name, tensor name) -> (row ratios, col ratios), focus layers
    row_col: dict[tuple[str, str], tuple[Any, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# small helpers


def parse_layers(spec: list[str] | str | None) -> list[int] | None:
    """``["0", "5", "10-12"]`` or ``"0,5,10-12"`` -> ``[0, 5, 10, 11, 12]``; None/"all" -> None."""
    if spec is None:
        return None
    items = [spec] if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        for tok in str(item).replace(",", " ").split():
            if tok == "all":
                return None
            try:
                if "-" in tok[1:]:
                    a, b = tok.split("-", 1)
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(tok))
            except ValueError as err:
                raise CompareError(f"--layers: cannot parse {tok!r}; use indices and ranges like 0 5 10-12") from err
    if any(v < 0 for v in out):
        raise CompareError("--layers: layer indices must be >= 0")
    return sorted(out)


def _classify(key: str) -> tuple[int | None, str]:
    from rlmonitor.core.naming import parse_name

    if key.endswith(".bias"):
        mn = parse_name(key[: -len(".bias")])
        return mn.layer, f"{mn.kind}.bias"
    mn = parse_name(key)
    return mn.layer, mn.kind


def _sparsity(n: int, changed: int) -> float | None:
    return 1.0 - changed / n if n else None


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _kind_order(kinds) -> list[str]:
    from rlmonitor.core.naming import MODULE_KINDS

    kinds = list(dict.fromkeys(kinds))
    return [k for k in MODULE_KINDS if k in kinds] + [k for k in kinds if k not in MODULE_KINDS]


def _resolve_key(ckpt, key: str) -> str | None:
    """``key`` in ``ckpt``, or the tied input embedding standing in for a missing LM head."""
    if key in ckpt:
        return key
    for head, embeds in _TIED_HEADS.items():
        if key == head or key.endswith("." + head):
            prefix = key[: -len(head)]
            for e in embeds:
                if prefix + e in ckpt:
                    return prefix + e
    return None


def _match(base, run, run_label: str, keys: list[str]) -> dict[str, str]:
    """base key -> run key; raises CompareError listing the mismatches."""
    mapping, missing, shapes = {}, [], []
    for k in keys:
        rk = _resolve_key(run, k)
        if rk is None:
            missing.append(k)
            continue
        mapping[k] = rk
        s0, s1 = base.info(_resolve_key(base, k)).shape, run.info(rk).shape
        if tuple(s0) != tuple(s1):
            shapes.append(f"{k}: BASE {tuple(s0)} vs RUN {tuple(s1)}")
    extra = [k for k in run.names() if _resolve_key(base, k) is None and k not in keys]
    if missing or extra or shapes:
        parts, first = [], []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of BASE missing from RUN")
            first += [f"missing {k}" for k in missing[:5]]
        if extra:
            parts.append(f"{len(extra)} extra tensor(s) in RUN")
            first += [f"extra {k}" for k in extra[:5]]
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es)")
            first += [f"shape {s}" for s in shapes[:5]]
        raise CompareError(
            f"{run_label}: architecture does not match BASE ({len(keys)} tensors in BASE): "
            + ", ".join(parts)
            + ". First mismatches: "
            + "; ".join(first)
            + ". Compare checkpoints of the same architecture (or pass the right --adapter-base)"
        )
    return mapping


class _Acc:
    """Element counts ``[n_params, n_changed]`` keyed by anything."""

    def __init__(self) -> None:
        self.d: dict = {}

    def add(self, key, n: int, changed: int) -> None:
        c = self.d.setdefault(key, [0, 0])
        c[0] += n
        c[1] += changed


def _pool(c, max_side: int = _HEATMAP_MAX):
    import torch.nn.functional as F

    m, n = c.shape
    out = (min(m, max_side), min(n, max_side))
    if out == (m, n):
        return c.numpy().copy()
    return F.adaptive_avg_pool2d(c[None, None], out)[0, 0].numpy()


# ---------------------------------------------------------------------------
# the comparison


def compare(
    base: str,
    runs: list[str],
    *,
    names: list[str] | None = None,
    k: int = DEFAULT_K,
    alpha: float = DEFAULT_ALPHA,
    low_alpha: float | None = None,
    eta: float = DEFAULT_ETA,
    full_spectrum: bool = False,
    sparsity_only: bool = False,
    layers: list[int] | None = None,
    focus_layers: list[int] | None = None,
    adapter_base: str | None = None,
    progress: bool = False,
    chunk_elems: int = CHUNK_ELEMS,
    threads: int | None = None,
) -> CompareResult:
    """Compare ``runs`` against ``base``; see the module docstring for what is reported.

    Args:
        base, runs: checkpoint paths (or cached Hub ids).
        names: display names of the runs (default: their directory/file names).
        k: rank of the top-k SVD (clipped to ``min(m, n)`` per matrix).
        alpha: density of the principal mask; ``low_alpha`` (default ``alpha``)
            that of the low-magnitude mask.
        eta: relative tolerance of the bf16-aware change test (paper: 1e-3).
        full_spectrum: exact full-spectrum spectral drift instead of top-k.
        sparsity_only: sparsity (and Jaccard across runs) only.
        layers: block indices for the spectral/overlap work (default: all).
        focus_layers: blocks for heat maps, row/col ratios and overlap curves
            (default: ``layers`` if given, else the middle block).
        adapter_base: base model for PEFT adapter RUNs (default: BASE if it is a
            full model, else the adapter's ``base_model_name_or_path``).
        progress: show a progress bar over tensors.
        chunk_elems: elements per streamed block of a large tensor.
        threads: tensors processed concurrently (default ``min(4, cpu count)``).
            Each tensor op runs single-threaded meanwhile (``torch.set_num_threads(1)``,
            restored on return): the work is many memory-bound ops on independent
            tensors, which parallelise better across tensors than inside each op,
            and intra-op OpenMP threads spin badly on a loaded machine. Peak
            memory grows with ``threads`` (one tensor block per thread).
    """
    from rlmonitor.checkpoints import (
        Checkpoint,
        SafetensorsCheckpoint,
        is_adapter_dir,
        open_checkpoint,
        resolve_path,
    )

    t_start = time.perf_counter()
    if not runs:
        raise CompareError("give at least one RUN to compare against BASE")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CompareError(f"--k must be a positive integer, got {k!r}")
    low_alpha = alpha if low_alpha is None else low_alpha
    for nm, a in (("--alpha", alpha), ("--low-alpha", low_alpha)):
        if not (0.0 < float(a) < 1.0):
            raise CompareError(f"{nm} must be in (0, 1), got {a!r}")
    if not (0.0 <= float(eta) < 1.0):
        raise CompareError(f"--eta must be in [0, 1), got {eta!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CompareError(f"--threads must be a positive integer, got {threads!r}")
    if names is not None and len(names) != len(runs):
        raise CompareError(f"--names: got {len(names)} names for {len(runs)} runs")

    base_ck = open_checkpoint(base, adapter_base=adapter_base)
    if adapter_base is not None:
        run_adapter_base: Checkpoint | str = adapter_base
    elif not is_adapter_dir(resolve_path(base)):
        run_adapter_base = base_ck
    else:
        run_adapter_base = None
    run_cks = [open_checkpoint(r, adapter_base=run_adapter_base) for r in runs]
    if names is None:
        names = _default_names(runs)
    elif len(set(names)) != len(names):
        raise CompareError(f"--names must be unique, got {names}")
    R = len(run_cks)

    # tensors to compare: BASE's, plus an untied LM head that only some RUN has
    keys = base_ck.names()
    for rc in run_cks:
        for kk in rc.names():
            if kk not in base_ck and kk not in keys and _resolve_key(base_ck, kk) is not None:
                keys.append(kk)
    maps = [_match(base_ck, rc, f"RUN {runs[i]}", keys) for i, rc in enumerate(run_cks)]

    infos = {kk: base_ck.info(_resolve_key(base_ck, kk)) for kk in keys}
    skipped = [kk for kk in keys if not infos[kk].floating]
    keys = [kk for kk in keys if infos[kk].floating]
    for i, rc in enumerate(run_cks):
        bad = [kk for kk in keys if not rc.info(maps[i][kk]).floating]
        if bad:
            raise CompareError(f"RUN {runs[i]}: tensor {bad[0]} is floating in BASE but not in RUN")
    classes = {kk: _classify(kk) for kk in keys}
    block_layers = sorted({lay for lay, _ in classes.values() if lay is not None})

    def is_block_matrix(kk: str) -> bool:
        shp = infos[kk].shape
        return classes[kk][0] is not None and len(shp) == 2 and min(shp) > 1 and kk.endswith(".weight")

    if focus_layers is None:
        focus_layers = list(layers) if layers is not None else (
            [block_layers[len(block_layers) // 2]] if block_layers else [])
    focus = set(focus_layers)
    spectral_layers = None if layers is None else set(layers)
    unknown = sorted(set(focus_layers) - set(block_layers)) + sorted((spectral_layers or set()) - set(block_layers))
    if unknown:
        raise CompareError(
            f"--layers: no block {sorted(set(unknown))} in BASE (it has blocks "
            f"{block_layers[0] if block_layers else '-'}..{block_layers[-1] if block_layers else '-'})"
        )

    # accumulators
    tot = [_Acc() for _ in range(R)]  # key None: whole model
    by_layer = [_Acc() for _ in range(R)]
    by_kind = [_Acc() for _ in range(R)]
    by_lk = [_Acc() for _ in range(R)]
    stored = [[0, 0] for _ in range(R)]  # [n_params with same dtype, n exactly different]
    stored_ok = [True] * R
    dtypes = [dict() for _ in range(R)]
    base_dtypes: dict[str, int] = {}
    tensors = [[] for _ in range(R)]
    bf16_cast = [False] * R
    spec_rows = [[] for _ in range(R)]
    ov_rows = [[] for _ in range(R)]
    ov_acc = [dict() for _ in range(R)]  # kind -> [n_changed, inter_p, inter_l, inter_pnl]
    ov_dens = [0, 0, 0, 0]  # n_params, |Mp|, |Ml|, |Mp & ~Ml| over analysed matrices
    curve = [{a: [0, 0, 0] for a in ALPHA_GRID} for _ in range(R)]  # a -> [n_changed, inter_p, inter_l]
    pairs = [(i, j) for i in range(R) for j in range(i + 1, R)]
    jac_kind = {p: {} for p in pairs}  # kind -> [inter, union]
    jac_lk = {p: {} for p in pairs}
    jac_all = {p: [0, 0] for p in pairs}
    cons_rows: list[dict] = []
    result = CompareResult(report={})

    # one job per tensor
    jobs = []
    for kk in keys:
        info0 = infos[kk]
        layer, kind = classes[kk]
        rinfos = [rc.info(maps[i][kk]) for i, rc in enumerate(run_cks)]
        block = is_block_matrix(kk)
        matrix_metrics = block and not sparsity_only and (spectral_layers is None or layer in spectral_layers)
        in_focus = block and layer in focus
        spans: list[tuple[int | None, int | None]] = [(None, None)]
        if not (matrix_metrics or in_focus) and len(info0.shape) > 0:
            step = max(1, chunk_elems // max(1, info0.numel // max(1, info0.shape[0])))
            if step < info0.shape[0]:
                spans = [(s, min(s + step, info0.shape[0])) for s in range(0, info0.shape[0], step)]
        jobs.append(_Job(kk, _resolve_key(base_ck, kk), [maps[i][kk] for i in range(R)], layer, kind, info0,
                         rinfos, matrix_metrics, in_focus, spans))  # fmt: skip
    ctx = _Ctx(base_ck, run_cks, eta, k, alpha, low_alpha, full_spectrum, R, pairs,
               f"BASE {base}", [f"RUN {r}" for r in runs])  # fmt: skip
    # bf16 sparsity of one RUN is a bit-pattern count: numpy on the mapped files, no torch import
    bits_path = (
        sparsity_only and R == 1 and eta < _BITWISE_ETA_LIMIT
        and all(isinstance(ck, SafetensorsCheckpoint) for ck in (base_ck, *run_cks))
        and all(j.info0.dtype == "BF16" and j.rinfos[0].dtype == "BF16" for j in jobs)
    )  # fmt: skip
    process = _process_tensor_bits if bits_path else _process_tensor

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="tensor", desc="compare", file=sys.stderr, leave=False)
    n_workers = max(1, min(threads or min(4, os.cpu_count() or 1), len(jobs) or 1))
    torch_threads = None
    if not bits_path:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tensors in parallel, each op single-threaded (see `threads`)
    ex = ThreadPoolExecutor(n_workers, thread_name_prefix="rlmonitor-compare")
    try:
        # map() yields in order; results hold counts and small arrays only, never weights
        for job, out in zip(jobs, ex.map(lambda j: process(j, ctx), jobs), strict=True):
            kk, layer, kind, info0, numel = job.key, job.layer, job.kind, job.info0, job.info0.numel
            base_dtypes[info0.dtype_name] = base_dtypes.get(info0.dtype_name, 0) + numel
            for i, ri in enumerate(job.rinfos):
                dtypes[i][ri.dtype_name] = dtypes[i].get(ri.dtype_name, 0) + numel
                if info0.dtype != "BF16" or ri.dtype != "BF16":
                    bf16_cast[i] = True
                if out["stored_diff"][i] is None:
                    stored_ok[i] = False
                else:
                    stored[i][0] += numel
                    stored[i][1] += out["stored_diff"][i]
                ch = out["changed"][i]
                for acc, key in ((tot[i], None), (by_layer[i], layer), (by_kind[i], kind), (by_lk[i], (layer, kind))):
                    acc.add(key, numel, ch)
                tensors[i].append({
                    "name": kk, "layer": layer, "kind": kind, "shape": list(info0.shape),
                    "dtype": ri.dtype_name if ri.dtype == info0.dtype else f"{info0.dtype_name}->{ri.dtype_name}",
                    "n_params": numel, "n_changed": ch, "update_sparsity": _sparsity(numel, ch),
                })  # fmt: skip
                if out["spectral"][i] is not None:
                    spec_rows[i].append(out["spectral"][i])
                    row, inters = out["overlap"][i]
                    ov_rows[i].append(row)
                    c = ov_acc[i].setdefault(kind, [0, 0, 0, 0])
                    for t, v in enumerate((ch, *inters)):
                        c[t] += v
                if out["curve"][i] is not None:
                    for a, vals in out["curve"][i].items():
                        for t, v in enumerate(vals):
                            curve[i][a][t] += v
                if out["row_col"][i] is not None:
                    result.row_col[(names[i], kk)] = out["row_col"][i]
            if out["dens"] is not None:
                for t, v in enumerate(out["dens"]):
                    ov_dens[t] += v
            for p, (inter, union) in out["pairs"].items():
                for acc, key in ((jac_kind[p], kind), (jac_lk[p], (layer, kind))):
                    c = acc.setdefault(key, [0, 0])
                    c[0] += inter
                    c[1] += union
                jac_all[p][0] += inter
                jac_all[p][1] += union
            if out["consensus"] is not None:
                row, pooled = out["consensus"]
                cons_rows.append(row)
                result.heatmaps[kk] = pooled
            if bar is not None:
                bar.update(1)
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        ex.shutdown(wait=True)
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        if bar is not None:
            bar.close()

    # ---- assemble the report ------------------------------------------------
    n_params = sum(infos[kk].numel for kk in keys)
    notes: list[str] = list(base_ck.notes)
    if skipped:
        notes.append(f"{len(skipped)} non-floating tensor(s) skipped (e.g. {skipped[0]})")
    kinds_all = _kind_order(kind for _, kind in classes.values())
    run_reports = []
    for i, rc in enumerate(run_cks):
        n, ch = tot[i].d.get(None, [0, 0])
        rnotes = list(rc.notes)
        if bf16_cast[i]:
            parts = ", ".join(f"{d} {v}" for d, v in sorted(dtypes[i].items()))
            bparts = ", ".join(f"{d} {v}" for d, v in sorted(base_dtypes.items()))
            rnotes.append(
                f"not all tensors are stored as bf16 (BASE: {bparts}; RUN: {parts} params): the bf16 test was "
                "applied to the bf16 casts of the stored values (metrics.md section 1); "
                "stored_dtype_sparsity gives exact equality of the stored values"
            )
        entry: dict[str, Any] = {
            "name": names[i], "path": runs[i], "format": rc.kind, "dtypes": dtypes[i],
            "bf16_cast": bf16_cast[i], "n_params": n, "n_changed": ch, "update_sparsity": _sparsity(n, ch),
            "stored_dtype_sparsity": _sparsity(stored[i][0], stored[i][1]) if stored_ok[i] else None,
            "notes": rnotes,
            "by_layer": [
                {"layer": lay, "n_params": v[0], "n_changed": v[1], "update_sparsity": _sparsity(*v)}
                for lay, v in sorted(by_layer[i].d.items(), key=lambda t: (t[0] is None, t[0] or 0))
            ],
            "by_kind": [
                {"kind": kd, "n_params": by_kind[i].d[kd][0], "n_changed": by_kind[i].d[kd][1],
                 "update_sparsity": _sparsity(*by_kind[i].d[kd])}
                for kd in kinds_all
            ],
            "by_layer_kind": [
                {"layer": lay, "kind": kd, "n_params": v[0], "n_changed": v[1], "update_sparsity": _sparsity(*v)}
                for (lay, kd), v in sorted(
                    by_lk[i].d.items(), key=lambda t: (t[0][0] is None, t[0][0] or 0, kinds_all.index(t[0][1]))
                )
            ],
            "tensors": tensors[i],
            "spectral": None,
            "overlap": None,
        }  # fmt: skip
        if not sparsity_only and spec_rows[i]:
            entry["spectral"] = _spectral_summary(spec_rows[i], k, full_spectrum, kinds_all)
            entry["overlap"] = _overlap_summary(
                ov_rows[i], ov_acc[i], ov_dens, alpha, low_alpha, kinds_all, curve[i], sorted(focus)
            )
        run_reports.append(entry)

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "base": {"path": base, "format": base_ck.kind, "n_tensors": len(keys), "n_params": n_params,
                 "dtypes": base_dtypes},
        "settings": {
            "eta": eta, "k": k, "alpha": alpha, "low_alpha": low_alpha, "alpha_grid": list(ALPHA_GRID),
            "full_spectrum": full_spectrum, "sparsity_only": sparsity_only,
            "layers": sorted(spectral_layers) if spectral_layers is not None else None,
            "focus_layers": sorted(focus),
            "drift_metric": "spectral_drift" if full_spectrum else "spectral_drift_topk",
        },
        "runs": run_reports,
    }  # fmt: skip
    if R > 1:
        report["jaccard"], report["jaccard_by_layer"] = _jaccard_report(
            ctx.M, pairs, names, jac_kind, jac_lk, jac_all, tot, by_kind, by_lk, kinds_all
        )
        report["consensus"] = {"runs": R, "layers": sorted(focus), "matrices": cons_rows}
    report["notes"] = notes
    report["outputs"] = []
    report["elapsed_s"] = time.perf_counter() - t_start
    result.report = report
    return result


def _default_names(runs: list[str]) -> list[str]:
    names = []
    for r in runs:
        p = Path(r.rstrip("/"))
        nm = p.stem if p.suffix == ".safetensors" else p.name
        if p.suffix == ".safetensors" and p.stem.startswith("model") and p.parent.name:
            nm = p.parent.name
        names.append(nm or r)
    seen: dict[str, int] = {}
    out = []
    for nm in names:
        seen[nm] = seen.get(nm, 0) + 1
        out.append(nm if seen[nm] == 1 else f"{nm}#{seen[nm]}")
    return out


@dataclass
class _Job:
    key: str
    bkey: str
    rkeys: list[str]
    layer: int | None
    kind: str
    info0: Any
    rinfos: list
    matrix_metrics: bool
    in_focus: bool
    spans: list[tuple[int | None, int | None]]


@dataclass
class _Ctx:
    base: Any
    runs: list
    eta: float
    k: int
    alpha: float
    low_alpha: float
    full_spectrum: bool
    R: int
    pairs: list[tuple[int, int]]
    base_label: str
    run_labels: list[str]

    @property
    def M(self):  # the metrics module, imported on first use
        from rlmonitor import metrics

        return metrics

    @property
    def torch(self):
        import torch

        return torch


def _empty_out(R: int, pairs, same: list[bool]) -> dict[str, Any]:
    return {
        "changed": [0] * R, "stored_diff": [0 if s else None for s in same], "pairs": {p: [0, 0] for p in pairs},
        "spectral": [None] * R, "overlap": [None] * R, "curve": [None] * R, "row_col": [None] * R,
        "dens": None, "consensus": None,
    }  # fmt: skip


def _process_tensor_bits(job: _Job, c: _Ctx) -> dict:
    """:func:`_process_tensor` for one RUN, bf16 storage on both sides and the bitwise
    test: counts (and a focus matrix's row/column ratios) from the stored bit patterns
    with numpy. Hands the tensor to the torch path where that must decide (NaN/Inf,
    sign-only changes) or a read gives no bit patterns."""
    import numpy as np

    from rlmonitor.core.bf16bits import changed_counts

    out = _empty_out(1, c.pairs, [True])
    for start, stop in job.spans:
        a0 = c.base.read_bits(job.bkey, start, stop)
        a1 = c.runs[0].read_bits(job.rkeys[0], start, stop) if a0 is not None else None
        got = changed_counts(a0, a1, lines=job.in_focus) if a1 is not None else None
        if got is None:
            return _process_tensor(job, c)
        nc, rows, cols = got
        out["changed"][0] += nc
        out["stored_diff"][0] += nc
        if job.in_focus:
            # as row_col_update_ratios: exact counts, one correctly rounded float32 division
            m, n = a0.shape
            out["row_col"][0] = (rows.astype("float32") / np.float32(n), cols.astype("float32") / np.float32(m))
    return out


def _process_tensor(job: _Job, c: _Ctx) -> dict:
    """All metrics of one tensor, for every run; streams row blocks of large tensors.

    Holds BASE's block, one RUN block at a time, and the RUNs' masks of the block
    (needed for Jaccard / consensus). Returns counts and small arrays only.
    """
    M, torch, R = c.M, c.torch, c.R
    kk, layer, kind = job.key, job.layer, job.kind
    # bf16 storage and a bitwise-equivalent eta: the mask is the stored-value comparison itself
    bitwise_bf16 = job.info0.dtype == "BF16" and c.eta < _BITWISE_ETA_LIMIT
    same = [ri.dtype == job.info0.dtype for ri in job.rinfos]
    out = _empty_out(R, c.pairs, same)
    for start, stop in job.spans:
        w0 = c.base.read(job.bkey, start, stop)
        grid = masks0 = f0 = None
        if job.matrix_metrics:
            k_eff = min(c.k, *w0.shape)
            try:
                lm = M.low_magnitude_mask(w0, c.low_alpha)  # also checks that W0 is finite
                f0 = M.top_k_svd(w0, k_eff)
                pm = M.principal_mask(f0, k_eff, c.alpha)
            except ValueError as err:
                raise CompareError(f"tensor {kk} of {c.base_label}: {err}") from err
            pnl = pm & ~lm
            masks0 = (pm, lm, pnl)
            out["dens"] = (w0.numel(), *(M.count_true(m) for m in masks0))
            if job.in_focus:
                grid = [(a, M.principal_mask(f0, k_eff, a), M.low_magnitude_mask(w0, a)) for a in ALPHA_GRID]
        masks, counts = [], []
        for i, rc in enumerate(c.runs):
            where = f"tensor {kk} ({c.base_label} vs {c.run_labels[i]})"
            w1 = rc.read(job.rkeys[i], start, stop)
            mask = rows_cols = None
            try:
                if R > 1 or job.matrix_metrics or job.in_focus:
                    if job.in_focus:
                        mask, *rows_cols = M.changed_mask_and_ratios(w0, w1, c.eta)
                    else:
                        mask = M.changed_mask(w0, w1, c.eta)
                    nc = M.count_true(mask)
                else:  # counts only: the mask is never materialised
                    nc = M.count_changed(w0, w1, c.eta)
            except ValueError as err:
                raise CompareError(f"{where}: {err}") from err
            out["changed"][i] += nc
            if same[i]:
                out["stored_diff"][i] += nc if bitwise_bf16 else int((w0 != w1).count_nonzero())
            if R > 1:
                masks.append(mask)
                counts.append(nc)
            if job.matrix_metrics:
                out["spectral"][i] = _spectral(M, torch, w0, w1, f0, k_eff, c.full_spectrum, kk, layer, kind, where)
                out["overlap"][i] = _overlap(M, mask, nc, masks0, kk, layer, kind)
                if grid is not None:
                    out["curve"][i] = {
                        a: (nc, M.count_true(gp & mask), M.count_true(gl & mask))
                        for a, gp, gl in grid
                    }
            if job.in_focus:
                rr, cc = rows_cols
                out["row_col"][i] = (rr.numpy(), cc.numpy())
            del w1
        for i, j in c.pairs:
            inter = M.count_true(masks[i] & masks[j])
            out["pairs"][(i, j)][0] += inter
            out["pairs"][(i, j)][1] += counts[i] + counts[j] - inter
        if R > 1 and job.in_focus:
            C = M.consensus_ratio(masks)
            hist = torch.bincount((C * R).round().long().flatten(), minlength=R + 1).double() / C.numel()
            anyc = float(1.0 - hist[0])
            row = {
                "name": kk, "layer": layer, "kind": kind, "shape": list(C.shape), "mean": float(C.mean()),
                "histogram": [float(h) for h in hist], "all_of_any": float(hist[R]) / anyc if anyc > 0 else None,
            }  # fmt: skip
            out["consensus"] = (row, _pool(C))
        del w0, masks
    return out


def _spectral(M, torch, w0, w1, f0, k, full, name, layer, kind, where) -> dict:
    try:
        # Cold start for W1: a warm start from W0's factors would bias W1's subspace towards W0's
        # (the angles we measure); identical matrices share their factors.
        f1 = f0 if torch.equal(w0, w1) else M.top_k_svd(w1, k)
        left = M.degrees(M.principal_angles(f0, f1, k, "left"))
        right = M.degrees(M.principal_angles(f0, f1, k, "right"))
        try:
            drift = M.spectral_drift(w0, w1) if full else M.spectral_drift(f0, f1, k)
        except ValueError:
            drift = None  # W0 == 0: drift undefined
    except ValueError as err:
        raise CompareError(f"{where}: {err}") from err
    return {
        "name": name, "layer": layer, "kind": kind, "k": k,
        "max_angle_left_deg": float(left[-1]), "max_angle_right_deg": float(right[-1]),
        "angles_left_deg": [float(x) for x in left], "angles_right_deg": [float(x) for x in right],
        "drift": drift,
    }  # fmt: skip


def _overlap(M, mask, nc, masks0, name, layer, kind) -> tuple[dict, tuple[int, int, int]]:
    row = {"name": name, "layer": layer, "kind": kind, "n_changed": nc}
    for key, mx in zip(("principal", "low_magnitude", "principal_not_low"), masks0, strict=True):
        row[key] = M.mask_overlap(mx, mask) if nc else None
    return row, tuple(M.count_true(mx & mask) for mx in masks0)


def _spectral_summary(rows: list[dict], k: int, full: bool, kinds_all: list[str]) -> dict:
    def agg(rs):
        drifts = [r["drift"] for r in rs if r["drift"] is not None]
        return {
            "max_angle_left_deg": max(r["max_angle_left_deg"] for r in rs),
            "max_angle_right_deg": max(r["max_angle_right_deg"] for r in rs),
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
        out[key] = _ratio(tot[t + 1], tot[0])
    for t, key in enumerate(keys):
        out["baseline_" + key] = _ratio(dens[t + 1], dens[0])
    out["by_kind"] = [
        {"kind": kd, "n_changed": acc[kd][0], **{key: _ratio(acc[kd][t + 1], acc[kd][0]) for t, key in enumerate(keys)}}
        for kd in kinds_all
        if kd in acc
    ]
    out["matrices"] = rows
    out["curve_layers"] = focus
    out["curve"] = [
        {"alpha": a, "principal": _ratio(c[1], c[0]), "low_magnitude": _ratio(c[2], c[0])}
        for a, c in curve.items()
        if c[0]
    ]
    return out


def _jaccard_report(M, pairs, names, jac_kind, jac_lk, jac_all, tot, by_kind, by_lk, kinds_all):
    def row(i, j, inter_union, na, nb, n):
        inter, union = inter_union
        p, q = (na / n, nb / n) if n else (0.0, 0.0)
        return {
            "jaccard": _ratio(inter, union),
            "random_baseline": M.jaccard_random_baseline(p, q) if (p + q) > 0 else None,
            "density_a": p, "density_b": q,
        }  # fmt: skip

    out, by_layer = [], []
    for i, j in pairs:
        n, na = tot[i].d[None]
        nb = tot[j].d[None][1]
        out.append({"run_a": names[i], "run_b": names[j], "kind": "all", "n_params": n,
                    **row(i, j, jac_all[(i, j)], na, nb, n)})  # fmt: skip
        for kd in kinds_all:
            if kd not in jac_kind[(i, j)]:
                continue
            n, na = by_kind[i].d[kd]
            nb = by_kind[j].d[kd][1]
            out.append({"run_a": names[i], "run_b": names[j], "kind": kd, "n_params": n,
                        **row(i, j, jac_kind[(i, j)][kd], na, nb, n)})  # fmt: skip
        for (lay, kd), iu in sorted(
            jac_lk[(i, j)].items(), key=lambda t: (t[0][0] is None, t[0][0] or 0, kinds_all.index(t[0][1]))
        ):
            n, na = by_lk[i].d[(lay, kd)]
            nb = by_lk[j].d[(lay, kd)][1]
            r = row(i, j, iu, na, nb, n)
            by_layer.append({"run_a": names[i], "run_b": names[j], "layer": lay, "kind": kd,
                             "jaccard": r["jaccard"], "random_baseline": r["random_baseline"]})  # fmt: skip
    return out, by_layer


# ---------------------------------------------------------------------------
# outputs: tables (CSV / W&B), figures, terminal


def tables(result: CompareResult) -> dict[str, tuple[list[str], list[list]]]:
    """Flat tables ``name -> (columns, rows)`` behind the CSVs and the W&B tables."""
    rep = result.report
    runs = rep["runs"]
    t: dict[str, tuple[list[str], list[list]]] = {}
    t["summary"] = (
        ["run", "n_params", "n_changed", "update_sparsity", "stored_dtype_sparsity", "bf16_cast",
         "max_angle_left_deg", "max_angle_right_deg", "drift_mean", "overlap_principal",
         "baseline_principal", "overlap_low_magnitude", "baseline_low_magnitude"],
        [[r["name"], r["n_params"], r["n_changed"], r["update_sparsity"], r["stored_dtype_sparsity"],
          r["bf16_cast"],
          *((r["spectral"]["max_angle_left_deg"], r["spectral"]["max_angle_right_deg"], r["spectral"]["drift_mean"])
            if r["spectral"] else (None, None, None)),
          *((r["overlap"]["principal"], r["overlap"]["baseline_principal"], r["overlap"]["low_magnitude"],
             r["overlap"]["baseline_low_magnitude"]) if r["overlap"] else (None,) * 4)]
         for r in runs],
    )  # fmt: skip
    t["sparsity_by_layer"] = (
        ["run", "layer", "kind", "n_params", "n_changed", "update_sparsity"],
        [[r["name"], e["layer"], "all", e["n_params"], e["n_changed"], e["update_sparsity"]]
         for r in runs for e in r["by_layer"]]
        + [[r["name"], e["layer"], e["kind"], e["n_params"], e["n_changed"], e["update_sparsity"]]
           for r in runs for e in r["by_layer_kind"]],
    )  # fmt: skip
    t["sparsity_by_kind"] = (
        ["run", "kind", "n_params", "n_changed", "update_sparsity"],
        [[r["name"], e["kind"], e["n_params"], e["n_changed"], e["update_sparsity"]] for r in runs for e in r["by_kind"]],
    )
    t["tensors"] = (
        ["run", "name", "layer", "kind", "shape", "dtype", "n_params", "n_changed", "update_sparsity"],
        [[r["name"], e["name"], e["layer"], e["kind"], "x".join(map(str, e["shape"])), e["dtype"], e["n_params"],
          e["n_changed"], e["update_sparsity"]] for r in runs for e in r["tensors"]],
    )  # fmt: skip
    if any(r["spectral"] for r in runs):
        t["spectral"] = (
            ["run", "name", "layer", "kind", "k", "max_angle_left_deg", "max_angle_right_deg", "drift"],
            [[r["name"], m["name"], m["layer"], m["kind"], m["k"], m["max_angle_left_deg"], m["max_angle_right_deg"],
              m["drift"]] for r in runs if r["spectral"] for m in r["spectral"]["matrices"]],
        )  # fmt: skip
        t["principal_angles"] = (
            ["run", "name", "layer", "kind", "side", "i", "angle_deg"],
            [[r["name"], m["name"], m["layer"], m["kind"], side, idx + 1, a]
             for r in runs if r["spectral"] for m in r["spectral"]["matrices"]
             for side in ("left", "right") for idx, a in enumerate(m[f"angles_{side}_deg"])],
        )  # fmt: skip
        t["overlap"] = (
            ["run", "name", "layer", "kind", "n_changed", "principal", "low_magnitude", "principal_not_low"],
            [[r["name"], m["name"], m["layer"], m["kind"], m["n_changed"], m["principal"], m["low_magnitude"],
              m["principal_not_low"]] for r in runs if r["overlap"] for m in r["overlap"]["matrices"]],
        )  # fmt: skip
        t["overlap_curve"] = (
            ["run", "alpha", "principal", "low_magnitude", "random_baseline"],
            [[r["name"], c["alpha"], c["principal"], c["low_magnitude"], c["alpha"]]
             for r in runs if r["overlap"] for c in r["overlap"]["curve"]],
        )  # fmt: skip
    if "jaccard" in rep:
        t["jaccard"] = (
            ["run_a", "run_b", "kind", "n_params", "density_a", "density_b", "jaccard", "random_baseline"],
            [[e["run_a"], e["run_b"], e["kind"], e["n_params"], e["density_a"], e["density_b"], e["jaccard"],
              e["random_baseline"]] for e in rep["jaccard"]],
        )  # fmt: skip
        t["jaccard_by_layer"] = (
            ["run_a", "run_b", "layer", "kind", "jaccard", "random_baseline"],
            [[e["run_a"], e["run_b"], e["layer"], e["kind"], e["jaccard"], e["random_baseline"]]
             for e in rep["jaccard_by_layer"]],
        )  # fmt: skip
        R = rep["consensus"]["runs"]
        t["consensus"] = (
            ["name", "layer", "kind", "mean", *[f"frac_{r}_of_{R}" for r in range(R + 1)], "all_of_any"],
            [[m["name"], m["layer"], m["kind"], m["mean"], *m["histogram"], m["all_of_any"]]
             for m in rep["consensus"]["matrices"]],
        )  # fmt: skip
    if result.row_col:
        t["row_col_ratios"] = (
            ["run", "name", "axis", "index", "ratio"],
            [[run, name, axis, idx, float(v)] for (run, name), (rr, cc) in result.row_col.items()
             for axis, arr in (("row", rr), ("col", cc)) for idx, v in enumerate(arr)],
        )  # fmt: skip
    return t


def write_csvs(result: CompareResult, out: Path) -> list[str]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (cols, rows) in tables(result).items():
        p = out / f"{name}.csv"
        with p.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            w.writerows([["" if v is None else v for v in row] for row in rows])
        paths.append(str(p))
    return paths


def _figure(nrows: int, ncols: int, w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path, paths: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    paths.append(str(path))


def write_figures(result: CompareResult, out: Path) -> list[str]:
    """PNG figures (matplotlib object API, Agg): see the module docstring."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from rlmonitor.core.naming import MODULE_KINDS

    out.mkdir(parents=True, exist_ok=True)
    rep = result.report
    runs = rep["runs"]
    paths: list[str] = []

    # per-layer x kind sparsity heat map, one panel per run
    layers = sorted({e["layer"] for r in runs for e in r["by_layer_kind"] if e["layer"] is not None})
    kinds = [kd for kd in MODULE_KINDS if any(e["kind"] == kd for r in runs for e in r["by_layer_kind"])]
    if layers and kinds:
        fig, axes = _figure(1, len(runs), 0.7 * len(kinds) + 2.2, 0.22 * len(layers) + 1.6)
        for ax, r in zip(axes[0], runs, strict=True):
            grid = np.full((len(layers), len(kinds) + 1), np.nan)
            for e in r["by_layer_kind"]:
                if e["layer"] in layers and e["kind"] in kinds:
                    grid[layers.index(e["layer"]), kinds.index(e["kind"])] = e["update_sparsity"]
            for e in r["by_layer"]:
                if e["layer"] in layers:
                    grid[layers.index(e["layer"]), -1] = e["update_sparsity"]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(len(kinds) + 1), [*kinds, "layer"])
            ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
            ax.set_ylabel("layer")
            ax.set_title(f"{r['name']}: update sparsity {r['update_sparsity']:.3f}", fontsize=9)
            fig.colorbar(im, ax=ax, label="bf16 update sparsity")
        _save(fig, out / "sparsity_by_layer.png", paths)

    # sparsity per module kind, grouped bars
    kinds_b = [e["kind"] for e in runs[0]["by_kind"]]
    fig, axes = _figure(1, 1, max(6.0, 0.45 * len(kinds_b) * max(1, len(runs) / 2)), 3.6)
    ax = axes[0][0]
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        vals = [e["update_sparsity"] or 0.0 for e in r["by_kind"]]
        ax.bar(np.arange(len(kinds_b)) + i * width, vals, width, label=r["name"])
    ax.set_xticks(np.arange(len(kinds_b)) + 0.4 - width / 2, kinds_b, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("bf16 update sparsity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, out / "sparsity_by_kind.png", paths)

    spec_runs = [r for r in runs if r["spectral"]]
    if spec_runs:
        # max principal angle and drift per layer, lines per kind
        fig, axes = _figure(len(spec_runs), 3, 4.4, 3.0)
        for row, r in zip(axes, spec_runs, strict=True):
            mats = r["spectral"]["matrices"]
            for kd in _kind_order(m["kind"] for m in mats):
                ms = sorted((m for m in mats if m["kind"] == kd), key=lambda m: m["layer"])
                xs = [m["layer"] for m in ms]
                row[0].plot(xs, [m["max_angle_left_deg"] for m in ms], marker=".", label=kd)
                row[1].plot(xs, [m["max_angle_right_deg"] for m in ms], marker=".", label=kd)
                row[2].plot(xs, [m["drift"] if m["drift"] else np.nan for m in ms], marker=".", label=kd)
            row[0].set_title(f"{r['name']}: max principal angle, left (deg)", fontsize=9)
            row[1].set_title("max principal angle, right (deg)", fontsize=9)
            row[2].set_title(r["spectral"]["drift_metric"], fontsize=9)
            row[2].set_yscale("log")
            for ax in row:
                ax.set_xlabel("layer")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            row[0].legend(fontsize=7)
        _save(fig, out / "principal_angles.png", paths)

        # theta_1..theta_k curves on the focus layers
        focus = rep["settings"]["focus_layers"]
        fig, axes = _figure(len(spec_runs), 2, 4.6, 3.2)
        for row, r in zip(axes, spec_runs, strict=True):
            for m in r["spectral"]["matrices"]:
                if m["layer"] in focus:
                    idx = np.arange(1, len(m["angles_left_deg"]) + 1)
                    lab = f"L{m['layer']} {m['kind']}"
                    row[0].plot(idx, m["angles_left_deg"], marker=".", label=lab)
                    row[1].plot(idx, m["angles_right_deg"], marker=".", label=lab)
            row[0].set_title(f"{r['name']}: principal angles, left (deg)", fontsize=9)
            row[1].set_title("principal angles, right (deg)", fontsize=9)
            for ax in row:
                ax.set_xlabel("i")
            row[0].legend(fontsize=6)
        _save(fig, out / "principal_angle_curves.png", paths)

        # overlap vs alpha with the random baseline
        fig, axes = _figure(1, 2, 4.6, 3.4)
        for r in spec_runs:
            cv = r["overlap"]["curve"]
            if cv:
                axes[0][0].plot([c["alpha"] for c in cv], [c["principal"] for c in cv], marker="o", label=r["name"])
                axes[0][1].plot([c["alpha"] for c in cv], [c["low_magnitude"] for c in cv], marker="o",
                                label=r["name"])  # fmt: skip
        for ax, title in zip(axes[0], ("principal mask", "low-magnitude mask"), strict=True):
            ax.plot([0, 0.5], [0, 0.5], "k--", lw=1, label="random (= alpha)")
            ax.set_xlabel("alpha (mask density)")
            ax.set_ylabel("overlap |Mx n M| / |M|")
            ax.set_title(f"{title}, layers {rep['settings']['focus_layers']}", fontsize=9)
            ax.legend(fontsize=7)
        _save(fig, out / "overlap_vs_alpha.png", paths)

    if "jaccard" in rep:
        rows = [e for e in rep["jaccard"] if e["jaccard"] is not None]
        pairs = list(dict.fromkeys((e["run_a"], e["run_b"]) for e in rows))
        kinds_j = list(dict.fromkeys(e["kind"] for e in rows))
        fig, axes = _figure(1, 1, max(6.0, 0.5 * len(kinds_j) * max(1, len(pairs) / 2)), 3.6)
        ax = axes[0][0]
        width = 0.8 / max(1, len(pairs))
        for pi, pr in enumerate(pairs):
            es = {e["kind"]: e for e in rows if (e["run_a"], e["run_b"]) == pr}
            xs = np.arange(len(kinds_j)) + pi * width
            ax.bar(xs, [es[kd]["jaccard"] if kd in es else np.nan for kd in kinds_j], width, label=" vs ".join(pr))
            ax.scatter(xs, [es[kd]["random_baseline"] if kd in es else np.nan for kd in kinds_j], color="k",
                       marker="_", s=120, zorder=3, label="random baseline" if pi == 0 else None)  # fmt: skip
        ax.set_xticks(np.arange(len(kinds_j)) + 0.4 - width / 2, kinds_j, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("Jaccard of update masks")
        ax.legend(fontsize=7)
        _save(fig, out / "jaccard.png", paths)

        for lay in rep["consensus"]["layers"]:
            mats = [m for m in rep["consensus"]["matrices"] if m["layer"] == lay and m["name"] in result.heatmaps]
            if not mats:
                continue
            ncol = min(4, len(mats))
            nrow = math.ceil(len(mats) / ncol)
            fig, axes = _figure(nrow, ncol, 3.4, 3.2)
            flat = [ax for row in axes for ax in row]
            for ax, m in zip(flat, mats, strict=False):
                im = ax.imshow(result.heatmaps[m["name"]], aspect="auto", cmap="magma", vmin=0, vmax=1,
                               interpolation="nearest")  # fmt: skip
                ax.set_title(f"{m['kind']} {tuple(m['shape'])}", fontsize=8)
                ax.set_xlabel("in")
                ax.set_ylabel("out")
            for ax in flat[len(mats) :]:
                ax.set_axis_off()
            fig.colorbar(im, ax=flat, label=f"consensus ratio over {rep['consensus']['runs']} runs")
            fig.suptitle(f"consensus of update masks, layer {lay}", fontsize=10)
            _save(fig, out / f"consensus_layer{lay}.png", paths)

    if result.row_col:
        for lay in rep["settings"]["focus_layers"]:
            names = list(dict.fromkeys(n for (_, n) in result.row_col if _classify(n)[0] == lay))
            if not names:
                continue
            fig, axes = _figure(len(names), 2, 4.6, 2.2)
            for row, nm in zip(axes, names, strict=True):
                for r in runs:
                    rc = result.row_col.get((r["name"], nm))
                    if rc is None:
                        continue
                    row[0].plot(rc[0], lw=0.8, label=r["name"])
                    row[1].plot(rc[1], lw=0.8, label=r["name"])
                row[0].set_title(f"{nm}: row update ratio", fontsize=8)
                row[1].set_title("column update ratio", fontsize=8)
            axes[0][0].legend(fontsize=6)
            _save(fig, out / f"row_col_ratios_layer{lay}.png", paths)
    return paths


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(result: CompareResult, file=None) -> None:
    """Rich terminal tables."""
    from rich.console import Console
    from rich.table import Table

    con = Console(file=file or sys.stdout)
    if not con.is_terminal:
        con = Console(file=file or sys.stdout, width=max(con.width, 130))  # logs and pipes: no wrapping
    rep = result.report
    runs = rep["runs"]
    s = rep["settings"]
    t = Table(title=f"rlmonitor compare: BASE {rep['base']['path']} ({rep['base']['n_params']:,} params)")
    t.add_column("run")
    t.add_column("changed", justify="right")
    t.add_column("bf16 sparsity", justify="right")
    spec = any(r["spectral"] for r in runs)
    if spec:
        t.add_column("max angle L/R (deg)", justify="right")
        t.add_column("drift" + ("" if s["full_spectrum"] else f" (top-{s['k']})"), justify="right")
        t.add_column(f"overlap principal (rand {s['alpha']:g})", justify="right")
        t.add_column(f"overlap low-mag (rand {s['low_alpha']:g})", justify="right")
    for r in runs:
        row = [r["name"], f"{r['n_changed']:,}", _fmt(r["update_sparsity"])]
        if spec:
            sp, ov = r["spectral"], r["overlap"]
            row += [
                f"{sp['max_angle_left_deg']:.3g} / {sp['max_angle_right_deg']:.3g}" if sp else "-",
                _fmt(sp and sp["drift_mean"], ".3g"),
                _fmt(ov and ov["principal"]),
                _fmt(ov and ov["low_magnitude"]),
            ]
        t.add_row(*row)
    con.print(t)

    tk = Table(title="bf16 update sparsity by module kind")
    tk.add_column("kind")
    for r in runs:
        tk.add_column(r["name"], justify="right")
    for idx, e in enumerate(runs[0]["by_kind"]):
        tk.add_row(e["kind"], *[_fmt(r["by_kind"][idx]["update_sparsity"]) for r in runs])
    con.print(tk)

    if "jaccard" in rep:
        tj = Table(title="Jaccard of update masks (random baseline)")
        tj.add_column("kind")
        pairs = list(dict.fromkeys((e["run_a"], e["run_b"]) for e in rep["jaccard"]))
        for a, b in pairs:
            tj.add_column(f"{a} / {b}", justify="right")
        for kd in dict.fromkeys(e["kind"] for e in rep["jaccard"]):
            cells = []
            for pr in pairs:
                e = next((e for e in rep["jaccard"] if (e["run_a"], e["run_b"]) == pr and e["kind"] == kd), None)
                cells.append(f"{_fmt(e and e['jaccard'], '.3f')} ({_fmt(e and e['random_baseline'], '.3f')})")
            tj.add_row(kd, *cells)
        con.print(tj)
    for note in rep["notes"]:
        con.print(f"[dim]note: {note}[/dim]", highlight=False)
    for r in runs:
        for note in r["notes"]:
            con.print(f"[dim]note ({r['name']}): {note}[/dim]", highlight=False)


def log_wandb(result: CompareResult, figures: list[str], *, project: str | None, name: str | None) -> str:
    """Log the comparison as one W&B run (tables, images, summary); returns the run directory."""
    import wandb

    rep = result.report
    run = wandb.init(
        project=project, name=name, job_type="compare",
        # read WANDB_DIR now: wandb caches it at the first setup of the process
        dir=os.environ.get("WANDB_DIR") or None,
        config={"base": rep["base"]["path"], "runs": [r["path"] for r in rep["runs"]], **rep["settings"]},
    )  # fmt: skip
    try:
        payload: dict[str, Any] = {}
        for tname, (cols, rows) in tables(result).items():
            if tname in ("row_col_ratios", "principal_angles", "tensors") and len(rows) > 20000:
                continue  # large; in the CSVs
            payload[f"tables/{tname}"] = wandb.Table(columns=cols, data=[list(r) for r in rows])
        for p in figures:
            payload[f"figures/{Path(p).stem}"] = wandb.Image(p)
        run.log(payload)
        for r in rep["runs"]:
            pre = f"{r['name']}/"
            run.summary[pre + "update_sparsity"] = r["update_sparsity"]
            run.summary[pre + "n_changed"] = r["n_changed"]
            if r["spectral"]:
                run.summary[pre + "max_angle_left_deg"] = r["spectral"]["max_angle_left_deg"]
                run.summary[pre + "max_angle_right_deg"] = r["spectral"]["max_angle_right_deg"]
                run.summary[pre + "drift_mean"] = r["spectral"]["drift_mean"]
            if r["overlap"]:
                run.summary[pre + "overlap_principal"] = r["overlap"]["principal"]
                run.summary[pre + "overlap_low_magnitude"] = r["overlap"]["low_magnitude"]
        for e in rep.get("jaccard", []):
            if e["kind"] == "all":
                run.summary[f"jaccard/{e['run_a']}__{e['run_b']}"] = e["jaccard"]
        return str(run.dir)
    finally:
        run.finish()


# ---------------------------------------------------------------------------
# command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="compare checkpoints on disk: bf16 update sparsity, spectra, overlaps, cross-run Jaccard",
        description=(
            "Compare fine-tuned checkpoints (RUN) with their base (BASE), streaming tensor by tensor. "
            "Inputs: model directories (single/sharded safetensors), .safetensors files, PEFT LoRA adapter "
            "directories (effective weights), or Hub ids already in the local cache."
        ),
        epilog=(
            "examples:\n"
            "  rlmonitor compare Qwen/Qwen2.5-0.5B ./grpo-run --out report/ --json report.json\n"
            "  rlmonitor compare base/ run1/ run2/ run3/ --layers 12 --wandb\n"
            "  rlmonitor compare base/ lora-adapter/ --sparsity-only"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="base (reference) checkpoint")
    p.add_argument("runs", metavar="RUN", nargs="+", help="checkpoint(s) to compare with BASE")
    p.add_argument("--out", metavar="DIR", help="write CSVs and PNG figures here")
    p.add_argument("--json", metavar="PATH", help="write the JSON report here ('-': stdout)")
    p.add_argument("--wandb", action="store_true", help="log everything as one W&B run (respects WANDB_MODE)")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: $WANDB_PROJECT or 'rlmonitor')")
    p.add_argument("--wandb-name", default=None, help="W&B run name")
    p.add_argument("--layers", nargs="+", metavar="L",
                   help="blocks for spectral/overlap work and heat maps, e.g. 0 5 10-12 "
                        "(default: all blocks for spectral, the middle block for heat maps)")  # fmt: skip
    p.add_argument("--full-spectrum", action="store_true", help="exact full-spectrum spectral drift (slower)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"top-k singular subspace rank (default {DEFAULT_K})")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"principal-mask density (default {DEFAULT_ALPHA})")  # fmt: skip
    p.add_argument("--low-alpha", type=float, default=None, help="low-magnitude-mask density (default: --alpha)")
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="bf16 change-test tolerance (default 1e-3)")
    p.add_argument("--sparsity-only", action="store_true", help="update sparsity (and cross-run Jaccard) only")
    p.add_argument("--adapter-base", metavar="PATH",
                   help="base model for PEFT adapter inputs (default: BASE, else base_model_name_or_path)")  # fmt: skip
    p.add_argument("--names", nargs="+", metavar="NAME", help="display names of the runs")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="tensors processed in parallel, each op single-threaded (default: min(4, CPUs))")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no terminal table")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    import json
    import os
    import tempfile

    try:
        layers = parse_layers(args.layers)
        result = compare(
            args.base, args.runs, names=args.names, k=args.k, alpha=args.alpha, low_alpha=args.low_alpha,
            eta=args.eta, full_spectrum=args.full_spectrum, sparsity_only=args.sparsity_only, layers=layers,
            adapter_base=args.adapter_base, progress=not args.no_progress and sys.stderr.isatty(),
            threads=args.threads,
        )  # fmt: skip
        rep = result.report
        outputs: list[str] = []
        figures: list[str] = []
        tmp = None
        if args.out:
            out = Path(args.out)
            try:
                outputs += write_csvs(result, out)
                figures = write_figures(result, out)
            except OSError as err:
                raise CompareError(f"--out {args.out}: cannot write ({err})") from err
            outputs += figures
        elif args.wandb:
            tmp = tempfile.TemporaryDirectory(prefix="rlmonitor-compare-")
            figures = write_figures(result, Path(tmp.name))
        rep["outputs"] = outputs
        if not args.quiet:
            print_report(result, file=sys.stderr if args.json == "-" else None)
        if args.wandb:
            project = args.wandb_project or os.environ.get("WANDB_PROJECT") or "rlmonitor"
            rundir = log_wandb(result, figures, project=project, name=args.wandb_name)
            print(f"W&B run logged ({rundir})", file=sys.stderr)
        if tmp is not None:
            tmp.cleanup()
        if args.json:
            text = json.dumps(rep, indent=1, allow_nan=False)
            if args.json == "-":
                print(text)
            else:
                try:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(text)
                except OSError as err:
                    raise CompareError(f"--json {args.json}: cannot write ({err})") from err
        return 0
    except CompareError as err:
        print(f"rlmonitor compare: error: {err}", file=sys.stderr)
        return 2
