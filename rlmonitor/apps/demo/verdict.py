"""The demo's verdict: the paper's RLVR-vs-SFT contrasts checked on the measured numbers,
after the same number of steps (:func:`matched_comparison`) and at the same update size
(:func:`size_matched`). Pure functions of ``metrics.jsonl`` records."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from rlmonitor.core import keys

from .config import METHODS

__all__ = ["ERROR_BARS", "SUMMARY_KEYS", "final_values", "matched_comparison", "size_matched", "values_at", "verdict"]

SPARSITY, ANGLE, DRIFT = str(keys.UPDATE_SPARSITY), str(keys.ANGLE_MAX), str(keys.DRIFT_TOPK)
PRINCIPAL, LOW = str(keys.PRINCIPAL_OVERLAP), str(keys.LOW_OVERLAP)
KL, REL_FRO = str(keys.KL_FORWARD), str(keys.REL_FROBENIUS)

#: The summary's metrics: key, label, and what the paper expects of RL relative to SFT
#: ("higher" / "lower"; None: reported, not part of the contrast).
SUMMARY_KEYS: tuple[tuple[str, str, str | None], ...] = (
    (SPARSITY, "update sparsity (bf16)", "higher"),
    (ANGLE, "max principal angle (deg)", "lower"),
    (DRIFT, "spectral drift (top-k)", "lower"),
    (PRINCIPAL, "principal-mask overlap ratio", "lower"),
    (LOW, "low-magnitude overlap ratio", "higher"),
    (KL, "KL(pi || pi_base) on the probe", None),
    (REL_FRO, "relative update norm ||dW||/||W0||", None),
)
#: Spectral values and the keys of their certified error bounds (shown as error bars).
ERROR_BARS: dict[str, str] = {ANGLE: str(keys.ANGLE_MAX_BOUND), DRIFT: str(keys.DRIFT_TOPK_BOUND)}
#: The contrasts re-checked at equal update size: key -> RL expected "higher"/"lower".
DIRECTIONS = {k: e for k, _, e in SUMMARY_KEYS if e is not None}


def num(v: Any) -> float | None:
    """``v`` as a finite float, else None."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def final_values(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float | None]:
    """For each key, its value in the last record of ``rows`` that has it (else None)."""
    out: dict[str, float | None] = {}
    for key in keys:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = vals[-1] if vals else None
    return out


def values_at(rows: Sequence[dict[str, Any]], keys: Sequence[str], step: int) -> dict[str, float | None]:
    """:func:`final_values` over the records up to and including ``step``."""
    return final_values([r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step], keys)


def matched_comparison(runs: dict[str, Sequence[dict[str, Any]]], keys: Sequence[str]) -> dict[str, Any]:
    """The values the verdict compares: each method's final values when both runs
    measured the same last step (a complete demo), else the values at the last step
    *both* measured (a run was interrupted), so that RL and SFT are compared after the
    same number of steps. Returns ``{"step", "note", <method>: {key: value}}`` (an
    empty dict for a method without a geometry measurement)."""
    measured = {m: sorted({r["step"] for r in rows if r.get(SPARSITY) is not None
                           and isinstance(r.get("step"), int)}) for m, rows in runs.items()}  # fmt: skip
    out: dict[str, Any] = {"step": None, "note": "", **{m: {} for m in runs}}
    have = [m for m in runs if measured[m]]
    if not have:
        return out
    lasts = {m: measured[m][-1] for m in have}
    if len(have) == 1 or len(set(lasts.values())) == 1:
        for m in have:
            out[m] = final_values(runs[m], keys)
        out["step"] = max(lasts.values())
        missing = [METHODS[m][2] for m in runs if m not in have]
        if missing:
            out["note"] = f"{', '.join(missing)} stopped before its first geometry measurement"
        return out
    step = max(set.intersection(*(set(measured[m]) for m in have)), default=None)
    if step is None:  # pragma: no cover - both runs use the same measurement grid
        out["note"] = "the runs have no measured step in common: nothing to compare"
        return out
    out["step"] = step
    out["note"] = (f"compared at step {step}, the last step both runs measured; last measured: "
                   + ", ".join(f"{METHODS[m][2]} step {lasts[m]}" for m in have))  # fmt: skip
    for m in have:
        out[m] = values_at(runs[m], keys, step)
    return out


