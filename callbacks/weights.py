"""Which 2-D weights of a (possibly PEFT-wrapped) model are monitored, and their
*effective* values.

Full fine-tuning: the ``weight`` parameters. PEFT LoRA / PiSSA layers: the
weight a merged checkpoint would record, ``W_base + sum_a delta_a`` with PEFT's
own ``get_delta_weight`` (``scaling * B @ A``, transposed for ``fan_in_fan_out``)
cast to the base dtype exactly as ``merge_and_unload()`` does, computed without
touching the model. Merged or disabled adapters contribute nothing (their
effect is already in, or absent from, the base weight).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from rlmonitor.config import GeometryConfig
from rlmonitor.geometry import MatrixSpec
from rlmonitor.naming import canonical, parse_name

__all__ = ["MatrixRef", "find_matrices", "is_lora_layer"]

_ATTN_KINDS = {"q", "k", "v", "o"}


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


@dataclass
class MatrixRef:
    """A monitored matrix: its spec and the module that owns it."""

    spec: MatrixSpec
    module: nn.Module
    lora: bool

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """The effective weight (a fresh tensor for LoRA layers, the parameter's
        data otherwise: copy it before the optimizer steps again)."""
        if not self.lora:
            return self.module.weight.detach()
        m = self.module
        w = m.base_layer.weight.detach()
        if getattr(m, "disable_adapters", False):
            return w
        merged = set(getattr(m, "merged_adapters", []))
        out = None
        for name in m.active_adapters:
            if name in merged or name not in m.lora_A:
                continue
            if getattr(m, "use_dora", {}).get(name, False):
                warnings.warn(f"rlmonitor: {self.spec.name} uses DoRA; its magnitude vector is not included in "
                              "the effective weight", RuntimeWarning, stacklevel=2)
            delta = m.get_delta_weight(name).to(w.dtype)
            out = w + delta if out is None else out + delta
        return w if out is None else out


def _head_dim(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    hd = getattr(cfg, "head_dim", None)
    if hd:
        return int(hd)
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    return int(hidden // heads) if hidden and heads else None


def find_matrices(model: nn.Module, config: GeometryConfig) -> list[MatrixRef]:
    """The monitored matrices of ``model`` in module order.

    A module qualifies when its canonical name (PEFT prefixes stripped) matches
    one of ``config.include`` and none of ``config.exclude`` and it holds a 2-D
    ``weight`` (or is a PEFT LoRA layer around one).
    """
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    head_dim = _head_dim(model)
    refs: list[MatrixRef] = []
    seen: set[str] = set()
    for raw_name, module in model.named_modules():
        if ".lora_" in raw_name or raw_name.endswith(".base_layer") or ".base_layer." in raw_name:
            continue
        lora = is_lora_layer(module)
        weight = module.base_layer.weight if lora else getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        name = canonical(raw_name)
        if name in seen or not any(p.search(name) for p in include) or any(p.search(name) for p in exclude):
            continue
        seen.add(name)
        parsed = parse_name(name)
        hd = head_dim if parsed.kind in _ATTN_KINDS else None
        spec = MatrixSpec(name=name, layer=parsed.layer, kind=parsed.kind, shape=tuple(weight.shape), head_dim=hd)
        refs.append(MatrixRef(spec=spec, module=module, lora=lora))
    return refs
