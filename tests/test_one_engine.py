"""One engine, two front-ends: the live callback and ``rlmonitor compare`` give the same
numbers under the same keys for the same weights (a real tiny GRPO run, then compare on
its saved base and its last checkpoint)."""

from __future__ import annotations

import json

import pytest
from conftest import digit_reward

from rlmonitor.callbacks.geometry import GeometryCallback
from rlmonitor.cli import main as cli_main
from rlmonitor.core import keys
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow


def _grpo(tiny_model_path, out, **cb):
    from trl import GRPOConfig, GRPOTrainer

    from rlmonitor.toy import make_dataset

    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", max_steps=4, per_device_train_batch_size=4,
        num_generations=4, max_completion_length=8, logging_steps=1, learning_rate=1e-2, save_strategy="steps",
        save_steps=4, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    callback = GeometryCallback(kl=False, **cb)
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=make_dataset(64, seed=0),
                          args=args, callbacks=[callback])  # fmt: skip
    trainer.train()
    return callback


def test_callback_and_compare_agree_on_every_shared_scalar(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    callback = _grpo(tiny_model_path, out, every_n_steps=2, k=4)
    assert callback.total_errors() == 0
    live = [r for r in read_jsonl(out / "rlmonitor" / "metrics.jsonl") if keys.UPDATE_SPARSITY in r]
    assert [r["step"] for r in live] == [2, 4]
    last = live[-1]

    # one command: the run's saved base against its newest checkpoint
    rc = cli_main(["compare", str(out), "--k", "4", "--json", str(tmp_path / "c.json"), "--quiet", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "c.json").read_text())
    run = report["runs"][0]
    assert run["name"] == "checkpoint-4"
    scalars = run["scalars"]
    shared = sorted(k for k in scalars if k in last)
    # every headline quantity is shared (same keys, same matrices)
    for key in (keys.UPDATE_SPARSITY, keys.REL_FROBENIUS, keys.ANGLE_MAX, keys.ANGLE_MAX_LEFT, keys.ANGLE_MAX_RIGHT,
                keys.DRIFT_TOPK, keys.PRINCIPAL_OVERLAP, keys.LOW_OVERLAP, keys.PRINCIPAL_NOT_LOW_OVERLAP,
                keys.NONFINITE, keys.UPDATE_SPARSITY_KIND(kind="q"), keys.ANGLE_MAX_KIND(kind="down"),
                keys.UPDATE_SPARSITY_LAYER(i=1)):  # fmt: skip
        assert key in shared, key
    for key in shared:
        assert scalars[key] == pytest.approx(last[key], abs=1e-6), key
    assert 0.0 < scalars[keys.UPDATE_SPARSITY] < 1.0 and scalars[keys.ANGLE_MAX] > 0.0
    # the per-matrix records join on the same canonical names
    live_mats = {m["name"]: m for m in read_jsonl(out / "rlmonitor" / "matrices.jsonl") if m["step"] == 4}
    assert {m["name"] for m in run["matrices"]} == set(live_mats)
    for m in run["matrices"]:
        assert m["changed"] == live_mats[m["name"]]["changed"]


def test_compare_reuses_the_spectra_saved_with_the_base(tiny_model_path, tmp_path, monkeypatch):
    """The live run saved the exact step-0 spectra with its base; compare takes them
    instead of recomputing them (its most expensive step), with the same results."""
    import rlmonitor.core.spectral as spectral
    from rlmonitor.apps.compare import compare_output_dir

    out = tmp_path / "run"
    _grpo(tiny_model_path, out, every_n_steps=4, k=4)
    saved = out / "rlmonitor" / "base" / "spectra.safetensors"
    assert saved.is_file()
    saved.rename(saved.with_suffix(".away"))  # without it compare computes the spectra itself
    fresh = compare_output_dir(str(out), k=4).report["runs"][0]["scalars"]
    saved.with_suffix(".away").rename(saved)

    def no_recompute(*a, **k):
        raise AssertionError("the base spectrum was recomputed")

    monkeypatch.setattr(spectral, "base", no_recompute)
    reused = compare_output_dir(str(out), k=4).report["runs"][0]["scalars"]
    assert reused.keys() == fresh.keys()
    for key, value in fresh.items():
        assert reused[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key  # bounds carry rounding-level noise
