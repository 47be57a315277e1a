"""The step-0 base on disk, with an identity checked on load.

Layout of ``<output_dir>/<output_subdir>/base/``:

- ``weights.safetensors``: one tensor per monitored matrix, key ``<canonical name>.weight``
  (a valid safetensors checkpoint: ``rlmonitor compare`` reads it as BASE);
- ``spectra.safetensors``: the exact step-0 spectra, keys ``<name>::<field>``;
- ``base_meta.json``: the identity ``{"format", "run_id", "step", "fingerprint",
  "matrices": {name: [m, n]}, "created", "config"}``.

Guarantees: a base is written only from step-0 weights (:func:`save_base` refuses
anything else); a fresh run that finds an older base moves it aside
(``base.replaced-<time>``) instead of overwriting it; files are written to a
temporary folder renamed into place, so a crash never leaves a half-written base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .naming import MatrixSpec, canonical

__all__ = ["BASE_FORMAT", "LoadedBase", "fingerprint", "load_base", "save_base", "save_spectra", "set_aside_base"]

BASE_FORMAT = "rlmonitor.base/2"
WEIGHTS, SPECTRA, META = "weights.safetensors", "spectra.safetensors", "base_meta.json"
_LEGACY = "base.safetensors"  # rlmonitor 0.1: weights and fp32 factors in one file


def fingerprint(specs: list[MatrixSpec], extra: str = "") -> str:
    """Identity of what is monitored: the matrices' names and shapes, plus ``extra``
    (e.g. the model's architecture)."""
    h = hashlib.sha256(extra.encode())
    for s in sorted(specs, key=lambda s: s.name):
        h.update(f"{s.name}:{s.shape[0]}x{s.shape[1]};".encode())
    return h.hexdigest()[:16]


@dataclass
class LoadedBase:
    weights: dict[str, torch.Tensor]
    spectra: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta.get("step", -1))


def set_aside_base(folder: str | Path) -> Path | None:
    """Move an existing base folder aside (``<folder>.replaced-<time>``); returns where."""
    folder = Path(folder)
    if not folder.exists():
        return None
    dest = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    folder.rename(dest)
    return dest


def save_base(
    folder: str | Path,
    weights: Mapping[str, torch.Tensor],
    spectra: Mapping[str, Mapping[str, torch.Tensor]],
    meta: dict[str, Any],
) -> None:
    """Write the base (step-0 weights only) atomically; an existing base is moved aside."""
    from safetensors.torch import save_file

    if meta.get("step") != 0:
        raise ValueError(f"refusing to save weights of step {meta.get('step')} as the step-0 base")
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({f"{n}.weight": w.contiguous() for n, w in weights.items()}, str(tmp / WEIGHTS))
    flat = {f"{n}::{f}": t.contiguous() for n, s in spectra.items() for f, t in s.items()}
    if flat:
        save_file(flat, str(tmp / SPECTRA))
    (tmp / META).write_text(json.dumps({"format": BASE_FORMAT, **meta}, indent=1, default=str))
    set_aside_base(folder)
    tmp.rename(folder)


def save_spectra(folder: str | Path, spectra: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Add the step-0 spectra to a saved base (atomic file replace); they are computed
    on the worker after the weights are safely on disk."""
    from safetensors.torch import save_file

    flat = {f"{n}::{f}": t.contiguous() for n, s in spectra.items() for f, t in s.items()}
    if not flat:
        return
    tmp = Path(folder) / (SPECTRA + ".tmp")
    save_file(flat, str(tmp))
    tmp.replace(Path(folder) / SPECTRA)


def _load_legacy(folder: Path) -> LoadedBase | None:
    from safetensors.torch import load_file

    meta_path = folder / "base_meta.json"
    if not (folder / _LEGACY).exists() or not meta_path.exists():
        return None
    tensors = load_file(str(folder / _LEGACY))
    weights = {canonical(k): v for k, v in tensors.items() if "::" not in k}
    meta = json.loads(meta_path.read_text())
    return LoadedBase(weights=weights, spectra={}, meta={"format": "rlmonitor.base/1", **meta})


def load_base(folder: str | Path) -> LoadedBase | None:
    """What :func:`save_base` wrote (or a 0.1 base), or None if there is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).exists() or not (folder / META).exists():
        return _load_legacy(folder)
    meta = json.loads((folder / META).read_text())
    weights = {k[: -len(".weight")]: v for k, v in load_file(str(folder / WEIGHTS)).items()}
    spectra: dict[str, dict[str, torch.Tensor]] = {}
    if (folder / SPECTRA).exists():
        for k, v in load_file(str(folder / SPECTRA)).items():
            name, _, field = k.rpartition("::")
            spectra.setdefault(name, {})[field] = v
    return LoadedBase(weights=weights, spectra=spectra, meta=meta)
