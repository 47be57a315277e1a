"""``rlmonitor sweep``: the shipped W&B sweep YAML, validation messages, exact grid /
random expansion, W&B's command-macro formatting, and a real local run of the program."""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from rlmonitor import cli
from rlmonitor.apps.sweep import (
    SweepSpecError,
    build_command,
    command_args,
    expand,
    load_sweep,
    parse_sweep,
)
from rlmonitor.apps.train import TrainArguments

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "sweeps" / "pissa_vs_lora.yaml"
COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]

MINI = """\
program: sweeps/train.py
method: grid
metric: {name: train/reward, goal: maximize}
parameters:
  seed: {values: [0, 1]}
  learning_rate: {values: [1.0e-4, 1.0e-3]}
  adapter: {values: [lora, pissa]}
  lora_rank: {value: 8}
command:
  - ${env}
  - ${interpreter}
  - ${program}
  - ${args}
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def dry_run(capsys, *argv: str) -> tuple[int, list[list[str]]]:
    rc = cli.main(["sweep", *argv])
    out = capsys.readouterr().out
    return rc, [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


# ------------------------------------------------------------------------------- shipped YAML


def test_shipped_yaml_is_a_valid_grid_over_train_arguments():
    spec = load_sweep(SHIPPED, cwd=REPO)
    assert spec.name == "pissa_vs_lora" and spec.method == "grid"
    assert spec.program == "sweeps/train.py" and spec.program_path.is_file()
    assert spec.command == COMMAND
    assert spec.metric == {"name": "train/reward", "goal": "maximize"}
    assert not spec.notes
    params = spec.parameters
    assert params["adapter"].values == ("lora", "pissa")
    lrs = params["learning_rate"].values
    assert all(type(v) is float for v in lrs) and list(lrs) == sorted(lrs)
    assert lrs[-1] / lrs[0] >= 30  # stable ... collapsing
    assert {"lora_rank", "seed"} <= set(params)
    # every parameter is a TrainArguments field, so ${args} maps onto the program's flags
    assert set(params) <= {f.name for f in fields(TrainArguments)}
    # plain PyYAML (what `wandb sweep` uses) reads the same numbers: no '1e-4' strings
    raw = yaml.safe_load(SHIPPED.read_text())
    assert raw["command"] == COMMAND
    assert all(isinstance(v, float) for v in raw["parameters"]["learning_rate"]["values"])


def test_shipped_yaml_commands_parse_into_train_arguments(capsys, monkeypatch, tmp_path):
    from transformers import HfArgumentParser

    monkeypatch.chdir(REPO)
    rc, commands = dry_run(capsys, str(SHIPPED), "--local", "--dry-run", "--out", str(tmp_path))
    spec = load_sweep(SHIPPED, cwd=REPO)
    configs = expand(spec)
    assert rc == 0 and len(commands) == len(configs) == len(list(itertools.product(
        *(spec.parameters[n].grid_values() for n in sorted(spec.parameters)))))  # fmt: skip
    parser = HfArgumentParser(TrainArguments)
    for cmd, config in zip(commands, configs, strict=True):
        assert cmd[:3] == ["/usr/bin/env", sys.executable, "sweeps/train.py"]
        (args,) = parser.parse_args_into_dataclasses(args=cmd[3:])
        for k, v in config.items():
            assert getattr(args, k) == v
        assert Path(args.output_dir).parent == tmp_path


QWEN = REPO / "sweeps" / "pissa_vs_lora_qwen.yaml"
QWEN_MULTIGPU = REPO / "sweeps" / "pissa_vs_lora_qwen_multigpu.yaml"


@pytest.mark.parametrize(
    ("path", "launcher", "model", "gpus"),
    [
        (QWEN, ["/usr/bin/env", sys.executable], "Qwen/Qwen2.5-0.5B-Instruct", 1),
        (QWEN_MULTIGPU, ["/usr/bin/env", "accelerate", "launch", "--num_processes=8"], "Qwen/Qwen2.5-1.5B-Instruct", 8),
    ],
)  # fmt: skip
def test_qwen_gsm8k_sweeps_plan_the_paper_grid(capsys, monkeypatch, tmp_path, path, launcher, model, gpus):
    """The real-hardware sweeps: the dry run plans adapter x rank {8, 32, 64} x lr {1e-5,
    5e-5, 1e-4} on GSM8K with vLLM on CUDA, and every command parses into TrainArguments
    (so every rank of a multi-GPU launch gets the same arguments)."""
    from transformers import HfArgumentParser

    monkeypatch.chdir(REPO)
    spec = load_sweep(path, cwd=REPO)
    assert spec.method == "grid" and not spec.notes and spec.program == "sweeps/train.py"
    assert spec.parameters["lora_rank"].values == (8, 32, 64)
    assert spec.parameters["learning_rate"].values == (1.0e-5, 5.0e-5, 1.0e-4)
    assert spec.parameters["adapter"].values == ("lora", "pissa")
    rc, commands = dry_run(capsys, str(path), "--dry-run", "--out", str(tmp_path))
    assert rc == 0 and len(commands) == 2 * 3 * 3
    parser = HfArgumentParser(TrainArguments)
    seen = set()
    for cmd in commands:
        assert cmd[: len(launcher) + 1] == [*launcher, "sweeps/train.py"]
        (args,) = parser.parse_args_into_dataclasses(args=cmd[len(launcher) + 1 :])
        assert (args.model_name_or_path, args.dataset, args.dataset_config) == (model, "openai/gsm8k", "main")
        assert args.use_vllm is True and args.device == "cuda" and args.report_to == "wandb"
        assert args.stop_on_collapse  # the stop reaches every rank (tests/test_dist_launch.py)
        assert args.per_device_train_batch_size * gpus % args.num_generations == 0
        assert args.max_steps * args.per_device_train_batch_size * gpus // args.num_generations <= args.num_train_samples
        assert Path(args.output_dir).parent == tmp_path
        seen.add((args.adapter, args.lora_rank, args.learning_rate))
    assert len(seen) == 18
    # plain PyYAML (what `wandb sweep` reads) sees floats, not YAML 1.1 strings
    raw = yaml.safe_load(path.read_text())
    assert all(type(v) is float for v in raw["parameters"]["learning_rate"]["values"])


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("method: grid", "method: grd",
         "method: 'grd' is not a sweep method (did you mean 'grid'?)"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}", "learning_rate: {}",
         "parameters.learning_rate: has no values"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}", "learning_rate:",
         "parameters.learning_rate: expected a mapping"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}", "learning_rate: {values: []}",
         "parameters.learning_rate.values: is an empty list"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}", "learning_rate: {values: [1.0e-4, 1e-4]}",
         "parameters.learning_rate.values[1]: '1e-4' is a string (YAML 1.1 reads 1e-4 as a string); write 1.0e-4"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}", "learning_rate: {value: 5e-3}",
         "parameters.learning_rate.value: '5e-3' is a string (YAML 1.1 reads 5e-3 as a string); write 5.0e-3"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}",
         "learning_rate: {distribution: log_uniform_values, min: 1e-5, max: 1.0e-2}",
         "parameters.learning_rate.min: '1e-5' is a string (YAML 1.1 reads 1e-5 as a string); write 1.0e-5"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}", "learning_rate: {values: [1.0e4]}",
         "parameters.learning_rate.values[0]: '1.0e4' is a string (YAML 1.1 reads 1.0e4 as a string); write 1.0e+4"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}",
         "learning_rate: {distribution: log_uniform_value, min: 1.0e-5, max: 1.0e-2}",
         "parameters.learning_rate.distribution: 'log_uniform_value' is not a distribution "
         "(did you mean 'log_uniform_values'?)"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}",
         "learning_rate: {distribution: uniform, min: 1.0e-5, max: 1.0e-2}",
         "parameters.learning_rate: grid search needs a finite set of values"),
        ("learning_rate: {values: [1.0e-4, 1.0e-3]}", "learning_rate: {vaules: [1.0e-4]}",
         "parameters.learning_rate.vaules: unknown key (did you mean 'values'?)"),
        ("program: sweeps/train.py", "program: sweeps/trian.py",
         "program: 'sweeps/trian.py' does not exist"),
        ("program: sweeps/train.py\n", "",
         "program: missing"),
        ("  - ${args}", "  - ${argz}",
         "command[3]: unknown macro ${argz} (did you mean 'args'?)"),
        ("parameters:", "paramters:",
         "paramters: unknown sweep key (did you mean 'parameters'?)"),
        ("metric: {name: train/reward, goal: maximize}", "metric: {name: train/reward, goal: maximise}",
         "metric.goal: 'maximise' must be minimize or maximize"),
    ],
)  # fmt: skip
def test_yaml_errors_name_the_key(tmp_path, old, new, message):
    assert old in MINI
    path = write(tmp_path, MINI.replace(old, new, 1))
    with pytest.raises(SweepSpecError) as err:
        load_sweep(path, cwd=REPO)
    assert str(err.value).startswith(message), str(err.value)
    assert str(err.value).split(":")[0] == err.value.key


def test_quoted_scientific_string_is_deliberate_and_accepted(tmp_path):
    path = write(tmp_path, MINI.replace("adapter: {values: [lora, pissa]}", "run_name: {value: '1e-4'}"))
    assert load_sweep(path, cwd=REPO).parameters["run_name"].value == "1e-4"


def test_flow_list_of_macros_gets_a_hint(tmp_path):
    text = MINI.split("command:")[0] + "command: [${env}, ${interpreter}, ${program}, ${args}]\n"
    with pytest.raises(SweepSpecError, match=r"invalid YAML(.|\n)*hint: \$\{\.\.\.\} macros"):
        load_sweep(write(tmp_path, text), cwd=REPO)


def test_bayes_is_valid_yaml_but_needs_the_wandb_server(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write(tmp_path, MINI.replace("method: grid", "method: bayes"))
    spec = load_sweep(path)
    with pytest.raises(
        SweepSpecError, match=r"^method: bayes search needs the W&B sweep server.*wandb agent"
    ):
        expand(spec)
    assert cli.main(["sweep", str(path), "--local", "--dry-run"]) == 2
    assert "method: bayes search needs the W&B sweep server" in capsys.readouterr().err


def test_cli_reports_the_key_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write(tmp_path, MINI.replace("1.0e-3]", "1e-3]"))
    assert cli.main(["sweep", str(path), "--local", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: parameters.learning_rate.values[1]: '1e-3' is a string" in err
    assert "write 1.0e-3" in err


def test_without_local_it_validates_and_prints_the_wandb_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["sweep", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "grid, 20 runs" in out
    assert f"wandb sweep --project rlmonitor {SHIPPED}" in out and "wandb agent" in out
    assert "--local" in out


# ------------------------------------------------------------------------------- expansion


def test_local_dry_run_expands_the_grid_exactly(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    rc, commands = dry_run(capsys, str(write(tmp_path, MINI)), "--local", "--dry-run", "--out", str(out),
                           "--max-steps", "3")  # fmt: skip
    assert rc == 0
    # W&B order: parameters sorted by name (not YAML order), the last name varying fastest
    expected = []
    combos = itertools.product(["lora", "pissa"], [0.0001, 0.001], [8], [0, 1])
    for i, (adapter, lr, rank, seed) in enumerate(combos):
        name = f"{i:02d}-adapter={adapter}-learning_rate={lr:g}-seed={seed}"
        expected.append([
            "/usr/bin/env", sys.executable, "sweeps/train.py",
            f"--adapter={adapter}", f"--learning_rate={lr}", f"--lora_rank={rank}", f"--seed={seed}",
            "--max_steps=3", f"--output_dir={out / name}",
        ])  # fmt: skip
    assert commands == expected
    assert not out.exists()  # a dry run writes nothing


def test_grid_count_takes_the_first_n(tmp_path):
    spec = load_sweep(write(tmp_path, MINI), cwd=REPO)
    full = expand(spec)
    assert len(full) == 8 and expand(spec, count=3) == full[:3]
    spec.run_cap = 2
    assert expand(spec) == full[:2]


def test_grid_int_uniform_and_q_uniform_become_values(tmp_path):
    text = MINI.replace("lora_rank: {value: 8}", "lora_rank: {distribution: int_uniform, min: 2, max: 4}")
    text = text.replace(
        "seed: {values: [0, 1]}", "temperature: {distribution: q_uniform, min: 0.5, max: 1.0, q: 0.25}"
    )
    spec = load_sweep(write(tmp_path, text), cwd=REPO)
    assert spec.parameters["lora_rank"].grid_values() == [2, 3, 4]
    assert spec.parameters["temperature"].grid_values() == [0.5, 0.75]  # W&B: arange(min, max, q)
    assert len(expand(spec)) == 2 * 2 * 3 * 2


RANDOM = """\
program: sweeps/train.py
method: random
parameters:
  adapter: {values: [lora, pissa]}
  learning_rate: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-2}
  lora_rank: {distribution: int_uniform, min: 4, max: 16}
  temperature: {distribution: uniform, min: 0.7, max: 1.3}
  beta: {distribution: q_uniform, min: 0.0, max: 0.1, q: 0.01}
  seed: {value: 3}
