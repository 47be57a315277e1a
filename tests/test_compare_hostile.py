"""``rlmonitor compare`` on hostile or malformed inputs: a bad ``adapter_config.json`` or
adapter factors, a shard index naming files outside the checkpoint folder. Each is one
CompareError naming the file and field, exit code 2 on the command line, no traceback,
and nothing read from outside the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_compare import HD, KV, NH, H, moved, random_base, save

from rlmonitor.apps.compare import CompareError, compare
from rlmonitor.cli import main as cli_main

R = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A bf16 base, a moved run, a sharded copy of the run, and a valid LoRA adapter."""
    root = tmp_path_factory.mktemp("hostile")
    gen = torch.Generator().manual_seed(3)
    base = random_base(gen)
    run, _ = moved(base, gen, 0.2)
    adapter = root / "adapter"
    adapter.mkdir()
    factors = {}
    for i in range(2):
        pre = f"base_model.model.model.layers.{i}.self_attn."
        factors[pre + "q_proj.lora_A.weight"] = torch.randn(R, H, generator=gen)
        factors[pre + "q_proj.lora_B.weight"] = torch.randn(NH * HD, R, generator=gen)
        factors[pre + "v_proj.lora_A.weight"] = torch.randn(R, H, generator=gen)
        factors[pre + "v_proj.lora_B.weight"] = torch.randn(KV * HD, R, generator=gen)
    save_file({k: (v * 0.01).to(torch.bfloat16) for k, v in factors.items()}, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "use_rslora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
              "init_lora_weights": True, "base_model_name_or_path": None}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return {
        "root": root, "base": save(base, root / "base", torch.bfloat16), "run": save(run, root / "run", torch.bfloat16),
        "sharded": save(run, root / "sharded", torch.bfloat16, shards=3), "adapter": adapter, "config": config,
    }  # fmt: skip


