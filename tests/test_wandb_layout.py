"""What reaches W&B by default on a 24-layer model, read back from real offline runs.

One default GRPO run (GeometryCallback + CollapseCallback, tiny 24-layer Qwen2) and one
plain-Trainer run with per_kind_keys / per_layer_keys on; both are read with
``wandb leet inspect`` (tests/conftest.py). The workspace built by ``rlmonitor
workspace`` is checked against the keys those runs really logged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import digit_reward, wandb_history, wandb_summary

from rlmonitor.core import keys
from rlmonitor.core.naming import parse_name
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow

LAYERS = 24
MAX_KEYS = 40
OURS = ("geometry/", "kl/", "collapse/")  # prefixes of rlmonitor's W&B keys (test-side only)


def _tiny24():
    from rlmonitor.toy import TinyModelConfig, build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    cfg = TinyModelConfig(hidden_size=32, num_layers=LAYERS, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return build_tiny_model(tok, cfg), tok


def _finish(out: Path, cb) -> SimpleNamespace:
    import wandb

    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    wandb.teardown()
    rows = wandb_history(run_dir)
    logged = {k.split(".")[0] for r in rows for k in r if k.startswith(OURS)}
    return SimpleNamespace(rows=rows, logged=logged, summary=wandb_summary(run_dir), files=run_dir / "files",
                           records=read_jsonl(out / "rlmonitor" / "metrics.jsonl"), plots=out / "rlmonitor" / "plots",
                           cb=cb)  # fmt: skip


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """GRPO, default key layout, KL probe and CollapseCallback on, W&B offline."""
    from trl import GRPOConfig, GRPOTrainer

    from rlmonitor import GeometryCallback
    from rlmonitor.callbacks.collapse import CollapseCallback
    from rlmonitor.toy import make_dataset

    folder = tmp_path_factory.mktemp("wandb-default")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DIR", str(folder))
        mp.setenv("WANDB_MODE", "offline")
        model, tok = _tiny24()
        # default key layout; a small KL probe only to keep the test fast (same keys)
        geo = GeometryCallback(every_n_steps=2, k=4, kl={"kl_probe_size": 2, "kl_probe_max_new_tokens": 8})
        args = GRPOConfig(output_dir=str(folder / "out"), use_cpu=True, bf16=False, report_to="wandb", max_steps=4,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
                          learning_rate=3e-3, save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                          run_name="layout-default")  # fmt: skip
        GRPOTrainer(model=model, processing_class=tok, reward_funcs=[digit_reward], args=args,
                    train_dataset=make_dataset(64, seed=0),
                    callbacks=[geo, CollapseCallback(geometry=geo)]).train()  # fmt: skip
        return _finish(folder / "out", geo)


@pytest.fixture(scope="module")
def opt_in_run(tmp_path_factory):
    """A plain Trainer (causal-LM loss) with per-kind and per-layer scalars opted in."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from rlmonitor import GeometryCallback

    folder = tmp_path_factory.mktemp("wandb-opt-in")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DIR", str(folder))
        mp.setenv("WANDB_MODE", "offline")
        model, _ = _tiny24()
        ids = torch.randint(4, model.config.vocab_size, (16, 12), generator=torch.Generator().manual_seed(0))
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
        geo = GeometryCallback(every_n_steps=2, k=4, kl=False, per_kind_keys=True, per_layer_keys=True)
        args = TrainingArguments(output_dir=str(folder / "out"), use_cpu=True, report_to="wandb", max_steps=2,
                                 per_device_train_batch_size=8, learning_rate=1e-3, save_strategy="no",
                                 logging_steps=1, disable_tqdm=True, run_name="layout-opt-in")  # fmt: skip
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[geo]).train()
        return _finish(folder / "out", geo)


def _geometry_record(run, step: int) -> dict:
    return next(r for r in run.records if r["step"] == step and keys.UPDATE_SPARSITY in r)


def _table(run, key: str) -> dict:
    path = run.summary[f"{key}.path"]
    return json.loads((run.files / path).read_text())


