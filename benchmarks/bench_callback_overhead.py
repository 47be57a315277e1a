"""Training-step overhead of GeometryCallback (issue 3) and the KL probe's share
of step time (issue 4), measured in one run.

Runs the same GRPO training (tiny Qwen2 on CPU by default; a Qwen2.5-0.5B-shaped
random model on GPU with ``--size 0.5b``) three times, interleaved ``--rounds``
times: without the callback, with ``GeometryCallback(kl=None)`` and with the
default callback (geometry + KL probe), at the default interval. Reports the
mean seconds per optimizer step (snapshot steps included; median over rounds)
of each and the ratios.

    python benchmarks/bench_callback_overhead.py [--steps 40] [--rounds 3] [--size tiny|0.5b] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time between consecutive step ends (skips the first steps as warm-up)."""

    def __init__(self, skip: int = 3) -> None:
        self.skip, self.times, self._t = skip, [], None

    def on_step_begin(self, args, state, control, **kw):
        if self._t is None:
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        if state.global_step > self.skip:
            self.times.append(now - self._t)
        self._t = now


def build_model(size: str, out: str) -> str:
    from rlmonitor.toy import TinyModelConfig, build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    if size == "tiny":
        cfg = TinyModelConfig()
        model = build_tiny_model(tok, cfg)
    else:  # Qwen2.5-0.5B shapes with the toy vocabulary (random init)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864,
                                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                             max_position_embeddings=128, tie_word_embeddings=True,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def digit_reward(completions, **kw):
    return [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]


def run(model_path: str, variant: str, steps: int, device: str) -> float:
    from trl import GRPOConfig, GRPOTrainer

    from rlmonitor import GeometryCallback
    from rlmonitor.toy import make_dataset

    timer = StepTimer()
    callbacks: list = [timer]
    if variant == "geometry":
        callbacks.insert(0, GeometryCallback(kl=None))
    elif variant == "geometry+kl":
        callbacks.insert(0, GeometryCallback())
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, use_cpu=device == "cpu", bf16=device == "cuda", report_to="none",
                          max_steps=steps, per_device_train_batch_size=8, num_generations=8,
                          max_completion_length=16, learning_rate=1e-4, logging_steps=10, save_strategy="no",
                          seed=0, disable_tqdm=True)
        GRPOTrainer(model=model_path, reward_funcs=[digit_reward], train_dataset=make_dataset(512, seed=0),
                    args=args, callbacks=callbacks).train()
    return statistics.fmean(timer.times)  # mean: the snapshot steps must count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default interval is 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.size, tmp)
        results: dict[str, list[float]] = {"none": [], "geometry": [], "geometry+kl": []}
        for _ in range(args.rounds):
            for variant in results:
                results[variant].append(run(path, variant, args.steps, args.device))
    med = {k: statistics.median(v) for k, v in results.items()}
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {dev}; model: {args.size}; {args.steps} steps x {args.rounds} rounds; default interval (20)")
    for k, v in med.items():
        print(f"  {k:12s} mean step {v * 1e3:8.1f} ms (median of rounds)")
    print(f"geometry overhead: {med['geometry'] / med['none'] - 1:+.1%} (target <= +10% tiny CPU, <= +2% GPU 0.5B)")
    print(f"geometry+KL overhead: {med['geometry+kl'] / med['none'] - 1:+.1%}")
    print(f"KL probe share of step time: {(med['geometry+kl'] - med['geometry']) / med['geometry+kl']:+.1%}")


if __name__ == "__main__":
    main()
