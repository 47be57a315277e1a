"""Training script for tests/test_dist_launch.py, launched the way users launch:

    accelerate launch --config_file CFG tests/dist_train.py OUT MODEL [--max-steps N] [--save-steps N]
        [--resume CHECKPOINT] [--collapse] [--tag NAME]

A real ``transformers.Trainer`` on the tiny model with ``GeometryCallback(every_n_steps=2,
k=4)`` and a small KL probe; the engine (DDP, FSDP2, DeepSpeed ZeRO-3) comes from the
accelerate config. Besides the monitor's own records it leaves, for the test to check:

- ``<OUT>/saved-<tag>.pt`` (rank 0): the full monitored weights, gathered independently
  of rlmonitor, at the start and at every measured step ({step: {name: tensor}});
- ``<OUT>/rank-<r>-<tag>.json`` (every rank): world size, the matrices this rank owns,
  the monitor's peak ``held_bytes()``, the bytes of all monitored matrices, the step it
  stopped at and rlmonitor's error count.

Not a test module itself.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

PROMPTS = ("12+7=", "3+45=", "60+6=")


def _gather(params):
    """Full values of possibly sharded parameters, with each engine's own API."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def lora_weights(model) -> dict[str, torch.Tensor]:
    """Effective weights of PEFT LoRA layers: base + PEFT's own ``get_delta_weight``,
    computed while the engine holds the full parameters."""
    from rlmonitor.core.naming import canonical

    out = {}
    for name, m in model.named_modules():
        if not (name.endswith("_proj") and hasattr(m, "lora_A")):
            continue
        params = [m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight]
        with _gather(params):
            out[canonical(name)] = (m.base_layer.weight + m.get_delta_weight("default")).detach().clone()
    return out


def full_weights(model) -> dict[str, torch.Tensor]:
    """Monitored weights (the ``*_proj`` matrices) by canonical name, gathered when sharded
    with each engine's own API (every rank calls this, in the same order)."""
    from rlmonitor.core.naming import canonical

    if hasattr(model, "peft_config"):
        return lora_weights(model)
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith("_proj.weight"):
            continue
        if hasattr(p, "full_tensor"):  # FSDP2 DTensor
            out[canonical(name)] = p.full_tensor().detach().clone()
            continue
        with _gather([p]):
            out[canonical(name)] = p.detach().clone()
    return out


def dataset(tok):
    from datasets import Dataset

    from rlmonitor.toy import make_dataset

    ds = make_dataset(64, seed=0)
    enc = tok([p + a + tok.eos_token for p, a in zip(ds["prompt"], ds["answer"], strict=True)])
    return Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["input_ids"]})


def collator(pad_id: int):
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

    return collate


def callbacks(opts, geometry):
    """The geometry callback, the independent weight saver (after it: the same step's
    weights) and, with ``--collapse``, a collapse detector forced to fire on the loss."""
    from transformers import TrainerCallback

    from rlmonitor.callbacks.collapse import CollapseCallback, CollapseConfig

    saved: dict[int, dict[str, torch.Tensor]] = {}
    peak = {"held": 0}

    class Saver(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            saved[state.global_step] = full_weights(model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if geometry.monitor is not None:
                peak["held"] = max(peak["held"], geometry.monitor.held_bytes())
            if state.global_step % 2 == 0 or state.global_step == state.max_steps:
                saved[state.global_step] = full_weights(model)

    out = [geometry, Saver()]
    if opts.collapse:
        # "KL" ceiling on the training loss (about 4 nats): fires at the 2nd logged step
        cfg = CollapseConfig(enabled_detectors=["kl_blowup"], kl_keys=["loss"], kl_spike_keys=[], kl_ceiling=1e-3,
                             kl_ceiling_mode="absolute", patience=2)
        out.append(CollapseCallback(cfg, stop_on_collapse=True, geometry=geometry))
    return out, saved, peak


def _local_numel(p) -> int:
    """Elements of a parameter this rank holds (its shard under FSDP2 and ZeRO-3)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    return p.numel()


def fsdp_on_cpu() -> bool:
    """accelerate 1.15 turns an FSDP config into FSDP only on GPU-like devices (with
    ``use_cpu`` it silently falls back to DDP). A machine without GPUs can still run
    FSDP2 over gloo: have accelerate take the multi-device path with a CPU device (the
    documented ``ACCELERATE_TORCH_DEVICE``) and the gloo backend. Test scaffolding only."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return False
    from accelerate.state import DistributedType, PartialState

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo", DistributedType.MULTI_GPU)
    return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("model")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--collapse", action="store_true")
    p.add_argument("--tag", default="run")
    p.add_argument("--lora", action="store_true", help="train a PEFT LoRA adapter on every projection")
    opts = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from rlmonitor import GeometryCallback
    from rlmonitor.callbacks.kl import KLProbeConfig

    torch.manual_seed(0)
    out = Path(opts.out)
    # DeepSpeed is not used by accelerate when cpu=True: its CPU accelerator runs it instead
    on_device = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or fsdp_on_cpu()
    tok = AutoTokenizer.from_pretrained(opts.model)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(opts.model)
    if opts.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    args = TrainingArguments(output_dir=str(out), use_cpu=not on_device, max_steps=opts.max_steps,
                             per_device_train_batch_size=4, learning_rate=2e-2 if opts.lora else 1e-3, report_to="none",
                             save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
                             logging_steps=1, remove_unused_columns=False,
                             # gloo on CPU; unset for one process (accelerate 1.15 then expects a process group)
                             ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    geometry = GeometryCallback(every_n_steps=2, k=4, kl=KLProbeConfig(prompts=PROMPTS, kl_probe_max_new_tokens=4))
    cbs, saved, peak = callbacks(opts, geometry)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(tok), data_collator=collator(tok.pad_token_id),
                      processing_class=tok, callbacks=cbs)
    trainer.train(resume_from_checkpoint=opts.resume)
    rank, world = trainer.args.process_index, trainer.args.world_size
    mon = geometry.monitor
    local = [p for name, p in model.named_parameters() if name.endswith("_proj.weight") or
             (name.endswith("_proj.base_layer.weight"))]
    report = {"local_numel": sum(_local_numel(p) for p in local),
              "total_numel": sum(s.numel for s in mon.specs),"rank": rank, "world": world, "mine": [s.name for s in mon.mine], "held_peak": peak["held"],
              "total_bytes": mon.snapshot_bytes(mon.specs), "mine_bytes": mon.snapshot_bytes(mon.mine),
              "estimate_bytes": mon.estimate_bytes(), "sharded": mon.sharded, "step": trainer.state.global_step,
              "errors": geometry.total_errors(), "engine": type(trainer.model_wrapped).__name__}
    (out / f"rank-{rank}-{opts.tag}.json").write_text(json.dumps(report))
    if rank == 0:
        torch.save(saved, out / f"saved-{opts.tag}.pt")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # every group (the monitor's too) torn down in order, as
        dist.destroy_process_group()  # PyTorch asks of a distributed program, not by interpreter-exit teardown


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
