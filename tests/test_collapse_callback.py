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
import warnings

import pytest
from conftest import digit_reward

from rlmonitor.callbacks.collapse import STATE_FILE, CollapseCallback
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


# ------------------------------------------------------------------------------- robustness


def grpo(model_path, out, cb, *, lr: float = 5e-2, max_steps: int = 12, **kw):
    from trl import GRPOConfig, GRPOTrainer

    from rlmonitor.toy import make_dataset

    args = GRPOConfig(**{**dict(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", max_steps=max_steps,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
        learning_rate=lr, save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    ), **kw})  # fmt: skip
    return GRPOTrainer(model=model_path, reward_funcs=[digit_reward], train_dataset=make_dataset(64, seed=0),
                       args=args, callbacks=[cb])  # fmt: skip


@pytest.mark.parametrize("bad", ["../elsewhere", "a/../../b", "/tmp/abs", "", "..", 7])
def test_output_subdir_must_stay_inside_output_dir(bad):
    with pytest.raises(ValueError, match=r"^CollapseCallback\.output_subdir=.* is invalid: use a plain relative"):
        CollapseCallback(output_subdir=bad)
    assert CollapseCallback(output_subdir="runs/rlmonitor").output_subdir == "runs/rlmonitor"


@pytest.mark.parametrize("blocker", ["file_in_the_way", "read_only_folder"])
def test_unwritable_rlmonitor_folder_does_not_stop_training(tiny_model_path, tmp_path, monkeypatch, blocker):
    """The local folder cannot be written: training runs to the end (and collapse is still
    detected and stops it), the failure is warned about once and counted, and the records
    still reach W&B."""
    import os

    import wandb
    from conftest import wandb_history

    out = tmp_path / "out"
    out.mkdir()
    if blocker == "file_in_the_way":
        (out / "rlmonitor").write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions")
        (out / "rlmonitor").mkdir(mode=0o500)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cb = CollapseCallback(CollapseConfig(**FAST), stop_on_collapse=True)
    trainer = grpo(tiny_model_path, out, cb, max_steps=30, report_to="wandb", run_name="unwritable")
    with pytest.warns(RuntimeWarning) as record:
        trainer.train()
    wandb.finish()
    messages = [str(w.message) for w in record]
    failures = [m for m in messages if "writing local records" in m]
    assert len(failures) == 1 and "training continues" in failures[0], messages
    assert any("collapse detected" in m for m in messages)
    assert cb.errors == 1 and cb.local is None
    step = trainer.state.global_step
    assert 0 < step < 30 and cb.status.detected and cb.status.step == step  # detected, stopped there
    rows = [r for r in wandb_history(tmp_path / "wandb") if "collapse/detected" in r]
    assert [int(r["train/global_step"]) for r in rows][-1] == step
    assert rows[-1]["collapse/detected"] == 1.0 and rows[-1]["collapse/entropy_collapse"] == 1.0


def collapse_rows(path, after: int) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "run_id", "segment")} for r in read_jsonl(path)
            if "collapse/detected" in r and r["step"] > after]  # fmt: skip


def test_resumed_run_keeps_the_detector_state(tiny_model_path, tmp_path):
    """A run resumed from a checkpoint taken during the detectors' warm-up detects at the
    same step as the uninterrupted run; one resumed after the detection stays latched.
    The uninterrupted run saves a checkpoint every 2 steps; each resume starts from a copy
    of one checkpoint in a fresh output folder, and its collapse records must equal the
    uninterrupted run's for every later step (the trainer itself is deterministic here)."""
    import shutil

    config = CollapseConfig(**FAST, ewma_alpha=0.5)
    whole = tmp_path / "whole"
    trainer = grpo(tiny_model_path, whole, CollapseCallback(config), save_strategy="steps", save_steps=2)
    with pytest.warns(RuntimeWarning, match="collapse detected"):
        trainer.train()
    expected_logs = {h["step"]: h for h in trainer.state.log_history if "entropy" in h}
    detected = json.loads((whole / "rlmonitor" / "summary.json").read_text())["collapse_step"]
    warm, late = 4, detected + detected % 2  # checkpoints: in the warm-up's wake, and at/after the detection
    assert FAST["warmup"] < warm < detected <= late < 12, detected
    assert (whole / f"checkpoint-{warm}" / STATE_FILE).is_file()

    for resume_at in (warm, late):
        out = tmp_path / f"resumed-{resume_at}"
        shutil.copytree(whole / f"checkpoint-{resume_at}", out / f"checkpoint-{resume_at}")
        cb = CollapseCallback(config)
        resumed = grpo(tiny_model_path, out, cb, save_strategy="steps", save_steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{resume_at}"))
        logs = {h["step"]: h for h in resumed.state.log_history if "entropy" in h}
        assert all(logs[s]["entropy"] == expected_logs[s]["entropy"] for s in logs), "the trainer diverged"
        got = collapse_rows(out / "rlmonitor" / "metrics.jsonl", resume_at)
        assert got == collapse_rows(whole / "rlmonitor" / "metrics.jsonl", resume_at), resume_at
        assert got[-1]["collapse/detected"] == 1.0 and got[-1]["collapse/step"] == detected
        assert cb.status.step == detected and cb.errors == 0
        assert json.loads((out / "rlmonitor" / "summary.json").read_text())["collapse_step"] == detected


def test_resume_without_a_matching_saved_state_warns_and_starts_fresh(tmp_path):
    """The Trainer's own events on a real TrainingArguments / TrainerState: a state saved
    at step 4 is restored; another config, or no file at all, warns and starts fresh."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    saver = CollapseCallback(CollapseConfig(**FAST))
    saver.on_train_begin(args, TrainerState(global_step=0), TrainerControl())
    for step in range(1, 5):
        saver.on_log(args, TrainerState(global_step=step), TrainerControl(), logs={"entropy": 1.0, "loss": 0.5})
    (tmp_path / "checkpoint-4").mkdir()
    saver.on_save(args, TrainerState(global_step=4), TrainerControl())
    assert (tmp_path / "checkpoint-4" / STATE_FILE).is_file()

    same = CollapseCallback(CollapseConfig(**FAST))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean restore warns about nothing
        same.on_train_begin(args, TrainerState(global_step=4), TrainerControl())
    assert same.monitor.state_dict() == saver.monitor.state_dict()
    other = CollapseCallback(CollapseConfig(warmup=4))
    with pytest.warns(RuntimeWarning, match=r"state in .*checkpoint-4.* was not restored .*fresh warm-up"):
        other.on_train_begin(args, TrainerState(global_step=4), TrainerControl())
    assert other.monitor.detectors["entropy"][0].n == 0
    missing = CollapseCallback(CollapseConfig(**FAST))
    with pytest.warns(RuntimeWarning, match="resuming at step 8 without a saved collapse-detector state"):
        missing.on_train_begin(args, TrainerState(global_step=8), TrainerControl())
    assert missing.errors == 0 and missing.monitor.detectors["entropy"][0].n == 0
