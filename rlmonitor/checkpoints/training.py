"""What a training run leaves on disk: rlmonitor's saved base and the checkpoints.

The live ``GeometryCallback`` saves its step-0 base (the monitored matrices only)
under ``<output_dir>/<output_subdir>/base/`` (default subdir ``rlmonitor``):

* ``weights.safetensors``: one tensor per monitored matrix, key
  ``<canonical matrix name>.weight`` (:func:`rlmonitor.core.naming.canonical_key`),
  dtype as snapshotted;
* ``spectra.safetensors``: its top-k factors (fp64; not weights, never read here);
* ``base_meta.json``: ``{"format": "rlmonitor.base/2", "step": 0,
  "matrices": {name: [m, n]}, ...}``.

A distributed run (every rank keeps its share of the matrices) writes the weights as
``weights-<r>-of-<w>.safetensors``, one per rank, with the index
``weights.safetensors.index.json`` (the Hugging Face sharded-checkpoint layout) in
place of ``weights.safetensors``; both layouts are read the same way.

:func:`open_saved_base` reads such a folder as a *partial* checkpoint (kind
``"rlmonitor-base"``): it holds only the monitored matrices, so ``compare`` compares
exactly those. :func:`resolve_output_dir` turns a training output folder into
(saved base, newest model saved by the run) for ``rlmonitor compare OUTPUT_DIR``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CompareError
from .safetensors import SafetensorsCheckpoint

__all__ = [
    "BASE_FORMAT",
    "DEFAULT_SUBDIR",
    "RunChoice",
    "SavedBaseCheckpoint",
    "find_saved_base",
    "has_weights",
    "open_saved_base",
    "read_json",
    "resolve_output_dir",
]

DEFAULT_SUBDIR = "rlmonitor"
BASE_FORMAT = "rlmonitor.base/2"
BASE_META = "base_meta.json"
BASE_WEIGHTS = "weights.safetensors"
BASE_INDEX = BASE_WEIGHTS + ".index.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
_HOW_SAVED = (
    "rlmonitor's GeometryCallback saves it when training starts, in <output_dir>/<output_subdir>/base/ "
    "(output_subdir default 'rlmonitor')"
)


def read_json(file: Path) -> Any:
    """Parsed JSON of ``file`` (any JSON value: callers check the shape they need)."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise CompareError(f"{file}: cannot read JSON ({err})") from err


# ---------------------------------------------------------------------------
# the saved base


def find_saved_base(path: Path, subdir: str | None) -> Path | None:
    """The folder of a saved base at ``path``: ``path`` itself when it holds
    ``base_meta.json``; with ``subdir`` also ``path/<subdir>/base`` then ``path/base``
    (a training output folder, or its rlmonitor folder). None when there is none."""
    if not path.is_dir():
        return None
    candidates = [path] + ([path / subdir / "base", path / "base"] if subdir else [])
    return next((c for c in candidates if (c / BASE_META).is_file()), None)


class SavedBaseCheckpoint(SafetensorsCheckpoint):
    """rlmonitor's saved base: the monitored matrices at the step it was taken."""

    partial = True

    def _key(self, stored: str) -> str:
        return stored  # saved under canonical names already (canonical_key is not idempotent on 'model.model.')


def _check_meta(meta_file: Path, meta: Any) -> tuple[int, dict[str, tuple[int, ...]]]:
    """``(step, {matrix name: shape})`` of a ``base_meta.json``."""
    fix = "the base folder is damaged or from another rlmonitor version: rerun training with the callback to re-save it"
    if not isinstance(meta, dict):
        raise CompareError(f"{meta_file}: must hold a JSON object, got a {type(meta).__name__}; {fix}")
    fmt = meta.get("format")
    if fmt != BASE_FORMAT:
        raise CompareError(
            f"{meta_file}: field 'format' is {fmt!r}, this rlmonitor reads {BASE_FORMAT!r} "
            "(weights.safetensors + spectra.safetensors + base_meta.json); compare against the base model "
            "instead (rlmonitor compare BASE RUN) or re-save the base with this rlmonitor's callback"
        )
    step = meta.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CompareError(f"{meta_file}: field 'step' must be a step number >= 0, got {step!r}; {fix}")
    mats = meta.get("matrices")
    if not isinstance(mats, dict) or not mats:
        raise CompareError(f"{meta_file}: field 'matrices' must be an object {{name: [rows, cols]}}; {fix}")
    shapes = {}
    for name, shape in mats.items():
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):  # fmt: skip
            raise CompareError(f"{meta_file}: matrices[{name!r}] must be [rows, cols], got {shape!r}; {fix}")
        shapes[name + ".weight"] = tuple(shape)
    return step, shapes