def test_default_run_logs_at_most_40_keys_in_reading_order(default_run):
    run = default_run
    assert run.cb.total_errors() == 0
    assert len(run.logged) <= MAX_KEYS, sorted(run.logged)
    sections = {keys.lookup(k).section for k in run.logged}
    assert sections <= {"headline", "kl", "collapse", "plots", "system"}, sections
    # the headline, KL and collapse keys are all there, and the media that carry the detail
    for key in (keys.UPDATE_SPARSITY, keys.ANGLE_MAX, keys.ANGLE_MAX_LEFT, keys.DRIFT_TOPK, keys.PRINCIPAL_OVERLAP,
                keys.LOW_OVERLAP, keys.KL_FORWARD, keys.COLLAPSE_DETECTED, keys.PLOT_LAYER_SPARSITY,
                keys.PLOT_LAYER_ANGLES, keys.PLOT_LAYER_KIND, keys.PLOT_ANGLES, keys.PLOT_LAYER_TABLE,
                keys.PLOT_KIND_TABLE, keys.PLOT_UPDATE_RATIOS(i=LAYERS // 2)):  # fmt: skip
        assert key in run.logged, key
    # metrics.jsonl still has every per-layer and per-kind scalar
    last = _geometry_record(run, 4)
    assert all(keys.UPDATE_SPARSITY_LAYER(i=i) in last for i in range(LAYERS))
    assert keys.ANGLE_MAX_KIND(kind="down") in last
    # every key plots against train/global_step
    assert all("train/global_step" in r for r in run.rows if any(k.startswith(OURS) for k in r))
    assert {f.name for f in run.plots.iterdir()} >= {"layer_sparsity.png", "layer_angles.png", "layer_kind.png",
                                                       "principal_angles.png", f"update_ratios_L{LAYERS // 2}.png"}


def test_diagnostics_reach_the_run_summary_not_the_history(default_run):
    run = default_run
    diag = {k for r in run.records for k in r if (key := keys.lookup(k)) is not None and key.section == "diagnostics"}
    assert {keys.ANGLE_MAX_LAYER, keys.SNAPSHOT_BYTES, keys.KL_CACHE_BYTES} <= diag
    assert not diag & run.logged
    for name in diag:
        values = [r[name] for r in run.records if name in r]
        expect = max(values) if keys.lookup(name).summary == "max" else values[-1]
        assert run.summary[name] == expect, name
    # declared summaries: the max principal angle's run summary is its max over the history
    history = [r[keys.ANGLE_MAX] for r in run.rows if keys.ANGLE_MAX in r]
    assert run.summary[keys.ANGLE_MAX] == {"max": max(history)}


def test_tables_carry_the_per_layer_and_per_kind_values(default_run):
    run = default_run
    last = _geometry_record(run, 4)
    layer_table = _table(run, keys.PLOT_LAYER_TABLE)
    assert layer_table["columns"] == ["layer", "update_sparsity", "rel_frobenius", "principal_angle_max_deg",
                                      "spectral_drift_topk"]  # fmt: skip
    assert [row[0] for row in layer_table["data"]] == list(range(LAYERS))
    per_layer = {"update_sparsity": keys.UPDATE_SPARSITY_LAYER, "rel_frobenius": keys.REL_FROBENIUS_LAYER,
                 "principal_angle_max_deg": keys.ANGLE_MAX_LAYER_I, "spectral_drift_topk": keys.DRIFT_TOPK_LAYER}  # fmt: skip
    for row in layer_table["data"]:
        for col, value in zip(layer_table["columns"][1:], row[1:], strict=True):
            assert value == last[per_layer[col](i=row[0])], (row[0], col)
    kind_table = _table(run, keys.PLOT_KIND_TABLE)
    assert [row[0] for row in kind_table["data"]] == ["q", "k", "v", "o", "gate", "up", "down"]
    for row in kind_table["data"]:
        assert row[1] == last[keys.UPDATE_SPARSITY_KIND(kind=row[0])]
        assert row[3] == last[keys.ANGLE_MAX_KIND(kind=row[0])]


def test_angle_curves_show_the_matrix_that_sets_the_max(default_run):
    run = default_run
    last = _geometry_record(run, 4)
    name = last["principal_angle_max_matrix"]
    parsed = parse_name(name)
    curves = _table(run, keys.PLOT_ANGLE_CURVES_TABLE)
    label = f"L{parsed.layer}.{parsed.kind} (max)"
    mine = [row[2] for row in curves["data"] if row[1] == label]
    assert mine, (label, {row[1] for row in curves["data"]})
    history = next(r for r in run.rows if keys.ANGLE_MAX in r and r["train/global_step"] == 4)
    assert max(mine) == history[keys.ANGLE_MAX] == last[keys.ANGLE_MAX]
    # the other curves are the heat-map layer's
    others = {row[1] for row in curves["data"]} - {label}
    assert others and all(o.startswith(f"L{LAYERS // 2}.") for o in others)


def test_opt_in_adds_the_per_layer_and_per_kind_scalars(opt_in_run):
    run = opt_in_run
    assert run.cb.total_errors() == 0
    for metric in (keys.UPDATE_SPARSITY_LAYER, keys.REL_FROBENIUS_LAYER, keys.ANGLE_MAX_LAYER_I,
                   keys.DRIFT_TOPK_LAYER):  # fmt: skip
        assert {metric(i=i) for i in range(LAYERS)} <= run.logged
    assert {keys.UPDATE_SPARSITY_KIND(kind=k) for k in ("q", "k", "v", "o", "gate", "up", "down")} <= run.logged
    assert len(run.logged) > MAX_KEYS + 4 * LAYERS
    # a per-layer max gets its max summary (define_metric on first sight)
    history = [r[keys.ANGLE_MAX_LAYER_I(i=3)] for r in run.rows if keys.ANGLE_MAX_LAYER_I(i=3) in r]
    assert run.summary[keys.ANGLE_MAX_LAYER_I(i=3)] == {"max": max(history)}


def test_workspace_panels_read_only_keys_the_runs_log(default_run, opt_in_run):
    pytest.importorskip("wandb_workspaces")
    from rlmonitor.apps.workspace import SECTION_TITLES, build_workspace, panel_references

    logged = default_run.logged | opt_in_run.logged
    refs = panel_references(build_workspace("me", "proj", heatmap_layers=(LAYERS // 2,)))
    assert [name for name, _, _ in refs] == list(SECTION_TITLES.values())
    by_title = {title: section for section, title in SECTION_TITLES.items()}
    for title, exact, regexes in refs:
        section = by_title[title]
        assert exact or regexes, title
        for key in exact:
            assert key in logged, (title, key)
            assert keys.lookup(key) is not None and keys.lookup(key).section == section, (title, key)
        for rx in regexes:
            matched = {k for k in logged if re.search(rx, k)}
            assert matched, (title, rx)
            assert {keys.lookup(k).section for k in matched} == {section}, (title, rx)