"""


def test_random_with_count_is_reproducible_and_in_range(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write(tmp_path, RANDOM)
    spec = load_sweep(path)
    a, b = expand(spec, count=6, seed=0), expand(spec, count=6, seed=0)
    assert a == b and len(a) == 6
    assert expand(spec, count=6, seed=1) != a
    for c in a:
        assert list(c) == sorted(c)
        assert c["adapter"] in ("lora", "pissa") and c["seed"] == 3
        assert 1e-5 <= c["learning_rate"] <= 1e-2 and type(c["learning_rate"]) is float
        assert 4 <= c["lora_rank"] <= 16 and type(c["lora_rank"]) is int
        assert 0.7 <= c["temperature"] <= 1.3
        assert 0 <= c["beta"] <= 0.1 and abs(c["beta"] / 0.01 - round(c["beta"] / 0.01)) < 1e-9
    # through the CLI: same commands twice, --count honoured
    argv = [str(path), "--local", "--dry-run", "--count", "4", "--out", str(tmp_path / "o")]
    rc1, first = dry_run(capsys, *argv)
    rc2, second = dry_run(capsys, *argv)
    assert rc1 == rc2 == 0 and first == second and len(first) == 4
    assert [cmd[3:9] for cmd in first] == [command_args(c)["args"] for c in a[:4]]


def test_random_needs_a_count(tmp_path):
    spec = load_sweep(write(tmp_path, RANDOM), cwd=REPO)
    with pytest.raises(SweepSpecError, match=r"^method: random search runs until stopped: give --count"):
        expand(spec)


def test_command_macros_match_the_wandb_agent(monkeypatch):
    from wandb.sdk.launch.sweeps import utils as wandb_utils

    config = {"a": 1e-4, "b": True, "c": False, "d": "x y", "e": 3, "f": 0.001}
    theirs = wandb_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in config.items()}})
    ours = command_args(config)
    for key in ("args", "args_no_hyphens", "args_no_boolean_flags", "args_no_equals", "args_json",
                "args_append_hydra", "args_override_hydra"):  # fmt: skip
        assert ours[key] == theirs[key], key
    monkeypatch.setenv("RLM_TEST_VAR", "hello")
    spec = parse_sweep(
        {"program": "train.py", "method": "grid", "parameters": {"a": {"value": 1}},
         "command": ["${env}", "${interpreter}", "-u", "${program}", "--tag=${envvar:RLM_TEST_VAR}",
                     "${args_no_hyphens}", "${args_json_file}"]},
        check_program=False,
    )  # fmt: skip
    cmd = build_command(spec, {"a": 1}, interpreter="python", args_json_file="cfg.json")
    assert cmd == ["/usr/bin/env", "python", "-u", "train.py", "--tag=hello", "a=1", "cfg.json"]


# ------------------------------------------------------------------------------- real local run


@pytest.mark.slow
def test_local_run_executes_the_program_and_continues_past_a_failure(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.chdir(REPO)  # program: sweeps/train.py is relative to the launch directory
    path = write(tmp_path, f"""\
        name: mini-sweep
        program: sweeps/train.py
        method: grid
        metric: {{name: train/reward, goal: maximize}}
        parameters:
          adapter: {{values: [lora, bogus]}}
          model_name_or_path: {{value: {tiny_model_path}}}
          learning_rate: {{value: 1.0e-3}}
          per_device_train_batch_size: {{value: 4}}
          num_generations: {{value: 4}}
          num_train_samples: {{value: 16}}
          geometry_every: {{value: 1}}
          geometry_k: {{value: 4}}
        command:
          - ${{env}}
          - ${{interpreter}}
          - ${{program}}
          - ${{args}}
        """)  # fmt: skip
    out = tmp_path / "out"
    rc = cli.main(["sweep", str(path), "--local", "--max-steps", "2", "--out", str(out)])
    assert rc == 1  # one configuration failed; the other still ran

    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "rlmonitor.sweep/1" and doc["sweep"] == "mini-sweep"
    assert (doc["n_runs"], doc["n_ok"], doc["n_failed"]) == (2, 1, 1)
    ok, bad = doc["runs"]
    assert ok["config"]["adapter"] == "lora" and ok["status"] == "ok" and ok["returncode"] == 0
    assert ok["steps_run"] == 2 and ok["collapse_step"] == -1
    for key in ("final_reward", "max_principal_angle_deg", "final_kl_base_forward", "final_update_sparsity"):
        assert isinstance(ok[key], (int, float)), key
    assert ok["command"][3:] == [
        "--adapter=lora", "--geometry_every=1", "--geometry_k=4", "--learning_rate=0.001",
        f"--model_name_or_path={tiny_model_path}", "--num_generations=4", "--num_train_samples=16",
        "--per_device_train_batch_size=4", "--max_steps=2", f"--output_dir={out / '00-adapter=lora'}",
    ]  # fmt: skip
    run_dir = out / "00-adapter=lora"
    assert json.loads((run_dir / "run_summary.json").read_text())["args"]["adapter"] == "lora"
    assert (run_dir / "log.txt").read_text().startswith("$ /usr/bin/env")

    assert bad["config"]["adapter"] == "bogus" and bad["status"] == "failed" and bad["returncode"] == 2
    assert "bogus" in bad["error"] and "invalid choice" in bad["error"]
    assert (out / "01-adapter=bogus" / "log.txt").is_file()

    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("index,name,status,returncode,seconds,adapter")
    assert (out / "sweep_summary.png").stat().st_size > 10_000

    # W&B offline, grouped by the sweep name, under <out>/wandb
    (wandb_file,) = sorted((out / "wandb").glob("offline-run-*/*.wandb"))
    exe = Path(sys.executable).parent / "wandb"
    dump = subprocess.run([str(exe), "leet", "inspect", "--json", str(wandb_file)], capture_output=True,
                          text=True, check=True, timeout=120).stdout  # fmt: skip
    runs = [json.loads(line)["run"] for line in dump.splitlines() if '"type":"run"' in line.replace(" ", "")]
    assert runs and runs[0]["run_group"] == "mini-sweep" and runs[0]["project"] == "rlmonitor"


def test_report_flags_unflagged_runs_far_from_base(tmp_path):
    from rlmonitor.apps.sweep import RunResult, collapse_overview, plot_results, unflagged_drift

    spec = load_sweep(write(tmp_path, MINI), cwd=REPO)
    configs = expand(spec)[:4]
    summaries = [
        {"collapse_step": -1, "final_kl_base_forward": 0.01, "final_reward": 0.4, "steps_run": 60},
        {"collapse_step": 30, "final_kl_base_forward": 4.0, "final_reward": 0.0, "steps_run": 30},
        {"collapse_step": -1, "final_kl_base_forward": 4.5, "final_reward": 0.0, "steps_run": 60},
        {},
    ]
    results = []
    for i, (c, s) in enumerate(zip(configs, summaries, strict=True)):
        r = RunResult(i, f"run{i}", c, [], str(tmp_path), "log", status="ok" if s else "failed", summary=s)
        results.append(r)
    assert [r.name for r in unflagged_drift(results)] == ["run2"]
    lines = collapse_overview(spec, results)
    assert lines[0] == "runs: 1/3 runs collapsed (learning_rate=0.0001@step 30)"  # all lora here
    assert lines[-1].startswith("warning: 1 run(s) were NOT flagged but end with KL to base > 1 nats/token")
    png = plot_results(spec, results, tmp_path / "p.png")
    assert png is not None and png.stat().st_size > 10_000
