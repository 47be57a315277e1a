"""The step-0 base on disk, with an identity checked on load.

Layout of ``<output_dir>/<output_subdir>/base/``:

- ``weights.safetensors``: one tensor per monitored matrix, key ``<canonical name>.weight``
  (a valid safetensors checkpoint: ``rlmonitor compare`` reads it as BASE);
- ``spectra.safetensors``: the exact step-0 spectra, keys ``<name>::<field>``;
- ``base_meta.json``: the identity ``{"format", "run_id", "step", "fingerprint",
  "matrices": {name: [m, n]}, "created", "config"}``.

A sharded run (every rank owns some matrices, :mod:`rlmonitor.core.sharding`) writes
one ``weights-<r>-of-<w>.safetensors`` and ``spectra-<r>-of-<w>.safetensors`` per rank
and, on rank 0 once every rank has written, the index ``weights.safetensors.index.json``
(the Hugging Face sharded-checkpoint format, so ``compare`` reads it too) before
``base_meta.json``. Loading reads only the matrices asked for, from whichever file
holds them, so a resume may use another world size.

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

__all__ = [
    "BASE_FORMAT",
    "LoadedBase",
    "fingerprint",
    "identity_problem",
    "load_base",
    "load_spectra",
    "save_base",
    "save_spectra",
    "set_aside_base",
    "write_index",
]

BASE_FORMAT = "rlmonitor.base/2"
WEIGHTS, SPECTRA, META = "weights.safetensors", "spectra.safetensors", "base_meta.json"
INDEX = WEIGHTS + ".index.json"
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
    partial: bool = False  # only some matrices were asked for

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


def _shard_name(stem: str, shard: tuple[int, int] | None) -> str:
    return f"{stem}.safetensors" if shard is None else f"{stem}-{shard[0]:05d}-of-{shard[1]:05d}.safetensors"


def save_base(
    folder: str | Path,
    weights: Mapping[str, torch.Tensor],
    spectra: Mapping[str, Mapping[str, torch.Tensor]],
    meta: dict[str, Any] | None,
    *,
    shard: tuple[int, int] | None = None,
) -> None:
    """Write the base (step-0 weights only) into ``folder``, which must not hold one.

    ``shard=(rank, world)``: write this rank's part only; ``meta`` None (ranks > 0) or
    given (rank 0, after every rank wrote): then :func:`write_index` completes it."""
    from safetensors.torch import save_file

    if meta is not None and meta.get("step") != 0:
        raise ValueError(f"refusing to save weights of step {meta.get('step')} as the step-0 base")
    folder = Path(folder)
    if (folder / META).exists() or (folder / WEIGHTS).exists() or (folder / _LEGACY).exists():
        raise FileExistsError(f"refusing to write a base over the one in {folder} (set it aside first)")
    folder.mkdir(parents=True, exist_ok=True)
    name = _shard_name("weights", shard)
    tag = f".tmp-{os.getpid()}"
    save_file({f"{n}.weight": w.contiguous() for n, w in weights.items()}, str(folder / (name + tag)))
    (folder / (name + tag)).replace(folder / name)
    save_spectra(folder, spectra, shard=shard)
    if meta is not None and shard is None:
        _write_meta(folder, meta)


def write_index(folder: str | Path, owner: Mapping[str, int], world: int, meta: dict[str, Any]) -> None:
    """Rank 0 of a sharded run, once every rank saved its part: the index (name -> shard
    file), then the identity."""
    if meta.get("step") != 0:
        raise ValueError(f"refusing to save weights of step {meta.get('step')} as the step-0 base")
    folder = Path(folder)
    wmap = {f"{n}.weight": _shard_name("weights", (r, world)) for n, r in sorted(owner.items())}
    tmp = folder / (INDEX + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"metadata": {"format": BASE_FORMAT}, "weight_map": wmap}, indent=1))
    tmp.replace(folder / INDEX)
    _write_meta(folder, meta)


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / (META + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": BASE_FORMAT, **meta}, indent=1, default=str))
    tmp.replace(folder / META)


def save_spectra(folder: str | Path, spectra: Mapping[str, Mapping[str, torch.Tensor]], *,
                 shard: tuple[int, int] | None = None) -> None:  # fmt: skip
    """Add the step-0 spectra to a saved base (atomic file replace); they are computed
    on the worker after the weights are safely on disk."""
    from safetensors.torch import save_file

    flat = {f"{n}::{f}": t.contiguous() for n, s in spectra.items() for f, t in s.items()}
    if not flat:
        return
    name = _shard_name("spectra", shard)
    tmp = Path(folder) / (name + f".tmp-{os.getpid()}")
    save_file(flat, str(tmp))
    tmp.replace(Path(folder) / name)


def _load_legacy(folder: Path) -> LoadedBase | None:
    from safetensors.torch import load_file

    meta_path = folder / "base_meta.json"
    if not (folder / _LEGACY).exists() or not meta_path.exists():
        return None
    tensors = load_file(str(folder / _LEGACY))
    weights = {canonical(k): v for k, v in tensors.items() if "::" not in k}
    meta = json.loads(meta_path.read_text())
    return LoadedBase(weights=weights, spectra={}, meta={"format": "rlmonitor.base/1", **meta})


def _read(files: list[Path], keep) -> dict[str, torch.Tensor]:
    """Tensors whose key ``keep`` accepts, read only those (safetensors' lazy reads)."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if keep(key):
                    out[key] = handle.get_tensor(key)
    return out


def load_spectra(folder: str | Path, names: set[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The saved step-0 spectra of a base folder (single or sharded), by matrix name
    (``names``: only these). Empty when none were saved."""
    folder = Path(folder)
    files = sorted(folder.glob("spectra-*-of-*.safetensors")) or (
        [folder / SPECTRA] if (folder / SPECTRA).exists() else [])  # fmt: skip
    wanted = (lambda n: True) if names is None else (lambda n: n in names)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in _read(files, lambda k: wanted(k.rpartition("::")[0])).items():
        name, _, field_ = k.rpartition("::")
        out.setdefault(name, {})[field_] = v
    return out


def load_base(folder: str | Path, names: set[str] | None = None) -> LoadedBase | None:
    """What :func:`save_base` wrote (or a 0.1 base), or None if there is none. ``names``:
    load only these matrices (a rank of a sharded run reads its own)."""
    folder = Path(folder)
    if not (folder / META).exists() or not ((folder / WEIGHTS).exists() or (folder / INDEX).exists()):
        return _load_legacy(folder)
    meta = json.loads((folder / META).read_text())
    if (folder / INDEX).exists():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        weight_files = [folder / f for f in files]
    else:
        weight_files = [folder / WEIGHTS]
    wanted = (lambda n: True) if names is None else (lambda n: n in names)
    weights = {k[: -len(".weight")]: v for k, v in _read(weight_files, lambda k: wanted(k[: -len(".weight")])).items()}
    return LoadedBase(weights=weights, spectra=load_spectra(folder, names), meta=meta, partial=names is not None)


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
    listed = {n: list(s) for n, s in listed.items()}
    if base.partial:  # a rank's share: what it holds must be listed, with the same shapes
        listed = {n: s for n, s in listed.items() if n in held}
    if listed != held:
        missing, extra = sorted(set(listed) - set(held)), sorted(set(held) - set(listed))
        return (f"its matrix list does not match its weights file ({len(missing)} listed but not stored, "
                f"{len(extra)} stored but not listed, or other shapes)")
    return None
