"""GeometryCallback on a real GRPOTrainer (tiny Qwen2 on CPU, W&B offline).

Logged values are checked against recomputations from weights the test saves
itself, with an independent bf16 test (int16 bit patterns).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import digit_reward, undocumented, wandb_history
from transformers import TrainerCallback

from rlmonitor import GeometryCallback
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
REQUIRED = (
    "geometry/update_sparsity",
    *(f"geometry/update_sparsity/{k}" for k in KINDS),
    "geometry/principal_angle_max_deg",
    "geometry/spectral_drift_topk",
    "geometry/principal_overlap_ratio",
    "geometry/low_magnitude_overlap_ratio",
    "geometry/errors",
    "geometry/layers/0/update_sparsity",
    "geometry/layers/1/update_sparsity",
)


def bf16_changed_bits(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Independent reference: bf16 bit patterns differ (+0 and -0 are equal)."""
    a = w0.to(torch.bfloat16).view(torch.int16)
    b = w1.to(torch.bfloat16).view(torch.int16)
    both_zero = ((a & 0x7FFF) == 0) & ((b & 0x7FFF) == 0)
    return (a != b) & ~both_zero


def sparsity_from(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor]) -> float:
    changed = sum(int(bf16_changed_bits(w0[n], w1[n]).sum()) for n in w0)
    return 1.0 - changed / sum(t.numel() for t in w0.values())


