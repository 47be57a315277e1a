"""Bandwidth of the bf16 change mask + row/column update ratios vs ``tensor.copy_``.

Workload: the Linear weights of Qwen2.5-0.5B (24 layers x q 896x896, k 128x896,
v 128x896, o 896x896, gate 4864x896, up 4864x896, down 896x4864; ~357M weights),
in bf16, with a sparse update (a fraction ``--density`` of the weights moved by
1%, i.e. by at least one bf16 ULP).

Measured (warm-up, then best of ``--repeats`` passes over all matrices, the copy
and mask passes interleaved so both see the same machine load):

- mask pass: ``changed_mask_and_ratios(w0, w1)`` for every matrix (the change
  mask and its row/column update ratios, as GeometryCallback computes them: on CPU
  one cache-blocked walk over the inputs); bytes read = both inputs' bytes.
- copy pass: ``buf.copy_(w0)`` for every matrix; bytes read = one input's bytes.

``mask bandwidth ratio = (mask bytes read / mask time) / (copy bytes read / copy time)``;
target >= 0.50 (the mask pass then costs at most ~4 copies of one checkpoint).

Usage::

    python benchmarks/bench_masks.py [--device cpu|cuda] [--repeats 5] [--layers 24]
                                     [--density 0.3] [--threads N] [--breakdown]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import torch

from rlmonitor.metrics import changed_mask, changed_mask_and_ratios, count_changed, row_col_update_ratios

QWEN25_05B_SHAPES = {
    "q_proj": (896, 896),
    "k_proj": (128, 896),
    "v_proj": (128, 896),
    "o_proj": (896, 896),
    "gate_proj": (4864, 896),
    "up_proj": (4864, 896),
    "down_proj": (896, 4864),
}


def make_weights(
    layers: int, density: float, device: torch.device, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    pairs = []
    for _ in range(layers):
        for shape in QWEN25_05B_SHAPES.values():
            w0 = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            moved = torch.rand(shape, generator=gen, device=device) < density
            # +1% is more than half a bf16 ULP (<= 2^-8 relative), so every moved weight changes
            w1 = torch.where(moved, (w0.float() * 1.01).to(torch.bfloat16), w0)
            pairs.append((w0, w1))
    return pairs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def best_of(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Best-of-``repeats`` wall time of each pass, passes interleaved round by round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn, device))
    return best


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5, help="timed passes per measurement (best is kept)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--density", type=float, default=0.3, help="fraction of weights changed (RLVR: 0.08-0.64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of the mask pass")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    pairs = make_weights(args.layers, args.density, device)
    n_weights = sum(w0.numel() for w0, _ in pairs)
    one_input_bytes = sum(w0.numel() * w0.element_size() for w0, _ in pairs)
    mask_bytes_read = 2 * one_input_bytes
    copy_bytes_read = one_input_bytes
    bufs = [torch.empty_like(w0) for w0, _ in pairs]

    def copy_pass() -> None:
        for buf, (w0, _) in zip(bufs, pairs, strict=True):
            buf.copy_(w0)

    def mask_pass() -> None:
        for w0, w1 in pairs:
            changed_mask_and_ratios(w0, w1)

    fns: dict[str, Callable[[], object]] = {"copy_": copy_pass, "mask+ratios": mask_pass}
    if args.breakdown:
        masks = [changed_mask(w0, w1) for w0, w1 in pairs]

        def each(fn: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], None]:
            def run() -> None:  # results dropped at once, as in the mask pass
                for w0, w1 in pairs:
                    fn(w0, w1)

            return run

        fns["changed_mask, then row_col_update_ratios"] = each(lambda a, b: row_col_update_ratios(changed_mask(a, b)))
        fns["changed_mask"] = each(changed_mask)
        fns["count_changed"] = each(count_changed)
        fns["changed_mask(check_finite_values=False)"] = each(
            lambda a, b: changed_mask(a, b, check_finite_values=False)
        )
        fns["row_col_update_ratios"] = lambda: [row_col_update_ratios(m) for m in masks]

    gc.collect()
    best = best_of(fns, device, args.repeats, args.warmup)

    # sanity: the measured masks have the requested density
    dens = sum(int(changed_mask(w0, w1).sum()) for w0, w1 in pairs) / n_weights

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; torch {torch.__version__}")
    print(
        f"workload: Qwen2.5-0.5B linear weights, {args.layers} layers, {len(pairs)} matrices, "
        f"{n_weights / 1e6:.1f}M bf16 weights ({one_input_bytes / 1e6:.0f} MB per checkpoint), "
        f"changed fraction {dens:.3f}"
    )
    print(f"timing: best of {args.repeats} after {args.warmup} warm-up pass(es)")
    copy_bw = copy_bytes_read / best["copy_"]
    for key, t in best.items():
        read = (
            copy_bytes_read
            if key == "copy_"
            else (one_input_bytes // 2 if key == "row_col_update_ratios" else mask_bytes_read)
        )
        print(
            f"  {key:42s} {t * 1e3:9.1f} ms  {read / t / 1e9:7.2f} GB/s read  ({t / best['copy_']:.2f} x copy time)"
        )
    ratio = (mask_bytes_read / best["mask+ratios"]) / copy_bw
    print(f"mask bandwidth ratio: {ratio:.2f} (target >= 0.50)")
    return ratio


if __name__ == "__main__":
    main()
