"""The step-0 base on disk, with an identity checked on load.

Layout of ``<output_dir>/<output_subdir>/base/``:

- ``weights.safetensors``: one tensor per monitored matrix, key ``<canonical name>.weight``
  (a valid safetensors checkpoint: ``rlmonitor compare`` reads it as BASE);
- ``spectra.safetensors``: the exact step-0 spectra, keys ``<name>::<field>``;
- ``base_meta.json``: the identity ``{"format", "run_id", "step", "fingerprint",
  "matrices": {name: [m, n]}, "created", "config"}``.

The folder may also hold ``kl_probe.safetensors`` (the KL probe's step-0 policy,
written by the callback), so the base files are moved into it one by one rather
than replacing the folder.

Guarantees: a base is written only from step-0 weights (:func:`save_base` refuses
anything else) and never over another base (:func:`save_base` refuses a folder that
holds one: a fresh run moves an older base aside first, ``base.replaced-<time>``,
with :func:`set_aside_base`); each file is written under a temporary name and renamed
into place, ``base_meta.json`` last, so a crash never leaves a base that loads
half-written. :func:`identity_problem` checks a loaded base against its identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .naming import MatrixSpec, canonical

__all__ = ["BASE_FORMAT", "LoadedBase", "fingerprint", "identity_problem", "load_base", "save_base", "save_spectra",
           "set_aside_base"]

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
    """Write the base (step-0 weights only) into ``folder``, which must not hold one."""
    from safetensors.torch import save_file

    if meta.get("step") != 0:
        raise ValueError(f"refusing to save weights of step {meta.get('step')} as the step-0 base")
    folder = Path(folder)
    if (folder / META).exists() or (folder / WEIGHTS).exists() or (folder / _LEGACY).exists():
        raise FileExistsError(f"refusing to write a base over the one in {folder} (set it aside first)")
    folder.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    save_file({f"{n}.weight": w.contiguous() for n, w in weights.items()}, str(folder / (WEIGHTS + tag)))
    (folder / (WEIGHTS + tag)).replace(folder / WEIGHTS)
    save_spectra(folder, spectra)
    (folder / (META + tag)).write_text(json.dumps({"format": BASE_FORMAT, **meta}, indent=1, default=str))
    (folder / (META + tag)).replace(folder / META)


def save_spectra(folder: str | Path, spectra: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Add the step-0 spectra to a saved base (atomic file replace); they are computed
    on the worker after the weights are safely on disk."""
    from safetensors.torch import save_file

    flat = {f"{n}::{f}": t.contiguous() for n, s in spectra.items() for f, t in s.items()}
    if not flat:
        return
    tmp = Path(folder) / (SPECTRA + f".tmp-{os.getpid()}")
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


def identity_problem(base: LoadedBase) -> str | None:
    """Why ``base`` cannot be trusted as what its identity says, or None. Checked: a
    known format, an integer step, and a matrix list (names and shapes) that is exactly
    what the weights file holds (a partial copy or a mixed-up folder fails)."""
    meta = base.meta
    if meta.get("format") not in (BASE_FORMAT, "rlmonitor.base/1"):
        return f"unknown format {meta.get('format')!r}"
    if not isinstance(meta.get("step"), int):
        return f"no step in its identity (step={meta.get('step')!r})"
    listed = meta.get("matrices")
    if not isinstance(listed, dict):
        return "no matrix list in its identity"
    held = {n: list(w.shape) for n, w in base.weights.items()}
    if {n: list(s) for n, s in listed.items()} != held:
        missing, extra = sorted(set(listed) - set(held)), sorted(set(held) - set(listed))
        return (f"its matrix list does not match its weights file ({len(missing)} listed but not stored, "
                f"{len(extra)} stored but not listed, or other shapes)")
    return None
