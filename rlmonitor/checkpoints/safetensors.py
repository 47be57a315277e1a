"""Safetensors files: header parsing, memory-mapped reads, and the :class:`Checkpoint`
interface every reader implements.

A :class:`Checkpoint` lists its tensors under *canonical* names (so checkpoints
saved from a plain model, a PEFT-wrapped model, a ``torch.compile``-d or DDP
model match) and reads one tensor, or a block of its rows, at a time through
a memory map of just that tensor's bytes (the offsets come from the safetensors
header, validated once by ``safe_open`` when the file is scanned). The mapping is
released with the returned tensor, so the pages a comparison touches never pile
up in the process's resident memory.
"""

from __future__ import annotations

import json
import math
import mmap
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
    "LORA_PART",
    "Checkpoint",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "read_file_bits",
    "read_file_rows",
    "safetensors_error",
    "scan_file",
]

#: a LoRA factor (or DoRA magnitude, LoRA bias) inside a stored tensor name
LORA_PART = re.compile(r"\.(lora_[A-Za-z_]+)(?:\.(?!weight$|bias$)[^.]+)?(?:\.(weight|bias))?$")

#: safetensors dtype strings -> short names used in reports
_DTYPE_NAMES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
_FLOAT_DTYPES = frozenset(_DTYPE_NAMES)


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


def safetensors_error(file: Path, err: Exception) -> CompareError:
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

# file -> (size, mtime_ns, {stored key: (dtype, shape, first byte, end byte)}), filled by scan_file
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


def read_file_bits(file: Path, stored_key: str, start: int | None, stop: int | None) -> np.ndarray | None:
    """The stored bf16 bit patterns (numpy ``uint16``, zero-copy) of a BF16 tensor's rows;
    None for other dtypes or an unscanned file. Imports numpy, never torch."""
    import numpy as np

    try:
        got = _map_range(file, stored_key, start, stop)
    except (OSError, ValueError) as err:
        raise safetensors_error(file, err) from err
    if got is None or got[2] != "BF16":
        return None
    mm, offset, _, shape = got
    if mm is None:
        return np.empty(shape, dtype=np.uint16)
    return np.frombuffer(mm, dtype=np.uint16, count=math.prod(shape), offset=offset).reshape(shape)


def read_file_rows(file: Path, stored_key: str, start: int | None, stop: int | None) -> torch.Tensor:
    """One tensor, or rows ``start:stop`` of it, through a fresh memory map."""
    import torch

    try:
        t = _mapped(file, stored_key, start, stop)
        if t is None:
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(stored_key) if start is None else f.get_slice(stored_key)[start:stop]
    except (SafetensorError, OSError, ValueError) as err:
        raise safetensors_error(file, err) from err
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()  # every fp8 value is exactly representable in bf16/fp32
    return t


def scan_file(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
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
        raise safetensors_error(file, err) from err
    with _OFFSETS_LOCK:
        _OFFSETS[file] = (st.st_size, st.st_mtime_ns, offsets)
    return {k: (shape, dtype) for k, (dtype, shape, _, _) in offsets.items()}


class Checkpoint:
    """A set of named tensors that can be read one at a time."""

    path: str
    kind: str
    notes: list[str]
    config: dict | None
    #: True when the checkpoint holds only some tensors of a model (rlmonitor's saved
    #: base: the monitored matrices); compare then compares exactly its tensors
    partial: bool = False

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
            for stored, (shape, dtype) in scan_file(file).items():
                if ".original_module." in stored:
                    continue  # PEFT keeps the untouched copy of a modules_to_save module
                if LORA_PART.search(stored):
                    raise CompareError(
                        f"{file}: holds LoRA factors ({stored}) next to full weights. Save the adapter with "
                        "save_pretrained() and pass its directory, or merge it first (merge_and_unload())"
                    )
                key = self._key(stored)
                if key in self._tensors:
                    other = self._tensors[key]
                    raise CompareError(
                        f"{self.path}: tensor {key!r} appears twice ({other.file.name}:{other.stored_key} and "
                        f"{file.name}:{stored}); pass a single model, not a directory of several"
                    )
                self._tensors[key] = TensorInfo(key, stored, file, shape, dtype)

    def _key(self, stored: str) -> str:
        """The canonical name of a stored tensor name."""
        return canonical_key(stored)

    def _index(self) -> dict:
        return self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        return self._tensors[key]

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        ti = self._tensors[key]
        return read_file_rows(ti.file, ti.stored_key, start, stop)

    def read_bits(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        ti = self._tensors[key]
        return read_file_bits(ti.file, ti.stored_key, start, stop)


