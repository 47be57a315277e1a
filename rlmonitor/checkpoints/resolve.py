"""From a user's argument to an open :class:`Checkpoint`.

Supported inputs (see :func:`open_checkpoint`):

* a single ``*.safetensors`` file;
* a Hugging Face model directory, single file or sharded (``*.safetensors.index.json``);
* a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``),
  read as its effective weights on a base (:mod:`.adapters`);
* rlmonitor's saved base (``base_meta.json`` + ``weights.safetensors``), or, where a
  base is expected, a folder whose ``<subdir>/base/`` or ``base/`` holds one
  (:mod:`.training`);
* a Hub id, only when it is already in the local Hugging Face cache (never downloads).

A shard index is untrusted: every file it names must resolve inside the checkpoint
folder (or, for a Hugging Face cache snapshot, inside that repository's ``blobs``),
else nothing is read and a :class:`CompareError` names the entry.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePath
from typing import Any

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterCheckpoint, parse_adapter_config
from .errors import CompareError
from .safetensors import Checkpoint, SafetensorsCheckpoint
from .training import DEFAULT_SUBDIR, find_saved_base, open_saved_base, read_json

__all__ = ["is_adapter_dir", "open_checkpoint", "resolve_path"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def resolve_path(spec: str, *, what: str = "checkpoint") -> Path:
    """A local path, or the local Hugging Face cache snapshot of a Hub id."""
    p = Path(os.path.expanduser(spec))
    if p.exists():
        return p
    if _HUB_ID.match(spec) and not spec.endswith(".safetensors"):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    spec, local_files_only=True, allow_patterns=["*.safetensors", "*.json", "*.safetensors.index.json"]
                )
            )
        except Exception as err:
            raise CompareError(
                f"{what} {spec!r} is not a local path and is not in the local Hugging Face cache "
                f"({type(err).__name__}). rlmonitor compare works offline and never downloads: fetch it first "
                f"(`hf download {spec}`) or pass a local directory"
            ) from err
    raise CompareError(f"{what} {spec!r}: no such file or directory")


def _model_files(path: Path) -> tuple[str, list[Path]]:
    if path.is_file():
        if path.name.endswith(".index.json"):
            return "sharded", _index_files(path)
        if path.suffix != ".safetensors":
            raise CompareError(
                f"{path}: not a .safetensors file; rlmonitor compare reads safetensors only "
                "(re-save with save_pretrained(..., safe_serialization=True))"
            )
        return "safetensors-file", [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CompareError(f"{path}: several shard indexes ({', '.join(i.name for i in indexes)}); pass one of them")
    if indexes:
        return "sharded", _index_files(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" (found {', '.join(other[:3])}: re-save with save_pretrained(..., safe_serialization=True))"
            if other
            else ""
        )
        raise CompareError(f"{path}: no *.safetensors weights in this directory{hint}")
    return ("model-dir" if len(files) == 1 else "sharded"), files


def _shard_roots(folder: Path) -> list[Path]:
    """Where a shard of ``folder`` may resolve to: the folder itself and, for a Hugging
    Face cache snapshot (``<repo>/snapshots/<revision>``, files linked to
    ``<repo>/blobs/<hash>``), that repository's ``blobs``."""
    real = folder.resolve()
    roots = [real]
    blobs = real.parent.parent / "blobs"
    if real.parent.name == "snapshots" and blobs.is_dir():
        roots.append(blobs.resolve())
    return roots


def _shard_path(index: Path, roots: list[Path], name: str, shard: Any) -> Path:
    """The file a weight_map entry names, refused unless it stays inside the checkpoint."""
    fix = "the index is corrupt or hostile: re-download or re-save the checkpoint (save_pretrained())"
    where = f"{index}: weight_map[{name[:80]!r}]"
    if not isinstance(shard, str) or not shard or "\x00" in shard:
        shown = repr(shard)[:60]
        raise CompareError(f"{where} must be a shard file name, got {shown} ({type(shard).__name__}); {fix}")
    pure = PurePath(shard)
    if pure.is_absolute() or pure.drive or ".." in pure.parts:
        raise CompareError(
            f"{where} = {shard[:120]!r} points outside the checkpoint folder {index.parent}; shard files must be "
            f"inside it (names such as model-00001-of-00002.safetensors): {fix}"
        )
    path = index.parent / pure
    if path.exists() or path.is_symlink():
        real = path.resolve()
        if not any(real.is_relative_to(r) for r in roots):
            raise CompareError(
                f"{where} = {shard[:120]!r} resolves to {real}, outside the checkpoint folder {index.parent} "
                f"(through a symbolic link); shard files must be inside it: {fix}"
            )
    return path


