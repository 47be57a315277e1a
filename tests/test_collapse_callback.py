"""CollapseCallback on a real GRPOTrainer (tiny random Qwen2 on CPU, no W&B).

At an extreme learning rate (0.05, full fine-tuning) the policy learns within ~5 steps
to emit only digits (the ``digit_reward`` goes 0.1 -> 1.0) and its token entropy falls
from ~4.6 nats to ~0: a mode collapse, which ``entropy_collapse`` must detect and
``stop_on_collapse=True`` must turn into an early stop. At a low learning rate nothing
may fire. Seeds are fixed, so both runs are deterministic.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from conftest import digit_reward

from rlmonitor.callbacks.collapse import CollapseCallback
from rlmonitor.core.collapse import CollapseConfig
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow

# warm-up / patience shortened for test speed (counts of logged steps; defaults 10 / 5)
FAST = dict(warmup=3, patience=2)


def run_grpo(model_path, out, *, lr: float, max_steps: int, stop: bool = True):
    from trl import GRPOConfig, GRPOTrainer

    from rlmonitor.toy import make_dataset

    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", max_steps=max_steps,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
        learning_rate=lr, save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    cb = CollapseCallback(CollapseConfig(**FAST), stop_on_collapse=stop)
    trainer = GRPOTrainer(model=model_path, reward_funcs=[digit_reward], train_dataset=make_dataset(64, seed=0),
                          args=args, callbacks=[cb])  # fmt: skip
    with (
        pytest.warns(RuntimeWarning, match="collapse detected")
        if stop and lr > 1e-2
        else contextlib.nullcontext()
    ):
        trainer.train()
    rows = read_jsonl(out / "rlmonitor" / "metrics.jsonl")
    summary = json.loads((out / "rlmonitor" / "summary.json").read_text())
    return trainer, cb, rows, summary


def test_extreme_lr_collapse_is_detected_and_stops_the_run(tiny_model_path, tmp_path):
    max_steps = 30
    trainer, cb, rows, summary = run_grpo(tiny_model_path, tmp_path / "hot", lr=5e-2, max_steps=max_steps)
    step = trainer.state.global_step
    assert step < max_steps, "the run was not stopped early"

    # what the trainer itself logged: entropy really collapsed, reward went up (reward hacking)
    logs = [h for h in trainer.state.log_history if "entropy" in h]
    assert logs[0]["entropy"] > 3.0 and logs[-1]["entropy"] < 0.1
    assert logs[-1]["reward"] > logs[0]["reward"]

    collapse_rows = [r for r in rows if "collapse/detected" in r]
    assert [r["step"] for r in collapse_rows][-1] == step  # one collapse row per logged step, up to the stop
    fired = [r for r in collapse_rows if r["collapse/detected"] == 1.0]
    assert fired, "collapse/detected never reached 1 in metrics.jsonl"
    first = fired[0]
    assert first["collapse/step"] == first["step"] == summary["collapse_step"]
    assert first["collapse/entropy_collapse"] == 1.0
    assert all(r["collapse/detected"] == 0.0 for r in collapse_rows if r["step"] < first["step"])
    # stopped at the step that detected it (on_log of that step sets should_training_stop)
    assert summary["collapse_step"] == step >= FAST["warmup"] + FAST["patience"]
    assert "entropy_collapse" in summary["collapse_detectors"]
    assert "entropy" in summary["collapse_reason"]
    assert cb.status is not None and cb.status.detected


def test_low_lr_run_is_not_flagged_and_runs_to_the_end(tiny_model_path, tmp_path):
    max_steps = 10
    trainer, cb, rows, summary = run_grpo(tiny_model_path, tmp_path / "cool", lr=1e-4, max_steps=max_steps)
    assert trainer.state.global_step == max_steps
    collapse_rows = [r for r in rows if "collapse/detected" in r]
    assert {r["step"] for r in collapse_rows} == set(range(1, max_steps + 1))  # every logged step was judged
    assert all(r["collapse/detected"] == 0.0 and r["collapse/step"] == -1.0 for r in collapse_rows)
    assert summary["collapse_step"] == -1 and summary["collapse_reason"] == ""
    assert not cb.status.detected
