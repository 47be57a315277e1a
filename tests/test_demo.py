"""`rlmonitor demo` end to end in reduced form (a few steps, a briefly pretrained base),
plus the pure pieces of its summary (verdict, matched comparison, W&B mode).

The summary's numbers are checked against values read independently: each run's
`rlmonitor/metrics.jsonl` (parsed here line by line), the Trainer's log history and the
offline W&B run's transaction log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import wandb_history

from rlmonitor.cli import main

SUMMARY_KEYS = (
    "geometry/update_sparsity",
    "geometry/principal_angle_max_deg",
    "geometry/spectral_drift_topk",
    "geometry/principal_overlap_ratio",
    "geometry/low_magnitude_overlap_ratio",
    "kl/base_forward",
)
# 200 pretraining steps leave the base at roughly 10% accuracy: GRPO then sees rewards
# of both kinds and really moves (with 50 steps every answer is wrong, every advantage
# zero, and the RL run would not change a single weight). About 10 s on 2 cores.
PRETRAIN_STEPS = "200"
STEPS = 4


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_value(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else None


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One base-model cache for the module: built by the first demo, reused after."""
    return tmp_path_factory.mktemp("rlmonitor-cache")


@pytest.fixture
def demo_env(cache_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RLMONITOR_CACHE", str(cache_dir))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return tmp_path


@pytest.mark.slow
def test_demo_end_to_end(demo_env, cache_dir, capsys):
    out = demo_env / "demo"
    rc = main(["demo", "--steps", str(STEPS), "--pretrain-steps", PRETRAIN_STEPS, "--out", str(out),
               "--wandb", "offline", "--device", "cpu"])
    assert rc == 0
    # the printed compare command names the runs and works as printed
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "rlmonitor compare" in x)
    argv = line.split("rlmonitor compare", 1)[1].split()
    assert argv[argv.index("--names") + 1 : argv.index("--names") + 3] == ["rlvr", "sft"]
    assert main(["compare", *argv, "--json", str(out / "compare.json"), "--quiet", "--no-progress"]) == 0
    assert [r["name"] for r in json.loads((out / "compare.json").read_text())["runs"]] == ["rlvr", "sft"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert Path(summary["base"]["path"]).parent == cache_dir  # the user's cache was not touched
    assert 0.0 <= summary["base"]["accuracy"] <= 1.0
    for name in ("comparison.png", "curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert summary["figures"][name.removesuffix(".png")] == str(out / name)

    for method, sub in (("rlvr", "rl"), ("sft", "sft")):
        info = summary["methods"][method]
        assert info["status"] == "finished" and info["steps"] == STEPS
        rows = read_rows(out / sub / "rlmonitor" / "metrics.jsonl")
        geo_steps = [r["step"] for r in rows if "geometry/update_sparsity" in r]
        assert geo_steps == list(range(1, STEPS + 1))  # every = max(1, steps // 10)
        for key in SUMMARY_KEYS:
            expected = last_value(rows, key)
            assert expected is not None, f"{method}: {key} never logged"
            assert info["final"][key] == expected, (method, key)
            assert summary["comparison"][method][key] == expected  # complete run: final values compared
        assert 0.0 <= info["accuracy"] <= 1.0
        assert info["dashboards"] and all(Path(p).is_file() for p in info["dashboards"])
        assert (out / sub / "model" / "model.safetensors").is_file()
        # W&B: an offline run per method, whose logged geometry matches the summary
        run = summary["wandb"]["runs"][method]
        assert run["name"] == method and Path(run["dir"]).parent == demo_env / "wandb"
        assert run["sync"] == f"wandb sync {run['dir']}"
        assert run["leet"] == f"wandb leet inspect --summary {run['dir']}"
        history = wandb_history(Path(run["dir"]))
        logged = [h["geometry/update_sparsity"] for h in history if "geometry/update_sparsity" in h]
        assert logged and logged[-1] == info["final"]["geometry/update_sparsity"]
    assert summary["wandb"]["mode"] == "offline" and summary["wandb"]["project"] == "rlmonitor-demo"

    # RL really moved: some weights changed, and reward is GRPO's own logged value
    rl = summary["methods"]["rlvr"]
    assert rl["final"]["geometry/update_sparsity"] < 1.0
    state = json.loads((out / "rl" / "trainer_state.json").read_text())
    rewards = [h["reward"] for h in state["log_history"] if "reward" in h]
    assert len(rewards) == STEPS and rl["reward"] == rewards[-1]
    assert "reward" not in summary["methods"]["sft"]

    # each verdict boolean is the comparison it names, on the summary's own numbers
    v, r, s = summary["verdict"], rl["final"], summary["methods"]["sft"]["final"]
    assert v["rl_sparser"]["holds"] == (r["geometry/update_sparsity"] > s["geometry/update_sparsity"])
    assert v["rl_principal_overlap_below_sft"]["holds"] == (
        r["geometry/principal_overlap_ratio"] < s["geometry/principal_overlap_ratio"])
    assert v["rl_principal_overlap_below_random"]["holds"] == (r["geometry/principal_overlap_ratio"] < 1.0)
    assert v["rl_spectral_drift_smaller"]["holds"] == (r["geometry/spectral_drift_topk"] < s["geometry/spectral_drift_topk"])
    assert v["rl_principal_angle_smaller"]["holds"] == (
        r["geometry/principal_angle_max_deg"] < s["geometry/principal_angle_max_deg"])
    assert v["rl_low_magnitude_overlap_above_sft"]["holds"] == (
        r["geometry/low_magnitude_overlap_ratio"] > s["geometry/low_magnitude_overlap_ratio"])
    checks = [c["holds"] for name, c in v.items() if name != "overall"]
    assert v["overall"]["checks_made"] == len(checks) == 7
    assert v["overall"]["holds"] == all(checks)
    assert all(c["sentence"] for c in v.values())
    matched = summary["size_matched"]  # SFT at RL's update size, when SFT's range contains it
    assert matched is None or set(matched["checks"]) == set(SUMMARY_KEYS[:5])


@pytest.mark.slow
def test_demo_no_sft_skips_sft(demo_env, monkeypatch):
    import torch

    from rlmonitor.callbacks.geometry import GeometryCallback

    original, threads = GeometryCallback.on_step_end, set()

    def recording(self, *args, **kwargs):
        threads.add(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GeometryCallback, "on_step_end", recording)
    before = torch.get_num_threads()
    out = demo_env / "demo"
    rc = main(["demo", "--steps", "2", "--pretrain-steps", PRETRAIN_STEPS, "--out", str(out),
               "--wandb", "off", "--no-sft", "--device", "cpu"])
    assert rc == 0
    assert threads == {1} and torch.get_num_threads() == before  # --threads 1 (default) for the run only
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["rlvr"]
    assert not (out / "sft").exists()
    assert summary["wandb"]["mode"] == "off" and summary["wandb"]["runs"] == {}
    assert not (demo_env / "wandb").exists()
    rows = read_rows(out / "rl" / "rlmonitor" / "metrics.jsonl")
    assert summary["methods"]["rlvr"]["final"]["geometry/update_sparsity"] == last_value(
        rows, "geometry/update_sparsity")
    v = summary["verdict"]
    assert v["rl_sparser"]["holds"] is None and v["rl_spectral_drift_smaller"]["holds"] is None
    assert v["overall"]["checks_made"] == 2  # only RL's overlaps against the random baseline
    assert (out / "comparison.png").is_file() and (out / "curves.png").is_file()


@pytest.mark.slow
def test_demo_ctrl_c_keeps_finished_parts(demo_env, monkeypatch):
    """A KeyboardInterrupt during SFT: the RL run stays complete, the summary compares
    both runs at the last step both measured, and the exit code is 130."""
    from rlmonitor.callbacks.geometry import GeometryCallback

    original = GeometryCallback.on_step_end

    def interrupting(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if args.run_name == "sft" and state.global_step == 2:
            self.monitor.worker.flush()  # deterministic for the test: step 2's record is written
            raise KeyboardInterrupt

    monkeypatch.setattr(GeometryCallback, "on_step_end", interrupting)
    out = demo_env / "demo"
    rc = main(["demo", "--steps", str(STEPS), "--pretrain-steps", PRETRAIN_STEPS, "--out", str(out),
               "--wandb", "offline"])
    assert rc == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["methods"]["rlvr"]["status"] == "finished"
    assert summary["methods"]["sft"]["status"] == "interrupted"
    assert summary["comparison"]["step"] == 2 and "step 2" in summary["comparison"]["note"]
    rl_rows = read_rows(out / "rl" / "rlmonitor" / "metrics.jsonl")
    at2 = [r for r in rl_rows if r["step"] <= 2]
    assert summary["comparison"]["rlvr"]["geometry/update_sparsity"] == last_value(at2, "geometry/update_sparsity")
    assert summary["methods"]["rlvr"]["final"]["geometry/update_sparsity"] == last_value(
        rl_rows, "geometry/update_sparsity")
    sft_rows = read_rows(out / "sft" / "rlmonitor" / "metrics.jsonl")
    assert summary["comparison"]["sft"]["geometry/update_sparsity"] == last_value(sft_rows, "geometry/update_sparsity")
    # the interrupted W&B run was closed and can still be synced
    assert Path(summary["wandb"]["runs"]["sft"]["dir"]).is_dir()
    assert (out / "curves.png").is_file()


# --------------------------------------------------------------------------- pure helpers


def test_verdict_directions():
    from rlmonitor.apps.demo import verdict

    rl = {"geometry/update_sparsity": 0.5, "geometry/principal_angle_max_deg": 1.0,
          "geometry/spectral_drift_topk": 1e-4, "geometry/principal_overlap_ratio": 0.7,
          "geometry/low_magnitude_overlap_ratio": 1.3, "geometry/rel_frobenius": 0.01, "kl/base_forward": 0.01}
    sft = {"geometry/update_sparsity": 0.1, "geometry/principal_angle_max_deg": 10.0,
           "geometry/spectral_drift_topk": 1e-2, "geometry/principal_overlap_ratio": 1.2,
           "geometry/low_magnitude_overlap_ratio": 0.9, "geometry/rel_frobenius": 0.02, "kl/base_forward": 0.02}
    v = verdict(rl, sft)
    assert all(c["holds"] is True for c in v.values())
    assert "shows:" in v["overall"]["sentence"] and "7 of 7" in v["overall"]["sentence"]
    flipped = verdict(sft, rl)  # SFT's numbers in RL's place: every contrast fails
    assert flipped["overall"]["holds"] is False and flipped["overall"]["checks_holding"] == 0
    assert "does NOT show" in flipped["overall"]["sentence"]
    partial = verdict({**rl, "geometry/update_sparsity": 0.05}, sft)
    assert partial["rl_sparser"]["holds"] is False and partial["overall"]["holds"] is False
    assert "shows only partly" in partial["overall"]["sentence"]
    alone = verdict(rl, None)
    assert alone["rl_sparser"]["holds"] is None and alone["overall"]["checks_made"] == 2
    assert verdict(None, None)["overall"]["holds"] is None


def test_matched_comparison_uses_the_last_common_step():
    from rlmonitor.apps.demo import matched_comparison

    def rows(steps, base):
        out = [{"step": 0, "kl/base_forward": 0.0}]
        out += [{"step": s, "geometry/update_sparsity": base - s / 100, "kl/base_forward": s / 10} for s in steps]
        return out

    keys = ["geometry/update_sparsity", "kl/base_forward"]
    done = matched_comparison({"rlvr": rows([2, 4, 6], 1.0), "sft": rows([2, 4, 6], 0.5)}, keys)
    assert done["step"] == 6 and done["note"] == ""
    assert done["rlvr"]["geometry/update_sparsity"] == pytest.approx(0.94)
    cut = matched_comparison({"rlvr": rows([2, 4, 6], 1.0), "sft": rows([2, 4], 0.5)}, keys)
    assert cut["step"] == 4 and "step 4" in cut["note"]
    assert cut["rlvr"] == {"geometry/update_sparsity": pytest.approx(0.96), "kl/base_forward": pytest.approx(0.4)}
    assert cut["sft"]["geometry/update_sparsity"] == pytest.approx(0.46)
    early = matched_comparison({"rlvr": rows([2, 4], 1.0), "sft": rows([], 0.5)}, keys)
    assert early["step"] == 4 and early["sft"] == {} and "SFT" in early["note"]


def test_size_matched_interpolates_sft_to_rl_update_size():
    from rlmonitor.apps.demo import size_matched

    keys = ("geometry/update_sparsity", "geometry/principal_angle_max_deg", "geometry/spectral_drift_topk",
            "geometry/principal_overlap_ratio", "geometry/low_magnitude_overlap_ratio")
    sft = [{"step": 0, "kl/base_forward": 0.0}]
    for step, rel in ((10, 0.01), (20, 0.02), (30, 0.03)):
        sft.append({"step": step, "geometry/rel_frobenius": rel, "geometry/update_sparsity": 0.5 - 10 * rel,
                    "geometry/principal_angle_max_deg": 100 * rel, "geometry/spectral_drift_topk": rel / 10,
                    "geometry/principal_overlap_ratio": 0.5 + 10 * rel, "geometry/low_magnitude_overlap_ratio": 1.2 - rel})
    rl = {"geometry/rel_frobenius": 0.015, "geometry/update_sparsity": 0.4, "geometry/principal_angle_max_deg": 1.0,
          "geometry/spectral_drift_topk": 1e-3, "geometry/principal_overlap_ratio": 0.6,
          "geometry/low_magnitude_overlap_ratio": 1.1}
    m = size_matched(rl, sft)
    assert m["sft_step"] == pytest.approx(15.0)
    assert m["sft"]["geometry/update_sparsity"] == pytest.approx(0.35)
    assert m["sft"]["geometry/principal_angle_max_deg"] == pytest.approx(1.5)
    assert m["sft"]["geometry/low_magnitude_overlap_ratio"] == pytest.approx(1.185)
    assert set(m["checks"]) == set(keys)
    # RL sparser, smaller angle, drift 1e-3 < 1.5e-3, overlap 0.6 < 0.65; low-magnitude 1.1 < 1.185 fails
    assert m["checks"]["geometry/low_magnitude_overlap_ratio"] is False and m["checks_holding"] == 4
    assert "4 of 5" in m["sentence"] and "low-magnitude" in m["sentence"]
    assert size_matched({**rl, "geometry/rel_frobenius": 0.05}, sft) is None  # outside SFT's range
    assert size_matched(rl, []) is None


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    from rlmonitor.apps.demo import resolve_wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_wandb_mode("auto") == "offline"  # no credentials anywhere
    assert resolve_wandb_mode("online") == "online" and resolve_wandb_mode("off") == "off"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("auto") == "offline"  # an explicit WANDB_MODE wins
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "off"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert resolve_wandb_mode("auto") == "online"


def test_demo_config_fields_have_help_and_errors_name_class_field_value_and_fix():
    import dataclasses

    from rlmonitor.apps.demo import DemoConfig

    assert all(f.metadata.get("help") for f in dataclasses.fields(DemoConfig))
    for kw, message in (({"steps": 0}, "DemoConfig.steps=0 is invalid: use a positive integer"),
                        ({"wandb": "cloud"}, "DemoConfig.wandb='cloud' is invalid: choose 'auto', 'online'"),
                        ({"rl_lr": float("nan")}, "DemoConfig.rl_lr=nan is invalid: use a finite number in (0, inf)"),
                        ({"pretrain_steps": -1}, "DemoConfig.pretrain_steps=-1 is invalid: use a non-negative integer"),
                        ({"geometry_every": 0}, "DemoConfig.geometry_every=0 is invalid: use a positive integer")):  # fmt: skip
        with pytest.raises(ValueError) as err:
            DemoConfig(**kw)
        assert str(err.value).startswith(message)
    assert DemoConfig(steps=25).every == 2 and DemoConfig(geometry_every=7).every == 7
