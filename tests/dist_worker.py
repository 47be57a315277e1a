"""Worker for tests/test_distributed.py, launched with torch.distributed.run (2 CPU
processes, gloo). Not a test module itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py {ddp,fsdp2,order} MODEL OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

PROMPTS = ("12+7=", "3+45=", "60+6=")


def full_weights(model) -> dict[str, torch.Tensor]:
    """Monitored weights by canonical name, gathered when sharded (all ranks call this)."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("_proj.weight"):
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("model.")[: -len(".weight")]] = t.detach().clone()
    return out


def batch_for(tok, step: int):
    from rlmonitor.toy import make_dataset

    ds = make_dataset(8, seed=100 + step)
    texts = [p + a + tok.eos_token for p, a in zip(ds["prompt"], ds["answer"], strict=True)]
    enc = tok(texts, return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def run_ddp(model_path: str, out: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from rlmonitor import GeometryCallback
    from rlmonitor.callbacks.kl import KLProbeConfig
    from rlmonitor.toy import make_dataset

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_path)
    ds = make_dataset(64, seed=0)
    enc = tok([p + a + tok.eos_token for p, a in zip(ds["prompt"], ds["answer"], strict=True)])
    train = Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["input_ids"]})

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

    saved: dict[int, dict[str, torch.Tensor]] = {}

    class Saver(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            saved[0] = full_weights(model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % 2 == 0:
                saved[state.global_step] = full_weights(model)

    args = TrainingArguments(output_dir=str(out), use_cpu=True, max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1,
                             ddp_backend="gloo", remove_unused_columns=False)
    cb = GeometryCallback(every_n_steps=2, k=4, kl=KLProbeConfig(prompts=PROMPTS, kl_probe_max_new_tokens=4))
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, processing_class=tok,
                      callbacks=[cb, Saver()])
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    if dist.get_rank() == 0:
        torch.save(saved, out / "saved.pt")


def run_fsdp2(model_path: str, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    from rlmonitor import GeometryCallback
    from rlmonitor.callbacks.kl import KLProbeConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_path)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert hasattr(model.model.layers[0].self_attn.q_proj.weight, "full_tensor")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cb = GeometryCallback(every_n_steps=2, k=4, kl=KLProbeConfig(prompts=PROMPTS, kl_probe_max_new_tokens=4))
    args = SimpleNamespace(output_dir=str(out))
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = rank == 0
    state.global_step, state.max_steps = 0, 5
    cb.on_train_begin(args, state, control, model=model, processing_class=tok)
    saved = {0: full_weights(model)}
    model.train()
    for step in range(1, 6):
        batch = batch_for(tok, step * 10 + rank)  # different data per rank, as in real data parallelism
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step = step
        cb.on_step_end(args, state, control, model=model)
        if step % 2 == 0 or step == 5:
            saved[step] = full_weights(model)
    cb.on_train_end(args, state, control, model=model)
    if rank == 0:
        torch.save(saved, out / "saved.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_order(model_path: str, out: Path) -> None:
    """GeometryMonitor driven directly, with ranks out of step: rank 0 asks for its first
    snapshot while its worker still computes the base (its agreement comes before its
    base gather), rank 1 only after its worker has gathered (the other order). The
    monitor's collectives must not depend on which thread gets there first."""
    import time

    from rlmonitor.core.config import GeometryConfig
    from rlmonitor.core.monitor import GeometryMonitor
    from rlmonitor.core.naming import MatrixSpec
    from rlmonitor.core.sharding import Shards

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    specs = [MatrixSpec.from_name(f"layers.{i}.mlp.up_proj", (768, 512), None) for i in range(4)]
    gen = torch.Generator().manual_seed(0)
    weights = {s.name: torch.randn(s.shape, generator=gen) for s in specs}  # replicated, as DDP holds them
    cfg = GeometryConfig(every_n_steps=1, k=8, wandb="off", plot_every_n_snapshots=0, flush_timeout_s=30)
    mon = GeometryMonitor(cfg, specs, out / "rlmonitor", itemsizes={s.name: 4 for s in specs}, main=rank == 0,
                          shards=Shards.current(specs))  # fmt: skip

    def read(group):
        for s in group:
            yield s.name, weights[s.name]

    mon.start(0, read, token=object())
    if rank == 1:
        time.sleep(1.0)
    for step in (1, 2):
        mon.snapshot(step, read, final=step == 2)
        for w in weights.values():
            w.add_(torch.randn(w.shape, generator=gen), alpha=1e-3)
    mon.finish(2, read)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, model_path, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    {"ddp": run_ddp, "fsdp2": run_fsdp2, "order": run_order}[mode](model_path, out)
