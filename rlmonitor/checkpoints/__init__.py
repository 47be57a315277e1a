"""Read-only, streaming access to checkpoints on disk (safetensors files, model
directories, PEFT adapters, rlmonitor's saved base, training output folders)."""

from .errors import CompareError
from .files import (
    AdapterCheckpoint,
    Checkpoint,
    SafetensorsCheckpoint,
    TensorInfo,
    canonical_key,
    is_adapter_dir,
    open_checkpoint,
    resolve_path,
)

__all__ = [
    "AdapterCheckpoint",
    "Checkpoint",
    "CompareError",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "canonical_key",
    "is_adapter_dir",
    "open_checkpoint",
    "resolve_path",
]