def _base_files(folder: Path) -> list[Path]:
    """The weight files of a saved base: ``weights.safetensors``, or the per-rank files the
    index of a sharded base names (plain file names inside ``folder``, all present)."""
    if (folder / BASE_WEIGHTS).is_file():
        return [folder / BASE_WEIGHTS]
    index = folder / BASE_INDEX
    if not index.is_file():
        raise CompareError(
            f"{folder}: has {BASE_META} but no {BASE_WEIGHTS} (nor {BASE_INDEX}); the base was not saved "
            "completely (interrupted at the start of training?): rerun training with the callback to re-save it"
        )
    fix = "the sharded base is damaged: rerun training with the callback to re-save it"
    data = read_json(index)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CompareError(f"{index}: must hold a non-empty 'weight_map' {{tensor: file}}; {fix}")
    files: list[Path] = []
    for name, shard in wmap.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise CompareError(f"{index}: weight_map[{str(name)[:80]!r}] must be a file name inside {folder}, got "
                               f"{str(shard)[:80]!r}; {fix}")  # fmt: skip
        path = folder / shard
        if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
            raise CompareError(f"{index}: {shard} links outside {folder}; {fix}")
        if path not in files:
            files.append(path)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CompareError(f"{index}: {len(missing)} of {len(files)} weight files are missing (first: "
                           f"{', '.join(missing[:3])}); {fix}")  # fmt: skip
    return files


def open_saved_base(folder: Path, label: str) -> SavedBaseCheckpoint:
    """Open the saved base in ``folder`` (checks ``base_meta.json`` against the weights;
    a sharded base is read through its index)."""
    meta_file = folder / BASE_META
    step, shapes = _check_meta(meta_file, read_json(meta_file))
    files = _base_files(folder)
    ck = SavedBaseCheckpoint(path=label, kind="rlmonitor-base", files=files)
    stored = {k: tuple(ck.info(k).shape) for k in ck.names()}
    if stored != shapes:
        odd = sorted(set(stored) ^ set(shapes)) or [k for k in stored if stored[k] != shapes[k]]
        raise CompareError(
            f"{folder}: {' + '.join(f.name for f in files)} ({len(stored)} tensors) does not match the matrices "
            f"listed in {BASE_META} ({len(shapes)}), e.g. {odd[0]}; the base was not saved completely: rerun training with the callback"
        )
    where = str(folder) if Path(label).resolve() == folder.resolve() else f"{label} (saved base in {folder})"
    ck.notes.append(
        f"{where}: rlmonitor's saved base from step {step}, {len(stored)} monitored matrices; "
        "compare covers exactly these"
        + ("" if step == 0 else f" (taken at step {step}: the run was resumed without a saved base)")
    )
    return ck


# ---------------------------------------------------------------------------
# training output folders


def has_weights(folder: Path) -> bool:
    """``folder`` holds a model (``model*.safetensors``) or a PEFT adapter."""
    return folder.is_dir() and (
        any(folder.glob("model*.safetensors")) or (folder / "adapter_model.safetensors").is_file()
    )


def _weights_mtime(folder: Path) -> float:
    files = [*folder.glob("model*.safetensors"), folder / "adapter_model.safetensors"]
    return max(f.stat().st_mtime for f in files if f.is_file())


