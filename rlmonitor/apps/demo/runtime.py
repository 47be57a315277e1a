"""The process settings of a demo run: environment variables, torch's CPU threads, quiet
libraries and a one-line progress bar per fine-tune (each restored afterwards)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

from .verdict import num

__all__ = ["environ", "progress_callback", "quiet_libraries", "torch_threads"]


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (or, with None, leave alone) environment variables; restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op CPU threads set to ``n`` (0: left alone), restored afterwards."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide library chatter that buries the demo's own output (deprecation warnings,
    weight-loading bars, per-step log dicts); keep the training progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    try:
        import datasets

        ds_bars = datasets.is_progress_bar_enabled()
    except Exception:  # pragma: no cover - datasets is a dependency
        datasets, ds_bars = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*max_length.*")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if datasets is not None:
            datasets.disable_progress_bars()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            if datasets is not None and ds_bars:
                datasets.enable_progress_bars()


def progress_callback(desc: str):
    """The Trainer's tqdm bar with a description and the latest reward/loss as postfix,
    instead of one printed dict per logging step."""
    from transformers.trainer_callback import ProgressCallback

    class DemoProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(desc)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is None or not logs:
                return
            post = {k: f"{logs[k]:.3f}" for k in ("reward", "loss") if num(logs.get(k)) is not None}
            if post:
                self.training_bar.set_postfix(post, refresh=False)

        def close(self) -> None:
            if self.training_bar is not None:
                self.training_bar.close()
                self.training_bar = None

    return DemoProgress()
