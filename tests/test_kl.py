"""KL math against torch.nn.functional.kl_div, and the KL probe on a real tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from rlmonitor.callbacks.kl import KLProbe, KLProbeConfig
from rlmonitor.metrics import compress_logprobs, token_kl, token_kl_topk


def test_token_kl_matches_kl_div():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, 40, generator=g), torch.randn(5, 7, 40, generator=g)
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    ref = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    torch.testing.assert_close(token_kl(lp, lq), ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(token_kl(lp, lp), torch.zeros(5, 7))


def test_forward_and_reverse_differ_on_hand_built_pair():
    # p is peaked, q is uniform over 4 tokens: KL(p||q) = log 4 - H(p), KL(q||p) is large
    p = torch.tensor([0.97, 0.01, 0.01, 0.01])
    q = torch.full((4,), 0.25)
    fwd, rev = token_kl(p.log(), q.log()), token_kl(q.log(), p.log())
    h_p = -(p * p.log()).sum()
    assert float(fwd) == pytest.approx(math.log(4) - float(h_p), rel=1e-6)
    assert float(rev) == pytest.approx(float((q * (q.log() - p.log())).sum()), rel=1e-6)
    assert float(rev) > 1.5 * float(fwd)
    # zero probabilities: p = 0 where q > 0 contributes nothing to KL(p || q)
    p0 = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert float(token_kl(p0.log(), q.log())) == pytest.approx(math.log(2), rel=1e-6)


def test_topk_compression_is_exact_when_tail_is_uniform_and_bounded_otherwise():
    g = torch.Generator().manual_seed(1)
    lq = torch.randn(6, 50, generator=g).log_softmax(-1)
    lp = torch.randn(6, 50, generator=g).log_softmax(-1)
    # keep all but one token: the tail is a single token, so the compression is exact
    c = compress_logprobs(lq, 49)
    torch.testing.assert_close(token_kl_topk(lp, c), token_kl(lp, lq), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(token_kl_topk(lp, c, reverse=True), token_kl(lq, lp), rtol=1e-4, atol=1e-6)
    # a distribution whose tail is exactly uniform is also recovered exactly
    head = torch.tensor([2.0, 1.0, 0.5])
    logits = torch.cat([head, torch.zeros(47)]).repeat(6, 1)
    lu = logits.log_softmax(-1)
    torch.testing.assert_close(token_kl_topk(lp, compress_logprobs(lu, 3)), token_kl(lp, lu), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        compress_logprobs(lq, 50)


def test_kl_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="logp and logq"):
        token_kl(torch.zeros(3, 5), torch.zeros(3, 6))
    with pytest.raises(TypeError, match="logq"):
        token_kl(torch.zeros(3, 5), [0.0] * 5)


@pytest.fixture
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    return model, tok


def _dataset():
    from rlmonitor.toy import make_dataset

    return make_dataset(32, seed=3)


def test_probe_is_zero_at_step_0_preserves_rng_and_train_mode(tiny):
    model, tok = tiny
    model.train()
    probe = KLProbe(KLProbeConfig(kl_probe_size=4, kl_probe_max_new_tokens=8))
    cpu_state = torch.get_rng_state()
    probe.setup(model, tok, _dataset())
    out = probe.measure(model)
    assert torch.equal(torch.get_rng_state(), cpu_state), "the probe must not consume the trainer's RNG"
    assert model.training, "the probe must restore train mode"
    assert out["kl/base_forward"] == 0.0 and out["kl/base_reverse"] == 0.0 and out["kl/base_forward_max"] == 0.0
    assert out["kl/probe_logprob_mean"] < 0.0
    assert probe.completion_mask.sum() > 0
    # moving the weights makes KL positive in both directions, and the step KL appears
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out2 = probe.measure(model)
    assert out2["kl/base_forward"] > 0 and out2["kl/base_reverse"] > 0
    assert out2["kl/step_forward"] == pytest.approx(out2["kl/base_forward"], rel=1e-5)  # previous eval = base


def test_probe_same_seed_same_probe_and_save_load(tiny, tmp_path):
    model, tok = tiny
    a, b = KLProbe(KLProbeConfig(kl_probe_size=3, kl_probe_max_new_tokens=6)), KLProbe(
        KLProbeConfig(kl_probe_size=3, kl_probe_max_new_tokens=6))
    a.setup(model, tok, _dataset())
    b.setup(model, tok, _dataset())
    assert torch.equal(a.input_ids, b.input_ids)
    a.save(tmp_path)
    c = KLProbe(KLProbeConfig())
    assert c.load(tmp_path, model)
    assert torch.equal(c.input_ids, a.input_ids) and torch.equal(c.cache, a.cache)
    assert c.measure(model)["kl/base_forward"] == 0.0


def test_probe_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="prompts"):
        KLProbeConfig(prompts=["", " "])
    with pytest.raises(ValueError, match="kl_probe_size"):
        KLProbeConfig(kl_probe_size=0)
    with pytest.raises(ValueError, match="no usable prompt"):
        KLProbe(KLProbeConfig()).setup(model, tok, [{"text": "no prompt column"}] * 4)
    bare = copy.deepcopy(tok)
    bare.pad_token = None
    bare.eos_token = None
    with pytest.raises(ValueError, match="pad"):
        KLProbe(KLProbeConfig()).setup(model, bare, _dataset())
    probe = KLProbe(KLProbeConfig(prompts=("1" * 300,), kl_probe_max_prompt_tokens=16, kl_probe_max_new_tokens=4))
    with pytest.warns(RuntimeWarning, match="cut to the last 16"):
        probe.setup(model, tok, None)


def test_probe_in_gradient_checkpointing_mode(tiny):
    model, tok = tiny
    model.gradient_checkpointing_enable()
    model.train()
    probe = KLProbe(KLProbeConfig(kl_probe_size=2, kl_probe_max_new_tokens=4))
    probe.setup(model, tok, _dataset())
    assert probe.measure(model)["kl/base_forward"] == 0.0
    assert model.training


def test_compressed_cache_when_over_budget(tiny):
    model, tok = tiny
    vocab = model.config.vocab_size
    probe = KLProbe(KLProbeConfig(kl_probe_size=4, kl_probe_max_new_tokens=8, kl_cache_max_mb=5e-3,
                                  kl_cache_topk_min=4))
    with pytest.warns(RuntimeWarning, match="compressed"):
        probe.setup(model, tok, _dataset())
    k = probe.cache.values.shape[-1]
    assert k < vocab
    # independent reference in numpy: q~ keeps q's top-k and spreads the tail uniformly
    import numpy as np

    logq = probe._logprobs(model).double().numpy()
    q = np.exp(logq)
    qt = np.empty_like(q)
    for i in range(q.shape[0]):
        top = np.argsort(-q[i])[:k]
        tail = 1.0 - q[i, top].sum()
        qt[i] = tail / (vocab - k)
        qt[i, top] = q[i, top]
    expect = float(np.mean(np.sum(q * (logq - np.log(qt)), axis=-1)))
    got = probe.measure(model)["kl/base_forward"]
    assert got == pytest.approx(expect, rel=1e-3, abs=1e-6)
    assert got > 0  # the documented bias of the approximation (p = q here)


def test_lora_disabled_adapter_path_agrees_with_cached_path_on_merged_copy(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    base_copy = copy.deepcopy(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                  init_lora_weights=True))
    probe = KLProbe(KLProbeConfig(kl_probe_size=4, kl_probe_max_new_tokens=8))
    probe.setup(peft_model, tok, _dataset())
    assert probe.use_disabled_adapters and probe.cache is None
    with torch.no_grad():  # train the adapters a little: B != 0
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    lora_kl = probe.measure(peft_model)
    assert lora_kl["kl/base_forward"] > 0

    # the cached path, on merged copies: base = the original model, current = merged adapters
    cached = KLProbe(KLProbeConfig())
    cached.input_ids, cached.attention_mask, cached.completion_mask = (
        probe.input_ids, probe.attention_mask, probe.completion_mask)
    cached._setup_base(base_copy)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    ref = cached.measure(merged)
    for key in ("kl/base_forward", "kl/base_reverse", "kl/base_forward_max", "kl/probe_logprob_mean"):
        assert lora_kl[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
