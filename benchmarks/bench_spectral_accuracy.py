"""Accuracy and cost of the certified spectral path (rlmonitor.metrics.spectral_contract).

Part 1, the accuracy grid: spectra {1/i ("inv"), i^-0.5 + 0.05 ("sqrt"), Marchenko-Pastur
bulk + 8 spikes ("mp"), the toy model's pretrained weights ("toy", their own shapes)} x
shapes {896x896, 128x896, 4864x896, 896x4864} x relative updates {1e-5..1e-1}
(``||dW||_F / ||W0||_F``) x kinds {dense, sparse 30%, rank 4} x k {8, 16, 64}. Each cell
compares every value of ``spectral_change(base, W1, w0=W0, k, full_spectrum=True)`` with
numpy's fp64 SVD of the same fp32 values (scipy's subspace_angles for the angles). One
row per (spectrum, shape, k, rel), over the three update kinds:

    ang_max  worst |max theta got - max theta exact|, absolute (rad) and relative
    curve    worst max_i |theta_i got - theta_i exact| over both sides, absolute and relative
             (entries below 1e-5 rad fall under the 1e-6 floor, so their relative error may
             exceed 0.1 inside the contract; the summary counts actual contract violations)
    drift    worst |drift got - exact| (top-k; full-spectrum in the summary), abs and relative
    b/c      worst bound / contract ratio: bound / max(0.1 |exact_i|, floor) over every
             entry (<= 1: within the contract); "honest": bound >= error for every value
    methods  K(rylov) / E(xact) / U(nchanged) counts; ill: cells flagged ill_conditioned
    ms, x    median time of spectral_change and speedup over torch.linalg.svd(W1) (fp32,
             same device and threads; measured once per (spectrum, shape))

Part 2, the live target: one snapshot of Qwen2.5-0.5B shapes (24 layers x {q 896x896,
k 128x896, v 128x896, o 896x896, gate 4864x896, up 4864x896, down 896x4864} = 168
matrices), random weights shaped by each spectrum, dense relative updates 1e-4 and 1e-3,
k = 16: total time of spectral_change at contract accuracy vs torch.linalg.svd (fp32) of
every W_t, and separately the one-time cost of base_spectrum for all 168.

    python benchmarks/bench_spectral_accuracy.py [--device cpu|cuda] [--quick] [--threads N]
        [--part grid|qwen|both|floor] [--layers 24] [--spectra inv,sqrt] [--qwen-spectra inv,sqrt]

Run from the repository root with ``PYTHONPATH=.`` when the installed rlmonitor is another
checkout. ``--part floor`` times the method's fp64 sweeps alone per Qwen shape.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import math
import os
import statistics
import time
from collections import Counter

import numpy as np
import scipy.linalg as sla
import torch

from rlmonitor.metrics import ANGLE_FLOOR, DRIFT_FLOOR, REL_TOL, base_spectrum, spectral_change

SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864)]
RELS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
KINDS = ["dense", "sparse", "lowrank"]
KS = [8, 16, 64]
QWEN = [("q", 896, 896), ("k", 128, 896), ("v", 128, 896), ("o", 896, 896), ("gate", 4864, 896),
        ("up", 4864, 896), ("down", 896, 4864)]


def set_blas_threads(n: int) -> None:
    """numpy's bundled OpenBLAS thread count (best effort). The benchmark keeps it at 1:
    numpy only builds the matrices and the references (untimed), and idle OpenBLAS
    threads busy-wait after each call, stealing the second core from torch's timed
    calls (2-thread spectral_change ran 2x slower right after numpy work)."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "libscipy_openblas*.so"))
    with contextlib.suppress(IndexError, OSError, AttributeError):
        ctypes.CDLL(libs[0]).scipy_openblas_set_num_threads64_(ctypes.c_int(n))


