"""KL-vs-step: exact token-wise KL between the current policy and the base policy
on a fixed probe set (docs/metrics.md, KL section, the paper's learning-progress curve).

At train start ``kl_probe_size`` prompts (from the trainer's train dataset, or
given) get completions sampled once from the base policy (seeded, inside
``torch.random.fork_rng`` so the trainer's RNG streams are untouched). The probe
never changes; it is saved beside the base snapshot so a resumed run uses it.

Base distribution:

- full fine-tuning and adapters that rewrite the base weights (PiSSA, OLoRA, ...):
  the base log-probabilities at probe positions are cached once on CPU (fp32 by
  default for accuracy: bf16 rounding of log-probs adds noise of the order of
  ``entropy * 2^-9`` nats per token, larger than early RL KL). When the cache
  would exceed ``kl_cache_max_mb`` it keeps the top-K log-probs per position
  plus the tail mass (see :mod:`rlmonitor.metrics.kl`).
- plain LoRA (``B = 0`` at init, base weights untouched): the base policy is the
  model with adapters disabled, so nothing is cached.

Logged metrics (averages over probe completion tokens):

- ``kl/base_forward``: KL(pi_theta || pi_base), the paper's learning-progress curve.
- ``kl/base_reverse``: KL(pi_base || pi_theta).
- ``kl/base_forward_max``: largest per-token KL(pi_theta || pi_base) on the probe.
- ``kl/step_forward``: KL(pi_theta(t) || pi_theta(t - interval)), the per-interval leash.
- ``kl/probe_logprob_mean``: mean log pi_theta of the probe completion tokens.
- ``kl/weight_step_ratio``: ``||dW_step||_F^2 / (2 kl/step_forward)`` over the
  monitored matrices, Gate I's effective inverse curvature ``1/mu`` (logged when
  the KL and geometry intervals coincide). Gate I bounds the weight step by
  ``sqrt(2K/mu)`` for a per-step KL budget ``K``: a *stable* ratio means the
  policy moves in proportion to the weights (KL leashes the step); a ratio that
  falls sharply means small weight steps now move the policy a lot (sharp
  region, a collapse precursor); a rising ratio means weights move in directions
  the policy barely feels.
- ``kl/cache_bytes``: memory of the cached base log-probs (0 for the LoRA path).

Relation to TRL's ``kl`` (logged only when ``beta > 0``): TRL estimates
KL(pi_theta || pi_ref) with the k3 estimator ``exp(r) - r - 1`` (``r = log
pi_ref - log pi_theta``) on the *sampled training completions* of each step,
against a reference model held in memory. Ours is exact (full vocabulary) on a
*fixed* probe set, so it is comparable across steps and runs, costs one small
forward per interval, and exists whatever ``beta`` is. Both estimate the same
divergence; expect the same trend, not the same numbers.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlmonitor.core import keys
from rlmonitor.core.config import KLProbeConfig
from rlmonitor.metrics import TopKLogProbs, compress_logprobs, token_kl, token_kl_topk

__all__ = ["KLProbe", "KLProbeConfig"]


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _lora_keeps_base(model: Any) -> bool:
    """True for PEFT adapters whose init leaves the base weights untouched (plain LoRA)."""
    for cfg in getattr(model, "peft_config", {}).values():
        init = getattr(cfg, "init_lora_weights", True)
        if getattr(cfg, "peft_type", None) is not None and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
            return False
        if not (init is True or init is False or init == "gaussian"):
            return False  # pissa / olora / corda / eva / loftq rewrite the base weights
    return True


def _prompt_ids(row: Any, tokenizer: Any) -> list[int] | None:
    """Prompt token ids of a dataset row: a ``prompt`` string or chat messages
    (GRPO-style), or the prompt part of a tokenized row (``input_ids`` with a
    ``completion_mask``, or ``labels`` of -100 over the prompt, as SFTTrainer
    prepares them). None if there is none."""
    if not isinstance(row, dict):
        return None
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt.strip() else None
    ids = row.get("input_ids")
    if not isinstance(ids, list):
        return None
    mask, labels = row.get("completion_mask"), row.get("labels")
    if isinstance(mask, list) and 1 in mask:
        return list(ids[: mask.index(1)]) or None
    if isinstance(labels, list):  # SFT rows: labels are -100 on the prompt
        first = next((i for i, label in enumerate(labels) if label != -100), None)
        return list(ids[:first]) or None if first else None
    return None


@contextlib.contextmanager
def _eval_mode(model: Any):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _positions(model: Any) -> int | None:
    """The model's largest sequence length (``max_position_embeddings``), if it has one."""
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _fit_positions(model: Any, cfg: KLProbeConfig, width: int) -> int:
    """Completion tokens of a probe whose longest (already cut) prompt has ``width`` tokens:
    the configured number, or (with one warning) what still fits the model's positions."""
    n, new_tokens = _positions(model), cfg.kl_probe_max_new_tokens
    if n is None or width + new_tokens <= n:
        return new_tokens
    fitted = n - width
    warnings.warn(
        f"rlmonitor: KL probe of up to {width} prompt + {new_tokens} completion tokens exceeds the model's "
        f"{n} positions (max_position_embeddings); sampling {fitted} completion tokens instead. Set "
        "KLProbeConfig(kl_probe_max_prompt_tokens=..., kl_probe_max_new_tokens=...) to choose.",
        RuntimeWarning,
        stacklevel=3,
    )
    return fitted