def monitored_weights(model) -> dict[str, torch.Tensor]:
    """Effective weights by canonical name (no PEFT or leading `model.` prefix): merged copy for PEFT models."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("_proj.weight"):
            out[name.removeprefix("base_model.model.").removeprefix("model.")[: -len(".weight")]] = p.detach().clone()
    return out


class WeightSaver(TrainerCallback):
    """Saves effective weights at train start and every `every` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.saved[state.global_step] = monitored_weights(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.saved[state.global_step] = monitored_weights(model)


def grpo_args(out, **kw):
    from trl import GRPOConfig

    base = dict(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", max_steps=6,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
        learning_rate=1e-2, save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    base.update(kw)
    return GRPOConfig(**base)


def prompts_dataset(n=64):
    from rlmonitor.toy import make_dataset

    return make_dataset(n, seed=0)


def geometry_rows(out) -> list[dict]:
    return [r for r in read_jsonl(out / "rlmonitor" / "metrics.jsonl") if "geometry/update_sparsity" in r]


def test_grpo_wandb_offline_required_keys_and_sparsity(tiny_model_path, tmp_path, monkeypatch):
    import wandb
    from trl import GRPOTrainer

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    saver = WeightSaver(every=2)
    # per-kind and per-layer scalars reach W&B only when asked for (the default keeps the workspace small)
    cb = GeometryCallback(every_n_steps=2, k=4, plot_every_n_snapshots=2, per_kind_keys=True, per_layer_keys=True)
    trainer = GRPOTrainer(
        model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
        args=grpo_args(tmp_path / "out", report_to="wandb", run_name="geometry-test", learning_rate=3e-4),
        callbacks=[cb, saver],
    )
    trainer.train()
    run_dir = wandb.run.dir
    wandb.finish()
    assert cb.total_errors() == 0

    rows = wandb_history(tmp_path / "wandb")
    geo = {int(r["train/global_step"]): r for r in rows if "geometry/update_sparsity" in r}
    assert sorted(geo) == [2, 4, 6]
    for step, row in geo.items():
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"step {step} lacks {missing}"
        # the logged value equals an independent recomputation from saved weights
        assert row["geometry/update_sparsity"] == pytest.approx(sparsity_from(saver.saved[0], saver.saved[step]),
                                                                abs=1e-12)
        for kind in KINDS:
            w0 = {n: t for n, t in saver.saved[0].items() if n.endswith(f".{kind}_proj")}
            w1 = {n: saver.saved[step][n] for n in w0}
            assert row[f"geometry/update_sparsity/{kind}"] == pytest.approx(sparsity_from(w0, w1), abs=1e-12)
    assert 0.0 < geo[6]["geometry/update_sparsity"] < 1.0, "lr=3e-4 moves some, not all, bf16-visible weights"
    for step in (4, 6):  # stability needs a previous profile
        assert -1.0 <= geo[step]["geometry/row_profile_stability"] <= 1.0
    # KL-vs-step reached W&B at 0, 2, 4, 6 and grows from exactly 0
    kl = {int(r["train/global_step"]): r for r in rows if "kl/base_forward" in r}
    assert sorted(kl) == [0, 2, 4, 6]
    assert kl[0]["kl/base_forward"] == 0.0 and kl[0]["kl/base_reverse"] == 0.0
    assert kl[6]["kl/base_forward"] > 0.0
    assert geo[4]["kl/weight_step_ratio"] > 0  # Gate I ratio rides with the geometry record
    # dashboard images reached the run, and the local copies exist
    assert any(k.startswith("geometry/plots/") for r in rows for k in r)
    plots = tmp_path / "out" / "rlmonitor" / "plots"
    assert {"layer_sparsity.png", "principal_angles.png"} <= {p.name for p in plots.iterdir()}
    assert run_dir  # the Trainer owned the run: our callback never called wandb.init
    # every key that reached W&B is documented in the README's metric-key table
    assert undocumented({k.split(".")[0] for r in rows for k in r}) == []  # media: "key._type" etc.


@pytest.mark.parametrize("init", [True, "pissa"], ids=["lora", "pissa"])
def test_peft_effective_weights_match_merged_copies(tiny_model_path, tmp_path, init):
    from peft import LoraConfig
    from trl import GRPOTrainer

    saver = WeightSaver(every=2)
    cb = GeometryCallback(every_n_steps=2, k=4)
    peft_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    trainer = GRPOTrainer(
        model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
        args=grpo_args(tmp_path, max_steps=4, learning_rate=5e-2), peft_config=peft_config, callbacks=[cb, saver],
    )
    trainer.train()
    assert cb.total_errors() == 0
    rows = {r["step"]: r for r in geometry_rows(tmp_path)}
    assert sorted(rows) == [2, 4]
    for step in (2, 4):
        expect = sparsity_from(saver.saved[0], saver.saved[step])
        assert rows[step]["geometry/update_sparsity"] == pytest.approx(expect, abs=1e-12)
    assert rows[4]["geometry/update_sparsity"] < 1.0
    # the KL probe uses adapters-disabled for plain LoRA, a cache for PiSSA (whose base is a residual)
    assert cb.probe.use_disabled_adapters is (init is True)


def test_resume_keeps_the_original_base(tiny_model_path, tmp_path):
    from trl import GRPOTrainer

    saver = WeightSaver(every=2)
    args = grpo_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first = GRPOTrainer(model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
                        args=args, callbacks=[GeometryCallback(every_n_steps=2, k=4), saver])
    first.train()
    step0 = saver.saved[0]

    saver2 = WeightSaver(every=2)
    cb2 = GeometryCallback(every_n_steps=2, k=4)
    second = GRPOTrainer(model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
                         args=grpo_args(tmp_path, max_steps=6, save_strategy="no"), callbacks=[cb2, saver2])
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    resumed_start = saver2.saved[4]
    rows = {r["step"]: r for r in geometry_rows(tmp_path)}
    assert 6 in rows and "geometry/base_is_resumed" not in rows[6]
    vs_true_base = sparsity_from(step0, saver2.saved[6])
    vs_resumed = sparsity_from(resumed_start, saver2.saved[6])
    assert vs_true_base != vs_resumed  # the test can tell the two bases apart
    assert rows[6]["geometry/update_sparsity"] == pytest.approx(vs_true_base, abs=1e-12)
    for name, w in step0.items():
        assert torch.equal(cb2.analyzer.base[name].weight, w)


def test_metric_failure_does_not_stop_training(tiny_model_path, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    import rlmonitor.core.spectral as spectral

    def broken(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(spectral, "change", broken)  # the engine's spectral step
    cb = GeometryCallback(every_n_steps=2, k=4)
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
                          args=grpo_args(tmp_path, max_steps=4), callbacks=[cb])
    with pytest.warns(RuntimeWarning, match="injected failure"):
        trainer.train()
    assert trainer.state.global_step == 4
    rows = geometry_rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[-1]["geometry/errors"] > 0
    assert "geometry/principal_angle_max_deg" not in rows[-1]
    assert 0.0 <= rows[-1]["geometry/update_sparsity"] <= 1.0  # the other metrics still ran


def test_gradient_accumulation_uneven_max_steps_and_num_iterations(tiny_model_path, tmp_path):
    from trl import GRPOTrainer

    cb = GeometryCallback(every_n_steps=2, k=4, kl=False)
    trainer = GRPOTrainer(
        model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
        args=grpo_args(tmp_path, max_steps=5, gradient_accumulation_steps=2, num_iterations=2), callbacks=[cb],
    )
    trainer.train()
    assert [r["step"] for r in geometry_rows(tmp_path)] == [2, 4, 5]  # the last step is always measured
    assert cb.probe is None


def test_memory_budget_error_before_any_step(tiny_model_path, tmp_path):
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
                          args=grpo_args(tmp_path), callbacks=[GeometryCallback(max_snapshot_memory_gb=1e-6)])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="max_snapshot_memory_gb"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_sft_trainer(tiny_model_path, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlmonitor.toy import make_dataset

    ds = make_dataset(64, seed=1)
    ds = Dataset.from_dict({"prompt": ds["prompt"], "completion": ds["answer"]})
    cb = GeometryCallback(every_n_steps=2, k=4)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=4,
                     per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no", logging_steps=1)
    SFTTrainer(model=tiny_model_path, train_dataset=ds, args=args, callbacks=[cb]).train()
    rows = geometry_rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    assert math.isfinite(rows[-1]["geometry/principal_angle_max_deg"])
    kl = [r for r in read_jsonl(tmp_path / "rlmonitor" / "metrics.jsonl") if "kl/base_forward" in r]
    assert kl[0]["kl/base_forward"] == 0.0 and kl[-1]["kl/base_forward"] > 0.0


def test_rotating_layer_subsets(tiny_model_path, tmp_path):
    from trl import GRPOTrainer

    saver = WeightSaver(every=2)
    cb = GeometryCallback(every_n_steps=2, k=4, layers_per_snapshot=1, kl=False)
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=[digit_reward], train_dataset=prompts_dataset(),
                          args=grpo_args(tmp_path, learning_rate=3e-4), callbacks=[cb, saver])
    trainer.train()
    rows = {r["step"]: r for r in geometry_rows(tmp_path)}
    assert sorted(rows) == [2, 4, 6]
    assert rows[2]["geometry/rotation_staleness_steps"] == 0.0  # only layer 0 measured so far
    assert "geometry/layers/1/update_sparsity" not in rows[2]
    assert rows[6]["geometry/rotation_staleness_steps"] == 2.0  # layer 1 last measured at step 4

    def layer(step: int, i: int) -> dict[str, dict[str, torch.Tensor]]:
        names = [n for n in saver.saved[0] if n.startswith(f"layers.{i}.")]
        return {n: saver.saved[0][n] for n in names}, {n: saver.saved[step][n] for n in names}

    # step 6 aggregates layer 0 measured at 6 and layer 1 measured at 4
    (b0, w0), (b1, w1) = layer(6, 0), layer(4, 1)
    assert rows[6]["geometry/update_sparsity"] == pytest.approx(sparsity_from({**b0, **b1}, {**w0, **w1}), abs=1e-12)
    assert rows[4]["geometry/layers/1/update_sparsity"] == pytest.approx(sparsity_from(b1, w1), abs=1e-12)
