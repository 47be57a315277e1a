"""The toy base model: built, pretrained and cached once per configuration.

:func:`build_base_model` saves tokenizer + model with ``save_pretrained`` into a folder
that ``AutoModelForCausalLM.from_pretrained`` and TRL trainers accept as a path; the
folder is named after a hash of everything that determines the model
(:func:`config_hash`, which includes :data:`TOY_VERSION`), so a rerun with the same
configuration reuses it and a changed recipe builds a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlmonitor.core.fields import Check, help_field

from .model import TinyModelConfig, build_tiny_model
from .task import ArithmeticTaskConfig
from .tokenizer import build_tokenizer
from .training import pretrain

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

__all__ = [
    "INFO_FILE",
    "TOY_VERSION",
    "PretrainConfig",
    "build_base_model",
    "config_hash",
    "default_cache_dir",
    "load_base_model",
    "read_base_info",
]

#: Bump when the tokenizer, the task text format or the pretraining recipe changes in a
#: way that makes previously cached base models stale (it is part of :func:`config_hash`).
TOY_VERSION = 2

#: Name of the json written next to the weights by :func:`build_base_model`.
INFO_FILE = "rlmonitor_toy.json"


@dataclass
class PretrainConfig:
    """Hyper-parameters of :func:`pretrain` as used by :func:`build_base_model`."""

    steps: int = help_field("Maximum optimizer steps (0: save the random initialisation).", default=2000)
    lr: float = help_field("Peak AdamW learning rate.", default=3e-3)
    batch_size: int = help_field("Problems per step.", default=128)
    seed: int = help_field("Seed of the training problems.", default=0)
    target_accuracy: float | None = help_field(
        "Stop once greedy accuracy reaches this (leaves room for RL); None: run all steps.", default=0.6)

    def __post_init__(self) -> None:
        check = Check(self)
        check.integer("steps", 0)
        check.number("lr", 0.0, lo_open=True)
        check.integer("batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise check.fail("seed", "use an integer")
        check.number("target_accuracy", 0.0, 1.0, lo_open=True, optional=True, fix="use a fraction in (0, 1], or None")


def default_cache_dir() -> Path:
    """``$RLMONITOR_CACHE`` if set, else ``~/.cache/rlmonitor``."""
    env = os.environ.get("RLMONITOR_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/rlmonitor").expanduser()


def _spec(
    model_config: TinyModelConfig, task_config: ArithmeticTaskConfig, pretrain_config: PretrainConfig
) -> dict[str, Any]:
    return {
        "toy_version": TOY_VERSION,
        "model_config": dataclasses.asdict(model_config),
        "task_config": {**dataclasses.asdict(task_config), "ops": list(task_config.ops)},
        "pretrain": dataclasses.asdict(pretrain_config),
    }


def config_hash(
    model_config: TinyModelConfig | None = None,
    task_config: ArithmeticTaskConfig | None = None,
    pretrain_config: PretrainConfig | None = None,
) -> str:
    """Short stable hash of everything that determines a base model."""
    spec = _spec(
        model_config or TinyModelConfig(),
        task_config or ArithmeticTaskConfig(),
        pretrain_config or PretrainConfig(),
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def read_base_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The json written by :func:`build_base_model` into ``path``, or ``None``."""
    info = Path(path) / INFO_FILE
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return None


def build_base_model(
    path: str | os.PathLike[str] | None = None,
    *,
    model_config: TinyModelConfig | None = None,
    task_config: ArithmeticTaskConfig | None = None,
    pretrain_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    pretrain_config: PretrainConfig | None = None,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """Build, pretrain and save the toy base model; reuse it when already built.

    Writes ``save_pretrained`` files for the model (``config.json``,
    ``generation_config.json``, ``model.safetensors``) and the tokenizer into ``path``,
    plus ``rlmonitor_toy.json`` with the configs, their hash and the measured pretraining
    stats. If ``path`` already holds a base with the same hash it is returned as is
    (unless ``force``).

    Args:
        path: target directory; default ``default_cache_dir() / "toy-base-<hash>"``.
        model_config, task_config: defaults to :class:`TinyModelConfig` /
            :class:`ArithmeticTaskConfig`.
        pretrain_steps, lr, batch_size, seed: override the corresponding fields of
            ``pretrain_config`` (default :class:`PretrainConfig`); ``pretrain_steps=0``
            saves the random initialisation (fast, for tests).
        pretrain_config: full pretraining recipe, e.g.
            ``PretrainConfig(target_accuracy=None)`` to train for all ``steps``.
        progress: show a progress bar while pretraining.
        force: rebuild even if a matching base exists.

    Returns:
        The directory, usable as ``from_pretrained(path)`` or ``GRPOTrainer(model=str(path))``.
    """
    model_config = model_config or TinyModelConfig()
    task_config = task_config or ArithmeticTaskConfig()
    overrides = {"steps": pretrain_steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    pretrain_config = dataclasses.replace(
        pretrain_config or PretrainConfig(), **{k: v for k, v in overrides.items() if v is not None}
    )
    spec = _spec(model_config, task_config, pretrain_config)
    digest = config_hash(model_config, task_config, pretrain_config)
    path = Path(path) if path is not None else default_cache_dir() / f"toy-base-{digest}"

    info = read_base_info(path)
    if not force and info is not None and info.get("hash") == digest and (path / "config.json").is_file():
        return path

    tokenizer = build_tokenizer(model_max_length=model_config.max_position_embeddings)
    model = build_tiny_model(tokenizer, model_config)
    stats = pretrain(
        model,
        tokenizer,
        steps=pretrain_config.steps,
        lr=pretrain_config.lr,
        batch_size=pretrain_config.batch_size,
        seed=pretrain_config.seed,
        task_config=task_config,
        target_accuracy=pretrain_config.target_accuracy,
        progress=progress,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / INFO_FILE).unlink(missing_ok=True)  # the json marks a complete build: write it last
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()}
    info = {"hash": digest, **spec, "stats": clean, "num_parameters": n_params}
    tmp = path / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    tmp.replace(path / INFO_FILE)
    return path


def load_base_model(path: str | os.PathLike[str]) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` loaded from a directory written by :func:`build_base_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