def haar(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def profile(spectrum: str, r: int, toy_s: np.ndarray | None = None) -> np.ndarray:
    i = np.arange(1, r + 1)
    if spectrum == "inv":
        return 1.0 / i
    if spectrum == "sqrt":
        return i**-0.5 + 0.05
    # "toy": the toy model's singular values, stretched to r entries (log-interpolated)
    x = np.linspace(0.0, 1.0, toy_s.size)
    return np.exp(np.interp(np.linspace(0.0, 1.0, r), x, np.log(toy_s)))


def synthetic(spectrum: str, m: int, n: int, seed: int, toy_s: np.ndarray | None = None) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    r = min(m, n)
    if spectrum == "mp":
        w = rng.standard_normal((m, n)) / math.sqrt(max(m, n))
        w += (haar(rng, m, 8) * np.linspace(6.0, 3.0, 8)) @ haar(rng, n, 8).T
    else:
        w = (haar(rng, m, r) * profile(spectrum, r, toy_s)) @ haar(rng, n, r).T
    return torch.tensor(w, dtype=torch.float32)


def perturb(w0: torch.Tensor, rel: float, kind: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    m, n = w0.shape
    if kind == "dense":
        g = rng.standard_normal((m, n))
    elif kind == "sparse":
        g = rng.standard_normal((m, n)) * (rng.random((m, n)) < 0.3)
    else:
        g = rng.standard_normal((m, 4)) @ rng.standard_normal((4, n))
    g *= rel * float(torch.linalg.matrix_norm(w0.double())) / np.linalg.norm(g)
    return (w0.double() + torch.from_numpy(g)).to(w0.dtype)


def np_svd(w: torch.Tensor):
    u, s, vt = np.linalg.svd(w.double().cpu().numpy(), full_matrices=False)
    return u, s, vt.T


def timed(sync, repeats: int, fn, *args, **kwargs):
    """Best time of ``repeats`` calls of ``fn(*args, **kwargs)`` and its result."""
    best, out = math.inf, None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def toy_weights() -> dict[str, torch.Tensor]:
    """The toy model's pretrained 2-D weights (the default recipe, cached by rlmonitor.toy)."""
    from rlmonitor.toy import build_base_model, load_base_model

    model, _ = load_base_model(build_base_model())
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2 and "layers.0." in n}


# --------------------------------------------------------------------------------------
# Part 1: the accuracy grid
# --------------------------------------------------------------------------------------


def cell_errors(ch, ref0, w1: torch.Tensor, k: int) -> dict:
    u0, s0, v0 = ref0
    u1, s1, v1 = np_svd(w1)
    out = {"b/c": 0.0, "honest": True, "viol": 0, "ill": int(ch.ill_conditioned), "uncert": int(not ch.meets_contract),
           "ang_abs": 0.0, "ang_rel": 0.0, "curve_abs": 0.0, "curve_rel": 0.0}
    for got, bound, a, b in ((ch.angles_left, ch.angle_bound_left, u0, u1),
                             (ch.angles_right, ch.angle_bound_right, v0, v1)):
        exact = np.sort(sla.subspace_angles(a[:, :k], b[:, :k]))
        got = got.double().cpu().numpy()
        err = np.abs(got - exact)
        out["ang_abs"] = max(out["ang_abs"], abs(got.max() - exact.max()))
        out["ang_rel"] = max(out["ang_rel"], abs(got.max() - exact.max()) / max(exact.max(), 1e-300))
        out["curve_abs"] = max(out["curve_abs"], err.max())
        above = exact >= ANGLE_FLOOR / REL_TOL  # below it the floor, not the relative error, applies
        if above.any():
            out["curve_rel"] = max(out["curve_rel"], (err[above] / exact[above]).max())
        out["b/c"] = max(out["b/c"], (bound / np.maximum(REL_TOL * exact, ANGLE_FLOOR)).max())
        out["honest"] &= bool(err.max() <= bound)
        out["viol"] += int((err > np.maximum(REL_TOL * exact, ANGLE_FLOOR)).sum())
    for key, got, bound, exact in (
        ("drift", ch.drift_topk, ch.drift_topk_bound, np.linalg.norm(s1[:k] - s0[:k]) / np.linalg.norm(s0[:k])),
        ("full", ch.drift_full, ch.drift_full_bound, np.linalg.norm(s1 - s0) / np.linalg.norm(s0)),
    ):
        err = abs(got - exact)
        out[f"{key}_abs"], out[f"{key}_rel"] = err, err / max(exact, 1e-300)
        out["b/c"] = max(out["b/c"], bound / max(REL_TOL * exact, DRIFT_FLOOR))
        out["honest"] &= bool(err <= bound)
        out["viol"] += int(err > max(REL_TOL * exact, DRIFT_FLOOR))
    return out


def grid_groups(args, toy) -> list[tuple]:
    groups = []
    for spectrum in args.grid_spectra:
        if spectrum == "toy":
            groups += [("toy", name.split(".")[-2], w) for name, w in toy.items()]
        else:
            groups += [(spectrum, f"{m}x{n}", (m, n)) for m, n in args.shapes]
    return groups


def run_grid(args, sync, toy) -> list[dict]:
    rows = []
    header = (f"{'spectrum':8} {'shape':9} {'k':>3} {'rel':>6} | {'ang_max abs':>11} {'rel':>7} | {'curve abs':>9} "
              f"{'rel':>7} | {'drift abs':>9} {'rel':>7} | {'b/c':>7} {'honest':>6} | {'K/E/U':>6} | {'ms':>7} "
              f"{'exact ms':>8} {'x':>6}")
    print(header)
    print("-" * len(header))
    for gi, (spectrum, shape_name, spec) in enumerate(grid_groups(args, toy)):
        w0 = spec.to(args.device) if isinstance(spec, torch.Tensor) else synthetic(spectrum, *spec, seed=gi).to(args.device)
        ref0 = np_svd(w0)
        t_exact, _ = timed(sync, 3, torch.linalg.svd, w0, full_matrices=False)
        for k in (k for k in args.ks if k < min(w0.shape)):
            base = base_spectrum(w0, k)
            for rel in args.rels:
                cells, times, methods = [], [], Counter()
                for ki, kind in enumerate(args.kinds):
                    w1 = perturb(w0.cpu(), rel, kind, seed=1000 * gi + ki).to(args.device)
                    _, ch = timed(sync, 1, spectral_change, base, w1, w0=w0, k=k, full_spectrum=True)
                    # time without the full-spectrum drift (what the live monitor runs)
                    t, _ = timed(sync, args.repeats, spectral_change, base, w1, w0=w0, k=k)
                    times.append(t)
                    methods[ch.method[0].upper()] += 1
                    cells.append(cell_errors(ch, ref0, w1, k))
                row = {"spectrum": spectrum, "shape": shape_name, "k": k, "rel": rel, "methods": methods,
                       "ms": 1e3 * statistics.median(times), "exact_ms": 1e3 * t_exact}
                for key in cells[0]:
                    row[key] = all(c[key] for c in cells) if key == "honest" else max(c[key] for c in cells)
                for key in ("viol", "ill", "uncert"):
                    row[key] = sum(c[key] for c in cells)
                certified = [c["b/c"] for c in cells if not c["uncert"]]
                row["b/c certified"] = max(certified, default=0.0)
                rows.append(row)
                m = "/".join(str(methods[c]) for c in "KEU")
                print(f"{spectrum:8} {shape_name:9} {k:3d} {rel:6.0e} | {row['ang_abs']:11.1e} {row['ang_rel']:7.1e} | "
                      f"{row['curve_abs']:9.1e} {row['curve_rel']:7.1e} | {row['drift_abs']:9.1e} {row['drift_rel']:7.1e} | "
                      f"{row['b/c']:7.2g} {row['honest']!s:>6} | {m:>6} {row['ill']:>3} | {row['ms']:7.1f} "
                      f"{row['exact_ms']:8.1f} {row['exact_ms'] / row['ms']:6.1f}", flush=True)
    return rows


def summarize_grid(rows: list[dict]) -> None:
    print("\nSummary over the grid")
    methods = sum((r["methods"] for r in rows), Counter())
    print(f"  cells: {sum(methods.values())}  krylov {methods['K']}  exact {methods['E']}  unchanged {methods['U']}")
    print(f"  all bounds honest: {all(r['honest'] for r in rows)};  values outside the contract: "
          f"{sum(r['viol'] for r in rows)} (of every angle and drift returned)")
    print(f"  worst bound/contract: {max(r['b/c'] for r in rows):.3g} over all cells; "
          f"{max(r['b/c certified'] for r in rows):.3g} over the cells with meets_contract")
    print(f"  cells flagged ill_conditioned: {sum(r['ill'] for r in rows)}; of them without meets_contract: "
          f"{sum(r['uncert'] for r in rows)}")
    for key in ("ang_abs", "curve_abs", "curve_rel", "drift_abs", "drift_rel", "full_abs", "full_rel"):
        print(f"  worst {key:10}: {max(r[key] for r in rows):.2e}")
    for spectrum in sorted({r["spectrum"] for r in rows}):
        for rel in sorted({r["rel"] for r in rows}):
            sel = [r for r in rows if r["spectrum"] == spectrum and r["rel"] == rel]
            if sel:
                ms, ex = sum(r["ms"] for r in sel), sum(r["exact_ms"] for r in sel)
                print(f"  {spectrum:5} rel {rel:6.0e}: time {ms:8.1f} ms vs exact {ex:8.1f} ms  ({ex / ms:5.1f}x)")


# --------------------------------------------------------------------------------------
# Part 2: one snapshot of Qwen2.5-0.5B shapes
# --------------------------------------------------------------------------------------


def run_qwen(args, sync, toy_s) -> None:
    print(f"\nQwen2.5-0.5B shapes: {args.layers} layers x {len(QWEN)} matrices, k={args.qwen_k}, dense updates")
    for spectrum in args.qwen_spectra:
        t_base = t_exact = 0.0
        t_ours = {rel: 0.0 for rel in args.qwen_rels}
        methods = {rel: Counter() for rel in args.qwen_rels}
        worst = {rel: 0.0 for rel in args.qwen_rels}
        for layer in range(args.layers):
            for j, (_, m, n) in enumerate(QWEN):
                w0 = synthetic(spectrum, m, n, seed=7 * layer + j, toy_s=toy_s).to(args.device)
                tb, base = timed(sync, 1, base_spectrum, w0, args.qwen_k)
                t_base += tb
                for ri, rel in enumerate(args.qwen_rels):
                    w1 = perturb(w0.cpu(), rel, "dense", seed=layer * 31 + j).to(args.device)
                    t, ch = timed(sync, 1, spectral_change, base, w1, w0=w0, k=args.qwen_k)
                    t_ours[rel] += t
                    methods[rel][ch.method] += 1
                    bc = max(ch.angle_bound_left / max(REL_TOL * float(ch.angles_left.min()), ANGLE_FLOOR),
                             ch.angle_bound_right / max(REL_TOL * float(ch.angles_right.min()), ANGLE_FLOOR))
                    worst[rel] = max(worst[rel], bc if ch.meets_contract else math.inf)
                    if ri == 0:  # the exact SVD's cost does not depend on the update size
                        te, _ = timed(sync, 1, torch.linalg.svd, w1, full_matrices=False)
                        t_exact += te
        print(f"  {spectrum:5}: one-time base_spectrum ({7 * args.layers} fp64 SVDs): {t_base:7.2f} s;  exact torch.linalg.svd "
              f"(fp32) of every W_t: {t_exact:7.2f} s")
        for rel in args.qwen_rels:
            print(f"         rel {rel:6.0e}: spectral_change {t_ours[rel]:6.2f} s -> {t_exact / t_ours[rel]:5.1f}x  "
                  f"methods {dict(methods[rel])}  worst bound/contract (from the bounds) {worst[rel]:.2g}", flush=True)


def run_floor(args, sync) -> None:
    """The method's unavoidable work per Qwen shape: its fp64 sweeps alone (the base block
    of L columns and two blocks of k + 8, two products each, as spectral_change uses them at
    depth 2) against torch.linalg.svd (fp32): the largest speedup the method could reach."""
    from rlmonitor.metrics import _spectral_cert as cert

    k = args.qwen_k
    print(f"\nFloor (k={k}, depth 2): fp64 sweeps alone vs torch.linalg.svd fp32, per matrix")
    tot_floor = tot_exact = 0.0
    for name, m, n in QWEN:
        w = synthetic("inv", m, n, seed=1)
        a = (w.mT if m < n else w).contiguous().to(args.device)
        base = base_spectrum(w.to(args.device), k)
        cols = [base.L, k + 8, k + 8]
        qs = [torch.linalg.qr(torch.randn(a.shape[1], c, dtype=torch.float64, device=args.device)).Q for c in cols]
        outs = [(torch.empty(a.shape[0], c, dtype=torch.float64, device=args.device),
                 torch.empty(a.shape[1], c, dtype=torch.float64, device=args.device)) for c in cols]

        def sweeps(a=a, qs=qs, outs=outs):
            for q, (y, z) in zip(qs, outs, strict=True):
                cert.fused_pass(a, q, y, z)

        t_floor, _ = timed(sync, 5, sweeps)
        t_exact, _ = timed(sync, 3, torch.linalg.svd, w.to(args.device), full_matrices=False)
        tot_floor += t_floor
        tot_exact += t_exact
        print(f"  {name:5} {m}x{n}: sweeps ({sum(cols)} columns) {1e3 * t_floor:7.1f} ms, exact {1e3 * t_exact:7.1f} ms"
              f" -> at most {t_exact / t_floor:5.1f}x")
    print(f"  per layer (the seven matrices once each): at most {tot_exact / tot_floor:5.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small grid: 896x896 and 4864x896, k=16, 3 updates")
    p.add_argument("--threads", type=int, default=None, help="torch (and numpy BLAS) threads; default torch's")
    p.add_argument("--part", default="both", choices=["grid", "qwen", "both", "floor"])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--spectra", default="inv,sqrt,mp,toy", help="spectra of the grid")
    p.add_argument("--qwen-spectra", default="inv,sqrt,mp,toy")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats per cell (median of kinds, best of repeats)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_blas_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    args.grid_spectra = args.spectra.split(",")
    args.qwen_spectra = args.qwen_spectra.split(",")
    args.shapes, args.rels, args.kinds, args.ks = SHAPES, RELS, KINDS, KS
    args.qwen_rels, args.qwen_k = [1e-4, 1e-3], 16
    if args.quick:
        args.shapes, args.rels, args.ks = [(896, 896), (4864, 896)], [1e-5, 1e-3, 1e-1], [16]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    parts = {"grid": args.grid_spectra, "qwen": args.qwen_spectra, "both": args.grid_spectra + args.qwen_spectra}
    toy = toy_weights() if "toy" in parts.get(args.part, []) else {}
    toy_s = (torch.linalg.svdvals(toy["model.layers.0.mlp.gate_proj.weight"].double()).numpy() if toy else None)
    if args.part in ("grid", "both"):
        summarize_grid(run_grid(args, sync, toy))
    if args.part in ("qwen", "both"):
        run_qwen(args, sync, toy_s)
    if args.part == "floor":
        run_floor(args, sync)


if __name__ == "__main__":
    main()
