"""Fault injection in real subprocesses: SIGKILL then resume, a re-run into the same
folder, a torn last line; an exception, SIGINT and SIGTERM ending the process with
snapshots still queued; a metric that never returns at interpreter exit.

The training script is :data:`fault_kit.SCRIPT` (a plain ``transformers.Trainer`` on
the tiny model), written to tmp_path. The five processes start together (one fixture)
so their imports overlap; each test then waits for its own.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from fault_kit import (
    GEO,
    KL,
    PROBE,
    SNAP,
    assert_one_history,
    finish,
    lines,
    records,
    start,
    steps_with,
    trainer,
    wandb_rows,
)

from rlmonitor import GeometryCallback
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow

SLOW = 0.4  # seconds per analysis: snapshots queue behind it
HANG_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def procs(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    common = {"max_steps": 20, "slow_s": SLOW, "report_to": "wandb"}
    started = {
        "killed": start(tmp, "killed", tiny_model_path, max_steps=12, save_steps=4, park_at=7),
        "crash": start(tmp, "crash", tiny_model_path, nan_at=3, raise_at=5, **common),
        "sigint": start(tmp, "sigint", tiny_model_path, signal_at=["SIGINT", 5], **common),
        "sigterm": start(tmp, "sigterm", tiny_model_path, signal_at=["SIGTERM", 5], **common),
        "hang": start(tmp, "hang", tiny_model_path, max_steps=20, hang_at=4, raise_at=5, flush_timeout_s=HANG_TIMEOUT),
    }
    yield tmp, started
    for p in started.values():
        if p.poll() is None:
            p.kill()
            p.wait()


# -- 2: one history after SIGKILL + resume, a re-run, a torn line -------------------------------


def _wait_for_step(proc, path, step: int, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and step in steps_with(read_jsonl(path), GEO):
            return
        assert proc.poll() is None, f"the script exited ({proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"no geometry record of step {step} within {timeout} s")


def test_sigkill_resume_rerun_and_torn_tail_keep_one_history(procs, tiny_model_path):
    tmp, started = procs
    out = tmp / "killed"
    rlm = out / "rlmonitor"
    proc = started["killed"]
    _wait_for_step(proc, rlm / "metrics.jsonl", 7)
    proc.send_signal(signal.SIGKILL)
    rc, events, _, _ = finish(proc)
    assert rc == -signal.SIGKILL and [e["event"] for e in events] == ["park"]
    killed = records(out)
    assert steps_with(killed, GEO) == [1, 2, 3, 4, 5, 6, 7]
    first_run = {r["run_id"] for r in killed}
    assert len(first_run) == 1 and {r["segment"] for r in killed} == {0}
    # a crash mid-write leaves a torn last line
    torn = json.dumps({"run_id": next(iter(first_run)), "segment": 0, "step": 8, GEO: 0.5})[:-12]
    with open(rlm / "metrics.jsonl", "a") as f:
        f.write(torn)

    cb = GeometryCallback(every_n_steps=1, k=4, kl=PROBE, plot_every_n_snapshots=0)
    trainer(tiny_model_path, out, [cb], max_steps=9).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    rows = records(out)  # every line parses: the torn one is gone, the next record intact
    assert_one_history(rows)
    assert steps_with(rows, GEO) == list(range(1, 10))
    assert steps_with(rows, KL) == list(range(0, 10))
    assert {r["run_id"] for r in rows} == first_run
    assert all(r["segment"] == (0 if r["step"] <= 4 else 1) for r in rows)
    mats = records(out, "matrices.jsonl")
    assert len({(m["step"], m["name"]) for m in mats}) == len(mats) == 9 * 14
    # the killed segment's records after step 4, and the torn line, are set aside, not deleted
    aside = {p.name: lines(p) for p in (rlm / "set_aside").iterdir()}
    metrics_aside = [x for name, ls in aside.items() if name.startswith("metrics.") for x in ls]
    assert torn + "\n" in metrics_aside
    parsed = [json.loads(x) for x in metrics_aside if x != torn + "\n"]
    assert steps_with(parsed, GEO) == [5, 6, 7] and {r["segment"] for r in parsed} == {0}
    assert [r for r in killed if r["step"] > 4] == parsed
    mats_aside = [json.loads(x) for name, ls in aside.items() if name.startswith("matrices.") for x in ls]
    assert sorted({m["step"] for m in mats_aside}) == [5, 6, 7]
    # readers see the one clean history
    from rlmonitor.apps.demo import final_values, values_at
    from rlmonitor.apps.train import summarize

    assert read_jsonl(rlm / "metrics.jsonl") == rows
    by_step = {r["step"]: r[GEO] for r in rows if GEO in r}
    assert summarize(out)["final_update_sparsity"] == final_values(rows, [GEO])[GEO] == by_step[9]
    assert values_at(read_jsonl(rlm / "metrics.jsonl"), [GEO], 6)[GEO] == by_step[6]

    # a fresh run into the same output_dir: the first run's records are set aside (no 2,4,2,4)
    cb2 = GeometryCallback(every_n_steps=2, k=4, kl=False, plot_every_n_snapshots=0)
    trainer(tiny_model_path, out, [cb2], max_steps=4).train()
    fresh = records(out)
    assert_one_history(fresh)
    assert steps_with(fresh, GEO) == [2, 4] and steps_with(fresh, KL) == []
    assert len({r["run_id"] for r in fresh}) == 1 and {r["run_id"] for r in fresh} != first_run
    assert {r["segment"] for r in fresh} == {0}
    moved = [json.loads(x) for p in (rlm / "set_aside").glob("metrics.*") for x in lines(p) if x != torn + "\n"]
    assert sorted(steps_with([r for r in moved if r["run_id"] in first_run], GEO)) == [
        1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 9]  # fmt: skip
    assert list(out.joinpath("rlmonitor").glob("base.replaced-*")), "the first run's base is kept aside"


# -- 3: exceptions and signals flush finished and queued records --------------------------------


def _event(events: list[dict], name: str) -> dict:
    found = [e for e in events if e["event"] == name]
    assert found, events
    return found[0]


def test_exception_after_nan_weights_flushes_queued_snapshots(procs):
    tmp, started = procs
    rc, events, err, _ = finish(started["crash"])
    assert rc == 1 and "injected crash at step 5" in err
    assert _event(events, "raise")["pending"] >= 1  # snapshots were still queued when it raised
    rows = records(tmp / "crash")
    geo = {r["step"]: r for r in rows if SNAP in r}
    assert sorted(geo) == [1, 2, 3, 4, 5]
    assert steps_with(rows, KL) == [0, 1, 2, 3, 4, 5]
    assert geo[2]["geometry/errors"] == 0 and geo[3]["geometry/errors"] >= 1  # NaN weights are counted
    assert geo[3]["geometry/nonfinite_weights"] >= 1 and geo[5]["geometry/nonfinite_weights"] >= 1
    # the flush at interpreter exit ran before W&B's own exit hook: the run has them too
    assert sorted(wandb_rows(tmp / "crash", SNAP)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("name, code", [("sigint", -signal.SIGINT), ("sigterm", 128 + signal.SIGTERM)])
def test_signal_flushes_queued_snapshots(procs, name, code):
    tmp, started = procs
    rc, events, err, _ = finish(started[name])
    assert rc == code, err[-2000:]
    assert _event(events, "signal")["pending"] >= 1
    rows = records(tmp / name)
    assert steps_with(rows, SNAP) == [1, 2, 3, 4, 5]
    assert steps_with(rows, KL) == [0, 1, 2, 3, 4, 5]
    assert sorted(wandb_rows(tmp / name, SNAP)) == [1, 2, 3, 4, 5]


def test_job_that_never_finishes_does_not_hold_the_process(procs):
    tmp, started = procs
    rc, events, err, _ = finish(started["hang"])
    raised = _event(events, "raise")
    assert rc == 1 and raised["pending"] >= 1
    waited = _event(events, "exit")["time"] - raised["time"]  # the traceback and rlmonitor's exit flush
    assert waited < HANG_TIMEOUT + 4.0, f"the exit waited {waited:.1f} s with flush_timeout_s={HANG_TIMEOUT}"
    assert "abandoned" in err and f"flush_timeout_s={HANG_TIMEOUT}" in err
    assert steps_with(records(tmp / "hang"), SNAP) == [1, 2, 3]  # what finished is kept
