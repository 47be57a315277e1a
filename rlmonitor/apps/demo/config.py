"""What determines a demo run (:class:`DemoConfig`), its fixed recipe, and how ``--wandb auto``
resolves to online / offline / off."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from rlmonitor.core.fields import Check, help_field

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "METHODS",
    "DemoConfig",
    "resolve_wandb_mode",
    "wandb_has_credentials",
]

#: Optimizer steps per fine-tune. The whole demo (both fine-tunes, 1 torch thread) took 35-55 s
#: on a 2-vCPU machine shared with other jobs, the one-time base pretraining included.
DEFAULT_STEPS = 200
#: Learning rate of both fine-tunes (AdamW, constant schedule). The same value for both
#: methods keeps the comparison about the objective; --rl-lr / --sft-lr change it.
DEFAULT_LR = 3e-5
#: GRPO: completions per step and per prompt (8 prompts x 8 samples).
RL_BATCH, RL_GENERATIONS = 64, 8
#: SFT: problems per step.
SFT_BATCH = 32
#: Fine-tuning problems, held-out evaluation problems, KL-probe prompts.
TRAIN_SIZE, EVAL_SIZE, PROBE_SIZE = 2048, 500, 32

#: method -> (sub-folder of --out, W&B run name, display name)
METHODS: dict[str, tuple[str, str, str]] = {
    "rlvr": ("rl", "rlvr", "RLVR (GRPO)"),
    "sft": ("sft", "sft", "SFT"),
}


@dataclass
class DemoConfig:
    """Everything that determines a demo run (recorded in ``summary.json``)."""

    out: str = help_field("Output directory (a previous demo's rl/ and sft/ in it are replaced).",
                          default="rlmonitor-demo")
    steps: int = help_field(f"Optimizer steps per fine-tune (default {DEFAULT_STEPS}).", default=DEFAULT_STEPS)
    seed: int = help_field("Seed of the fine-tunes and of their problems; the cached base does not depend on it.",
                           default=0)
    sft: bool = help_field("Also run the SFT fine-tune (False: RLVR only).", default=True)
    device: Literal["auto", "cpu", "cuda"] = help_field("auto: CUDA when available, else CPU.", default="auto")
    pretrain_steps: int | None = help_field(
        "Maximum pretraining steps of the base model (default: the toy recipe's; it stops early at 60% accuracy); "
        "another value builds and caches another base.", default=None)
    wandb: Literal["auto", "online", "offline", "off"] = help_field(
        "auto: online if W&B credentials are configured, else offline.", default="auto")
    rl_lr: float = help_field(f"GRPO learning rate (default {DEFAULT_LR:g}).", default=DEFAULT_LR)
    sft_lr: float = help_field(f"SFT learning rate (default {DEFAULT_LR:g}, the same as RL's).", default=DEFAULT_LR)
    geometry_every: int | None = help_field("GeometryCallback interval in steps (default: steps/10).", default=None)
    threads: int = help_field(
        "Torch CPU threads while the demo runs on the CPU; 0 leaves torch's default (one per core). With 1, "
        "the default, the demo stayed under a minute on a 2-core machine shared with other jobs, where one "
        "thread per core took 1.5 to 5 minutes (busy threads then wait for each other).", default=1)

    def __post_init__(self) -> None:
        check = Check(self)
        check.integer("steps")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise check.fail("seed", "use an integer")
        check.boolean("sft")
        check.choice("device", ("auto", "cpu", "cuda"))
        check.integer("pretrain_steps", 0, optional=True)
        check.choice("wandb", ("auto", "online", "offline", "off"))
        check.number("rl_lr", 0.0, lo_open=True)
        check.number("sft_lr", 0.0, lo_open=True)
        check.integer("geometry_every", optional=True)
        check.integer("threads", 0)
        if not isinstance(self.out, str) or not self.out.strip():
            raise check.fail("out", "give an output directory")

    @property
    def every(self) -> int:
        """Geometry/KL interval: about 10 measurements per fine-tune by default."""
        return self.geometry_every or max(1, self.steps // 10)


def wandb_has_credentials() -> bool:
    """Whether a W&B API key is configured (``WANDB_API_KEY``, this process's session,
    or the netrc file), checked locally: no network call, no prompt."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.sdk.lib import wbauth

        if wbauth.session_credentials(host=host) is not None:
            return True
        return bool(wbauth.read_netrc_auth(host=host))
    except Exception:  # another wandb layout, or a malformed key: read the netrc file ourselves
        import netrc
        from urllib.parse import urlsplit

        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        try:
            return bool(netrc.netrc(path).authenticators(urlsplit(host).netloc))
        except Exception:
            return False


def resolve_wandb_mode(requested: str) -> str:
    """``online`` / ``offline`` / ``off`` for ``--wandb``. ``auto`` honours an explicit
    ``WANDB_MODE=offline|disabled`` and otherwise goes online only with credentials."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "off"):
        return "off"
    if env in ("offline", "dryrun"):
        return "offline"
    return "online" if wandb_has_credentials() else "offline"
