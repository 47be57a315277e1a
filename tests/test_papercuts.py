"""Papercuts of the callback's configuration and setup, on real tiny models and trainers:
the KL probe given as a dict, the "no weight matrix" error on a GPT-2 model, and a KL
probe longer than the model's positions."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from rlmonitor import GeometryCallback
from rlmonitor.core import keys
from rlmonitor.core.config import GeometryConfig
from rlmonitor.core.sinks import read_jsonl

pytestmark = pytest.mark.slow


def _sft_dataset(tok, n: int = 16):
    """Tokenized rows as an SFT trainer prepares them: the prompt's labels are -100 (the
    KL probe takes its prompts from there)."""
    from datasets import Dataset

    from rlmonitor.toy import make_dataset

    rows = make_dataset(n, seed=0)
    ids, labels = [], []
    for prompt, answer in zip(rows["prompt"], rows["answer"], strict=True):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pad = 20 - len(p) - len(a)
        ids.append(p + a + [tok.pad_token_id] * pad)
        labels.append([-100] * len(p) + a + [-100] * pad)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def _train(model, tok, out, cb, steps: int = 2):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_sft_dataset(tok), processing_class=tok, callbacks=[cb])
    trainer.train()
    return [r for r in read_jsonl(out / "rlmonitor" / "metrics.jsonl") if keys.KL_FORWARD in r]


def _tiny(**overrides):
    from rlmonitor.toy import TinyModelConfig, build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    return build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=2, **overrides)), tok


def test_kl_probe_options_as_a_dict_run_the_probe_with_them(tmp_path):
    model, tok = _tiny()
    cb = GeometryCallback(every_n_steps=2, k=4, kl={"kl_probe_size": 4, "kl_probe_max_new_tokens": 6})
    kl = _train(model, tok, tmp_path, cb)
    assert cb.probe is not None, "a dict of options must not disable the probe"
    assert cb.probe.input_ids.shape[0] == 4  # four probe prompts
    assert [r["step"] for r in kl] == [0, 2]
    assert kl[0][keys.KL_FORWARD] == 0.0 and kl[1][keys.KL_FORWARD] > 0.0


@pytest.mark.parametrize("bad", [4, "yes", ["kl_probe_size"], {"kl_probe_sise": 4}])
def test_kl_probe_argument_of_the_wrong_type_or_with_unknown_options_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"GeometryCallback\(kl=\.\.\.\)") as info:
        GeometryCallback(kl=bad)
    if isinstance(bad, dict):
        assert "kl_probe_sise" in str(info.value) and "kl_probe_size" in str(info.value)  # names the valid ones


def test_kl_probe_option_with_a_bad_value_names_the_field():
    with pytest.raises(ValueError, match=r"KLProbeConfig\.kl_probe_size='4'"):
        GeometryCallback(kl={"kl_probe_size": "4"})


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlmonitor.toy import build_tokenizer

    tok = build_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return GPT2LMHeadModel(cfg), tok


def test_no_matrix_error_lists_the_models_2d_modules_and_a_pattern_that_matches(tmp_path):
    from rlmonitor.callbacks.weights import find_matrices

    model, tok = _gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="found no weight matrix to monitor") as info:
        _train(model, tok, tmp_path, GeometryCallback(every_n_steps=2, k=4))
    err = info.value
    assert err.__cause__ is None and err.__context__ is None  # one message, no chained traceback
    msg = str(err)
    n_2d = sum(1 for _, m in model.named_modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 2)
    assert f"this model's {n_2d} 2-D weights" in msg
    assert "h.0.attn.c_attn" in msg  # actual module names, a few of them
    hint = re.search(r"try include=\(r'(.+?)',\)", msg)
    assert hint, msg
    pattern = hint.group(1).replace("\\\\", "\\")
    assert all(leaf in pattern for leaf in ("c_attn", "c_fc", "c_proj"))
    # the suggestion really selects this model's layer matrices
    refs = find_matrices(model, GeometryConfig(include=(pattern,)))
    assert {r.spec.name.rsplit(".", 1)[-1] for r in refs} == {"c_attn", "c_fc", "c_proj"}
    assert len(refs) == 2 * 4  # per layer: c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing trained


def test_kl_probe_longer_than_the_models_positions_sizes_itself_with_one_warning(tmp_path):
    model, tok = _tiny(max_position_embeddings=32)
    cb = GeometryCallback(every_n_steps=2, k=4, kl={"kl_probe_size": 4, "kl_probe_max_new_tokens": 64})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kl = _train(model, tok, tmp_path, cb)
    sized = [w for w in caught if "exceeds the model's 32 positions" in str(w.message)]
    assert len(sized) == 1, [str(w.message) for w in caught]
    assert cb.probe is not None and cb.probe.input_ids.shape[1] <= 32
    assert [r["step"] for r in kl] == [0, 2]
    assert kl[0][keys.KL_FORWARD] == 0.0 and kl[1][keys.KL_FORWARD] > 0.0
