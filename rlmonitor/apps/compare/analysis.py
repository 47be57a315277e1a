"""The ``rlmonitor compare`` pass: check the options, open the checkpoints, plan one
job per tensor, stream the jobs through a thread pool while adding up their results,
then assemble the report (see the package docstring for what is reported).

A model is never materialised: tensors are read one at a time (large ones in blocks
of rows) through memory maps (:mod:`rlmonitor.checkpoints`), so peak memory stays at
a few tensors whatever the model size.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmonitor.checkpoints.errors import CompareError
from rlmonitor.checkpoints.training import DEFAULT_SUBDIR

from .aggregate import Totals, assemble_report
from .common import (
    BITWISE_ETA_LIMIT,
    CHUNK_ELEMS,
    DEFAULT_ALPHA,
    DEFAULT_ETA,
    DEFAULT_K,
    CompareResult,
    classify,
)
from .per_tensor import Ctx, Job, process_tensor, process_tensor_bits

__all__ = ["compare", "compare_output_dir", "default_names"]

_TIED_HEADS = {"lm_head.weight": ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")}


@dataclass(frozen=True)
class Options:
    """The checked settings of one comparison."""

    k: int
    alpha: float
    low_alpha: float
    eta: float
    full_spectrum: bool
    sparsity_only: bool
    threads: int | None
    chunk_elems: int
    geometry: Any  # the engine's GeometryConfig (k, alphas, eta, include/exclude), as the live callback's


@dataclass
class Inputs:
    """The opened checkpoints and the runs' display names."""

    base: str
    runs: list[str]
    base_ck: object
    run_cks: list
    names: list[str]


@dataclass
class Plan:
    """What to compare: tensors (BASE key -> RUN keys), their classes, the layers, the jobs."""

    keys: list[str]
    maps: list[dict[str, str]]
    left_out: list[list[str]]  # per RUN: its tensors a partial BASE does not hold
    infos: dict
    skipped: list[str]
    classes: dict[str, tuple[int | None, str]]
    focus: set[int]
    spectral_layers: set[int] | None
    jobs: list[Job]
    bits_path: bool
    monitored: list[str]  # tensors measured by the engine


# ---------------------------------------------------------------------------
# phases


def _check_options(runs: list[str], names: list[str] | None, k, alpha, low_alpha, eta, threads,
                   full_spectrum: bool, sparsity_only: bool, chunk_elems: int, include, exclude) -> Options:  # fmt: skip
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
    from rlmonitor.core.config import GeometryConfig

    over = {"include": include} if include is not None else {}
    if exclude is not None:
        over["exclude"] = exclude
    try:
        geometry = GeometryConfig(k=k, principal_alpha=alpha, low_alpha=low_alpha, eta=eta, **over)
    except ValueError as err:
        raise CompareError(str(err).replace("GeometryConfig.", "--")) from None
    return Options(k, alpha, low_alpha, eta, full_spectrum, sparsity_only, threads, chunk_elems, geometry)


def _open_inputs(base: str, runs: list[str], names: list[str] | None, adapter_base: str | None,
                 subdir: str) -> Inputs:  # fmt: skip
    from rlmonitor.checkpoints import open_checkpoint

    base_ck = open_checkpoint(base, adapter_base=adapter_base, as_base=True, subdir=subdir)
    # PEFT adapter RUNs: --adapter-base, else BASE when it is not an adapter itself,
    # else the adapter's own base_model_name_or_path
    if adapter_base is not None:
        run_adapter_base = adapter_base
    elif base_ck.kind != "peft-adapter":
        run_adapter_base = base_ck
    else:
        run_adapter_base = None
    run_cks = [open_checkpoint(r, adapter_base=run_adapter_base, subdir=subdir) for r in runs]
    if names is None:
        names = default_names(runs)
    elif len(set(names)) != len(names):
        raise CompareError(f"--names must be unique, got {names}")
    return Inputs(base, list(runs), base_ck, run_cks, list(names))


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


