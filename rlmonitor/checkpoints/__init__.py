"""Read-only, streaming access to checkpoints on disk (safetensors files, model
directories, PEFT adapters, rlmonitor's saved base, training output folders).

Modules: :mod:`.safetensors` (header parsing, memory-mapped reads, the
:class:`Checkpoint` interface), :mod:`.adapters` (PEFT LoRA adapters as effective
weights), :mod:`.training` (rlmonitor's saved base, training output folders),
:mod:`.resolve` (paths, Hub cache, shard indexes, :func:`open_checkpoint`).
"""

from rlmonitor.core.naming import canonical_key

from .adapters import AdapterCheckpoint, parse_adapter_config
from .errors import CompareError
from .resolve import is_adapter_dir, open_checkpoint, resolve_path
from .safetensors import Checkpoint, SafetensorsCheckpoint, TensorInfo
from .training import (
    DEFAULT_SUBDIR,
    RunChoice,
    SavedBaseCheckpoint,
    find_saved_base,
    open_saved_base,
    resolve_output_dir,
)

__all__ = [
    "DEFAULT_SUBDIR",
    "AdapterCheckpoint",
    "Checkpoint",
    "CompareError",
    "RunChoice",
    "SafetensorsCheckpoint",
    "SavedBaseCheckpoint",
    "TensorInfo",
    "canonical_key",
    "find_saved_base",
    "is_adapter_dir",
    "open_checkpoint",
    "open_saved_base",
    "parse_adapter_config",
    "resolve_output_dir",
    "resolve_path",
]
