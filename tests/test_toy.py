"""Tests for rlmonitor.toy: tokenizer, tiny model, arithmetic task, pretraining, base-model
cache, and (slow) smoke runs of TRL's GRPOTrainer / SFTTrainer on the saved base."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from rlmonitor import toy
from rlmonitor.toy import (
    ArithmeticTaskConfig,
    PretrainConfig,
    TinyModelConfig,
    arithmetic_reward,
    build_base_model,
    build_tiny_model,
    build_tokenizer,
    config_hash,
    default_cache_dir,
    evaluate_accuracy,
    make_dataset,
    parse_first_int,
    pretrain,
    read_base_info,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def random_base(tmp_path_factory) -> Path:
    """A saved, untrained base model (fast): enough to exercise the trainers."""
    return build_base_model(tmp_path_factory.mktemp("toy") / "random-base", pretrain_steps=0)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    ["12+7=", "12+7=19", "0*0=0", "99-100=-1", "", " a  b ", string.printable.strip("\t\n\r\x0b\x0c")],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    if text:
        assert len(ids) == len(text) + 1  # one token per character, plus BOS


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == toy.PAD_TOKEN and tokenizer.eos_token == toy.EOS_TOKEN
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert len(ids) == 4 and None not in ids
    # TRL's SFTTrainer appends the eos *string* to completions: it must map to the eos id.
    assert tokenizer("1+1=2" + tokenizer.eos_token)["input_ids"][-1] == tokenizer.eos_token_id
    # Characters outside the vocabulary become <|unk|> instead of vanishing.
    assert tokenizer("1\t2")["input_ids"][2] == tokenizer.unk_token_id
    batch = tokenizer(["1+1=", "10+10="], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1, 1]


def test_tokenizer_save_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "left"
    assert len(loaded) == len(tokenizer)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(loaded, attr) == getattr(tokenizer, attr)
    texts = ["12+7=19", "3-2=1", "hello, world!"]
    assert loaded(texts, padding=True)["input_ids"] == tokenizer(texts, padding=True)["input_ids"]
    for text in texts:
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


# --------------------------------------------------------------------------- model


def test_build_tiny_model(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig())
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2,
        64,
        4,
        2,
    )
    for obj in (cfg, model.generation_config):
        assert obj.pad_token_id == tokenizer.pad_token_id
        assert obj.bos_token_id == tokenizer.bos_token_id
        assert obj.eos_token_id == tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 200_000
    out = model(**tokenizer(["1+2=", "10+20="], return_tensors="pt", padding=True))
    assert out.logits.shape[-1] == len(tokenizer)


def test_build_tiny_model_seeded(tokenizer):
    a = build_tiny_model(tokenizer, TinyModelConfig(seed=3)).state_dict()
    b = build_tiny_model(tokenizer, TinyModelConfig(seed=3)).state_dict()
    c = build_tiny_model(tokenizer, TinyModelConfig(seed=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"]
    )


def test_tiny_model_config_validation():
    with pytest.raises(ValueError):
        TinyModelConfig(hidden_size=64, num_heads=5)
    with pytest.raises(ValueError):
        TinyModelConfig(num_heads=4, num_kv_heads=3)


# --------------------------------------------------------------------------- task


def test_arithmetic_reward_hand_cases():
    completions = ["19", " 19", "19<junk>7", "019", "190", "1 9", "", "abc", "=19", "18", "-3", "3"]
    answers = ["19"] * 10 + ["-3", "-3"]
    expected = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert arithmetic_reward(completions, answer=answers) == expected


def test_arithmetic_reward_accepts_trl_kwargs_and_chat_completions():
    rewards = arithmetic_reward(
        [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": ""}], None],
        answer=["7", "7", "7"],
        prompts=["3+4="] * 3,
        completion_ids=[[1], [2], [3]],
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0, 0.0]
    assert parse_first_int("x-12y3") == -12
    assert parse_first_int("nothing") is None


def test_make_dataset_deterministic_and_correct():
    a, b, c = make_dataset(50, seed=1), make_dataset(50, seed=1), make_dataset(50, seed=2)
    assert a.column_names == ["prompt", "answer"]
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    assert make_dataset(5).to_dict() == make_dataset(5, seed=ArithmeticTaskConfig().seed).to_dict()
    for prompt, answer in zip(a["prompt"], a["answer"], strict=True):
        assert isinstance(prompt, str) and prompt.endswith("=")
        x, y = prompt[:-1].split("+")
        assert 0 <= int(x) <= 99 and 0 <= int(y) <= 99
        assert int(answer) == int(x) + int(y)


def test_make_dataset_ops():
    config = ArithmeticTaskConfig(max_operand=9, ops=("-", "*"))
    ds = make_dataset(200, seed=0, config=config)
    seen = set()
    for prompt, answer in zip(ds["prompt"], ds["answer"], strict=True):
        op = "-" if "-" in prompt else "*"
        seen.add(op)
        x, y = (int(v) for v in prompt[:-1].split(op))
        assert int(answer) == (x - y if op == "-" else x * y)
        assert int(answer) >= 0  # allow_negative=False orders the operands
    assert seen == {"-", "*"}
    assert len(make_dataset(0)) == 0
    with pytest.raises(ValueError):
        ArithmeticTaskConfig(ops=("/",))
    with pytest.raises(ValueError):
        ArithmeticTaskConfig(min_operand=5, max_operand=4)


# --------------------------------------------------------------------------- training


def test_short_pretrain_lowers_loss(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(seed=0))
    threads = torch.get_num_threads()
    stats = pretrain(model, tokenizer, steps=60, batch_size=32, seed=0, eval_size=64)
    assert torch.get_num_threads() == threads  # restored
    assert stats["steps"] == 60
    assert stats["final_loss"] < 0.6 * stats["initial_loss"]
    assert 0.0 <= stats["accuracy"] <= 1.0


def test_evaluate_accuracy_restores_mode(tokenizer):
    model = build_tiny_model(tokenizer)
    model.train()
    acc = evaluate_accuracy(model, tokenizer, {"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]})
    assert 0.0 <= acc <= 1.0
    assert model.training


# --------------------------------------------------------------------------- base model cache


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RLMONITOR_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RLMONITOR_CACHE")
    assert default_cache_dir() == Path("~/.cache/rlmonitor").expanduser()


def test_config_hash():
    assert config_hash() == config_hash(TinyModelConfig(), ArithmeticTaskConfig(), PretrainConfig())
    assert config_hash(TinyModelConfig(seed=1)) != config_hash()
    assert config_hash(task_config=ArithmeticTaskConfig(ops=("+", "-"))) != config_hash()
    assert config_hash(pretrain_config=PretrainConfig(steps=0)) != config_hash()


def test_build_base_model_saves_and_caches(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_base_model(tmp_path / "base", pretrain_steps=0)
    assert path == tmp_path / "base"
    info = read_base_info(path)
    assert info["hash"] == config_hash(pretrain_config=PretrainConfig(steps=0))
    assert info["stats"]["steps"] == 0
    json.dumps(info, allow_nan=False)  # strict JSON (no NaN)

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.padding_side == "left" and model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id

    # Same configs: reused without building anything.
    def boom(*args, **kwargs):
        raise AssertionError("should have been cached")

    monkeypatch.setattr(toy.base, "pretrain", boom)  # the name build_base_model calls
    assert build_base_model(path, pretrain_steps=0) == path
    # Different configs or force: rebuilt.
    with pytest.raises(AssertionError, match="cached"):
        build_base_model(path, pretrain_steps=0, model_config=TinyModelConfig(seed=1))
    with pytest.raises(AssertionError, match="cached"):
        build_base_model(path, pretrain_steps=0, force=True)


def test_toy_version_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """Bumping TOY_VERSION (a changed recipe) makes cached bases stale: a new folder is built."""
    monkeypatch.setenv("RLMONITOR_CACHE", str(tmp_path))
    old = build_base_model(pretrain_steps=0)
    assert read_base_info(old)["toy_version"] == toy.TOY_VERSION
    monkeypatch.setattr(toy.base, "TOY_VERSION", toy.TOY_VERSION + 1)
    new = build_base_model(pretrain_steps=0)
    assert new != old and new.parent == old.parent and read_base_info(new)["toy_version"] == toy.TOY_VERSION + 1


def test_public_names_import_from_the_package():
    """The split into modules keeps `from rlmonitor.toy import X` working for every public X."""
    names = {"BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "UNK_TOKEN", "INFO_FILE", "TOY_VERSION", "ArithmeticTaskConfig",
             "PretrainConfig", "TinyModelConfig", "arithmetic_reward", "build_base_model", "build_tiny_model",
             "build_tokenizer", "config_hash", "default_cache_dir", "evaluate_accuracy", "load_base_model",
             "make_dataset", "parse_first_int", "pretrain", "read_base_info"}  # fmt: skip
    assert names == set(toy.__all__)
    for name in names:
        exec(f"from rlmonitor.toy import {name}", {})
    # the defaults hash as before the split: cached bases stay valid
    assert config_hash() == "b1122b49b26f" and config_hash(pretrain_config=PretrainConfig(steps=0)) == "19f9b086b641"


@pytest.mark.parametrize(("cls", "kw", "message"), [
    (TinyModelConfig, {"hidden_size": 0}, "TinyModelConfig.hidden_size=0 is invalid: use a positive integer"),
    (TinyModelConfig, {"num_kv_heads": 3}, "TinyModelConfig.num_kv_heads=3 is invalid: use a divisor of num_heads=4"),
    (ArithmeticTaskConfig, {"max_operand": -1}, "ArithmeticTaskConfig.max_operand=-1 is invalid: use an integer >= "),
    (PretrainConfig, {"lr": 0.0}, "PretrainConfig.lr=0.0 is invalid: use a finite number in (0, inf)"),
    (PretrainConfig, {"target_accuracy": 1.5}, "PretrainConfig.target_accuracy=1.5 is invalid: use a fraction"),
])  # fmt: skip
def test_toy_config_errors_name_class_field_value_and_fix(cls, kw, message):
    with pytest.raises(ValueError) as err:
        cls(**kw)
    assert str(err.value).startswith(message)


def test_build_base_model_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RLMONITOR_CACHE", str(tmp_path))
    path = build_base_model(pretrain_steps=0, model_config=TinyModelConfig(num_layers=1))
    assert path.parent == tmp_path and path.name.startswith("toy-base-")
    assert (path / "model.safetensors").is_file()


@pytest.mark.slow
def test_default_base_model_learns_the_task(tmp_path):
    """The default recipe (what `rlmonitor demo` uses) stops at ~60% greedy accuracy."""
    path = build_base_model(tmp_path / "base")
    stats = read_base_info(path)["stats"]
    assert stats["steps"] < stats["max_steps"]
    assert 0.4 <= stats["accuracy"] <= 0.9

    model, tok = toy.load_base_model(path)
    assert evaluate_accuracy(model, tok, make_dataset(200, seed=123)) >= 0.3


# --------------------------------------------------------------------------- TRL smoke runs


class _LogRecorder:
    """Builds a TrainerCallback (imported lazily) that keeps every ``logs`` dict."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self):
                self.logs: list[dict] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs or {}))

        return Recorder()