def _match(base, run, run_label: str, keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(base key -> run key, RUN tensors left out)``; raises CompareError listing the
    mismatches. RUN's extra tensors are an error, unless BASE is partial (rlmonitor's
    saved base holds only the monitored matrices): then they are left out."""
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
    left_out = extra if base.partial else []
    extra = [] if base.partial else extra
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
    return mapping, left_out


def _select_keys(inp: Inputs) -> tuple[list[str], list[dict[str, str]], list[list[str]]]:
    """BASE's tensors, plus an untied LM head that only some RUN has (not for a partial
    BASE, which is compared exactly), matched in every RUN."""
    base_ck = inp.base_ck
    keys = base_ck.names()
    if not base_ck.partial:
        for rc in inp.run_cks:
            for kk in rc.names():
                if kk not in base_ck and kk not in keys and _resolve_key(base_ck, kk) is not None:
                    keys.append(kk)
    matched = [_match(base_ck, rc, f"RUN {inp.runs[i]}", keys) for i, rc in enumerate(inp.run_cks)]
    return keys, [m for m, _ in matched], [left for _, left in matched]


def _layers(block_layers: list[int], layers: list[int] | None, focus_layers: list[int] | None):
    """``(focus layers, spectral layers or None = all)``; unknown blocks are an error."""
    if focus_layers is None:
        focus_layers = list(layers) if layers is not None else (
            [block_layers[len(block_layers) // 2]] if block_layers else [])  # fmt: skip
    spectral_layers = None if layers is None else set(layers)
    unknown = sorted(set(focus_layers) - set(block_layers)) + sorted((spectral_layers or set()) - set(block_layers))
    if unknown:
        raise CompareError(
            f"--layers: no block {sorted(set(unknown))} in BASE (it has blocks "
            f"{block_layers[0] if block_layers else '-'}..{block_layers[-1] if block_layers else '-'})"
        )
    return set(focus_layers), spectral_layers


def _monitored(inp: Inputs, opts: Options, keys, infos) -> tuple[set[str], str | None]:
    """The tensors the live callback would monitor: 2-D weights whose canonical matrix
    name matches ``include`` and not ``exclude`` (all 2-D weights of rlmonitor's saved
    base, which holds exactly the monitored ones). Where the patterns match nothing,
    every 2-D weight of a numbered block, with a note."""
    import re

    two_d = [kk for kk in keys if kk.endswith(".weight") and len(infos[kk].shape) == 2 and min(infos[kk].shape) > 1]
    if inp.base_ck.partial:
        return set(two_d), None
    inc = [re.compile(p) for p in opts.geometry.include]
    exc = [re.compile(p) for p in opts.geometry.exclude]
    names = {kk: kk[: -len(".weight")] for kk in two_d}
    chosen = {kk for kk, n in names.items() if any(p.search(n) for p in inc) and not any(p.search(n) for p in exc)}
    if chosen:
        return chosen, None
    fallback = {kk for kk in two_d if classify(kk)[0] is not None}
    note = (f"--include {list(opts.geometry.include)} matched no 2-D weight; measuring every 2-D weight of a "
            f"numbered block instead ({len(fallback)}); pass --include to choose") if fallback else None  # fmt: skip
    return fallback, note


def _jobs(inp: Inputs, opts: Options, keys, maps, infos, classes, focus, spectral_layers,
          monitored: set[str]) -> list[Job]:  # fmt: skip
    """One job per tensor: which metrics it gets, and its row blocks when only counted."""
    jobs = []
    for kk in keys:
        info0 = infos[kk]
        layer, kind = classes[kk]
        shp = info0.shape
        block = layer is not None and len(shp) == 2 and min(shp) > 1 and kk.endswith(".weight")
        matrix_metrics = kk in monitored and not opts.sparsity_only and (spectral_layers is None or layer in spectral_layers)
        in_focus = block and layer in focus
        spans: list[tuple[int | None, int | None]] = [(None, None)]
        if not (matrix_metrics or in_focus) and len(shp) > 0:
            step = max(1, opts.chunk_elems // max(1, info0.numel // max(1, shp[0])))
            if step < shp[0]:
                spans = [(s, min(s + step, shp[0])) for s in range(0, shp[0], step)]
        rinfos = [rc.info(maps[i][kk]) for i, rc in enumerate(inp.run_cks)]
        jobs.append(Job(kk, _resolve_key(inp.base_ck, kk), [m[kk] for m in maps], layer, kind, info0,
                        rinfos, matrix_metrics, in_focus, spans))  # fmt: skip
    return jobs


def _plan(inp: Inputs, opts: Options, layers: list[int] | None, focus_layers: list[int] | None) -> Plan:
    from rlmonitor.checkpoints import SafetensorsCheckpoint

    keys, maps, left_out = _select_keys(inp)
    infos = {kk: inp.base_ck.info(_resolve_key(inp.base_ck, kk)) for kk in keys}
    skipped = [kk for kk in keys if not infos[kk].floating]
    keys = [kk for kk in keys if infos[kk].floating]
    for i, rc in enumerate(inp.run_cks):
        bad = [kk for kk in keys if not rc.info(maps[i][kk]).floating]
        if bad:
            raise CompareError(f"RUN {inp.runs[i]}: tensor {bad[0]} is floating in BASE but not in RUN")
    classes = {kk: classify(kk) for kk in keys}
    focus, spectral_layers = _layers(sorted({lay for lay, _ in classes.values() if lay is not None}),
                                     layers, focus_layers)  # fmt: skip
    monitored, note = _monitored(inp, opts, keys, infos)
    if note:
        inp.base_ck.notes.append(note)
    jobs = _jobs(inp, opts, keys, maps, infos, classes, focus, spectral_layers, monitored)
    # bf16 sparsity of one RUN is a bit-pattern count: numpy on the mapped files, no torch import
    bits_path = (
        opts.sparsity_only and len(inp.run_cks) == 1 and opts.eta < BITWISE_ETA_LIMIT
        and all(isinstance(ck, SafetensorsCheckpoint) for ck in (inp.base_ck, *inp.run_cks))
        and all(j.info0.dtype == "BF16" and j.rinfos[0].dtype == "BF16" for j in jobs)
    )  # fmt: skip
    return Plan(keys, maps, left_out, infos, skipped, classes, focus, spectral_layers, jobs, bits_path,
                sorted(monitored))  # fmt: skip


def _saved_spectra(base_ck, plan: Plan) -> dict | None:
    """rlmonitor's saved base carries the exact step-0 spectra of its matrices: reuse them
    (the most expensive step of a comparison) instead of recomputing them."""
    if base_ck.kind != "rlmonitor-base" or not plan.monitored:
        return None
    from rlmonitor.core.basestore import load_spectra

    try:
        return load_spectra(base_ck.files[0].parent, {k[: -len(".weight")] for k in plan.monitored}) or None
    except Exception:  # unreadable spectra: computed from the weights instead
        return None


def _stream(inp: Inputs, opts: Options, plan: Plan, result: CompareResult, progress: bool) -> Totals:
    """Process the jobs on a thread pool, adding up results in job order."""
    R = len(inp.run_cks)
    pairs = [(i, j) for i in range(R) for j in range(i + 1, R)]
    ctx = Ctx(inp.base_ck, inp.run_cks, opts.eta, opts.k, opts.alpha, opts.low_alpha, opts.full_spectrum, R,
              pairs, f"BASE {inp.base}", [f"RUN {r}" for r in inp.runs], opts.geometry,
              _saved_spectra(inp.base_ck, plan))  # fmt: skip
    process = process_tensor_bits if plan.bits_path else process_tensor
    totals = Totals(R, pairs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.jobs), unit="tensor", desc="compare", file=sys.stderr, leave=False)
    n_workers = max(1, min(opts.threads or min(4, os.cpu_count() or 1), len(plan.jobs) or 1))
    torch_threads = None
    if not plan.bits_path:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tensors in parallel, each op single-threaded (see compare's `threads`)
    ex = ThreadPoolExecutor(n_workers, thread_name_prefix="rlmonitor-compare")
    try:
        # map() yields in order; results hold counts and small arrays only, never weights
        for job, out in zip(plan.jobs, ex.map(lambda j: process(j, ctx), plan.jobs), strict=True):
            totals.add(job, out, result, inp.names)
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
    return totals


# ---------------------------------------------------------------------------
# entry points


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
    subdir: str = DEFAULT_SUBDIR,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> CompareResult:
    """Compare ``runs`` against ``base``; see the package docstring for what is reported.

    Args:
        base, runs: checkpoint paths (or cached Hub ids). BASE may also be rlmonitor's
            saved base, or a training output folder holding one (``<subdir>/base/``):
            then exactly its (monitored) matrices are compared.
        names: display names of the runs (default: their folder/checkpoint names,
            with parent folders added where two would be equal).
        k: rank of the top-k SVD (clipped to ``min(m, n)`` per matrix).
        alpha: density of the principal mask; ``low_alpha`` (default ``alpha``)
            that of the low-magnitude mask.
        eta: relative tolerance of the bf16-aware change test (paper: 1e-3).
        full_spectrum: exact full-spectrum spectral drift instead of top-k.
        sparsity_only: sparsity (and Jaccard across runs) only.
        layers: block indices for the spectral/overlap work (default: all).
        focus_layers: blocks for heat maps, row/col ratios and overlap curves
            (default: ``layers`` if given, else the middle block).
        adapter_base: base model for PEFT adapter RUNs (default: BASE if it is not
            an adapter, else the adapter's ``base_model_name_or_path``).
        progress: show a progress bar over tensors.
        chunk_elems: elements per streamed block of a large tensor.
        threads: tensors processed concurrently (default ``min(4, cpu count)``).
            Each tensor op runs single-threaded meanwhile (``torch.set_num_threads(1)``,
            restored on return): the work is many memory-bound ops on independent
            tensors, which parallelise better across tensors than inside each op,
            and intra-op OpenMP threads spin badly on a loaded machine. Peak
            memory grows with ``threads`` (one tensor block per thread).
        subdir: the callback's ``output_subdir`` where a saved base is looked for.
        include, exclude: regexes choosing the monitored matrices by canonical name, as
            :class:`~rlmonitor.core.config.GeometryConfig`'s (default: the same defaults).
            The engine measures these matrices exactly as the live callback does and
            their aggregates are reported per run under ``scalars`` with the live keys.
    """
    t_start = time.perf_counter()
    opts = _check_options(runs, names, k, alpha, low_alpha, eta, threads, full_spectrum, sparsity_only, chunk_elems,
                          include, exclude)  # fmt: skip
    inp = _open_inputs(base, runs, names, adapter_base, subdir)
    plan = _plan(inp, opts, layers, focus_layers)
    result = CompareResult(report={})
    totals = _stream(inp, opts, plan, result, progress)
    result.report = assemble_report(inp, opts, plan, totals)
    result.report["elapsed_s"] = time.perf_counter() - t_start
    return result


def compare_output_dir(output_dir: str, *, subdir: str = DEFAULT_SUBDIR, **kwargs) -> CompareResult:
    """``rlmonitor compare OUTPUT_DIR``: the run's saved base against the newest model
    it saved (its final model or highest ``checkpoint-<N>``; the report says which and
    why). ``kwargs`` are :func:`compare`'s."""
    from rlmonitor.checkpoints import resolve_output_dir

    t_start = time.perf_counter()
    base, choice = resolve_output_dir(output_dir, subdir)
    result = compare(str(base), [str(choice.path)], subdir=subdir, **kwargs)
    result.report["notes"].insert(0, choice.reason)
    result.report["elapsed_s"] = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------
# run names


def _name_parts(spec: str) -> list[str]:
    """Path components naming a checkpoint: a model file stands for its folder."""
    p = Path(os.path.expanduser(spec))
    if not p.exists():  # a Hub id
        return [x for x in spec.split("/") if x] or [spec]
    p = Path(os.path.abspath(p))
    if p.is_file():
        stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
        if stem.startswith(("model", "adapter_model")) or p.name.endswith(".index.json"):
            p = p.parent
        else:
            p = p.with_name(stem)
    return [x for x in p.parts if x != p.anchor] or [str(p)]


def default_names(runs: list[str]) -> list[str]:
    """Folder/checkpoint names of ``runs``; where two would be equal, their parent
    folders are added until they differ (``grpo/checkpoint-40`` vs ``sft/checkpoint-40``);
    the same path given twice gets ``#2``."""
    parts = [_name_parts(r) for r in runs]
    depth = [1] * len(runs)

    def name(i: int) -> str:
        return "/".join(parts[i][-depth[i] :])

    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(runs)):
            groups.setdefault(name(i), []).append(i)
        # grow a group of equal names only while its paths differ (the same path twice never will)
        grow = [i for g in groups.values() if len({tuple(parts[j]) for j in g}) > 1
                for i in g if depth[i] < len(parts[i])]  # fmt: skip
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for i in range(len(runs)):
        nm = name(i)
        seen[nm] = seen.get(nm, 0) + 1
        out.append(nm if seen[nm] == 1 else f"{nm}#{seen[nm]}")
    return out