def _final_step(output_dir: Path) -> int | None:
    """``global_step`` of ``output_dir/trainer_state.json`` (``trainer.save_state()``), if readable."""
    try:
        step = json.loads((output_dir / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


@dataclass(frozen=True)
class RunChoice:
    """The model ``rlmonitor compare OUTPUT_DIR`` compares, and why that one."""

    path: Path
    reason: str


def _choose_between(output_dir: Path, n: int, ckpt: Path) -> RunChoice:
    """Final model in ``output_dir`` vs its highest ``checkpoint-<n>``: by the final model's
    step (``trainer_state.json``) when known, else by the weights' file times."""
    here = f"the final model saved in {output_dir}"
    step = _final_step(output_dir)
    if step is not None:
        if step >= n:
            return RunChoice(output_dir, f"RUN is {here}: its trainer_state.json gives step {step}, "
                                         f"not older than {ckpt.name}")  # fmt: skip
        return RunChoice(ckpt, f"RUN is {ckpt.name}: {here} is from step {step} (its trainer_state.json), "
                               f"older than {ckpt.name}")  # fmt: skip
    why = f"(file times; no trainer_state.json in {output_dir} gives the final model's step)"
    if _weights_mtime(output_dir) >= _weights_mtime(ckpt):
        return RunChoice(output_dir, f"RUN is {here}: written after {ckpt.name} {why}")
    return RunChoice(ckpt, f"RUN is {ckpt.name}: written after {here} {why}")


def choose_run(output_dir: Path) -> RunChoice:
    """The newest model a training run saved: its final model or its highest
    ``checkpoint-<N>`` folder holding weights."""
    numbered = sorted(
        (int(m.group(1)), d) for d in output_dir.iterdir() if (m := _CHECKPOINT_DIR.fullmatch(d.name)) and d.is_dir()
    )
    ckpts = [(n, d) for n, d in numbered if has_weights(d)]
    empty = [d.name for n, d in numbered if not has_weights(d)]
    final = has_weights(output_dir)
    if not ckpts and not final:
        raise CompareError(
            f"{output_dir}: no model to compare: no checkpoint-<N> folder with weights"
            + (f" ({', '.join(empty[:3])} hold none)" if empty else "")
            + " and no final model (model*.safetensors or adapter_model.safetensors). Save checkpoints during "
            "training (TrainingArguments save_strategy) or the final model (trainer.save_model())"
        )
    if not ckpts:
        choice = RunChoice(output_dir, f"RUN is the final model saved in {output_dir} (no checkpoint-<N> folders)")
    elif not final:
        d = ckpts[-1][1]
        choice = RunChoice(d, f"RUN is {d.name}: the highest-numbered of {len(ckpts)} checkpoint folder(s) "
                              f"(no final model saved in {output_dir} itself)")  # fmt: skip
    else:
        choice = _choose_between(output_dir, *ckpts[-1])
    if empty:
        choice = RunChoice(choice.path, choice.reason + f"; skipped {', '.join(empty[:3])}: no weights in it")
    return choice


def resolve_output_dir(spec: str | os.PathLike, subdir: str = DEFAULT_SUBDIR) -> tuple[Path, RunChoice]:
    """``(saved base folder, RunChoice)`` of a training output folder."""
    path = Path(os.path.expanduser(str(spec)))
    usage = "to compare two checkpoints give both: rlmonitor compare BASE RUN"
    if not path.is_dir():
        raise CompareError(
            f"{spec}: not a folder. With one positional, rlmonitor compare takes a training output folder "
            f"(the Trainer's output_dir); {usage}"
        )
    base = path / subdir / "base"
    if not (base / BASE_META).is_file():
        if (path / BASE_META).is_file():
            raise CompareError(f"{spec} is a saved base itself; give the model to compare too: rlmonitor compare "
                               f"{spec} RUN")  # fmt: skip
        raise CompareError(
            f"{spec}: no saved rlmonitor base (expected {base / BASE_META}). {_HOW_SAVED}; pass --subdir if the "
            f"run used another output_subdir, or {usage}"
        )
    return base, choose_run(path)