Say = Callable[[float, Any, bool], str]

#: The checks of :func:`verdict`: name, metric, what RL is compared with (None: SFT's
#: value, else a fixed baseline), whether RL should be higher, and the sentence.
_CONTRASTS: tuple[tuple[str, str, float | None, bool, Say], ...] = (
    ("rl_sparser", SPARSITY, None, True, lambda r, s, ok:
        f"RL left {r:.1%} of the monitored weights bf16-unchanged, SFT {s:.1%}: RL's update is "
        f"{'sparser' if ok else 'NOT sparser'} (paper, at LLM scale: RLVR 36-92%, SFT 0.6-19%)."),
    ("rl_principal_overlap_below_sft", PRINCIPAL, None, False, lambda r, s, ok:
        f"Principal-mask overlap ratio: RL {r:.3f} vs SFT {s:.3f}: RL's changes "
        f"{'land less' if ok else 'do NOT land less'} on the principal weights than SFT's."),
    ("rl_principal_overlap_below_random", PRINCIPAL, 1.0, False, lambda r, s, ok:
        f"RL's principal-mask overlap ratio is {r:.3f} ({'below' if ok else 'NOT below'} 1 = random): "
        f"RL {'avoids' if ok else 'does not avoid'} the principal weights."),
    ("rl_spectral_drift_smaller", DRIFT, None, False, lambda r, s, ok:
        f"Top-k spectral drift: RL {r:.2e} vs SFT {s:.2e}: RL "
        f"{'preserves the spectrum better' if ok else 'does NOT preserve the spectrum better'}."),
    ("rl_principal_angle_smaller", ANGLE, None, False, lambda r, s, ok:
        f"Max principal angle: RL {r:.2f} deg vs SFT {s:.2f} deg: RL "
        f"{'rotates the top-k singular subspaces less' if ok else 'does NOT rotate the top-k subspaces less'}."),
    ("rl_low_magnitude_overlap_above_sft", LOW, None, True, lambda r, s, ok:
        f"Low-magnitude overlap ratio: RL {r:.3f} vs SFT {s:.3f}: RL "
        f"{'favours' if ok else 'does NOT favour'} the low-magnitude weights more than SFT."),
    ("rl_low_magnitude_overlap_above_random", LOW, 1.0, True, lambda r, s, ok:
        f"RL's low-magnitude overlap ratio is {r:.3f} ({'above' if ok else 'NOT above'} 1 = random)."),
)  # fmt: skip


def _contrast(rl: dict[str, Any], sft: dict[str, Any], key: str, baseline: float | None, higher: bool,
              say: Say) -> dict[str, Any]:  # fmt: skip
    r, s = num(rl.get(key)), (num(sft.get(key)) if baseline is None else None)
    other = s if baseline is None else baseline
    if r is None or other is None:
        return {"holds": None, "rl": r, "sft": s,
                "sentence": "not measured (needs both runs)" if baseline is None else "not measured"}  # fmt: skip
    holds = r > other if higher else r < other
    return {"holds": holds, "rl": r, "sft": s, "sentence": say(r, s, holds)}