def _cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2 with one clean message; return stderr."""
    assert cli_main(["compare", *argv, "--no-progress", "--sparsity-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlmonitor compare: error:") and "Traceback" not in err
    return err


def test_valid_adapter_is_accepted(models):
    rep = compare(str(models["base"]), [str(models["adapter"])], sparsity_only=True).report
    assert rep["runs"][0]["format"] == "peft-adapter" and 0 < rep["runs"][0]["update_sparsity"] < 1


# ---------------------------------------------------------------------------
# adapter_config.json


BAD_CONFIGS = {
    "r-zero": ({"r": 0}, "'r' must be a positive integer"),
    "r-string": ({"r": "4"}, "'r' must be a positive integer"),
    "alpha-string": ({"lora_alpha": "eight"}, "'lora_alpha' must be a finite number"),
    "alpha-nan": ({"lora_alpha": float("nan")}, "'lora_alpha' must be a finite number"),
    "alpha-bool": ({"lora_alpha": True}, "'lora_alpha' must be a finite number"),
    "rslora-string": ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
    "fan-in-int": ({"fan_in_fan_out": 1}, "'fan_in_fan_out' must be true or false"),
    "rank-pattern-list": ({"rank_pattern": ["q_proj"]}, "'rank_pattern' must be an object"),
    "rank-pattern-zero": ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"),
    "alpha-pattern-list": ({"alpha_pattern": [2]}, "'alpha_pattern' must be an object"),
    "alpha-pattern-value": ({"alpha_pattern": {"v_proj": "two"}}, "alpha_pattern['v_proj']"),
    "alpha-pattern-regex": ({"alpha_pattern": {"v_proj(": 2}}, "not a valid regex"),
    "target-modules-int": ({"target_modules": 7}, "'target_modules' must be a list of module names"),
    "modules-to-save-str": ({"modules_to_save": "lm_head"}, "'modules_to_save' must be a list"),
    "init-number": ({"init_lora_weights": 3}, "'init_lora_weights'"),
    "peft-type-list": ({"peft_type": ["LORA"]}, "'peft_type' must be a string"),
    "base-path-int": ({"base_model_name_or_path": 5}, "'base_model_name_or_path' must be a path"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_adapter_config_fields(models, tmp_path, capsys, case):
    change, expected = BAD_CONFIGS[case]
    bad = tmp_path / "adapter"
    shutil.copytree(models["adapter"], bad)
    (bad / "adapter_config.json").write_text(json.dumps({**models["config"], **change}))
    with pytest.raises(CompareError, match=r"adapter_config\.json") as ei:
        compare(str(models["base"]), [str(bad)], sparsity_only=True)
    assert expected in str(ei.value) and "re-save the adapter" in str(ei.value)
    err = _cli_error(capsys, str(models["base"]), str(bad))
    assert str(bad / "adapter_config.json") in err and expected in err


def test_adapter_config_not_an_object_is_checked_before_any_tensor_is_read(models, tmp_path, capsys):
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps([models["config"]]))
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    err = _cli_error(capsys, str(models["base"]), str(bad))
    assert "must hold a JSON object" in err and "got a list" in err and "not a readable safetensors" not in err
    # absurdly nested JSON is a clean error too, not a RecursionError
    (bad / "adapter_config.json").write_text("[" * 100_000)
    assert "cannot read JSON" in _cli_error(capsys, str(models["base"]), str(bad))


@pytest.mark.parametrize("case", ["rank-zero", "one-dimensional", "integer"])
def test_bad_adapter_factors(models, tmp_path, capsys, case):
    bad = tmp_path / "adapter"
    shutil.copytree(models["adapter"], bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    b_key = a_key.replace("lora_A", "lora_B")
    if case == "rank-zero":
        t[a_key], t[b_key] = torch.zeros(0, H, dtype=torch.bfloat16), torch.zeros(NH * HD, 0, dtype=torch.bfloat16)
        expected = "disagree on the rank"
    elif case == "one-dimensional":
        t[a_key] = torch.zeros(R * H, dtype=torch.bfloat16)
        expected = "must be 2-D floating tensors"
    else:
        t[a_key] = torch.zeros(R, H, dtype=torch.int32)
        expected = "must be 2-D floating tensors"
    save_file(t, str(bad / "adapter_model.safetensors"))
    err = _cli_error(capsys, str(models["base"]), str(bad))
    assert str(bad) in err and "layers.0.self_attn.q_proj" in err and expected in err


# ---------------------------------------------------------------------------
# shard indexes


def _hostile_index(models, tmp_path: Path, case: str) -> Path:
    """A copy of the sharded run whose index sends one shard elsewhere. The outside file
    is a valid shard, so a reader that followed the index would succeed."""
    ck = tmp_path / "ck"
    shutil.copytree(models["sharded"], ck)
    index = ck / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = sorted(set(data["weight_map"].values()))[1]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(ck / victim, outside / victim)
    entry = {
        "dotdot": f"../elsewhere/{victim}",
        "absolute": str(outside / victim),
        "symlink": f"link/{victim}",
        "int": 123,
        "null": None,
        "list": [victim],
    }[case]
    if case == "symlink":
        (ck / "link").symlink_to(outside, target_is_directory=True)
    data["weight_map"] = {k: (entry if v == victim else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return ck


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "int", "null", "list"])
def test_shard_index_cannot_leave_the_checkpoint_folder(models, tmp_path, capsys, case):
    ck = _hostile_index(models, tmp_path, case)
    expected = "must be a shard file name" if case in ("int", "null", "list") else "outside the checkpoint folder"
    with pytest.raises(CompareError, match=expected):
        compare(str(models["base"]), [str(ck)], sparsity_only=True)
    err = _cli_error(capsys, str(models["base"]), str(ck))
    assert str(ck / "model.safetensors.index.json") in err and "weight_map[" in err and expected in err


def test_hub_cache_snapshot_links_into_blobs_are_allowed(models, tmp_path):
    """The Hugging Face cache keeps files in <repo>/blobs and links them from
    <repo>/snapshots/<revision>: a sharded model there still opens."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in models["sharded"].iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    got = compare(str(models["base"]), [str(snap)], sparsity_only=True).report["runs"][0]
    want = compare(str(models["base"]), [str(models["run"])], sparsity_only=True).report["runs"][0]
    assert got["format"] == "sharded" and got["tensors"] == want["tensors"]
