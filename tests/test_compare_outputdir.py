"""rlmonitor's saved base as a checkpoint, and ``rlmonitor compare OUTPUT_DIR`` on
training output folders built here (the files a GeometryCallback run and a Trainer
leave: ``rlmonitor/base/{weights,spectra}.safetensors`` + ``base_meta.json``,
``checkpoint-<N>/``, a final model), full fine-tunes and a PEFT LoRA run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_compare import HD, KV, LAYERS, NH, H, moved, random_base, save

from rlmonitor.apps.compare import CompareError, compare, compare_output_dir
from rlmonitor.apps.compare.analysis import default_names
from rlmonitor.checkpoints import open_checkpoint
from rlmonitor.checkpoints.training import choose_run
from rlmonitor.cli import main as cli_main
from rlmonitor.core.naming import canonical, canonical_key

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
MONITORED = [f"model.layers.{i}.{p}.weight" for i in range(LAYERS) for p in PROJ]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_rlmonitor_base(out: Path, weights: dict, subdir: str = "rlmonitor", step: int = 0) -> Path:
    """The saved base as the callback writes it (format rlmonitor.base/2)."""
    folder = out / subdir / "base"
    folder.mkdir(parents=True)
    mats = {canonical(k): weights[k].to(torch.bfloat16).contiguous() for k in MONITORED}
    save_file({n + ".weight": w for n, w in mats.items()}, str(folder / "weights.safetensors"))
    spectra = {}
    for n, w in mats.items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        spectra |= {f"{n}::U": u[:, :4].contiguous(), f"{n}::S": s[:4].contiguous(), f"{n}::V": vh[:4].T.contiguous()}
    save_file(spectra, str(folder / "spectra.safetensors"))
    meta = {"format": "rlmonitor.base/2", "step": step, "matrices": {n: list(w.shape) for n, w in mats.items()}}
    (folder / "base_meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tune's output folder: saved base, checkpoint-20 and checkpoint-40."""
    root = tmp_path_factory.mktemp("outdir")
    gen = torch.Generator().manual_seed(5)
    base = random_base(gen)
    run20, _ = moved(base, gen, 0.1)
    run40, mask40 = moved(base, gen, 0.3)
    out = root / "grpo"
    save_rlmonitor_base(out, base)
    save(run20, out / "checkpoint-20", torch.bfloat16)
    save(run40, out / "checkpoint-40", torch.bfloat16)
    (out / "checkpoint-40" / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    return {"out": out, "model": save(base, root / "base_model", torch.bfloat16), "mask40": mask40,
            "run40": run40, "root": root}  # fmt: skip


def test_compare_output_dir_uses_the_saved_base_and_the_newest_checkpoint(full_run, tmp_path, capsys):
    out, js = full_run["out"], tmp_path / "r.json"
    assert cli_main(["compare", str(out), "--k", "8", "--json", str(js), "--no-progress", "--out",
                     str(tmp_path / "figs")]) == 0  # fmt: skip
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    rep = json.loads(js.read_text())
    (run,) = rep["runs"]
    assert rep["base"]["format"] == "rlmonitor-base" and rep["base"]["n_tensors"] == len(MONITORED)
    assert run["path"] == str(out / "checkpoint-40") and run["name"] == "checkpoint-40"
    assert "checkpoint-40" in rep["notes"][0] and "highest-numbered" in rep["notes"][0]
    assert "checkpoint-40" in text and "left out" in text  # the choice and the note reach the terminal
    # exactly the monitored matrices, each with its known number of changed entries
    assert {t["name"] for t in run["tensors"]} == {canonical_key(k) for k in MONITORED}
    for t in run["tensors"]:
        assert t["n_changed"] == int(full_run["mask40"]["model." + t["name"]].sum())
    (left,) = [n for n in run["notes"] if "left out" in n]
    assert "embed_tokens.weight" in left or "norm" in left
    # the same numbers as comparing the full base model, restricted to these matrices
    ref = compare(str(full_run["model"]), [str(out / "checkpoint-40")], k=8).report["runs"][0]
    ref_t = {t["name"]: t for t in ref["tensors"]}
    assert all(t == ref_t[t["name"]] for t in run["tensors"])
    assert run["spectral"]["matrices"] == ref["spectral"]["matrices"]
    assert run["overlap"]["matrices"] == ref["overlap"]["matrices"]


def test_saved_base_wherever_a_base_is_accepted(full_run):
    out = full_run["out"]
    ck20 = str(out / "checkpoint-20")
    want = compare(str(out / "rlmonitor" / "base"), [ck20], sparsity_only=True).report["runs"][0]["tensors"]
    for base in (out, out / "rlmonitor"):  # the output folder, its rlmonitor folder
        rep = compare(str(base), [ck20], sparsity_only=True).report
        assert rep["base"]["format"] == "rlmonitor-base" and rep["runs"][0]["tensors"] == want
    # a base tensor the RUN lacks is still an error
    broken = full_run["root"] / "broken"
    w = load_file(str(out / "checkpoint-20" / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(broken.mkdir() or broken / "model.safetensors"))
    with pytest.raises(CompareError, match=r"1 tensor\(s\) of BASE missing from RUN.*layers\.1\.mlp\.up_proj"):
        compare(str(out), [str(broken)], sparsity_only=True)


def _copy_out(full_run, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out, symlinks=True)
    return out


def test_choice_between_final_model_and_checkpoints(full_run, tmp_path):
    out = _copy_out(full_run, tmp_path)
    shutil.copy(out / "checkpoint-20" / "model.safetensors", out / "model.safetensors")  # final model
    (out / "checkpoint-60").mkdir()  # an interrupted save: no weights
    # trainer_state.json in OUTPUT_DIR gives the final model's step
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 50}))
    c = choose_run(out)
    assert c.path == out and "step 50" in c.reason and "checkpoint-40" in c.reason and "skipped checkpoint-60" in c.reason
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 30}))
    c = choose_run(out)
    assert c.path == out / "checkpoint-40" and "step 30" in c.reason
    # no usable trainer_state.json: file times decide
    (out / "trainer_state.json").write_text("[1, 2")
    final, ck = out / "model.safetensors", out / "checkpoint-40" / "model.safetensors"
    os.utime(final, (1e9, 1e9))
    os.utime(ck, (2e9, 2e9))
    c = choose_run(out)
    assert c.path == out / "checkpoint-40" and "file times" in c.reason
    os.utime(final, (3e9, 3e9))
    c = choose_run(out)
    assert c.path == out and "file times" in c.reason
    # only a final model
    for d in out.glob("checkpoint-*"):
        shutil.rmtree(d)
    assert choose_run(out).path == out
    rep = compare(str(out / "rlmonitor" / "base"), [str(out)], sparsity_only=True).report
    assert rep["runs"][0]["name"] == "run"  # named by its folder, not "model"


