"""Streaming, read-only access to checkpoints on disk for ``rlmonitor compare``.

A :class:`Checkpoint` lists its tensors under *canonical* names (so checkpoints
saved from a plain model, a PEFT-wrapped model, a ``torch.compile``-d or DDP
model match) and reads one tensor, or a block of its rows, at a time through
a memory map of just that tensor's bytes (the offsets come from the safetensors
header, validated once by ``safe_open`` when the file is scanned). The mapping is
released with the returned tensor, so the pages a comparison touches never pile
up in the process's resident memory.

Supported inputs (see :func:`open_checkpoint`):

* a single ``*.safetensors`` file;
* a Hugging Face model directory, single file or sharded (``*.safetensors.index.json``);
* a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``):
  its tensors are the *effective* weights ``W + scaling * B @ A`` (``scaling =
  lora_alpha / r``, ``lora_alpha / sqrt(r)`` with ``use_rslora``; per-module
  ``alpha_pattern``/``rank_pattern``; embedding LoRA, ``fan_in_fan_out``, LoRA
  biases, ``modules_to_save``, DoRA on Linear layers), computed exactly as PEFT's
  ``merge_and_unload`` does, against a base model;
* a Hub id, only when it is already in the local Hugging Face cache (never downloads).

PiSSA / OLoRA / CorDA / LoftQ adapters saved *without* conversion carry a residual
base (``W - U_r S_r V_r^T``), not the original model: save them with
``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` (which turns
them into plain LoRA deltas against the original base) or pass the residual base
with ``--adapter-base``. The checkpoint adds a note to the report when it sees one.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from rlmonitor.core.naming import canonical_key

from .errors import CompareError

if TYPE_CHECKING:  # torch is imported where tensors are made: `compare --sparsity-only` on bf16 needs none
    import numpy as np
    import torch

__all__ = [
    "AdapterCheckpoint",
    "Checkpoint",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "canonical_key",
    "is_adapter_dir",
    "open_checkpoint",
    "resolve_path",
]

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: safetensors dtype strings -> short names used in reports
_DTYPE_NAMES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
_FLOAT_DTYPES = frozenset(_DTYPE_NAMES)

_LORA_PART = re.compile(r"\.(lora_[A-Za-z_]+)(?:\.(?!weight$|bias$)[^.]+)?(?:\.(weight|bias))?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is (as stored)."""

    key: str  #: canonical name
    stored_key: str  #: name inside the file
    file: Path
    shape: tuple[int, ...]
    dtype: str  #: safetensors dtype string, e.g. "BF16"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def floating(self) -> bool:
        return self.dtype in _FLOAT_DTYPES

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES.get(self.dtype, self.dtype.lower())


def _safetensors_error(file: Path, err: Exception) -> CompareError:
    return CompareError(
        f"{file}: not a readable safetensors file ({err}). The file is corrupt or truncated "
        "(an interrupted download or save?); re-download or re-save it"
    )


#: safetensors dtype strings read through a direct memory map -> torch dtype names
_TORCH_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip

# file -> (size, mtime_ns, {stored key: (dtype, shape, first byte, end byte)}), filled by _scan_file
_OFFSETS: dict[Path, tuple[int, int, dict[str, tuple[str, tuple[int, ...], int, int]]]] = {}
_OFFSETS_LOCK = threading.Lock()


