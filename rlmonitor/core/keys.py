"""The one vocabulary of rlmonitor: every key it logs, with meaning, formula and paper reference.

Front-ends never type a key as a literal: fixed keys are the :class:`Key` constants
of this module (a ``Key`` *is* its ``str``), pattern keys are filled by calling them::

    scalars[keys.UPDATE_SPARSITY] = 0.91
    scalars[keys.UPDATE_SPARSITY_KIND(kind="q")] = 0.93     # geometry/update_sparsity/q

``section`` says where a key belongs in a W&B workspace (:data:`SECTIONS`, top-down)
and whether it reaches W&B by default: ``kind`` and ``layer`` scalars only when
opted in (``GeometryConfig.per_kind_keys`` / ``per_layer_keys``; by default their
values reach W&B as heat-map images and tables of the ``plots`` section), and
``diagnostics`` as the run summary's latest value (no panel); ``metrics.jsonl`` always
has every key. ``summary`` says how W&B summarises a key (``define_metric``),
``compare`` whether ``rlmonitor compare`` reports it in its ``scalars`` (same name,
same matrices, same code as the live callback).
The README's key table and ``docs/metrics.md`` are generated from this registry
(``python -m rlmonitor.core.docs --update README.md docs/metrics.md``) and the tests
check they are current.

Paper references are to Zhu et al., "The Path Not Taken: RLVR Provably Learns Off the
Principals", arXiv 2511.08567.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["KEYS", "MATRIX_FIELDS", "OPT_IN_SECTIONS", "SECTIONS", "SUMMARY_ONLY_SECTIONS", "Key", "fields_table",
           "lookup", "markdown_table"]

Section = Literal["headline", "kl", "collapse", "plots", "kind", "layer", "system", "diagnostics", "summary"]
#: W&B workspace sections, top-down: headline scalars, KL, collapse, the images and tables
#: that carry per-kind and per-layer detail, the opt-in per-kind and per-layer scalars,
#: the monitor's own health, diagnostics (run summary only) and the run summary.
SECTIONS: tuple[str, ...] = ("headline", "kl", "collapse", "plots", "kind", "layer", "system", "diagnostics",
                             "summary")
#: Sections whose scalars reach W&B only when opted in (one panel per key and layer/kind).
OPT_IN_SECTIONS: tuple[str, ...] = ("kind", "layer")
#: Sections whose scalars reach W&B as the run summary's latest value, not as history
#: (no panel each; the full history is in metrics.jsonl).
SUMMARY_ONLY_SECTIONS: tuple[str, ...] = ("diagnostics",)
_PLACEHOLDER = re.compile(r"<(\w+)>")
_FILL = {"kind": r"[A-Za-z0-9_]+", "i": r"\d+", "detector": r"[a-z_]+", "figure": r"[A-Za-z0-9_]+"}

#: Every registered key, by its pattern.
KEYS: dict[str, Key] = {}


class Key(str):
    """A registered key. Pattern keys contain placeholders (``<kind>``, ``<i>``,
    ``<detector>``, ``<figure>``); call them with the values to get the logged name."""

    meaning: str
    formula: str
    paper: str
    section: str
    summary: str
    media: str
    compare: bool

    def __new__(
        cls,
        pattern: str,
        *,
        meaning: str,
        formula: str = "",
        paper: str = "-",
        section: Section = "headline",
        summary: Literal["last", "max", "min", "none"] = "last",
        media: Literal["scalar", "image", "table", "series", "value"] = "scalar",
        compare: bool = False,
    ) -> Key:
        self = super().__new__(cls, pattern)
        self.meaning, self.formula, self.paper = meaning, formula, paper
        self.section, self.summary, self.media, self.compare = section, summary, media, compare
        if pattern in KEYS:
            raise ValueError(f"key {pattern!r} is registered twice")
        KEYS[pattern] = self
        return self

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(_PLACEHOLDER.findall(self))

    def __call__(self, **values: object) -> str:
        missing = set(self.placeholders) - set(values)
        extra = set(values) - set(self.placeholders)
        if missing or extra:
            raise KeyError(f"key {str(self)!r} needs values for {sorted(self.placeholders)}, got {sorted(values)}")
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), str(self))

    @property
    def regex(self) -> re.Pattern[str]:
        parts = _PLACEHOLDER.split(str(self))
        rx = "".join(re.escape(p) if i % 2 == 0 else _FILL.get(p, r"[^/]+") for i, p in enumerate(parts))
        return re.compile(rx + "$")


def lookup(name: str) -> Key | None:
    """The registered key a logged name belongs to (None if it is not rlmonitor's)."""
    if name in KEYS:
        return KEYS[name]
    for key in KEYS.values():
        if key.placeholders and key.regex.match(name):
            return key
    return None


# ---------------------------------------------------------------------------------------
# geometry: whole model (headline) and per module kind / layer

_SPARSITY = "fraction of monitored weights whose bf16 value is unchanged vs step 0, element-weighted"
UPDATE_SPARSITY = Key("geometry/update_sparsity", meaning=_SPARSITY, formula="1 - sum |M|_0 / sum numel, M = 1[bf16(W_t) != bf16(W_0)]",
                      paper="Def. 2.1-2.2, Tab. 1", compare=True)  # fmt: skip
UPDATE_SPARSITY_KIND = Key("geometry/update_sparsity/<kind>", meaning="the same per module kind", paper="Tab. 1",
                           section="kind", compare=True)  # fmt: skip
UPDATE_SPARSITY_LAYER = Key("geometry/layers/<i>/update_sparsity", meaning="the same per layer", paper="Fig. 3",
                            section="layer", compare=True)  # fmt: skip
UPDATE_SPARSITY_VS_PREV = Key("geometry/update_sparsity_vs_prev", meaning="the same vs the previous snapshot",
                              paper="Def. 2.2")  # fmt: skip
REL_FROBENIUS = Key("geometry/rel_frobenius", meaning="relative size of the update (the fp32 truth when weights are fp32)",
                    formula="sqrt(sum ||W_t - W_0||_F^2 / sum ||W_0||_F^2)", paper="Sec. 3", compare=True)  # fmt: skip
REL_FROBENIUS_KIND = Key("geometry/rel_frobenius/<kind>", meaning="the same per module kind", section="kind",
                         compare=True)  # fmt: skip
REL_FROBENIUS_LAYER = Key("geometry/layers/<i>/rel_frobenius", meaning="the same per layer", section="layer",
                          compare=True)  # fmt: skip
WEIGHT_STEP_FRO2 = Key("geometry/weight_step_fro2", meaning="squared Frobenius size of the weight step since the previous snapshot (Gate I's weight step)",
                       formula="sum ||W_t - W_prev||_F^2", paper="Gate I")  # fmt: skip
ANGLE_MAX = Key("geometry/principal_angle_max_deg", summary="max", compare=True,
                meaning="largest principal angle between the top-k singular subspaces of W_0 and W_t, max over "
                        "matrices with a well-defined top-k subspace and both sides (degrees)",
                formula="max_i theta_i, cos theta_i = sigma_i(U0_k^T U_k) (and V)", paper="Sec. 4, Fig. 4")  # fmt: skip
ANGLE_MAX_LEFT = Key("geometry/principal_angle_max_deg_left", summary="max", compare=True,
                     meaning="the same, left side only (output space U)", paper="Sec. 4")  # fmt: skip
ANGLE_MAX_RIGHT = Key("geometry/principal_angle_max_deg_right", summary="max", compare=True,
                      meaning="the same, right side only (input space V)", paper="Sec. 4")  # fmt: skip
ANGLE_MAX_BOUND = Key("geometry/principal_angle_max_deg_bound", section="diagnostics", compare=True,
                      meaning="certified bound on the error of principal_angle_max_deg (degrees): "
                              "|reported - exact| <= bound")  # fmt: skip
ANGLE_MAX_LAYER = Key("geometry/principal_angle_max_layer", section="diagnostics", compare=True,
                      meaning="layer of the matrix that set principal_angle_max_deg (-1: outside a layer); the "
                              "matrix's name is in the local record (principal_angle_max_matrix)")  # fmt: skip
ANGLE_MAX_KIND = Key("geometry/principal_angle_max_deg/<kind>", meaning="the same per module kind", section="kind",
                     summary="max", paper="Fig. 4", compare=True)  # fmt: skip
ANGLE_MAX_LAYER_I = Key("geometry/layers/<i>/principal_angle_max_deg", meaning="the same per layer", section="layer",
                        summary="max", paper="Fig. 4", compare=True)  # fmt: skip
ILL_CONDITIONED = Key("geometry/ill_conditioned_matrices", section="diagnostics", compare=True,
                      meaning="matrices whose relative gap (sigma_k - sigma_{k+1}) / sigma_k is below min_rel_gap: "
                              "their top-k subspace is ill-defined, so they are kept out of the angle maxima")  # fmt: skip
ANGLE_MAX_ILL = Key("geometry/principal_angle_max_deg_ill_conditioned", section="diagnostics", summary="max",
                    compare=True,
                    meaning="largest principal angle among the ill-conditioned matrices (degrees)")  # fmt: skip
DRIFT_TOPK = Key("geometry/spectral_drift_topk", compare=True,
                 meaning="mean top-k normalized spectral shift",
                 formula="mean over matrices of ||s_1..k(W_t) - s_1..k(W_0)|| / ||s_1..k(W_0)||", paper="Sec. 4, Cor. 3.4")  # fmt: skip
DRIFT_TOPK_BOUND = Key("geometry/spectral_drift_topk_bound", section="diagnostics", compare=True,
                       meaning="certified bound on the error of spectral_drift_topk")  # fmt: skip
DRIFT_TOPK_KIND = Key("geometry/spectral_drift_topk/<kind>", meaning="the same per module kind", section="kind",
                      compare=True)  # fmt: skip
DRIFT_TOPK_LAYER = Key("geometry/layers/<i>/spectral_drift_topk", meaning="the same per layer", section="layer",
                       compare=True)  # fmt: skip
_ALPHA = "1 = random, RLVR < 1, SFT > 1"
PRINCIPAL_OVERLAP = Key("geometry/principal_overlap_ratio", compare=True,
                        meaning=f"overlap of the update mask with the principal mask over its random baseline ({_ALPHA})",
                        formula="(sum |M_princ n M| / sum |M|) / alpha_pooled", paper="Sec. 5.1, Fig. 5")  # fmt: skip
LOW_OVERLAP = Key("geometry/low_magnitude_overlap_ratio", compare=True,
                  meaning="the same for the bottom-alpha magnitude mask M_low (RLVR > 1)", paper="Sec. 5.1")  # fmt: skip
PRINCIPAL_NOT_LOW_OVERLAP = Key("geometry/principal_not_low_overlap_ratio", compare=True,
                                meaning="the same for M_princ n not M_low against its own density",
                                paper="Sec. 5.1")  # fmt: skip
ROW_STABILITY = Key("geometry/row_profile_stability",
                    meaning="mean correlation of each matrix's row update-ratio profile with the previous snapshot's "
                            "(from the 2nd snapshot on)", paper="Fig. 3")  # fmt: skip
COL_STABILITY = Key("geometry/col_profile_stability", meaning="the same for column profiles", paper="Fig. 3")
NONFINITE = Key("geometry/nonfinite_weights", summary="max", compare=True,
                meaning="NaN/Inf entries in the monitored weights")  # fmt: skip

# ---------------------------------------------------------------------------------------
# geometry: the monitor itself

ERRORS = Key("geometry/errors", section="system", summary="max",
             meaning="cumulative count of failed metric computations and failed writes of any sink")  # fmt: skip
METRIC_SECONDS = Key("geometry/metric_seconds", section="system", meaning="background compute time of this snapshot")
SNAPSHOT_SECONDS = Key("geometry/snapshot_seconds", section="system",
                       meaning="training-thread time spent taking this snapshot (GPU: enqueueing the device-to-host copies; the copy "
                               "itself delays the next optimizer step)")  # fmt: skip
ROTATION_STALENESS = Key("geometry/rotation_staleness_steps", section="system",
                         meaning="with layers_per_snapshot, age of the oldest per-layer measurement in the aggregates")  # fmt: skip
SNAPSHOT_BYTES = Key("geometry/snapshot_bytes", section="diagnostics", summary="max",
                     meaning="host memory held by the monitor: base state, previous and queued snapshots")  # fmt: skip
DROPPED = Key("geometry/dropped_snapshots", section="system", summary="max",
              meaning="snapshots skipped because the worker was busy (cumulative)")  # fmt: skip
MATRICES_WITHOUT_BASE = Key("geometry/matrices_without_base", section="system",
                             meaning="monitored matrices the saved base lacks (a resume with other include patterns): "
                                     "not measured, named in a warning and flagged in matrices.jsonl")  # fmt: skip
BASE_IS_RESUMED = Key("geometry/base_is_resumed", section="system",
                      meaning="1 if a resumed run measures against the resumed weights (no usable saved base: missing, unreadable or failing its identity check) or against a base saved at a step other than 0")  # fmt: skip

# ---------------------------------------------------------------------------------------
# geometry: images, tables and line series

PLOT = Key("geometry/plots/<figure>", section="plots", summary="none", media="image",
           meaning="a dashboard image or table (the ones below)")  # fmt: skip
PLOT_LAYER_SPARSITY = Key("geometry/plots/layer_sparsity", section="plots", summary="none", media="image",
                          meaning="image: update sparsity per layer (rows) over steps (columns); colour scaled to "
                                  "the data", paper="Tab. 1")  # fmt: skip
PLOT_LAYER_ANGLES = Key("geometry/plots/layer_angles", section="plots", summary="none", media="image",
                        meaning="image: largest principal angle per layer (rows) over steps (columns), degrees",
                        paper="Fig. 4")  # fmt: skip
PLOT_LAYER_KIND = Key("geometry/plots/layer_kind", section="plots", summary="none", media="image",
                      meaning="image: layer x module kind at the latest snapshot: update sparsity, relative "
                              "update size, largest principal angle, top-k spectral drift", paper="Tab. 1, Fig. 4")  # fmt: skip
PLOT_UPDATE_RATIOS = Key("geometry/plots/update_ratios_L<i>", section="plots", summary="none", media="image",
                         meaning="image: row (q/k/v) and column (o) update ratios of layer i over steps, head "
                                 "boundaries marked, 3-snapshot smoothing", paper="Fig. 3")  # fmt: skip
PLOT_ANGLES = Key("geometry/plots/principal_angles", section="plots", summary="none", media="image",
                  meaning="image: principal-angle curves theta_1..theta_k of the heat-map layers' matrices and, "
                          "highlighted, of the matrix that sets principal_angle_max_deg", paper="Fig. 4")  # fmt: skip
PLOT_ANGLE_CURVES = Key("geometry/plots/principal_angle_curves", section="plots", summary="none", media="series",
                        meaning="line series: the same principal-angle curves theta_i (deg) vs i (side of the max)",
                        paper="Fig. 4")  # fmt: skip
PLOT_ANGLE_CURVES_TABLE = Key("geometry/plots/principal_angle_curves_table", section="plots", media="table",
                              meaning="the data of that line series (W&B stores it as a table)")  # fmt: skip
PLOT_LAYER_TABLE = Key("geometry/plots/layer_table", section="plots", media="table",
                       meaning="table, one row per layer at the latest snapshot: update_sparsity, rel_frobenius, "
                               "principal_angle_max_deg, spectral_drift_topk (the values of the per-layer keys)")  # fmt: skip
PLOT_KIND_TABLE = Key("geometry/plots/kind_table", section="plots", media="table",
                      meaning="table, one row per module kind at the latest snapshot: the same columns (the values "
                              "of the per-kind keys)")  # fmt: skip

# ---------------------------------------------------------------------------------------
# KL probe

KL_FORWARD = Key("kl/base_forward", section="kl", formula="mean over probe tokens of KL(pi_theta || pi_base)",
                 meaning="token-wise KL to the base policy on a fixed probe (exact, full vocabulary): the "
                         "learning-progress curve", paper="Sec. 5.1")  # fmt: skip
KL_REVERSE = Key("kl/base_reverse", section="kl", meaning="KL(pi_base || pi_theta) on the same probe")
KL_FORWARD_MAX = Key("kl/base_forward_max", section="kl", summary="max", meaning="largest per-token KL on the probe")
KL_STEP = Key("kl/step_forward", section="kl",
              meaning="KL between consecutive probe evaluations (the per-interval leash)", paper="Gate I")  # fmt: skip
KL_WEIGHT_STEP_RATIO = Key("kl/weight_step_ratio", section="kl", formula="weight_step_fro2 / (2 kl/step_forward)",
                           meaning="Gate I's effective inverse curvature 1/mu", paper="Gate I, Prop. 3.1")  # fmt: skip
KL_LOGPROB_MEAN = Key("kl/probe_logprob_mean", section="kl", meaning="mean log-prob of the probe completions")
KL_CACHE_BYTES = Key("kl/cache_bytes", section="diagnostics", meaning="memory of the cached base log-probs")

# ---------------------------------------------------------------------------------------
# collapse detection

COLLAPSE_DETECTED = Key("collapse/detected", section="collapse", summary="max",
                        meaning="1 once any detector fired (latched)", paper="Sec. 5.2")  # fmt: skip
COLLAPSE_STEP = Key("collapse/step", section="collapse", meaning="the step the first detector fired (-1 before)")
COLLAPSE_DETECTOR = Key("collapse/<detector>", section="collapse", summary="max",
                        meaning="1 once that detector fired: nonfinite, reward_collapse, entropy_collapse, "
                                "entropy_explosion, kl_blowup, grad_spike")  # fmt: skip

# ---------------------------------------------------------------------------------------
# run summary (W&B run summary and summary.json, not history)

SUMMARY_COLLAPSE_STEP = Key("collapse_step", section="summary", media="value", summary="none",
                            meaning="step of the first collapse detection (-1 if none)")  # fmt: skip
SUMMARY_COLLAPSE_REASON = Key("collapse_reason", section="summary", media="value", summary="none",
                              meaning="why collapse was detected ('' if not)")  # fmt: skip
SUMMARY_COLLAPSE_DETECTORS = Key("collapse_detectors", section="summary", media="value", summary="none",
                                 meaning="comma-separated detectors that fired")  # fmt: skip
SUMMARY_COLLAPSE_CONTEXT = Key("collapse_context", section="summary", media="value", summary="none",
                               meaning="latest value of every watched metric at the first detection")  # fmt: skip

#: Fields of one per-matrix record (``matrices.jsonl`` and ``compare --json``'s ``matrices``).
MATRIX_FIELDS: dict[str, str] = {
    "step": "training step of the snapshot",
    "name": "canonical matrix name (PEFT and wrapper prefixes and a leading 'model.' stripped, no '.weight')",
    "layer": "layer index (null outside the numbered blocks)",
    "kind": "module kind: q k v o gate up down, or the leaf module name",
    "numel": "number of weights",
    "nonfinite": "NaN/Inf entries",
    "changed": "weights whose bf16 value differs from the base's",
    "update_sparsity": "1 - changed / numel",
    "changed_vs_prev": "weights whose bf16 value differs from the previous snapshot's",
    "dw_fro2": "||W_t - W_0||_F^2",
    "w0_fro2": "||W_0||_F^2",
    "step_fro2": "||W_t - W_prev||_F^2",
    "rel_frobenius": "sqrt(dw_fro2 / w0_fro2)",
    "overlap_principal_count": "|M n M_princ|",
    "overlap_low_count": "|M n M_low|",
    "overlap_principal_not_low_count": "|M n M_princ n not M_low|",
    "principal_density": "|M_princ| / numel",
    "low_density": "|M_low| / numel",
    "principal_not_low_density": "|M_princ n not M_low| / numel",
    "row_stability": "correlation of the row update-ratio profile with the previous snapshot's",
    "col_stability": "the same for columns",
    "head_ratios": "update ratio per attention head (rows of q/k/v, columns of o)",
    "angle_left_max_deg": "largest principal angle between the top-k left singular subspaces (degrees)",
    "angle_right_max_deg": "the same for the right singular subspaces",
    "angle_left_bound_deg": "certified bound on the error of every left angle (degrees)",
    "angle_right_bound_deg": "the same for the right angles",
    "spectral_drift_topk": "||s_1..k(W_t) - s_1..k(W_0)|| / ||s_1..k(W_0)||",
    "spectral_drift_topk_bound": "certified bound on its error",
    "rel_gap": "(sigma_k - sigma_{k+1}) / sigma_k (the smaller of W_0's and W_t's)",
    "ill_conditioned": "rel_gap < min_rel_gap: the top-k subspace is ill-defined",
    "no_base": "true for a monitored matrix the saved base lacks (not measured)",
    "spectral_method": "how the spectral values were computed: unchanged, krylov (certified) or exact",
}


def markdown_table(sections: tuple[str, ...] = SECTIONS) -> str:
    """The README's key table, generated from the registry."""
    rows = ["| key | meaning | paper |", "|---|---|---|"]
    for section in sections:
        for key in KEYS.values():
            if key.section == section:
                text = (key.meaning + (f": `{key.formula}`" if key.formula else "")).replace("|", "\\|")
                rows.append(f"| `{key}` | {text} | {key.paper} |")
    return "\n".join(rows)


def fields_table() -> str:
    """The per-matrix record fields as a markdown table."""
    rows = ["| field | meaning |", "|---|---|"]
    rows += [f"| `{name}` | {text.replace('|', chr(92) + '|')} |" for name, text in MATRIX_FIELDS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
