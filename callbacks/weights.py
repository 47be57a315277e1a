"""Which 2-D weights of a (possibly PEFT-wrapped) model are monitored, and their
*effective* values.

Full fine-tuning: the ``weight`` parameters; sharded ones (FSDP2 DTensors,
DeepSpeed ZeRO-3) are gathered one matrix at a time (a collective every rank
must join, in the same order). PEFT LoRA / PiSSA layers: the
weight a merged checkpoint would record, ``W_base + sum_a delta_a`` with PEFT's
own ``get_delta_weight`` (``scaling * B @ A``, transposed for ``fan_in_fan_out``)
cast to the base dtype exactly as ``merge_and_unload()`` does, computed without
touching the model. Merged or disabled adapters contribute nothing (their
effect is already in, or absent from, the base weight).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from rlmonitor.core.config import GeometryConfig
from rlmonitor.core.naming import MatrixSpec, canonical, parse_name

__all__ = ["MatrixRef", "find_matrices", "gathered", "is_lora_layer", "is_sharded", "model_identity",
           "no_matrix_message"]


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def is_sharded(t: torch.Tensor) -> bool:
    """True for parameters split across ranks: FSDP2 DTensors and DeepSpeed ZeRO-3."""
    return hasattr(t, "full_tensor") or hasattr(t, "ds_id")


@contextlib.contextmanager
def gathered(*params: torch.Tensor):
    """Full values of possibly sharded parameters, one collective per tensor, in
    argument order. Every rank must enter with the same parameters in the same
    order (the monitor walks modules in ``named_modules`` order on all ranks)."""
    ds = [p for p in params if hasattr(p, "ds_id")]
    if ds:
        import deepspeed

        with deepspeed.zero.GatheredParameters(ds, modifier_rank=None):
            yield [p.detach() for p in params]
        return
    yield [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in params]


@dataclass
class MatrixRef:
    """A monitored matrix: its spec and the module that owns it."""

    spec: MatrixSpec
    module: nn.Module
    lora: bool

    @property
    def param(self) -> torch.Tensor:
        return self.module.base_layer.weight if self.lora else self.module.weight

    @property
    def sharded(self) -> bool:
        return is_sharded(self.param)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the effective weight (PEFT merges into the base weight's dtype)."""
        return self.param.dtype

    def _adapters(self) -> list[str]:
        m = self.module
        if getattr(m, "disable_adapters", False):
            return []
        merged = set(getattr(m, "merged_adapters", []))
        return [a for a in m.active_adapters if a not in merged and a in m.lora_A]

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """The effective (full, gathered) weight: a fresh tensor for LoRA or sharded
        layers, the parameter's data otherwise (copy it before the optimizer steps)."""
        if not self.lora:
            with gathered(self.module.weight) as (w,):
                return w
        m = self.module
        names = self._adapters()
        if not self.sharded:
            w = m.base_layer.weight.detach()
            out = None
            for name in names:
                if getattr(m, "use_dora", {}).get(name, False):
                    warnings.warn(f"rlmonitor: {self.spec.name} uses DoRA; its magnitude vector is not included "
                                  "in the effective weight", RuntimeWarning, stacklevel=2)
                delta = m.get_delta_weight(name).to(w.dtype)
                out = w + delta if out is None else out + delta
            return w if out is None else out
        # sharded LoRA: gather the base and each factor, then merge as PEFT does
        factors = [t for a in names for t in (m.lora_A[a].weight, m.lora_B[a].weight)]
        with gathered(m.base_layer.weight, *factors) as (w, *full):
            out = w.clone()
            for i, name in enumerate(names):
                a, b = full[2 * i].float(), full[2 * i + 1].float()
                delta = (b @ a) * m.scaling[name]
                out += (delta.T if getattr(m, "fan_in_fan_out", False) else delta).to(w.dtype)
            return out


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
        if not isinstance(weight, torch.Tensor):
            continue
        shape = tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3 keeps the real shape in ds_shape
        if len(shape) != 2:
            continue
        name = canonical(raw_name)
        if name in seen or not any(p.search(name) for p in include) or any(p.search(name) for p in exclude):
            continue
        seen.add(name)
        refs.append(MatrixRef(spec=MatrixSpec.from_name(name, shape, head_dim), module=module, lora=lora))
    return refs


def _two_d_modules(model: nn.Module) -> list[str]:
    out = []
    for raw_name, module in model.named_modules():
        if ".lora_" in raw_name or ".base_layer" in raw_name:
            continue
        weight = module.base_layer.weight if is_lora_layer(module) else getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and len(getattr(weight, "ds_shape", weight.shape)) == 2:
            out.append(canonical(raw_name))
    return list(dict.fromkeys(out))


def no_matrix_message(model: nn.Module, config: GeometryConfig) -> str:
    """Why nothing is monitored, with this model's 2-D modules and a pattern that matches them."""
    names = _two_d_modules(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if parse_name(n).layer is not None})
    hint = f"include=(r'\\.({'|'.join(leaves)})$',)" if leaves else "include=(r'<pattern>',)"
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return (
        f"GeometryCallback found no weight matrix to monitor: GeometryConfig.include={config.include!r} "
        f"(exclude={config.exclude!r}) matched none of this model's {len(names)} 2-D weights ({shown or 'none'}). "
        f"Patterns are matched (re.search) against these canonical names; for this model try {hint}."
    )


def model_identity(model: nn.Module) -> str:
    """Architecture facts that identify a model (part of the saved base's fingerprint)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    facts = [type(base).__name__]
    for attr in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        facts.append(f"{attr}={getattr(cfg, attr, None)}")
    return ";".join(facts)