def _header_offsets(file: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Absolute byte ranges of a safetensors file's tensors, from its header
    (8-byte little-endian header length, then the JSON header)."""
    with file.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    data = 8 + n
    return {
        k: (v["dtype"], tuple(int(d) for d in v["shape"]), data + int(v["data_offsets"][0]), data + int(v["data_offsets"][1]))
        for k, v in header.items()
        if k != "__metadata__"
    }


def _map_range(file: Path, stored_key: str, start: int | None, stop: int | None):
    """``(map, byte offset in it, safetensors dtype, shape)`` of a private memory map
    covering just the requested rows, ``(None, 0, dtype, shape)`` for zero bytes, or
    None when the file was not scanned (or changed since)."""
    st = file.stat()
    with _OFFSETS_LOCK:
        entry = _OFFSETS.get(file)
    if entry is None or entry[:2] != (st.st_size, st.st_mtime_ns) or sys.byteorder != "little":
        return None
    got = entry[2].get(stored_key)
    if got is None:
        return None
    dtype_s, shape, first, end = got
    if start is not None and shape:
        rows = range(shape[0])[start:stop]
        row_bytes = (end - first) // shape[0] if shape[0] else 0
        first, end = first + rows.start * row_bytes, first + rows.stop * row_bytes
        shape = (len(rows), *shape[1:])
    if end <= first:
        return None, 0, dtype_s, shape
    if end > st.st_size:
        raise CompareError(f"{file}: truncated: tensor {stored_key} ends at byte {end} of {st.st_size}")
    page = mmap.ALLOCATIONGRANULARITY
    base = first - first % page
    with file.open("rb") as fh:
        # ACCESS_COPY: a private mapping consumers may treat as writable; reading copies nothing
        mm = mmap.mmap(fh.fileno(), end - base, access=mmap.ACCESS_COPY, offset=base)
    return mm, first - base, dtype_s, shape


def _mapped(file: Path, stored_key: str, start: int | None, stop: int | None) -> torch.Tensor | None:
    """Zero-copy tensor over a private memory map of the requested rows (None: use safe_open)."""
    import torch

    got = _map_range(file, stored_key, start, stop)
    if got is None or got[2] not in _TORCH_DTYPES:
        return None
    mm, offset, dtype_s, shape = got
    dtype = getattr(torch, _TORCH_DTYPES[dtype_s])
    if mm is None:
        return torch.empty(shape, dtype=dtype)
    # the tensor holds a reference to the map, which is unmapped when the tensor is freed
    return torch.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)


def _read_bits(file: Path, stored_key: str, start: int | None, stop: int | None) -> np.ndarray | None:
    """The stored bf16 bit patterns (numpy ``uint16``, zero-copy) of a BF16 tensor's rows;
    None for other dtypes or an unscanned file. Imports numpy, never torch."""
    import numpy as np

    try:
        got = _map_range(file, stored_key, start, stop)
    except (OSError, ValueError) as err:
        raise _safetensors_error(file, err) from err
    if got is None or got[2] != "BF16":
        return None
    mm, offset, _, shape = got
    if mm is None:
        return np.empty(shape, dtype=np.uint16)
    return np.frombuffer(mm, dtype=np.uint16, count=math.prod(shape), offset=offset).reshape(shape)


def _read_rows(file: Path, stored_key: str, start: int | None, stop: int | None) -> torch.Tensor:
    """One tensor, or rows ``start:stop`` of it, through a fresh memory map."""
    import torch

    try:
        t = _mapped(file, stored_key, start, stop)
        if t is None:
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(stored_key) if start is None else f.get_slice(stored_key)[start:stop]
    except (SafetensorError, OSError, ValueError) as err:
        raise _safetensors_error(file, err) from err
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()  # every fp8 value is exactly representable in bf16/fp32
    return t


def _scan_file(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``stored key -> (shape, dtype)`` of one safetensors file (reads the header only)."""
    if not file.is_file():
        raise CompareError(f"{file}: no such file")
    try:
        st = file.stat()
        # opening validates the header against the file (offsets, sizes, length);
        # numpy: reading metadata must not import torch
        with safe_open(str(file), framework="numpy"):
            pass
        offsets = _header_offsets(file)
    except (SafetensorError, OSError, ValueError, KeyError, struct.error) as err:
        raise _safetensors_error(file, err) from err
    with _OFFSETS_LOCK:
        _OFFSETS[file] = (st.st_size, st.st_mtime_ns, offsets)
    return {k: (shape, dtype) for k, (dtype, shape, _, _) in offsets.items()}


class Checkpoint:
    """A set of named tensors that can be read one at a time."""

    path: str
    kind: str
    notes: list[str]
    config: dict | None

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (canonical name), or its rows ``start:stop`` (dim 0)."""
        raise NotImplementedError

    def read_bits(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        """The stored bf16 bit patterns of ``key`` as numpy ``uint16`` (zero-copy), or
        None where the tensor is not stored as bf16 or is computed (adapters)."""
        return None

    def __contains__(self, key: str) -> bool:
        return key in self._index()

    def _index(self) -> dict:
        raise NotImplementedError


@dataclass
class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (a model directory, sharded or not, or a file)."""

    path: str
    kind: str
    files: list[Path]
    config: dict | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for stored, (shape, dtype) in _scan_file(file).items():
                if ".original_module." in stored:
                    continue  # PEFT keeps the untouched copy of a modules_to_save module
                if _LORA_PART.search(stored):
                    raise CompareError(
                        f"{file}: holds LoRA factors ({stored}) next to full weights. Save the adapter with "
                        "save_pretrained() and pass its directory, or merge it first (merge_and_unload())"
                    )
                key = canonical_key(stored)
                if key in self._tensors:
                    other = self._tensors[key]
                    raise CompareError(
                        f"{self.path}: tensor {key!r} appears twice ({other.file.name}:{other.stored_key} and "
                        f"{file.name}:{stored}); pass a single model, not a directory of several"
                    )
                self._tensors[key] = TensorInfo(key, stored, file, shape, dtype)

    def _index(self) -> dict:
        return self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        return self._tensors[key]

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        ti = self._tensors[key]
        return _read_rows(ti.file, ti.stored_key, start, stop)

    def read_bits(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        ti = self._tensors[key]
        return _read_bits(ti.file, ti.stored_key, start, stop)


@dataclass
class _LoraModule:
    module: str  # canonical module name ("layers.0.self_attn.q_proj")
    a_key: str
    b_key: str
    scaling: float
    embedding: bool
    fan_in_fan_out: bool
    bias_key: str | None = None
    magnitude_key: str | None = None  # DoRA


class AdapterCheckpoint(Checkpoint):
    """Effective weights of a PEFT LoRA adapter on top of a base checkpoint.

    ``read`` returns ``W + scaling * B @ A`` computed as PEFT's (unsafe, default)
    ``merge``: the product in fp32 (bf16/fp16 factors are upcast, as PEFT does on
    CPU), scaled, cast to the adapter dtype, then added to ``W`` (Linear: in the
    promoted dtype, rounded once to ``W``'s dtype; Embedding: the delta is cast to
    ``W``'s dtype first). So the numbers equal those of the merged model.
    Tensors the adapter saves whole (``modules_to_save``, biases with
    ``bias="all"``, embedding layers) replace the base's.
    """

    def __init__(self, path: Path, base: Checkpoint, config: dict, base_label: str):
        self.path = str(path)
        self.kind = "peft-adapter"
        self.base = base
        self.config = config
        self.notes: list[str] = []
        file = path / _ADAPTER_WEIGHTS
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CompareError(
                f"{path}: PEFT type {peft_type} is not supported (only LoRA adapters are); "
                "merge it with merge_and_unload() and compare the merged model"
            )
        stored = _scan_file(file)
        self._file = file
        self._stored = stored
        r_default = config.get("r", 8)
        alpha_default = config.get("lora_alpha", r_default)
        alpha_pattern = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora"))
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))

        parts: dict[str, dict[str, str]] = {}
        self._replaced: dict[str, TensorInfo] = {}
        self._keys: dict | None = None
        for sk, (shape, dtype) in stored.items():
            m = _LORA_PART.search(sk)
            if m is None:
                key = canonical_key(sk)
                self._replaced[key] = TensorInfo(key, sk, file, shape, dtype)
                continue
            part = m.group(1) + ("." + m.group(2) if m.group(2) else "")
            module_full = sk[: m.start()]
            if part not in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
                            "lora_magnitude_vector"):  # fmt: skip
                raise CompareError(
                    f"{path}: adapter tensor {sk!r} ({m.group(1)}) is not supported (plain LoRA only); "
                    "merge the adapter with merge_and_unload() and compare the merged model"
                )
            parts.setdefault(module_full, {})[part] = sk

        self._lora: dict[str, _LoraModule] = {}
        for module_full, p in parts.items():
            embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
            a_key = p.get("lora_embedding_A" if embedding else "lora_A.weight")
            b_key = p.get("lora_embedding_B" if embedding else "lora_B.weight")
            if a_key is None or b_key is None:
                raise CompareError(f"{path}: adapter module {module_full!r} has only one of its LoRA factors A, B")
            r = stored[a_key][0][0]
            if r != stored[b_key][0][-1]:
                raise CompareError(
                    f"{path}: LoRA factors of {module_full!r} disagree on the rank "
                    f"(A {stored[a_key][0]}, B {stored[b_key][0]})"
                )
            # alpha_pattern keys are regexes matched against the module path (PEFT's get_pattern_key)
            name = module_full[len("base_model.model.") :] if module_full.startswith("base_model.model.") else module_full
            alpha = alpha_default
            for pat, val in alpha_pattern.items():
                if re.match(rf"(.*\.)?({pat})$", name):
                    alpha = val
                    break
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            module = canonical_key(module_full)
            magnitude = p.get("lora_magnitude_vector")
            if magnitude is not None and (embedding or fan_in_fan_out):
                raise CompareError(
                    f"{path}: DoRA on {'an embedding' if embedding else 'a fan_in_fan_out'} layer ({module_full}) "
                    "is not supported; merge the adapter with merge_and_unload() and compare the merged model"
                )
            self._lora[module + ".weight"] = _LoraModule(
                module, a_key, b_key, float(scaling), embedding, fan_in_fan_out and not embedding,
                p.get("lora_B.bias"), magnitude,
            )
        for wkey, lm in self._lora.items():
            if wkey not in self:
                raise CompareError(
                    f"{path}: the adapter targets {lm.module!r} but its base model ({base_label}) has no tensor "
                    f"{wkey!r}; pass the right base with --adapter-base"
                )
            shape = self.info(wkey).shape
            rows, cols = stored[lm.b_key][0][0], stored[lm.a_key][0][1]
            want = (cols, rows) if (lm.embedding or lm.fan_in_fan_out) else (rows, cols)
            if tuple(shape) != want:
                raise CompareError(
                    f"{path}: LoRA factors of {lm.module!r} give a {want} update but the base weight "
                    f"({base_label}) is {tuple(shape)}; pass the right base with --adapter-base"
                )
            if lm.bias_key is not None and lm.module + ".bias" not in self:
                raise CompareError(f"{path}: the adapter has a LoRA bias for {lm.module!r} but the base has no bias")
        self._bias = {lm.module + ".bias": lm for lm in self._lora.values() if lm.bias_key}

        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "eva")):
            self.notes.append(
                f"adapter {path} was initialised with init_lora_weights={init!r}: unless it was saved with "
                "path_initial_model_for_weight_conversion, its base is the residual model, not the original; "
                "compare against that residual base (--adapter-base) or re-save the adapter converted"
            )
        elif config.get("loftq_config"):
            self.notes.append(f"adapter {path} uses LoftQ: its base is the quantisation residual, not the original")
        self.notes.append(
            f"{path}: effective weights W + s*B@A of {len(self._lora)} LoRA modules on base {base_label}"
        )

    # -- Checkpoint interface ------------------------------------------------
    def _index(self) -> dict:
        if self._keys is None:
            self._keys = {**dict.fromkeys(self.base.names()), **self._replaced}
        return self._keys

    def names(self) -> list[str]:
        return list(self._index())

    def info(self, key: str) -> TensorInfo:
        if key in self._replaced:
            return self._replaced[key]
        return self.base.info(key)

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        if key in self._replaced:
            ti = self._replaced[key]
            w = _read_rows(ti.file, ti.stored_key, start, stop)
        else:
            w = self.base.read(key, start, stop)
        lm = self._lora.get(key)
        if lm is not None:
            return self._apply_lora(w, lm, start, stop)
        lm = self._bias.get(key)
        if lm is not None:
            bb = _read_rows(self._file, lm.bias_key, start, stop)
            return (w + bb * lm.scaling).to(w.dtype)
        return w

    def _apply_lora(self, w: torch.Tensor, lm: _LoraModule, start: int | None, stop: int | None) -> torch.Tensor:
        import torch

        a = _read_rows(self._file, lm.a_key, None, None)
        b = _read_rows(self._file, lm.b_key, None, None)
        ad_dtype = b.dtype if not lm.embedding else a.dtype
        a, b = a.float(), b.float()
        sl = slice(start, stop)
        # same operation order as PEFT's get_delta_weight: (B @ A), transposed for embeddings and
        # fan_in_fan_out layers (rows of the delta are then columns of A), times the scaling
        delta = (b @ a[:, sl]).T if lm.embedding or lm.fan_in_fan_out else b[sl] @ a
        delta = (delta * lm.scaling).to(ad_dtype)
        if lm.embedding:
            return w + delta.to(w.dtype)  # PEFT Embedding.merge: weight += delta.to(weight.dtype)
        if lm.magnitude_key is not None:
            # DoRA (PEFT DoraLinearVariant.merge_unsafe): m / ||W + dW||_row * (W + dW); rows are independent
            mag = _read_rows(self._file, lm.magnitude_key, start, stop)
            merged = w + delta
            norm = torch.linalg.norm(merged, dim=1).to(merged.dtype)
            return ((mag / norm).view(-1, 1) * merged).to(w.dtype)
        return (w + delta).to(w.dtype)  # PEFT Linear.merge: weight += delta (in-place, promoted)