def _rng_devices(model: Any) -> list[int]:
    dev = next(model.parameters()).device
    return [dev.index or 0] if dev.type == "cuda" else []


class KLProbe:
    """Holds the probe and the base distribution; ``measure(model)`` returns the ``kl/*`` scalars."""

    def __init__(self, config: KLProbeConfig) -> None:
        self.config = config
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.completion_mask: torch.Tensor | None = None  # which next-token positions are probe completions
        self.cache: torch.Tensor | TopKLogProbs | None = None
        self.prev: torch.Tensor | None = None
        self.use_disabled_adapters = False

    # -- setup ------------------------------------------------------------
    def select_prompts(self, tokenizer: Any, dataset: Any) -> list[list[int]]:
        """Token ids of the probe prompts: the configured ones, or ``kl_probe_size``
        distinct prompts drawn (seeded) from the train dataset."""
        cfg = self.config
        if cfg.prompts is not None:
            return [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in cfg.prompts[: cfg.kl_probe_size]]
        if dataset is None:
            raise ValueError("KL probe: the trainer has no train dataset; pass KLProbeConfig(prompts=[...])")
        order = list(range(len(dataset)))
        random.Random(cfg.seed).shuffle(order)
        prompts: list[list[int]] = []
        for i in order[: max(cfg.kl_probe_size * 20, 64)]:
            ids = _prompt_ids(dataset[i], tokenizer)
            if ids and ids not in prompts:
                prompts.append(ids)
            if len(prompts) == cfg.kl_probe_size:
                break
        if not prompts:
            raise ValueError(
                "KL probe: no usable prompt in the train dataset (expected a 'prompt' column of strings or chat "
                "messages, or tokenized rows with a completion_mask); pass KLProbeConfig(prompts=[...]) or "
                "switch the probe off with GeometryCallback(kl=None)"
            )
        return prompts

    @torch.no_grad()
    def setup(self, model: Any, tokenizer: Any, dataset: Any, synced: bool = False) -> None:
        """Choose the probe, sample its completions from the base policy and cache
        the base distribution. ``synced=True`` (sharded models) keeps every rank
        generating in lockstep (``generate(synced_gpus=True)``)."""
        cfg = self.config
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
        if tokenizer is None:
            raise ValueError("KL probe needs the trainer's tokenizer (processing_class); none was given")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("KL probe: the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        prompts = self.select_prompts(tokenizer, dataset)
        device = next(model.parameters()).device
        n = _positions(model)
        if n is not None and n < 2:
            raise ValueError(f"KL probe: the model has {n} position(s); a probe needs at least 2")
        # a long prompt is cut so that its completion keeps half of the positions (or all it asks for)
        keep = None if n is None else min(cfg.kl_probe_max_new_tokens, n // 2)
        max_prompt = cfg.kl_probe_max_prompt_tokens if n is None else min(cfg.kl_probe_max_prompt_tokens, n - keep)
        encoded = []
        for ids in prompts:
            if not ids:
                continue
            if len(ids) > max_prompt:
                warnings.warn(f"rlmonitor: KL probe prompt of {len(ids)} tokens cut to the last {max_prompt}",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
                ids = ids[-max_prompt:]
            encoded.append(ids)
        if not encoded:
            raise ValueError("KL probe: every probe prompt tokenizes to nothing; give longer prompts")
        width = max(len(x) for x in encoded)
        new_tokens = _fit_positions(model, cfg, width)
        prompt_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):  # left padding
            prompt_ids[i, width - len(ids) :] = torch.tensor(ids)
            prompt_mask[i, width - len(ids) :] = 1
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        with torch.random.fork_rng(devices=_rng_devices(model)), _eval_mode(model), self._base_policy(model):
            torch.manual_seed(cfg.seed)
            out = model.generate(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                do_sample=True,
                temperature=cfg.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos,
                synced_gpus=synced,
            ).cpu()
        completion = out[:, width:]
        comp_mask = torch.ones_like(completion)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        for i in range(completion.shape[0]):  # keep tokens up to and including the first eos
            for j, tok in enumerate(completion[i].tolist()):
                if tok in eos_ids:
                    comp_mask[i, j + 1 :] = 0
                    break
        self.input_ids = out
        self.attention_mask = torch.cat([prompt_mask, comp_mask], dim=1)
        # next-token position t predicts token t+1: completion tokens are predicted at width-1 .. end-1
        pred_mask = torch.zeros_like(out, dtype=torch.bool)
        pred_mask[:, width - 1 : -1] = comp_mask.bool()
        self.completion_mask = pred_mask
        if not bool(pred_mask.any()):
            raise ValueError("KL probe: the base policy produced no completion token for any probe prompt")
        self._setup_base(model)

    def _setup_base(self, model: Any) -> None:
        self.use_disabled_adapters = _is_peft(model) and _lora_keeps_base(model)
        if self.use_disabled_adapters:
            self.cache = None
            return
        logq = self._logprobs(model)
        self.cache = self._compress(logq)
        self.prev = None

    def _compress(self, logq: torch.Tensor) -> torch.Tensor | TopKLogProbs:
        cfg = self.config
        dtype = torch.float32 if cfg.kl_cache_dtype == "float32" else torch.bfloat16
        n_tok, vocab = logq.shape
        budget = cfg.kl_cache_max_mb * 2**20
        if n_tok * vocab * dtype.itemsize <= budget:
            return logq.to("cpu", dtype)
        k = int(budget // (n_tok * 12))  # fp32 value + int64 index per kept entry
        if k < cfg.kl_cache_topk_min:
            raise ValueError(
                f"KL probe: {n_tok} probe tokens x vocabulary {vocab} do not fit kl_cache_max_mb="
                f"{cfg.kl_cache_max_mb} even with top-{cfg.kl_cache_topk_min} compression; raise kl_cache_max_mb "
                "or lower kl_probe_size / kl_probe_max_new_tokens"
            )
        warnings.warn(f"rlmonitor: KL base cache compressed to the top-{k} log-probs per token plus tail mass "
                      f"(full cache would need {n_tok * vocab * dtype.itemsize / 2**20:.0f} MiB)",
                      RuntimeWarning, stacklevel=2)
        c = compress_logprobs(logq, k)
        return TopKLogProbs(c.values.cpu(), c.indices.cpu(), c.log_tail.cpu(), c.vocab_size)

    @contextlib.contextmanager
    def _base_policy(self, model: Any):
        """Adapters disabled for plain-LoRA PEFT models (the base policy), else a no-op."""
        if _is_peft(model) and _lora_keeps_base(model):
            with model.disable_adapter():
                yield
        else:
            yield

    @torch.no_grad()
    def _logprobs(self, model: Any) -> torch.Tensor:
        """fp32 log-probs ``(n_completion_tokens, V)`` of ``model`` at the probe positions."""
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=_rng_devices(model)), _eval_mode(model):
            logits = model(
                input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device), use_cache=False
            ).logits
        return logits[self.completion_mask.to(device)].float().log_softmax(dim=-1)

    @property
    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        if isinstance(self.cache, TopKLogProbs):
            return sum(t.numel() * t.element_size() for t in self.cache[:3])
        return self.cache.numel() * self.cache.element_size()

    # -- measuring --------------------------------------------------------
    @torch.no_grad()
    def measure(self, model: Any) -> dict[str, float]:
        if self.input_ids is None:
            raise RuntimeError("KLProbe.measure called before setup")
        logp = self._logprobs(model)
        if self.use_disabled_adapters:
            with model.disable_adapter():
                logq = self._logprobs(model)
            fwd, rev = token_kl(logp, logq), token_kl(logq, logp)
        elif isinstance(self.cache, TopKLogProbs):
            fwd, rev = token_kl_topk(logp, self.cache), token_kl_topk(logp, self.cache, reverse=True)
        else:
            logq = self.cache.to(logp.device, torch.float32)
            fwd, rev = token_kl(logp, logq), token_kl(logq, logp)
        tokens = self.input_ids.to(logp.device)[:, 1:][self.completion_mask[:, :-1].to(logp.device)]
        out = {
            keys.KL_FORWARD: float(fwd.mean()),
            keys.KL_REVERSE: float(rev.mean()),
            keys.KL_FORWARD_MAX: float(fwd.max()),
            keys.KL_LOGPROB_MEAN: float(logp.gather(-1, tokens.unsqueeze(-1)).mean()),
            keys.KL_CACHE_BYTES: float(self.cache_bytes),
        }
        if self.prev is not None:
            out[keys.KL_STEP] = float(token_kl(logp, self.prev.to(logp.device, torch.float32)).mean())
        self.prev = logp.to("cpu", torch.float32 if self.config.kl_cache_dtype == "float32" else torch.bfloat16)
        return out

    # -- persistence --------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "completion_mask": self.completion_mask.to(torch.uint8),
        }
        if isinstance(self.cache, TopKLogProbs):
            tensors.update(top_values=self.cache.values, top_indices=self.cache.indices,
                           log_tail=self.cache.log_tail, vocab_size=torch.tensor([self.cache.vocab_size]))
        elif self.cache is not None:
            tensors["base_logprobs"] = self.cache
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "kl_probe.safetensors"))

    def load(self, folder: str | Path, model: Any) -> bool:
        path = Path(folder) / "kl_probe.safetensors"
        if not path.exists():
            return False
        t = load_file(str(path))
        self.input_ids, self.attention_mask = t["input_ids"], t["attention_mask"]
        self.completion_mask = t["completion_mask"].bool()
        self.use_disabled_adapters = _is_peft(model) and _lora_keeps_base(model)
        if "top_values" in t:
            self.cache = TopKLogProbs(t["top_values"], t["top_indices"], t["log_tail"], int(t["vocab_size"][0]))
        else:
            self.cache = t.get("base_logprobs")
        return True
