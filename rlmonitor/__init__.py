"""rlmonitor: see what RL post-training does to a language model's weights."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["GeometryCallback", "GeometryConfig", "__version__"]


def __getattr__(name: str):
    # The Trainer integration imports transformers; load it only when asked for so
    # that `import rlmonitor.metrics` stays light.
    if name == "GeometryCallback":
        from .callbacks.geometry import GeometryCallback

        return GeometryCallback
    if name == "GeometryConfig":
        from .config import GeometryConfig

        return GeometryConfig
    raise AttributeError(f"module 'rlmonitor' has no attribute {name!r}")