# ---------------------------------------------------------------------------
# resolving paths


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / _ADAPTER_CONFIG).is_file()


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CompareError(f"{file}: cannot read JSON ({err})") from err


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


def _index_files(index: Path) -> list[Path]:
    data = _read_json(index)
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise CompareError(f"{index}: shard index has no weight_map")
    files = [index.parent / f for f in dict.fromkeys(wmap.values())]
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
        except (OSError, ValueError):
            config = None
    return SafetensorsCheckpoint(path=label, kind=kind, files=files, config=config)


def open_checkpoint(
    spec: str | os.PathLike,
    *,
    adapter_base: Checkpoint | str | os.PathLike | None = None,
) -> Checkpoint:
    """Open a checkpoint for streaming reads.

    Args:
        spec: a ``.safetensors`` file, a model directory (single or sharded), a
            PEFT adapter directory, a shard index file, or a Hub id present in the
            local cache.
        adapter_base: for adapter directories, the base to apply the adapter to
            (an open :class:`Checkpoint` or a path); default: the adapter's
            ``base_model_name_or_path``.

    Raises:
        CompareError: missing, unreadable, corrupt or unsupported inputs.
    """
    spec = str(spec)
    path = resolve_path(spec)
    if not is_adapter_dir(path):
        return _open_model(path, spec)
    config = _read_json(path / _ADAPTER_CONFIG)
    if not (path / _ADAPTER_WEIGHTS).is_file():
        raise CompareError(
            f"{path}: adapter directory without {_ADAPTER_WEIGHTS} (only safetensors adapters are supported; "
            "re-save with save_pretrained(..., safe_serialization=True))"
        )
    if isinstance(adapter_base, Checkpoint):
        base, label = adapter_base, adapter_base.path
    else:
        base_spec = adapter_base if adapter_base is not None else config.get("base_model_name_or_path")
        if not base_spec:
            raise CompareError(
                f"{path}: adapter_config.json names no base_model_name_or_path; pass the base with --adapter-base"
            )
        base_path = resolve_path(str(base_spec), what=f"base model of adapter {path}")
        if is_adapter_dir(base_path):
            raise CompareError(f"{path}: the adapter's base {base_spec!r} is itself an adapter; pass a full model")
        base, label = _open_model(base_path, str(base_spec)), str(base_spec)
    return AdapterCheckpoint(path, base, config, label)
