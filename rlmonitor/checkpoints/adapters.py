"""PEFT LoRA adapter directories read as their *effective* weights.

A directory with ``adapter_config.json`` + ``adapter_model.safetensors`` reads as
``W + scaling * B @ A`` (``scaling = lora_alpha / r``, ``lora_alpha / sqrt(r)`` with
``use_rslora``; per-module ``alpha_pattern``; embedding LoRA, ``fan_in_fan_out``,
LoRA biases, ``modules_to_save``, DoRA on Linear layers), computed exactly as PEFT's
``merge_and_unload`` does, against a base checkpoint.

``adapter_config.json`` is untrusted input: :func:`parse_adapter_config` checks every
field the merge reads (types, ranges, regexes) before any tensor is read, so a bad
file is one :class:`CompareError` naming the file and the field.

PiSSA / OLoRA / CorDA / LoftQ adapters saved *without* conversion carry a residual
base (``W - U_r S_r V_r^T``), not the original model: save them with
``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` (which turns
them into plain LoRA deltas against the original base) or pass the residual base
with ``--adapter-base``. The checkpoint adds a note to the report when it sees one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlmonitor.core.naming import canonical_key

from .errors import CompareError
from .safetensors import LORA_PART, Checkpoint, TensorInfo, read_file_rows, scan_file

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterCheckpoint", "AdapterSettings", "parse_adapter_config"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_FIX = "fix adapter_config.json (PEFT's save_pretrained() writes it) or re-save the adapter"
_LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
               "lora_magnitude_vector")  # fmt: skip
_REINIT = ("pissa", "olora", "corda", "loftq", "eva")
_FLOAT = frozenset({"BF16", "F16", "F32", "F64"})


@dataclass(frozen=True)
class AdapterSettings:
    """The fields of ``adapter_config.json`` the merge uses, checked."""

    peft_type: str
    lora_alpha: float  #: default alpha (``r`` when the file gives none, as before)
    use_rslora: bool
    fan_in_fan_out: bool
    alpha_pattern: dict[str, float]
    init_lora_weights: bool | str
    loftq: bool
    base_model: str | None


def _show(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 63 else text


def _bad(file: Path, name: str, want: str, value: Any) -> CompareError:
    return CompareError(
        f"{file}: field {name!r} must be {want}, got {_show(value)} ({type(value).__name__}); {_FIX}"
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _pattern_map(file: Path, data: dict, name: str, ok, want: str) -> dict:
    """``alpha_pattern`` / ``rank_pattern``: ``{regex: value}`` (PEFT matches each key as
    ``(.*\\.)?(key)$`` against module paths), or null."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(file, name, f"an object {{module pattern: {want}}}", value)
    for key, val in value.items():
        if not ok(val):
            raise _bad(file, f"{name}[{key!r}]", want, val)
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as err:
            raise CompareError(f"{file}: field {name!r}: key {_show(key)} is not a valid regex ({err}); {_FIX}") from err
    return value


def _typed(file: Path, data: dict, name: str, types: tuple[type, ...], want: str, default: Any) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise _bad(file, name, want, value)
    return value


def _string_list(file: Path, data: dict, name: str, *, allow_str: bool) -> None:
    value = data.get(name)
    if value is None or (allow_str and isinstance(value, str)):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(file, name, "a list of module names" + (" or a regex string" if allow_str else ""), value)