def test_output_dir_errors(full_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(full_run["out"] / "checkpoint-20", bare / "checkpoint-20")
    assert cli_main(["compare", str(bare), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no saved rlmonitor base" in err and "GeometryCallback" in err and "--subdir" in err
    assert "Traceback" not in err
    nothing = tmp_path / "nothing"
    save_rlmonitor_base(nothing, random_base(torch.Generator().manual_seed(1)))
    (nothing / "checkpoint-10").mkdir()
    assert cli_main(["compare", str(nothing), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no model to compare" in err and "save_strategy" in err and "trainer.save_model()" in err
    # --subdir: a callback configured with another output_subdir
    other = tmp_path / "other"
    save_rlmonitor_base(other, random_base(torch.Generator().manual_seed(0)), subdir="geom")
    shutil.copytree(full_run["out"] / "checkpoint-20", other / "checkpoint-20")
    assert cli_main(["compare", str(other), "--no-progress", "--sparsity-only", "--quiet"]) == 2
    assert cli_main(["compare", str(other), "--subdir", "geom", "--no-progress", "--sparsity-only", "--quiet"]) == 0


@pytest.mark.parametrize("case", ["format", "matrices", "mismatch", "no-weights"])
def test_bad_saved_base(full_run, tmp_path, capsys, case):
    out = _copy_out(full_run, tmp_path)
    folder = out / "rlmonitor" / "base"
    meta = json.loads((folder / "base_meta.json").read_text())
    if case == "format":
        meta["format"] = "rlmonitor.base/1"
        expected = "this rlmonitor reads 'rlmonitor.base/2'"
    elif case == "matrices":
        meta["matrices"] = ["layers.0.self_attn.q_proj"]
        expected = "field 'matrices' must be an object"
    elif case == "mismatch":
        meta["matrices"]["layers.0.self_attn.q_proj"] = [64, 32]
        expected = "does not match the matrices listed"
    else:
        (folder / "weights.safetensors").unlink()
        expected = "no weights.safetensors"
    (folder / "base_meta.json").write_text(json.dumps(meta))
    assert cli_main(["compare", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and expected in err and "Traceback" not in err


def _shard_base(folder: Path, world: int = 2) -> None:
    """Rewrite a saved base as a distributed run writes it: one weights file per rank
    (the matrices it owns) and the index, with rlmonitor's own writers."""
    from rlmonitor.core.basestore import save_base, write_index

    weights = load_file(str(folder / "weights.safetensors"))
    meta = json.loads((folder / "base_meta.json").read_text())
    names = sorted(k.removesuffix(".weight") for k in weights)
    owner = {n: i % world for i, n in enumerate(names)}
    shutil.rmtree(folder)
    for r in range(world):
        save_base(folder, {n: weights[n + ".weight"] for n in names if owner[n] == r}, {}, None, shard=(r, world))
    write_index(folder, owner, world, meta)


def test_sharded_saved_base(full_run, tmp_path, capsys):
    out = _copy_out(full_run, tmp_path)
    folder = out / "rlmonitor" / "base"
    _shard_base(folder)
    assert not (folder / "weights.safetensors").exists() and len(list(folder.glob("weights-*-of-*"))) == 2
    rep = compare_output_dir(str(out), k=8, progress=False).report
    ref = compare_output_dir(str(full_run["out"]), k=8, progress=False).report
    assert rep["base"]["n_tensors"] == len(MONITORED)
    by_name = lambda rows: {r["name"]: r for r in rows}  # noqa: E731 - the shards list them in another order
    assert by_name(rep["runs"][0]["tensors"]) == by_name(ref["runs"][0]["tensors"])
    assert by_name(rep["runs"][0]["spectral"]["matrices"]) == by_name(ref["runs"][0]["spectral"]["matrices"])
    # damaged: a rank's file missing, or an index entry outside the folder
    index = folder / "weights.safetensors.index.json"
    doc = json.loads(index.read_text())
    (folder / "weights-00001-of-00002.safetensors").rename(tmp_path / "aside.safetensors")
    assert cli_main(["compare", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 weight files are missing" in err and "weights-00001-of-00002" in err and "Traceback" not in err
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = "../aside.safetensors"
    index.write_text(json.dumps(doc))
    assert cli_main(["compare", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "must be a file name inside" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# a PEFT LoRA run: adapter checkpoints applied to the saved base


def test_peft_checkpoint_against_the_saved_base(full_run, tmp_path):
    gen = torch.Generator().manual_seed(11)
    base = load_file(str(full_run["model"] / "model.safetensors"))
    out = tmp_path / "lora-run"
    save_rlmonitor_base(out, base)
    ck = out / "checkpoint-10"
    ck.mkdir(parents=True)
    r, alpha, v_alpha = 4, 8, 2
    factors, merged = {}, dict(base)
    for i in range(LAYERS):
        for proj, rows, scale in (("q_proj", NH * HD, alpha / r), ("v_proj", KV * HD, v_alpha / r)):
            key = f"model.layers.{i}.self_attn.{proj}"
            a = (torch.randn(r, H, generator=gen) * 0.1).to(torch.bfloat16)
            b = (torch.randn(rows, r, generator=gen) * 0.1).to(torch.bfloat16)
            factors[f"base_model.model.{key}.lora_A.weight"] = a
            factors[f"base_model.model.{key}.lora_B.weight"] = b
            # the merge, written out: W + s * B @ A (product in fp32, rounded to the factor dtype, added once)
            delta = ((b.float() @ a.float()) * scale).to(torch.bfloat16)
            merged[key + ".weight"] = (base[key + ".weight"].float() + delta.float()).to(torch.bfloat16)
    # an embedding LoRA too: the saved base does not hold embed_tokens, so it is left out
    factors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(r, 256, generator=gen).bfloat16()
    factors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(H, r, generator=gen).bfloat16()
    save_file(factors, str(ck / "adapter_model.safetensors"))
    (ck / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "alpha_pattern": {"v_proj": v_alpha},
        "target_modules": ["q_proj", "v_proj", "embed_tokens"], "base_model_name_or_path": "/nowhere/never-read",
    }))  # fmt: skip
    merged_dir = save(merged, tmp_path / "merged")

    rep = compare_output_dir(str(out), k=8).report
    (run,) = rep["runs"]
    assert run["format"] == "peft-adapter" and run["name"] == "checkpoint-10"
    assert any("PiSSA" in n for n in run["notes"]) and any("left out" in n for n in run["notes"])
    # the effective weights equal the merge computed above, bit for bit
    saved = open_checkpoint(str(out), as_base=True)
    adapter = open_checkpoint(str(ck), adapter_base=saved)
    for key in MONITORED:
        assert torch.equal(adapter.read(canonical_key(key)), merged[key]), key
    # and compare reports what comparing the merged model against the full base reports
    ref = compare(str(full_run["model"]), [str(merged_dir)], k=8).report["runs"][0]
    ref_t = {t["name"]: t for t in ref["tensors"]}
    assert all(t["n_changed"] == ref_t[t["name"]]["n_changed"] for t in run["tensors"])
    assert sum(t["n_changed"] for t in run["tensors"]) > 0
    assert run["spectral"]["matrices"] == ref["spectral"]["matrices"]
    # a final adapter saved in OUTPUT_DIR itself (trainer.save_model()), no checkpoint: it is the RUN
    final_out = tmp_path / "lora-final"
    shutil.copytree(out / "rlmonitor", final_out / "rlmonitor")
    for f in ck.iterdir():
        shutil.copy(f, final_out / f.name)
    final = compare_output_dir(str(final_out), sparsity_only=True).report["runs"][0]
    assert final["path"] == str(final_out) and final["name"] == "lora-final" and final["format"] == "peft-adapter"
    assert final["tensors"] == run["tensors"]
    # --adapter-base takes the output folder too
    again = compare(str(out / "rlmonitor" / "base"), [str(ck)], adapter_base=str(out), k=8).report["runs"][0]
    assert again["tensors"] == run["tensors"] and again["spectral"] == run["spectral"]


# ---------------------------------------------------------------------------
# run names


def test_default_names(tmp_path):
    for d in ("grpo/checkpoint-40", "sft/checkpoint-40", "solo/final", "x/ckpt"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "model.safetensors").write_bytes(b"")
    g, s = str(tmp_path / "grpo/checkpoint-40"), str(tmp_path / "sft/checkpoint-40")
    assert default_names([g, s]) == ["grpo/checkpoint-40", "sft/checkpoint-40"]
    assert default_names([g + "/model.safetensors", str(tmp_path / "solo/final/model.safetensors")]) == [
        "checkpoint-40", "final"]  # fmt: skip
    assert default_names([g, g, s]) == ["grpo/checkpoint-40", "grpo/checkpoint-40#2", "sft/checkpoint-40"]
    assert default_names(["Qwen/Qwen2.5-0.5B"]) == ["Qwen2.5-0.5B"]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "x" / "ckpt")
        assert default_names([".", "model.safetensors"]) == ["ckpt", "ckpt#2"]
    finally:
        os.chdir(cwd)
