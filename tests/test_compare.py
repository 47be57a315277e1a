"""Tests of ``rlmonitor compare`` on small checkpoints whose answers are known by construction."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlmonitor import metrics as M
from rlmonitor.apps.compare import CompareError, compare
from rlmonitor.cli import main as cli_main

# Qwen2-shaped, tiny: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, MLP 128, vocab 256, tied.
H, LAYERS, NH, KV, HD, FF, VOCAB = 64, 2, 4, 2, 16, 128, 256
MOVE = 1.0 + 2.0**-4  # a relative move every bf16 value shows
SUB_ULP = 1.0 + 2.0**-12  # below half a bf16 ULP: invisible after the bf16 cast


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small-matrix SVD/QR gains nothing from intra-op threads and, on a loaded 2-core box,
    loses a lot to OpenMP spin-waits (x30 measured): run this module single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qwen_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (NH * HD, H),
            p + "self_attn.q_proj.bias": (NH * HD,),
            p + "self_attn.k_proj.weight": (KV * HD, H),
            p + "self_attn.k_proj.bias": (KV * HD,),
            p + "self_attn.v_proj.weight": (KV * HD, H),
            p + "self_attn.v_proj.bias": (KV * HD,),
            p + "self_attn.o_proj.weight": (H, NH * HD),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (FF, H),
            p + "mlp.up_proj.weight": (FF, H),
            p + "mlp.down_proj.weight": (H, FF),
        }
    shapes["model.norm.weight"] = (H,)
    return shapes


def random_base(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """bf16-representable fp32 weights, none of them zero."""
    out = {}
    for name, shape in qwen_shapes().items():
        w = torch.randn(shape, generator=gen) * (0.1 if "norm" in name else 0.02)
        if "norm" in name:
            w += 1.0
        w = torch.where(w == 0, torch.full_like(w, 0.01), w)
        out[name] = w.to(torch.bfloat16).float()
    return out


def moved(base: dict, gen: torch.Generator, frac: float, sub_frac: float = 0.0, overlap_with=None):
    """A run moving ``round(frac * n)`` entries of every tensor (visible in bf16) and another
    ``round(sub_frac * n)`` by sub-ULP amounts. Returns (weights, {name: bool mask of visible moves})."""
    run, masks = {}, {}
    for name, w in base.items():
        n = w.numel()
        perm = torch.randperm(n, generator=gen)
        n_move, n_sub = round(frac * n), round(sub_frac * n)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[perm[:n_move]] = True
        factor = torch.ones(n)
        factor[perm[:n_move]] = MOVE
        factor[perm[n_move : n_move + n_sub]] = SUB_ULP
        run[name] = (w.reshape(-1) * factor).reshape(w.shape)
        masks[name] = mask.reshape(w.shape)
    return run, masks


def save(weights: dict, path: Path, dtype=None, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    ws = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in weights.items()}
    if shards == 1:
        save_file(ws, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(ws)
    per = math.ceil(len(names) / shards)
    wmap = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: ws[k] for k in names[s * per : (s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        wmap |= dict.fromkeys(part, fname)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """bf16 base + two bf16 runs (single file, sharded) + an fp32 pair with sub-ULP moves."""
    root = tmp_path_factory.mktemp("compare")
    gen = torch.Generator().manual_seed(0)
    base = random_base(gen)
    run_a, mask_a = moved(base, gen, 0.3)
    # run B: 25% moved, 10% of all entries shared with A (by construction)
    run_b, mask_b = {}, {}
    for name, w in base.items():
        n = w.numel()
        flat_a = mask_a[name].reshape(-1)
        idx_a = flat_a.nonzero().flatten()
        idx_not = (~flat_a).nonzero().flatten()
        n_inter, n_b = round(0.1 * n), round(0.25 * n)
        pick = torch.cat([idx_a[torch.randperm(len(idx_a), generator=gen)[:n_inter]],
                          idx_not[torch.randperm(len(idx_not), generator=gen)[: n_b - n_inter]]])  # fmt: skip
        mb = torch.zeros(n, dtype=torch.bool)
        mb[pick] = True
        run_b[name] = torch.where(mb, w.reshape(-1) * MOVE, w.reshape(-1)).reshape(w.shape)
        mask_b[name] = mb.reshape(w.shape)
    run_f, mask_f = moved(base, gen, 0.2, sub_frac=0.3)
    return {
        "base": save(base, root / "base", torch.bfloat16),
        "a": save(run_a, root / "run_a", torch.bfloat16),
        "a_sharded": save(run_a, root / "run_a_sharded", torch.bfloat16, shards=3),
        "b": save(run_b, root / "run_b", torch.bfloat16),
        "base32": save(base, root / "base32"),
        "f32": save(run_f, root / "run_f32"),
        "mask_a": mask_a, "mask_b": mask_b, "mask_f": mask_f, "root": root,
    }  # fmt: skip


def _expected_sparsity(masks: dict) -> float:
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def test_sparsity_known_by_construction(ckpts):
    rep = compare(str(ckpts["base"]), [str(ckpts["a"])], sparsity_only=True).report
    (run,) = rep["runs"]
    n_params = sum(math.prod(s) for s in qwen_shapes().values())
    assert run["n_params"] == rep["base"]["n_params"] == n_params  # embeddings, norms, biases count
    assert run["update_sparsity"] == pytest.approx(_expected_sparsity(ckpts["mask_a"]), abs=1e-12)
    assert run["bf16_cast"] is False and run["stored_dtype_sparsity"] == run["update_sparsity"]
    assert run["spectral"] is None and run["overlap"] is None and "jaccard" not in rep
    by_name = {t["name"]: t for t in run["tensors"]}
    for name, mask in ckpts["mask_a"].items():
        assert by_name[name.removeprefix("model.")]["n_changed"] == int(mask.sum())
    # per layer / per kind are element-weighted aggregates of the tensors
    for e in run["by_kind"]:
        ts = [t for t in run["tensors"] if t["kind"] == e["kind"]]
        assert e["n_changed"] == sum(t["n_changed"] for t in ts) and e["n_params"] == sum(t["n_params"] for t in ts)
    kinds = {e["kind"] for e in run["by_kind"]}
    assert {"q", "k", "v", "o", "gate", "up", "down", "embed_tokens", "norm", "q.bias"} <= kinds
    assert [e["layer"] for e in run["by_layer"]] == [0, 1, None]


def test_bit_level_cross_check_with_numpy(ckpts):
    from safetensors.torch import load_file  # numpy has no bf16: read with torch, compare the bits in numpy

    name = "model.layers.1.mlp.down_proj.weight"
    w0 = load_file(str(ckpts["base"] / "model.safetensors"))[name]
    w1 = load_file(str(ckpts["a"] / "model.safetensors"))[name]
    bits0, bits1 = w0.view(torch.int16).numpy(), w1.view(torch.int16).numpy()
    expected = int(np.count_nonzero(bits0 != bits1))
    rep = compare(str(ckpts["base"]), [str(ckpts["a"])], sparsity_only=True).report
    got = next(t for t in rep["runs"][0]["tensors"] if t["name"] == name.removeprefix("model."))
    assert got["n_changed"] == expected == int(ckpts["mask_a"][name].sum())


def test_fp32_checkpoint_sub_ulp_moves_are_invisible(ckpts):
    rep = compare(str(ckpts["base32"]), [str(ckpts["f32"])], sparsity_only=True).report
    (run,) = rep["runs"]
    n = run["n_params"]
    n_visible = sum(int(m.sum()) for m in ckpts["mask_f"].values())
    n_sub = sum(round(0.3 * m.numel()) for m in ckpts["mask_f"].values())
    assert run["update_sparsity"] == pytest.approx(1 - n_visible / n, abs=1e-12)
    assert run["stored_dtype_sparsity"] == pytest.approx(1 - (n_visible + n_sub) / n, abs=1e-12)
    assert run["bf16_cast"] is True
    assert any("bf16 casts" in note for note in run["notes"])
    assert run["dtypes"] == {"float32": n}


def test_sharded_and_single_file_agree(ckpts):
    single = compare(str(ckpts["base"]), [str(ckpts["a"])], k=8).report["runs"][0]
    sharded = compare(str(ckpts["base"]), [str(ckpts["a_sharded"])], k=8).report["runs"][0]
    assert sharded["format"] == "sharded" and single["format"] == "model-dir"
    for key in ("update_sparsity", "n_changed", "by_layer", "by_kind", "tensors", "spectral", "overlap"):
        assert single[key] == sharded[key], key
    # a single .safetensors file path gives the same too
    file_rep = compare(str(ckpts["base"] / "model.safetensors"), [str(ckpts["a"] / "model.safetensors")],
                       sparsity_only=True).report["runs"][0]  # fmt: skip
    assert file_rep["tensors"] == single["tensors"]


def test_jaccard_known_by_construction(ckpts):
    rep = compare(str(ckpts["base"]), [str(ckpts["a"]), str(ckpts["b"])], sparsity_only=True).report
    ma, mb = ckpts["mask_a"], ckpts["mask_b"]
    by_kind = {e["kind"]: e for e in rep["jaccard"]}
    # whole model: sum |A n B| / sum |A u B|, equal to jaccard() of the concatenated masks
    cat_a = torch.cat([m.reshape(-1) for m in ma.values()])
    cat_b = torch.cat([mb[k].reshape(-1) for k in ma])
    inter = sum(round(0.1 * m.numel()) for m in ma.values())
    union = sum(round(0.3 * m.numel()) + round(0.25 * m.numel()) - round(0.1 * m.numel()) for m in ma.values())
    assert by_kind["all"]["jaccard"] == pytest.approx(inter / union, abs=1e-12)
    assert by_kind["all"]["jaccard"] == pytest.approx(M.jaccard(cat_a, cat_b), abs=1e-12)
    p, q = cat_a.float().mean().item(), cat_b.float().mean().item()
    assert by_kind["all"]["random_baseline"] == pytest.approx(p * q / (p + q - p * q), rel=1e-6)
    # per module kind, e.g. q over both layers
    qa = torch.cat([ma[f"model.layers.{i}.self_attn.q_proj.weight"].reshape(-1) for i in range(LAYERS)])
    qb = torch.cat([mb[f"model.layers.{i}.self_attn.q_proj.weight"].reshape(-1) for i in range(LAYERS)])
    assert by_kind["q"]["jaccard"] == pytest.approx(M.jaccard(qa, qb), abs=1e-12)
    assert by_kind["q"]["random_baseline"] == pytest.approx(
        M.jaccard_random_baseline(qa.float().mean().item(), qb.float().mean().item()), rel=1e-6
    )
    # per layer x kind
    row = next(e for e in rep["jaccard_by_layer"] if e["layer"] == 1 and e["kind"] == "down")
    name = "model.layers.1.mlp.down_proj.weight"
    assert row["jaccard"] == pytest.approx(M.jaccard(ma[name], mb[name]), abs=1e-12)
    # consensus on the focus (middle) layer 1
    cons = {m["name"]: m for m in rep["consensus"]["matrices"]}
    c = M.consensus_ratio([ma[name], mb[name]])
    got = cons[name.removeprefix("model.")]
    assert got["mean"] == pytest.approx(float(c.mean()), abs=1e-6)
    assert got["histogram"][2] == pytest.approx(float((c == 1).float().mean()), abs=1e-12)
    assert rep["consensus"]["layers"] == [1]


def test_base_equal_to_run(ckpts):
    rep = compare(str(ckpts["base"]), [str(ckpts["base"])], k=8).report
    (run,) = rep["runs"]
    assert run["update_sparsity"] == 1.0 and run["n_changed"] == 0
    # identical matrices: angles are fp32 round-off of subspace_angles(U, U), drift exactly 0
    assert run["spectral"]["max_angle_left_deg"] < 1e-3 and run["spectral"]["drift_max"] == 0.0
    assert run["overlap"]["principal"] is None  # undefined: nothing changed
    json.dumps(rep, allow_nan=False)


# ---------------------------------------------------------------------------
# spectral metrics and mask overlaps against independent references


def _svd64(w: np.ndarray):
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return u, s, vt.T


def _top_set(scores: np.ndarray, alpha: float, largest: bool) -> np.ndarray:
    n = scores.size
    count = min(n, max(1, round(alpha * n)))
    order = np.argsort(-scores.reshape(-1) if largest else scores.reshape(-1), kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(scores.shape)


@pytest.fixture(scope="module")
def spec_pair(tmp_path_factory):
    """fp32 matrices (distinct values): q moves exactly its principal set, down exactly its
    low-magnitude set, up is untouched."""
    root = tmp_path_factory.mktemp("spec")
    rng = np.random.default_rng(1)
    k, alpha = 16, 0.05
    # q: decaying spectrum (well separated top-k subspace)
    qa, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    qb, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    q0 = (qa * np.exp(-np.arange(64) / 8.0)) @ qb.T
    down0 = rng.standard_normal((64, 128)) * 0.02
    up0 = rng.standard_normal((128, 64)) * 0.02
    base = {n: w.astype(np.float32) for n, w in (("q", q0), ("down", down0), ("up", up0))}
    masks = {}
    u, s, v = _svd64(base["q"])
    recon = (u[:, :k] * s[:k]) @ v[:, :k].T
    masks["q"] = _top_set(np.abs(recon), alpha, largest=True)
    masks["down"] = _top_set(np.abs(base["down"]), alpha, largest=False)
    masks["up"] = np.zeros_like(base["up"], dtype=bool)
    run = {n: np.where(masks[n], base[n] * 1.5, base[n]).astype(np.float32) for n in base}
    names = {"q": "model.layers.0.self_attn.q_proj.weight", "down": "model.layers.0.mlp.down_proj.weight",
             "up": "model.layers.0.mlp.up_proj.weight"}  # fmt: skip
    for tag, ws in (("base", base), ("run", run)):
        save_file({names[n]: torch.from_numpy(w) for n, w in ws.items()}, str(root / f"{tag}.safetensors"))
    return {"root": root, "base": base, "run": run, "masks": masks, "names": names, "k": k, "alpha": alpha}


def test_overlaps_known_by_construction(spec_pair):
    sp = spec_pair
    rep = compare(str(sp["root"] / "base.safetensors"), [str(sp["root"] / "run.safetensors")],
                  k=sp["k"], alpha=sp["alpha"]).report  # fmt: skip
    ov = rep["runs"][0]["overlap"]
    mats = {m["kind"]: m for m in ov["matrices"]}
    b = sp["base"]
    u, s, v = _svd64(b["down"])
    p_down = _top_set(np.abs((u[:, :16] * s[:16]) @ v[:, :16].T), 0.05, largest=True)
    l_q = _top_set(np.abs(b["q"]), 0.05, largest=False)
    # q moved exactly its principal mask; down exactly its low-magnitude mask
    assert mats["q"]["principal"] == 1.0
    assert mats["down"]["low_magnitude"] == 1.0
    mq, md = sp["masks"]["q"], sp["masks"]["down"]
    assert mats["q"]["low_magnitude"] == pytest.approx((l_q & mq).sum() / mq.sum(), abs=1e-12)
    assert mats["down"]["principal"] == pytest.approx((p_down & md).sum() / md.sum(), abs=1e-12)
    assert mats["up"]["n_changed"] == 0 and mats["up"]["principal"] is None
    # pooled over matrices: counts, not means of ratios
    assert ov["principal"] == pytest.approx((mq.sum() + (p_down & md).sum()) / (mq.sum() + md.sum()), abs=1e-12)
    assert ov["low_magnitude"] == pytest.approx(((l_q & mq).sum() + md.sum()) / (mq.sum() + md.sum()), abs=1e-12)
    n_all = sum(w.size for w in b.values())
    assert ov["baseline_principal"] == pytest.approx(sum(round(0.05 * w.size) for w in b.values()) / n_all)
    # principal and not low-magnitude, per matrix
    assert mats["down"]["principal_not_low"] == 0.0
    assert mats["q"]["principal_not_low"] == pytest.approx((mq & ~l_q).sum() / mq.sum(), abs=1e-12)
    # the overlap-vs-alpha curve at alpha=0.05 (focus layer 0 = all matrices here) is the same number
    at = next(c for c in ov["curve"] if c["alpha"] == 0.05)
    assert at["principal"] == pytest.approx(ov["principal"]) and at["low_magnitude"] == pytest.approx(ov["low_magnitude"])
    assert rep["runs"][0]["update_sparsity"] == pytest.approx(1 - (mq.sum() + md.sum()) / n_all, abs=1e-12)


def test_spectral_against_numpy_and_scipy(spec_pair):
    from scipy.linalg import subspace_angles

    sp = spec_pair
    k = sp["k"]
    args = (str(sp["root"] / "base.safetensors"), [str(sp["root"] / "run.safetensors")])
    topk = {m["kind"]: m for m in compare(*args, k=k).report["runs"][0]["spectral"]["matrices"]}
    full = compare(*args, k=k, full_spectrum=True).report
    assert full["settings"]["drift_metric"] == "spectral_drift"
    full = {m["kind"]: m for m in full["runs"][0]["spectral"]["matrices"]}
    u0, s0, v0 = _svd64(sp["base"]["q"])
    u1, s1, v1 = _svd64(sp["run"]["q"])
    left = np.degrees(subspace_angles(u0[:, :k], u1[:, :k]))  # descending
    right = np.degrees(subspace_angles(v0[:, :k], v1[:, :k]))
    assert topk["q"]["max_angle_left_deg"] == pytest.approx(left[0], abs=2e-2)
    assert topk["q"]["max_angle_right_deg"] == pytest.approx(right[0], abs=2e-2)
    np.testing.assert_allclose(topk["q"]["angles_left_deg"], left[::-1], atol=2e-2)
    assert topk["q"]["drift"] == pytest.approx(np.linalg.norm(s1[:k] - s0[:k]) / np.linalg.norm(s0[:k]), rel=1e-4)
    assert full["q"]["drift"] == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-4)
    # Weyl: |sigma_i(W1) - sigma_i(W0)| <= ||dW||_2
    assert np.abs(s1 - s0).max() <= np.linalg.norm(sp["run"]["q"] - sp["base"]["q"], 2) * (1 + 1e-5)
    assert topk["up"]["max_angle_left_deg"] < 1e-3 and topk["up"]["drift"] == 0.0


# ---------------------------------------------------------------------------
# PEFT adapters


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)  # fmt: skip
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    out = {"base": root / "base"}
    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    variants = {
        "lora": {},
        "rslora": {"use_rslora": True, "lora_alpha": 16},
        "dora": {"use_dora": True, "target_modules": ["q_proj", "down_proj"]},
        "embed": {"target_modules": ["embed_tokens", "v_proj"], "alpha_pattern": {"v_proj": 2}},
    }
    for tag, extra in variants.items():
        m = Qwen2ForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
        extra = {"lora_alpha": 8, "target_modules": proj, **extra}
        pm = get_peft_model(m, LoraConfig(r=4, init_lora_weights=False, **extra))
        for name, prm in pm.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA starts at the weight norms: move them
                prm.data *= 1.01
        pm.save_pretrained(root / tag)
        pm.merge_and_unload().save_pretrained(root / f"{tag}_merged")
        # adapter_config's base_model_name_or_path points at the base directory
        conf = json.loads((root / tag / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = str(root / "base")
        (root / tag / "adapter_config.json").write_text(json.dumps(conf))
        out[tag], out[f"{tag}_merged"] = root / tag, root / f"{tag}_merged"
    return out


@pytest.mark.parametrize("tag", ["lora", "rslora", "dora", "embed"])
def test_peft_adapter_equals_merged_model(peft_dirs, tag):
    base = str(peft_dirs["base"])
    ad = compare(base, [str(peft_dirs[tag])], k=8).report["runs"][0]
    mg = compare(base, [str(peft_dirs[f"{tag}_merged"])], k=8).report["runs"][0]
    assert ad["format"] == "peft-adapter"
    assert 0.0 < ad["update_sparsity"] < 1.0
    for key in ("n_params", "n_changed", "update_sparsity", "by_layer", "by_kind", "spectral", "overlap"):
        assert ad[key] == mg[key], key
    assert [t["n_changed"] for t in ad["tensors"]] == [t["n_changed"] for t in mg["tensors"]]
    # the adapter as BASE (its base from adapter_config.json) is the merged model exactly
    same = compare(str(peft_dirs[tag]), [str(peft_dirs[f"{tag}_merged"])], sparsity_only=True).report
    assert same["runs"][0]["update_sparsity"] == 1.0 and same["runs"][0]["stored_dtype_sparsity"] == 1.0


def test_peft_adapter_base_option(peft_dirs, tmp_path):
    base = str(peft_dirs["base"])
    default = compare(base, [str(peft_dirs["lora"])], sparsity_only=True).report["runs"][0]
    explicit = compare(base, [str(peft_dirs["lora"])], sparsity_only=True, adapter_base=base).report["runs"][0]
    assert default["tensors"] == explicit["tensors"]
    bad = tmp_path / "bad_adapter"
    shutil.copytree(peft_dirs["lora"], bad)
    conf = json.loads((bad / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tmp_path / "nowhere")
    (bad / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CompareError, match="nowhere"):
        compare(str(bad), [base], sparsity_only=True)


# ---------------------------------------------------------------------------
# bad input


def test_mismatched_architectures(ckpts, tmp_path):
    from safetensors.torch import load_file

    w = load_file(str(ckpts["a"] / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    w["model.layers.0.self_attn.q_proj.weight"] = w["model.layers.0.self_attn.q_proj.weight"][:32].contiguous()
    w["model.layers.2.mlp.extra.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CompareError) as ei:
        compare(str(ckpts["base"]), [str(tmp_path)], sparsity_only=True)
    msg = str(ei.value)
    assert "1 tensor(s) of BASE missing from RUN" in msg and "1 extra tensor(s) in RUN" in msg
    assert "1 shape mismatch(es)" in msg and "layers.1.mlp.up_proj.weight" in msg
    assert "layers.0.self_attn.q_proj.weight: BASE (64, 64) vs RUN (32, 64)" in msg


def test_truncated_file(ckpts, tmp_path, capsys):
    bad = tmp_path / "trunc"
    bad.mkdir()
    src = ckpts["a"] / "model.safetensors"
    data = src.read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CompareError, match=r"model\.safetensors.*corrupt or truncated"):
        compare(str(ckpts["base"]), [str(bad)])
    assert cli_main(["compare", str(ckpts["base"]), str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rlmonitor compare: error:" in err and str(bad / "model.safetensors") in err and "Traceback" not in err
    # a missing shard is named too
    shard_dir = tmp_path / "shards"
    shutil.copytree(ckpts["a_sharded"], shard_dir)
    victim = sorted(shard_dir.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CompareError, match=victim.name):
        compare(str(ckpts["base"]), [str(shard_dir)])


def test_offline_hub_id_and_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CompareError, match="not in the local Hugging Face cache"):
        compare("some-org/not-a-cached-model", [str(tmp_path)])
    with pytest.raises(CompareError, match="no such file"):
        compare(str(tmp_path / "missing.safetensors"), [str(tmp_path)])


# ---------------------------------------------------------------------------
# command line: --json schema, --out files, --wandb


def test_cli_json_schema_and_outputs(ckpts, tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "report.json"
    rc = cli_main(["compare", str(ckpts["base"]), str(ckpts["a"]), str(ckpts["b"]), "--k", "8",
                   "--out", str(out), "--json", str(js), "--no-progress", "--names", "A", "B"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "Jaccard" in text and "module kind" in text
    rep = json.loads(js.read_text())
    assert rep["schema"] == "rlmonitor.compare/1"
    assert {"base", "settings", "runs", "jaccard", "jaccard_by_layer", "consensus", "notes", "outputs"} <= set(rep)
    assert [r["name"] for r in rep["runs"]] == ["A", "B"]
    for r in rep["runs"]:
        assert 0.0 <= r["update_sparsity"] <= 1.0
        assert {"by_layer", "by_kind", "by_layer_kind", "tensors", "spectral", "overlap", "dtypes"} <= set(r)
        assert {"max_angle_left_deg", "max_angle_right_deg", "drift_mean", "by_kind", "matrices"} <= set(r["spectral"])
    assert rep["runs"][0]["update_sparsity"] == pytest.approx(_expected_sparsity(ckpts["mask_a"]), abs=1e-12)
    j = next(e for e in rep["jaccard"] if e["kind"] == "all")
    assert {"run_a", "run_b", "jaccard", "random_baseline"} <= set(j) and (j["run_a"], j["run_b"]) == ("A", "B")
    files = {Path(p).name for p in rep["outputs"]}
    assert {"summary.csv", "sparsity_by_layer.csv", "jaccard.csv", "spectral.csv", "overlap_curve.csv",
            "sparsity_by_layer.png", "principal_angles.png", "overlap_vs_alpha.png", "jaccard.png",
            "consensus_layer1.png", "row_col_ratios_layer1.png"} <= files  # fmt: skip
    for p in rep["outputs"]:
        assert Path(p).stat().st_size > 0
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("run,n_params,n_changed,update_sparsity")
    # --json - prints the JSON on stdout (tables go to stderr)
    assert cli_main(["compare", str(ckpts["base"]), str(ckpts["a"]), "--json", "-", "--sparsity-only",
                     "--no-progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["runs"][0]["spectral"] is None


def test_cli_bad_arguments(ckpts, capsys):
    assert cli_main(["compare", str(ckpts["base"]), str(ckpts["a"]), "--alpha", "1.5", "--no-progress"]) == 2
    assert cli_main(["compare", str(ckpts["base"]), str(ckpts["a"]), "--layers", "7", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--alpha must be in (0, 1)" in err and "no block [7]" in err


def test_layers_option(ckpts):
    rep = compare(str(ckpts["base"]), [str(ckpts["a"])], k=8, layers=[0]).report
    run = rep["runs"][0]
    assert {m["layer"] for m in run["spectral"]["matrices"]} == {0}
    assert rep["settings"]["focus_layers"] == [0]
    assert run["n_params"] == rep["base"]["n_params"]  # sparsity always covers the whole model


def test_wandb_offline(ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    rc = cli_main(["compare", str(ckpts["base"]), str(ckpts["a"]), str(ckpts["b"]), "--wandb", "--k", "8",
                   "--layers", "1", "--no-progress", "--quiet", "--names", "A", "B"])  # fmt: skip
    assert rc == 0
    logs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(logs) == 1
    wandb_bin = Path(sys.executable).parent / "wandb"
    if not wandb_bin.exists():
        pytest.skip("wandb CLI not found next to the interpreter")
    proc = subprocess.run([str(wandb_bin), "leet", "inspect", "--summary", "--json", logs[0]],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    logged = json.loads(proc.stdout)
    assert logged["state"] == "finished" and logged["config"]["layers"] == [1]
    summary = logged["summary"]
    assert summary["A/update_sparsity"] == pytest.approx(_expected_sparsity(ckpts["mask_a"]), abs=1e-12)
    for key in ("B/update_sparsity", "A/max_angle_left_deg", "A/overlap_principal", "jaccard/A__B",
                "tables/summary", "tables/sparsity_by_kind", "tables/sparsity_by_layer", "tables/spectral",
                "tables/jaccard", "tables/consensus", "figures/sparsity_by_layer", "figures/consensus_layer1"):  # fmt: skip
        assert key in summary, key
    assert summary["figures/jaccard"]["_type"] == "image-file"


def test_parse_layers():
    from rlmonitor.apps.compare import parse_layers

    assert parse_layers(["0", "5", "10-12"]) == [0, 5, 10, 11, 12]
    assert parse_layers("3,1") == [1, 3]
    assert parse_layers(None) is None and parse_layers(["all"]) is None
    for bad in (["x"], ["5-2"], ["-1"]):
        with pytest.raises(CompareError):
            parse_layers(bad)


# ---------------------------------------------------------------------------
# the torch-free bf16 path of --sparsity-only


def test_sparsity_only_bits_path_equals_the_torch_path(ckpts):
    bits = compare(str(ckpts["base"]), [str(ckpts["a"])], sparsity_only=True)
    full = compare(str(ckpts["base"]), [str(ckpts["a"])], k=8)
    rb, rf = bits.report["runs"][0], full.report["runs"][0]
    for key in ("n_changed", "update_sparsity", "stored_dtype_sparsity", "by_layer", "by_kind", "tensors"):
        assert rb[key] == rf[key], key
    assert bits.row_col.keys() == full.row_col.keys() and bits.row_col
    for key, (rows, cols) in bits.row_col.items():
        assert rows.dtype == cols.dtype == np.float32
        np.testing.assert_array_equal(rows, full.row_col[key][0])
        np.testing.assert_array_equal(cols, full.row_col[key][1])


def test_sparsity_only_on_bf16_never_imports_torch(ckpts, tmp_path):
    code = (
        "import sys, json\n"
        "from rlmonitor.cli import main\n"
        f"rc = main(['compare', {str(ckpts['base'])!r}, {str(ckpts['a'])!r}, '--sparsity-only', '--no-progress',"
        f" '--json', {str(tmp_path / 'r.json')!r}])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": False}
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert run["update_sparsity"] == pytest.approx(_expected_sparsity(ckpts["mask_a"]), abs=1e-12)


def test_sparsity_only_bf16_with_nan_or_signed_zero_flips(ckpts, tmp_path):
    from safetensors.torch import load_file

    w0 = load_file(str(ckpts["base"] / "model.safetensors"))
    w1 = load_file(str(ckpts["a"] / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    # +0 -> -0 at entries that were not moved: still unchanged (the torch path decides)
    b0, b1 = dict(w0), dict(w1)
    unmoved = (~ckpts["mask_a"][name]).reshape(-1).nonzero().flatten()[:5]
    b0[name] = w0[name].clone().reshape(-1)
    b0[name][unmoved] = 0.0
    b0[name] = b0[name].reshape(w0[name].shape)
    b1[name] = w1[name].clone().reshape(-1)
    b1[name][unmoved] = -0.0
    b1[name] = b1[name].reshape(w1[name].shape)
    save_file(b0, str(_dir(tmp_path / "z0") / "model.safetensors"))
    save_file(b1, str(_dir(tmp_path / "z1") / "model.safetensors"))
    rep = compare(str(tmp_path / "z0"), [str(tmp_path / "z1")], sparsity_only=True).report
    got = next(t for t in rep["runs"][0]["tensors"] if t["name"] == name.removeprefix("model."))
    assert got["n_changed"] == int(ckpts["mask_a"][name].sum())
    # the same NaN in both: never silently "unchanged"
    n0, n1 = dict(w0), dict(w1)
    n0[name] = w0[name].clone()
    n1[name] = w1[name].clone()
    n0[name][3, 3] = n1[name][3, 3] = float("nan")
    save_file(n0, str(_dir(tmp_path / "n0") / "model.safetensors"))
    save_file(n1, str(_dir(tmp_path / "n1") / "model.safetensors"))
    with pytest.raises(CompareError, match=r"up_proj.*non-finite"):
        compare(str(tmp_path / "n0"), [str(tmp_path / "n1")], sparsity_only=True)


def _dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_compare_bitwise_bound_is_the_metric_cores():
    # compare keeps its own copy (rlmonitor.metrics imports torch, the bits path must not)
    import rlmonitor.apps.compare.common as compare_module
    from rlmonitor.metrics import masks

    assert compare_module.BITWISE_ETA_LIMIT == masks.BITWISE_ETA_LIMIT


def test_spectral_figures_share_one_scale_across_runs(ckpts, tmp_path, monkeypatch):
    """principal_angles and principal_angle_curves: every run's angle panels (left and right)
    on one y scale, the drift panels on another, so runs read against each other."""
    from rlmonitor.apps.compare import figures

    saved = {}
    real = figures._save

    def keep(fig, path, paths):
        saved[Path(path).name] = fig
        real(fig, path, paths)

    monkeypatch.setattr(figures, "_save", keep)
    result = compare(str(ckpts["base"]), [str(ckpts["a"]), str(ckpts["b"])], k=8, names=["A", "B"])
    figures.write_figures(result, tmp_path)
    angles = saved["principal_angles.png"].axes
    ylims = [ax.get_ylim() for ax in angles]
    assert len(ylims) == 6
    assert ylims[0] == ylims[1] == ylims[3] == ylims[4]  # run A left/right, run B left/right
    assert ylims[2] == ylims[5] and ylims[2] != ylims[0]  # drift: its own shared scale
    curves = [ax.get_ylim() for ax in saved["principal_angle_curves.png"].axes]
    assert len(curves) == 4 and len(set(curves)) == 1