def _index_files(index: Path) -> list[Path]:
    data = read_json(index)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CompareError(f"{index}: shard index has no weight_map")
    roots = _shard_roots(index.parent)
    files = list(dict.fromkeys(_shard_path(index, roots, name, shard) for name, shard in wmap.items()))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CompareError(
            f"{index}: {len(missing)} of {len(files)} shards are missing (first: {', '.join(missing[:3])}); "
            "the download or save is incomplete"
        )
    return files


def _open_model(path: Path, label: str) -> SafetensorsCheckpoint:
    kind, files = _model_files(path)
    config = None
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, ValueError, RecursionError):
            config = None
    return SafetensorsCheckpoint(path=label, kind=kind, files=files, config=config)


def _holds_model(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or is_adapter_dir(path)


def _open_saved(folder: Path, path: Path, label: str) -> Checkpoint:
    ck = open_saved_base(folder, label)
    if folder != path and _holds_model(path):
        ck.notes.append(
            f"{label} also holds a model of its own; as a base it stands for the saved base in {folder} "
            "(pass the model's files or folder directly to compare against that model)"
        )
    return ck


def _adapter_base(path: Path, adapter_base: Checkpoint | str | os.PathLike | None, config_base: str | None,
                  subdir: str) -> tuple[Checkpoint, str]:  # fmt: skip
    """The base an adapter is applied to, and its label."""
    if isinstance(adapter_base, Checkpoint):
        return adapter_base, adapter_base.path
    base_spec = str(adapter_base) if adapter_base is not None else config_base
    if not base_spec:
        raise CompareError(
            f"{path}: adapter_config.json names no base_model_name_or_path; pass the base with --adapter-base"
        )
    base_path = resolve_path(base_spec, what=f"base model of adapter {path}")
    # an explicit --adapter-base may be a training output folder (its saved base); the
    # adapter's own base_model_name_or_path only when it names a saved base folder itself
    saved = find_saved_base(base_path, subdir if adapter_base is not None else None)
    if saved is not None:
        return _open_saved(saved, base_path, base_spec), base_spec
    if is_adapter_dir(base_path):
        raise CompareError(f"{path}: the adapter's base {base_spec!r} is itself an adapter; pass a full model")
    return _open_model(base_path, base_spec), base_spec


def open_checkpoint(
    spec: str | os.PathLike,
    *,
    adapter_base: Checkpoint | str | os.PathLike | None = None,
    as_base: bool = False,
    subdir: str = DEFAULT_SUBDIR,
) -> Checkpoint:
    """Open a checkpoint for streaming reads.

    Args:
        spec: a ``.safetensors`` file, a model directory (single or sharded), a
            PEFT adapter directory, a shard index file, rlmonitor's saved base
            folder, or a Hub id present in the local cache.
        adapter_base: for adapter directories, the base to apply the adapter to
            (an open :class:`Checkpoint` or a path, which may be rlmonitor's saved
            base or a training output folder holding one); default: the adapter's
            ``base_model_name_or_path``.
        as_base: ``spec`` is a base: a folder whose ``<subdir>/base/`` or ``base/``
            holds rlmonitor's saved base opens as that saved base (a training
            output folder as BASE means its step-0 base, not its final model).
        subdir: the callback's ``output_subdir`` (default ``rlmonitor``).

    Raises:
        CompareError: missing, unreadable, corrupt, hostile or unsupported inputs.
    """
    spec = str(spec)
    path = resolve_path(spec)
    saved = find_saved_base(path, subdir if as_base else None)
    if saved is not None:
        return _open_saved(saved, path, spec)
    if not is_adapter_dir(path):
        return _open_model(path, spec)
    config = read_json(path / ADAPTER_CONFIG)
    settings = parse_adapter_config(path / ADAPTER_CONFIG, config)  # before anything else is read
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CompareError(
            f"{path}: adapter directory without {ADAPTER_WEIGHTS} (only safetensors adapters are supported; "
            "re-save with save_pretrained(..., safe_serialization=True))"
        )
    base, label = _adapter_base(path, adapter_base, settings.base_model, subdir)
    return AdapterCheckpoint(path, base, config, label, settings)