def parse_adapter_config(file: Path, data: Any) -> AdapterSettings:
    """Check the fields of ``adapter_config.json`` (parsed JSON ``data``) that the merge
    uses; a missing or null field takes PEFT's default. Raises :class:`CompareError`
    naming ``file`` and the field for anything else."""
    if not isinstance(data, dict):
        raise CompareError(f"{file}: must hold a JSON object (PEFT's LoraConfig), got a {type(data).__name__}; {_FIX}")
    peft_type = _typed(file, data, "peft_type", (str,), "a string such as \"LORA\"", "LORA")
    r = data.get("r")
    if r is not None and not _positive_int(r):
        raise _bad(file, "r", "a positive integer (the LoRA rank)", r)
    alpha = data.get("lora_alpha")
    if alpha is not None and not _number(alpha):
        raise _bad(file, "lora_alpha", "a finite number", alpha)
    alpha_pattern = _pattern_map(file, data, "alpha_pattern", _number, "a finite number")
    _pattern_map(file, data, "rank_pattern", _positive_int, "a positive integer")
    _string_list(file, data, "target_modules", allow_str=True)
    _string_list(file, data, "modules_to_save", allow_str=False)
    _typed(file, data, "use_dora", (bool,), "true or false", False)
    init = _typed(file, data, "init_lora_weights", (bool, str), "true, false or an initialisation name", True)
    loftq = _typed(file, data, "loftq_config", (dict,), "an object", {})
    base = _typed(file, data, "base_model_name_or_path", (str,), "a path or Hub id string", None)
    return AdapterSettings(
        peft_type=peft_type.upper(),
        lora_alpha=alpha if alpha is not None else (r if r is not None else 8),
        use_rslora=_typed(file, data, "use_rslora", (bool,), "true or false", False),
        fan_in_fan_out=_typed(file, data, "fan_in_fan_out", (bool,), "true or false", False),
        alpha_pattern=alpha_pattern,
        init_lora_weights=init,
        loftq=bool(loftq),
        base_model=base or None,
    )


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

    On a *partial* base (rlmonitor's saved base: the monitored matrices only) the
    adapter's modules and whole tensors the base does not hold are left out (one note).
    """

    def __init__(self, path: Path, base: Checkpoint, config: dict, base_label: str,
                 settings: AdapterSettings | None = None):  # fmt: skip
        self.path = str(path)
        self.kind = "peft-adapter"
        self.base = base
        self.config = config
        self.partial = base.partial
        self.notes: list[str] = []
        s = settings if settings is not None else parse_adapter_config(path / ADAPTER_CONFIG, config)
        if s.peft_type != "LORA":
            raise CompareError(
                f"{path}: PEFT type {s.peft_type} is not supported (only LoRA adapters are); "
                "merge it with merge_and_unload() and compare the merged model"
            )
        self._file = path / ADAPTER_WEIGHTS
        self._stored = scan_file(self._file)
        self._keys: dict | None = None
        parts = self._split_tensors()
        self._lora = {m.module + ".weight": m for m in (self._module(mf, p, s) for mf, p in parts.items())}
        left_out = self._drop_missing_from_partial_base() if base.partial else []
        self._check_against_base(base_label)
        self._bias = {lm.module + ".bias": lm for lm in self._lora.values() if lm.bias_key}
        self._add_notes(s, base_label, left_out)

    # -- construction ----------------------------------------------------------
    def _split_tensors(self) -> dict[str, dict[str, str]]:
        """Stored tensors -> LoRA parts per module; whole tensors go to ``_replaced``."""
        parts: dict[str, dict[str, str]] = {}
        self._replaced: dict[str, TensorInfo] = {}
        for sk, (shape, dtype) in self._stored.items():
            m = LORA_PART.search(sk)
            if m is None:
                key = canonical_key(sk)
                self._replaced[key] = TensorInfo(key, sk, self._file, shape, dtype)
                continue
            part = m.group(1) + ("." + m.group(2) if m.group(2) else "")
            if part not in _LORA_PARTS:
                raise CompareError(
                    f"{self.path}: adapter tensor {sk!r} ({m.group(1)}) is not supported (plain LoRA only); "
                    "merge the adapter with merge_and_unload() and compare the merged model"
                )
            parts.setdefault(sk[: m.start()], {})[part] = sk
        return parts

    def _module(self, module_full: str, p: dict[str, str], s: AdapterSettings) -> _LoraModule:
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key = p.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = p.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            raise CompareError(f"{self.path}: adapter module {module_full!r} has only one of its LoRA factors A, B")
        r = self._check_factors(module_full, a_key, b_key, p)
        # alpha_pattern keys are regexes matched against the module path (PEFT's get_pattern_key)
        name = module_full[len("base_model.model.") :] if module_full.startswith("base_model.model.") else module_full
        alpha = s.lora_alpha
        for pat, val in s.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pat})$", name):
                alpha = val
                break
        scaling = alpha / math.sqrt(r) if s.use_rslora else alpha / r
        magnitude = p.get("lora_magnitude_vector")
        if magnitude is not None and (embedding or s.fan_in_fan_out):
            raise CompareError(
                f"{self.path}: DoRA on {'an embedding' if embedding else 'a fan_in_fan_out'} layer ({module_full}) "
                "is not supported; merge the adapter with merge_and_unload() and compare the merged model"
            )
        return _LoraModule(canonical_key(module_full), a_key, b_key, float(scaling), embedding,
                           s.fan_in_fan_out and not embedding, p.get("lora_B.bias"), magnitude)  # fmt: skip

    def _check_factors(self, module_full: str, a_key: str, b_key: str, p: dict[str, str]) -> int:
        """Shapes and dtypes of a module's factors (a bad file fails here, before any read);
        returns the rank."""
        (sa, da), (sb, db) = self._stored[a_key], self._stored[b_key]
        if len(sa) != 2 or len(sb) != 2 or da not in _FLOAT or db not in _FLOAT:
            raise CompareError(
                f"{self.path}: LoRA factors of {module_full!r} must be 2-D floating tensors "
                f"(A {sa} {da}, B {sb} {db}); re-save the adapter with save_pretrained()"
            )
        r = sa[0]
        if r < 1 or r != sb[-1]:
            raise CompareError(f"{self.path}: LoRA factors of {module_full!r} disagree on the rank (A {sa}, B {sb})")
        for part in ("lora_B.bias", "lora_magnitude_vector"):
            if part in p and (self._stored[p[part]][0] != (sb[0],) or self._stored[p[part]][1] not in _FLOAT):
                raise CompareError(
                    f"{self.path}: {part} of {module_full!r} is {self._stored[p[part]][0]} "
                    f"{self._stored[p[part]][1]}, expected a floating vector of {sb[0]} (B's rows)"
                )
        return r

    def _drop_missing_from_partial_base(self) -> list[str]:
        """Partial base: drop LoRA modules and whole tensors it does not hold; LoRA biases
        of dropped or bias-less modules go too (the base holds weights only)."""
        names = set(self.base.names())
        gone = [lm.module for k, lm in self._lora.items() if k not in names]
        gone += [k for k in self._replaced if k not in names]
        self._lora = {k: lm for k, lm in self._lora.items() if k in names}
        self._replaced = {k: ti for k, ti in self._replaced.items() if k in names}
        for lm in self._lora.values():
            if lm.bias_key is not None and lm.module + ".bias" not in names:
                lm.bias_key = None
        return gone

    def _check_against_base(self, base_label: str) -> None:
        for wkey, lm in self._lora.items():
            if wkey not in self:
                raise CompareError(
                    f"{self.path}: the adapter targets {lm.module!r} but its base model ({base_label}) has no tensor "
                    f"{wkey!r}; pass the right base with --adapter-base"
                )
            shape = self.info(wkey).shape
            rows, cols = self._stored[lm.b_key][0][0], self._stored[lm.a_key][0][1]
            want = (cols, rows) if (lm.embedding or lm.fan_in_fan_out) else (rows, cols)
            if tuple(shape) != want:
                raise CompareError(
                    f"{self.path}: LoRA factors of {lm.module!r} give a {want} update but the base weight "
                    f"({base_label}) is {tuple(shape)}; pass the right base with --adapter-base"
                )
            if lm.bias_key is not None and lm.module + ".bias" not in self:
                raise CompareError(f"{self.path}: the adapter has a LoRA bias for {lm.module!r} but the base has no bias")

    def _add_notes(self, s: AdapterSettings, base_label: str, left_out: list[str]) -> None:
        path, init = self.path, s.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_REINIT):
            self.notes.append(
                f"adapter {path} was initialised with init_lora_weights={init!r}: unless it was saved with "
                "path_initial_model_for_weight_conversion, its base is the residual model, not the original; "
                "compare against that residual base (--adapter-base) or re-save the adapter converted"
            )
        elif s.loftq:
            self.notes.append(f"adapter {path} uses LoftQ: its base is the quantisation residual, not the original")
        if self.base.kind == "rlmonitor-base":
            self.notes.append(
                f"adapter {path} applied to rlmonitor's saved base (the step-0 effective weights): right for LoRA, "
                "whose update is zero at step 0; PiSSA/OLoRA/CorDA/LoftQ-style adapters saved without conversion "
                "(path_initial_model_for_weight_conversion) are deltas against a residual model and cannot be "
                "compared this way"
            )
        if left_out:
            self.notes.append(
                f"{path}: {len(left_out)} adapter module(s)/tensor(s) are not in the base ({base_label} holds only "
                f"the monitored matrices) and are left out (e.g. {left_out[0]})"
            )
        self.notes.append(f"{path}: effective weights W + s*B@A of {len(self._lora)} LoRA modules on base {base_label}")

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
            w = read_file_rows(ti.file, ti.stored_key, start, stop)
        else:
            w = self.base.read(key, start, stop)
        lm = self._lora.get(key)
        if lm is not None:
            return self._apply_lora(w, lm, start, stop)
        lm = self._bias.get(key)
        if lm is not None:
            bb = read_file_rows(self._file, lm.bias_key, start, stop)
            return (w + bb * lm.scaling).to(w.dtype)
        return w

    def _apply_lora(self, w: torch.Tensor, lm: _LoraModule, start: int | None, stop: int | None) -> torch.Tensor:
        import torch

        a = read_file_rows(self._file, lm.a_key, None, None)
        b = read_file_rows(self._file, lm.b_key, None, None)
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
            mag = read_file_rows(self._file, lm.magnitude_key, start, stop)
            merged = w + delta
            norm = torch.linalg.norm(merged, dim=1).to(merged.dtype)
            return ((mag / norm).view(-1, 1) * merged).to(w.dtype)
        return (w + delta).to(w.dtype)  # PEFT Linear.merge: weight += delta (in-place, promoted)
