"""rlmonitor: see what RL post-training does to a language model's weights."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module; resolved lazily so that `import rlmonitor.metrics` stays
# light (the Trainer integration imports transformers)
_LAZY = {
    "GeometryCallback": "rlmonitor.callbacks.geometry",
    "KLProbeConfig": "rlmonitor.core.config",
    "CollapseCallback": "rlmonitor.callbacks.collapse",
    "GeometryConfig": "rlmonitor.core.config",
    "CollapseConfig": "rlmonitor.core.collapse",
}

__all__ = ["CollapseCallback", "CollapseConfig", "GeometryCallback", "GeometryConfig", "KLProbeConfig", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlmonitor' has no attribute {name!r}")
