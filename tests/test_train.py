"""``rlmonitor train`` (= ``python sweeps/train.py``): help text, bad input, the sweep's
commands, and a tiny real GRPO run through the command line."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from rlmonitor import cli
from rlmonitor.apps.sweep import build_command, expand, load_sweep
from rlmonitor.apps.train import TrainArguments, parse_args
from rlmonitor.core.sinks import read_jsonl

REPO = Path(__file__).resolve().parents[1]
BOOLEANS = [f.name for f in dataclasses.fields(TrainArguments) if typing.get_type_hints(TrainArguments)[f.name] is bool]


def run_cli(*argv: str, program: tuple[str, ...] = ("-m", "rlmonitor.cli", "train")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *program, *argv], capture_output=True, text=True, timeout=120, cwd=REPO)


def option_help(text: str) -> dict[str, str]:
    """``--option`` -> its help text, from an argparse ``--help`` (wrapping undone)."""
    out: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (--[a-z_]+)( \[BOOL\]| [A-Z_]+| \{[^}]*\})?", line)
        if m:
            current = m.group(1)
            out[current] = line[m.end() :]
        elif current and line.startswith(" " * 10):
            out[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in out.items()}


def test_help_lists_every_field_and_imports_no_training_framework():
    code = ("import sys\nfrom rlmonitor.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "bad = [m for m in ('transformers', 'trl', 'torch', 'wandb') if m in sys.modules]\n"
            "assert not bad, bad\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    helps = option_help(out.stdout)
    assert {f"--{f.name}" for f in dataclasses.fields(TrainArguments)} <= set(helps)
    assert option_help(run_cli("--help", program=("sweeps/train.py",)).stdout) == helps  # the same program


def test_every_boolean_flag_says_what_it_does():
    """The papercut: `--no_kl_probe` was documented as "Measure KL to the base policy".
    Each `--flag` / `--no_flag` help now states its own effect, and does it."""
    helps = option_help(run_cli("--help").stdout)
    assert {"kl_probe", "stop_on_collapse", "use_vllm"} <= set(BOOLEANS)
    for name in BOOLEANS:
        field = next(f for f in dataclasses.fields(TrainArguments) if f.name == name)
        on, off = helps[f"--{name}"], helps[f"--no_{name}"]
        assert on.startswith(field.metadata["help"]) and f"a bare --{name} means true" in on, on
        assert off.startswith(TrainArguments.NO_FLAG_HELP[name]) and off.endswith(f"(same as --{name}=false)"), off
        assert field.metadata["help"] not in off
        assert getattr(parse_args([f"--no_{name}"]), name) is False
        assert getattr(parse_args([f"--{name}"]), name) is True
        assert getattr(parse_args([f"--{name}=false"]), name) is False
    assert helps["--no_kl_probe"].startswith("Do not measure the KL to the base policy")


@pytest.mark.parametrize(("argv", "message"), [
    (["--max_steps=0"], "TrainArguments.max_steps=0 is invalid: use a positive integer"),
    (["--adapter=bogus"], "argument --adapter: invalid choice: 'bogus'"),
    (["--learning_rate=fast"], "argument --learning_rate: invalid float value: 'fast'"),
    (["--learning_rate=-1e-4"], "TrainArguments.learning_rate=-0.0001 is invalid: use a finite number in (0, inf)"),
    (["--per_device_train_batch_size=5"], "make it a multiple of num_generations=8"),
    (["--kl_probe=maybe"], "argument --kl_probe: expected true or false, got 'maybe'"),
    (["--collapse_warmup=2"], "TrainArguments.collapse_warmup=2 is invalid: use an integer >= 3"),
    (["--lora_rnak=8"], "unrecognized arguments: --lora_rnak=8"),
])  # fmt: skip
def test_bad_value_is_one_error_line_and_exit_2(tmp_path, argv, message):
    out_dir = tmp_path / "never"
    for program, prog in ((("-m", "rlmonitor.cli", "train"), "rlmonitor train"), (("sweeps/train.py",), "sweeps/train.py")):
        res = run_cli(*argv, f"--output_dir={out_dir}", program=program)
        assert res.returncode == 2 and res.stdout == "", (res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"{prog}: error: "), res.stderr
        assert message in res.stderr
        assert not out_dir.exists()  # nothing ran


def test_shipped_sweep_commands_parse_into_train_arguments():
    spec = load_sweep(REPO / "sweeps" / "pissa_vs_lora.yaml", cwd=REPO)
    for config in expand(spec):
        cmd = build_command(spec, config)
        args = parse_args(cmd[cmd.index("sweeps/train.py") + 1 :])
        assert all(getattr(args, k) == v for k, v in config.items()), config


@pytest.mark.slow
def test_tiny_run_through_rlmonitor_train(tiny_model_path, tmp_path, capsys):
    """Two GRPO steps on the tiny model through `rlmonitor train`; --no_kl_probe really
    switches the KL probe off, and run_summary.json is what the command printed."""
    out = tmp_path / "run"
    rc = cli.main(["train", f"--model_name_or_path={tiny_model_path}", "--max_steps=2", "--report_to=none",
                   "--per_device_train_batch_size=4", "--num_generations=4", "--num_train_samples=16",
                   "--geometry_every=1", "--geometry_k=4", "--no_kl_probe", "--device=cpu", f"--output_dir={out}"])
    assert rc == 0
    stdout = capsys.readouterr().out  # the Trainer's log lines, then the summary (indented JSON)
    printed = json.loads(stdout[stdout.index("{\n") :])
    summary = json.loads((out / "run_summary.json").read_text())
    assert printed == {k: v for k, v in summary.items() if k != "args"}
    assert summary["steps_run"] == 2 and summary["collapse_step"] == -1
    assert summary["args"]["kl_probe"] is False and summary["args"]["adapter"] == "lora"
    rows = read_jsonl(out / "rlmonitor" / "metrics.jsonl")
    assert [r["step"] for r in rows if "geometry/update_sparsity" in r] == [1, 2]
    assert any("collapse/detected" in r for r in rows)
    assert not any(k.startswith("kl/") for r in rows for k in r)  # --no_kl_probe: no probe
    assert summary["final_kl_base_forward"] is None
    assert summary["final_update_sparsity"] == [r for r in rows if "geometry/update_sparsity" in r][-1][
        "geometry/update_sparsity"]