def _grpo_args(output_dir, **overrides):
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        logging_steps=1,
        learning_rate=1e-4,
        activation_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("variant", ["plain", "beta", "pissa"])
def test_grpo_smoke(random_base, tmp_path, variant):
    from trl import GRPOTrainer

    peft_config = None
    overrides = {}
    if variant == "beta":
        overrides["beta"] = 0.04
    if variant == "pissa":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights="pissa", task_type="CAUSAL_LM"
        )
    recorder = _LogRecorder()
    trainer = GRPOTrainer(
        model=str(random_base),
        reward_funcs=[arithmetic_reward],
        args=_grpo_args(tmp_path, **overrides),
        train_dataset=make_dataset(16, seed=0),
        peft_config=peft_config,
        callbacks=[recorder],
    )
    trainer.train()
    step_logs = [log for log in recorder.logs if "reward" in log]
    assert len(step_logs) == 2
    for key in (
        "reward",
        "reward_std",
        "rewards/arithmetic_reward/mean",
        "entropy",
        "completions/mean_length",
    ):
        assert key in step_logs[0], key
    assert ("kl" in step_logs[0]) == (variant == "beta")
    if variant == "pissa":
        assert type(trainer.model).__name__ == "PeftModelForCausalLM"


@pytest.mark.slow
def test_sft_smoke(random_base, tmp_path):
    from trl import SFTConfig, SFTTrainer

    ds = make_dataset(16, seed=0)
    ds = ds.map(lambda row: {"completion": row["answer"]}, remove_columns=["answer"])
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=1e-3,
        max_length=32,
        activation_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    recorder = _LogRecorder()
    trainer = SFTTrainer(model=str(random_base), args=args, train_dataset=ds, callbacks=[recorder])
    # Prompt-completion rows tokenize exactly as pretrain() does: bos prompt completion eos,
    # with the loss on the completion only.
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    assert (
        tok.decode(row["input_ids"]) == tok.bos_token + ds[0]["prompt"] + ds[0]["completion"] + tok.eos_token
    )
    assert sum(label != -100 for label in row["labels"]) == len(ds[0]["completion"]) + 1
    trainer.train()
    assert sum("loss" in log for log in recorder.logs) == 2