def verdict(rl: dict[str, Any] | None, sft: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The paper's RLVR-vs-SFT contrasts, each checked on the measured final values.

    ``rl`` / ``sft``: ``{metric key: value}`` (None where the method did not run).
    Every entry is ``{"holds": bool | None, "rl", "sft", "sentence"}``; ``holds`` is
    None when a number it needs is missing. ``overall`` summarises the checks that
    could be made.
    """
    rl, sft = rl or {}, sft or {}
    checks = {name: _contrast(rl, sft, key, base, higher, say) for name, key, base, higher, say in _CONTRASTS}
    checks["overall"] = _overall(checks, rl, sft)
    return checks


def _overall(checks: dict[str, dict[str, Any]], rl: dict[str, Any], sft: dict[str, Any]) -> dict[str, Any]:
    made = [c["holds"] for c in checks.values() if c["holds"] is not None]
    n_ok = sum(bool(h) for h in made)
    if not made:
        return {"holds": None, "checks_made": 0, "checks_holding": 0,
                "sentence": "No contrast could be checked: no geometry was measured."}  # fmt: skip
    overall = n_ok == len(made)
    shows = "shows" if overall else "shows only partly" if n_ok else "does NOT show"
    sentence = (f"At this scale the paper's contrast (RL sparser, off-principal, spectrum-preserving; "
                f"SFT the opposite) {shows}: {n_ok} of {len(made)} checks hold.")  # fmt: skip
    if not any(num(v) is not None for v in sft.values()):
        sentence = (f"SFT has no measurement to compare with, so only RL's overlaps against the random baseline "
                    f"were checked: {n_ok} of {len(made)} hold.")  # fmt: skip
    (rf, sf), (rk, sk) = ((num(rl.get(k)), num(sft.get(k))) for k in (REL_FRO, KL))
    if rf is not None and sf is not None:
        sentence += f" For scale: RL moved the weights by {rf:.3g} (relative Frobenius norm) vs {sf:.3g} for SFT"
        if rk is not None and sk is not None:
            sentence += f", and the policy by KL {rk:.3g} vs {sk:.3g} on the probe"
        sentence += "."
        if rf < sf:
            sentence += " RL's update is also smaller overall, so part of the contrast may reflect its size."
    return {"holds": overall, "checks_made": len(made), "checks_holding": n_ok, "sentence": sentence}


def size_matched(rl: dict[str, Any] | None, sft_rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The contrasts again, against SFT *at RL's update size*: SFT's metrics linearly
    interpolated (between its two measurements that bracket it) to the relative update
    norm ``geometry/rel_frobenius`` RL ended with. Separates "RL changes weights
    differently" from "RL changes them less". None when SFT's measured range does not
    contain RL's update size (or a number is missing)."""
    names = [REL_FRO, *DIRECTIONS]
    target = num((rl or {}).get(REL_FRO))
    pts = [r for r in sft_rows if all(num(r.get(k)) is not None for k in names) and isinstance(r.get("step"), int)]
    pts.sort(key=lambda r: r["step"])
    if target is None or any(num((rl or {}).get(k)) is None for k in DIRECTIONS):
        return None
    for a, b in itertools.pairwise(pts):
        lo, hi = a[REL_FRO], b[REL_FRO]
        if lo <= target <= hi and hi > lo:
            t = (target - lo) / (hi - lo)
            break
    else:
        exact = [r for r in pts if r[REL_FRO] == target]
        if not exact:
            return None
        a = b = exact[0]
        t = 0.0
    sft = {k: a[k] + t * (b[k] - a[k]) for k in names}
    step = a["step"] + t * (b["step"] - a["step"])
    checks = {k: (rl[k] > sft[k]) if e == "higher" else (rl[k] < sft[k]) for k, e in DIRECTIONS.items()}
    n_ok = sum(checks.values())
    failing = [lbl for k, lbl, _ in SUMMARY_KEYS if k in checks and not checks[k]]
    sentence = (f"At equal update size (SFT interpolated to ||dW||/||W0|| = {target:.3g}, around its step {step:.0f}), "
                f"{n_ok} of {len(checks)} of the RL-vs-SFT contrasts hold"
                + (f" (not: {', '.join(failing)})." if failing else "."))  # fmt: skip
    return {"rel_frobenius": target, "sft_step": step, "sft": sft, "checks": checks, "checks_holding": n_ok,
            "sentence": sentence}  # fmt: skip
