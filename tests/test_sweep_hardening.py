"""``rlmonitor sweep`` on hostile or mistaken input: control characters, huge grids, YAML
alias bombs, duplicate keys, SIGTERM, unknown trainer arguments, ``--max-steps``.

Bad input must give one clear message and exit status 2 with nothing run; the tests
that could hang or exhaust memory on a regression run the real CLI in a subprocess
with a memory limit and a timeout."""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlmonitor import cli
from rlmonitor.apps.sweep import (
    MAX_LOCAL_RUNS,
    PlannedRun,
    SweepSpecError,
    expand,
    grid_size,
    iter_configs,
    load_sweep,
    parse_sweep,
    run_local,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "sweeps" / "pissa_vs_lora.yaml"

#: A stand-in program: records its pid and arguments in --output_dir, sleeps --sleep seconds.
PROGRAM = """\
import os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
os.makedirs(args["output_dir"], exist_ok=True)
with open(os.path.join(args["output_dir"], "pid"), "w") as fh:
    fh.write(str(os.getpid()))
with open(os.path.join(os.path.dirname(args["output_dir"]), "started"), "a") as fh:
    fh.write(args["output_dir"] + "\\n")
time.sleep(float(args.get("sleep", 0)))
"""

PROG_SWEEP = """\
name: prog
program: prog.py
method: grid
parameters:
  sleep: {values: [0, 0.5]}
  tag: {values: [a, b]}
command:
  - ${env}
  - ${interpreter}
  - ${program}
  - ${args}
"""


def write(folder: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def sweep_cli(cwd: Path, *argv: str, timeout: float = 60, memory_mb: int = 768) -> subprocess.CompletedProcess:
    """``rlmonitor sweep ARGV`` in a fresh interpreter, under a memory limit: a regression
    that builds a billion-entry grid or walks an alias bomb fails fast instead of taking
    the machine down."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))

    return subprocess.run([sys.executable, "-m", "rlmonitor.cli", "sweep", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)  # fmt: skip


# ------------------------------------------------------------------------------- control characters


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("tag: {values: [a, b]}", 'tag: {values: [a, "b\\0c"]}', "parameters.tag.values[1]"),
        ("tag: {values: [a, b]}", 'tag: {value: "x\\x1by"}', "parameters.tag.value"),
        ("tag: {values: [a, b]}", 'tag: {values: [a, "line\\nbreak"]}', "parameters.tag.values[1]"),
        ("name: prog", 'name: "pr\\0og"', "name"),
        ("  - ${args}", '  - ${args}\n  - "--x=\\0"', "command[4]"),
        ("  tag:", '  "t\\0ag":', "parameters.'t\\x00ag'"),
    ],
)  # fmt: skip
def test_control_characters_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, old, new, key):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, PROGRAM, "prog.py")
    path = write(tmp_path, PROG_SWEEP.replace(old, new, 1))
    out = tmp_path / "out"
    rc = cli.main(["sweep", str(path), "--local", "--jobs", "2", "--out", str(out), "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"error: {path}: {key}: ") and "control character" in err, err
    assert len(err.strip().splitlines()) == 1  # one message, no traceback
    assert not out.exists()  # nothing planned, nothing run


def test_runner_records_a_run_that_cannot_start_and_finishes_the_others(tmp_path):
    """Defence in depth: a command the OS refuses (NUL byte) fails that run only; the
    sweep continues and returns every result (no exception, no orphaned child)."""
    spec = parse_sweep({"program": "x.py", "method": "grid", "parameters": {"a": {"value": 1}}}, check_program=False)
    ok = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    runs = [
        PlannedRun(0, "slow", {"a": 1}, ok, tmp_path / "slow"),
        PlannedRun(1, "nul", {"a": 2}, [sys.executable, "-c", "pass\0"], tmp_path / "nul"),
        PlannedRun(2, "after", {"a": 3}, ok, tmp_path / "after"),
    ]
    results = run_local(spec, runs, tmp_path, jobs=2, progress=False)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "could not start" in results[1].error and "null" in results[1].error


# ------------------------------------------------------------------------------- huge grids


HUGE = """\
program: prog.py
method: grid
parameters:
  a: {min: 1, max: 1000}
  b: {min: 1, max: 1000}
  c: {min: 1, max: 1000}
command:
  - ${env}
  - ${interpreter}
  - ${program}
  - ${args}
"""


def test_run_cap_on_a_billion_run_grid_plans_only_the_cap(tmp_path):
    write(tmp_path, PROGRAM, "prog.py")
    path = write(tmp_path, HUGE + "run_cap: 2\n")
    proc = sweep_cli(tmp_path, str(path), "--local", "--dry-run", "--out", "o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = [shlex.split(ln) for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
    assert [c[3:6] for c in commands] == [["--a=1", "--b=1", "--c=1"], ["--a=1", "--b=1", "--c=2"]]
    spec = load_sweep(path, cwd=tmp_path)
    assert grid_size(spec) == 10**9
    first = iter_configs(spec)  # lazy: the billionth configuration without building the others
    assert next(first) == {"a": 1, "b": 1, "c": 1}


def test_a_billion_run_grid_without_a_cap_is_refused_with_its_size(tmp_path):
    write(tmp_path, PROGRAM, "prog.py")
    path = write(tmp_path, HUGE)
    proc = sweep_cli(tmp_path, str(path), "--local", "--dry-run", "--out", "o")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"error: {path}: parameters: the grid has 1,000,000,000 runs (1,000 a x 1,000 b x 1,000 c); rlmonitor "
        f"sweep --local plans at most {MAX_LOCAL_RUNS:,} runs: set run_cap: N (or --count N) to run its first N, "
        "or narrow the grid\n"
    )
    # validation alone states the size (W&B's controller runs it, not this machine)
    proc = sweep_cli(tmp_path, str(path))
    assert proc.returncode == 0 and "grid, 1,000,000,000 runs" in proc.stdout
    with pytest.raises(SweepSpecError, match=r"^--count: 20,000 runs"):
        expand(load_sweep(path, cwd=tmp_path), count=2 * MAX_LOCAL_RUNS)


def test_last_configuration_of_a_huge_grid_is_exact(tmp_path):
    spec = load_sweep(write(tmp_path, HUGE.replace("program: prog.py", "program: x.py")), check_program=False)
    spec.parameters["a"] = spec.parameters["a"].__class__("a", "categorical", values=("x", "y"))
    # mixed radix: index 1999 of (2 x 1000 x 1000) is a=x, b=2, c=1000
    configs = list(iter_configs(spec, count=2000))
    assert configs[-1] == {"a": "x", "b": 2, "c": 1000} and len(configs) == 2000


# ------------------------------------------------------------------------------- YAML safety


BOMB = """\
program: prog.py
method: grid
parameters:
  tag:
    value:
      - &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]
      - &x1 [*x0, *x0, *x0, *x0, *x0, *x0, *x0, *x0, *x0, *x0]
      - &x2 [*x1, *x1, *x1, *x1, *x1, *x1, *x1, *x1, *x1, *x1]
      - &x3 [*x2, *x2, *x2, *x2, *x2, *x2, *x2, *x2, *x2, *x2]
      - &x4 [*x3, *x3, *x3, *x3, *x3, *x3, *x3, *x3, *x3, *x3]
      - &x5 [*x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4]
      - &x6 [*x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5]
      - &x7 [*x6, *x6, *x6, *x6, *x6, *x6, *x6, *x6, *x6, *x6]
      - &x8 [*x7, *x7, *x7, *x7, *x7, *x7, *x7, *x7, *x7, *x7]
      - [*x8, *x8, *x8, *x8, *x8, *x8, *x8, *x8, *x8, *x8]
"""


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    write(tmp_path, PROGRAM, "prog.py")
    path = write(tmp_path, BOMB)
    t0 = time.monotonic()
    proc = sweep_cli(tmp_path, str(path), "--local", "--dry-run", timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {path}: line ") and "YAML aliases (*name) expand this file" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and time.monotonic() - t0 < 30


def test_recursive_alias_is_refused_and_modest_aliases_still_work(tmp_path):
    path = write(tmp_path, "program: x.py\nmethod: grid\nparameters:\n  tag: &t {value: [1, *t]}\n")
    with pytest.raises(SweepSpecError, match="refers to the node that contains it"):
        load_sweep(path, check_program=False)
    path = write(tmp_path, """\
        program: x.py
        method: grid
        parameters:
          learning_rate: &lrs {values: [1.0e-5, 1.0e-4]}
          beta: *lrs
        """)  # fmt: skip
    spec = load_sweep(path, check_program=False)
    assert spec.parameters["beta"].values == (1e-5, 1e-4) and len(expand(spec)) == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("program: x.py\nmethod: grid\nparameters:\n  a: {value: 1}\nmethod: random\n",
         "method: duplicate key (lines 2 and 5); YAML would silently keep the last one"),
        ("program: x.py\nmethod: grid\nparameters:\n  a: {value: 1}\n  b: {value: 2}\n  a: {values: [3]}\n",
         "parameters.a: duplicate key (lines 4 and 6)"),
        ("program: x.py\nmethod: grid\nparameters:\n  a: {values: [1], values: [2]}\n",
         "parameters.a.values: duplicate key (twice on line 4)"),
    ],
)  # fmt: skip
def test_duplicate_keys_are_refused_with_both_lines(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SweepSpecError) as err:
        load_sweep(path, check_program=False)
    assert str(err.value).startswith(message) and str(err.value).split(":")[0] == err.value.key
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- signals


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize(("signum", "rc"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_children_and_writes_results(tmp_path, signum, rc):
    write(tmp_path, PROGRAM, "prog.py")
    path = write(tmp_path, PROG_SWEEP.replace("sleep: {values: [0, 0.5]}", "sleep: {values: [0, 120]}")
                 .replace("tag: {values: [a, b]}", "tag: {value: a}"))  # fmt: skip
    out = tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-m", "rlmonitor.cli", "sweep", str(path), "--local", "--out",
                              str(out), "--no-plot"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    pid_file, child = out / "01-sleep=120" / "pid", None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert _alive(child)
        sweep.send_signal(signum)
        log = sweep.communicate(timeout=60)[0]
        assert sweep.returncode == rc, log
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the running child survived the sweep"
        doc = json.loads((out / "results.json").read_text())
        assert doc["interrupted"] is True and doc["signal"] == signal.Signals(signum).name
        assert [(r["name"], r["status"]) for r in doc["runs"]] == [("00-sleep=0", "ok"),
                                                                   ("01-sleep=120", "interrupted")]  # fmt: skip
        assert (out / "results.csv").is_file()
    finally:
        if sweep.poll() is None:
            sweep.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------------------- trainer arguments


def test_unknown_trainer_argument_is_refused_with_a_suggestion(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    text = SHIPPED.read_text().replace("  learning_rate:\n", "  lr:\n", 1)
    path = write(tmp_path, text)
    assert cli.main(["sweep", str(path), "--local", "--dry-run", "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(
        f"error: {path}: parameters.lr: is not an argument of rlmonitor's trainer (did you mean 'learning_rate'?)"
    )
    assert cli.main(["sweep", str(path)]) == 2  # validation alone catches it too
    for wrong, right in (("rank", "lora_rank"), ("learning_rat", "learning_rate"), ("mcl", "max_completion_length")):
        bad = write(tmp_path, SHIPPED.read_text().replace("  seed:\n", f"  {wrong}:\n", 1))
        with pytest.raises(SweepSpecError, match=rf"^parameters\.{wrong}: .*did you mean '{right}'"):
            load_sweep(bad, cwd=REPO)
    # the trainer's parser takes --learning-rate for --learning_rate: so does the check
    ok = write(tmp_path, text.replace("  lr:\n", "  learning-rate:\n"))
    assert "learning-rate" in load_sweep(ok, cwd=REPO).parameters


def test_trainer_detection_covers_rlmonitor_train_and_leaves_other_programs_alone(tmp_path):
    base = {"program": "x.py", "method": "grid", "parameters": {"lr": {"value": 0.1}}}
    for command in (["rlmonitor", "train", "${args}"], ["${env}", "python", "-m", "rlmonitor.apps.train", "${args}"]):
        with pytest.raises(SweepSpecError, match=r"^parameters\.lr: is not an argument"):
            parse_sweep({**base, "command": command}, check_program=False)
    write(tmp_path, PROGRAM, "prog.py")  # someone else's program: its flags are its own
    assert "lr" in parse_sweep({**base, "program": "prog.py"}, cwd=tmp_path).parameters


def test_the_check_does_not_import_transformers(tmp_path):
    code = (f"import sys; from rlmonitor.apps.sweep import load_sweep; load_sweep({str(SHIPPED)!r}, cwd={str(REPO)!r});"
            " print(sorted(m for m in ('transformers', 'torch', 'trl') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- command line


def test_max_steps_replaces_the_yaml_value(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_sweep(SHIPPED, cwd=REPO).parameters["max_steps"].value == 60
    rc = cli.main(["sweep", str(SHIPPED), "--dry-run", "--max-steps", "5", "--out", str(tmp_path / "o")])
    commands = [shlex.split(ln) for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith("#")]
    assert rc == 0 and len(commands) == 20
    for cmd in commands:
        assert [a for a in cmd if a.startswith("--max_steps")] == ["--max_steps=5"], cmd
        assert cmd.index("--max_steps=5") < cmd.index("--seed=0" if "--seed=0" in cmd else "--seed=1")  # in ${args}


def test_yaml_1_1_floats_with_a_dot_and_signed_exponent_stay_floats(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write(tmp_path, SHIPPED.read_text().replace("[1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]", "[1.0e-5, 5.0e-5]"))
    lrs = load_sweep(path, cwd=REPO).parameters["learning_rate"].values
    assert lrs == (1e-5, 5e-5) and all(type(v) is float for v in lrs)
    assert cli.main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "--learning_rate=1e-05" in out and "--learning_rate=5e-05" in out


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--jobs", "0", "must be >= 1, got 0"), ("--max-steps", "0", "must be >= 1, got 0"),
     ("--timeout", "0", "must be > 0 seconds, got 0.0")],
)  # fmt: skip
def test_bad_numeric_options_exit_2_before_planning(tmp_path, capsys, monkeypatch, flag, value, message):
    monkeypatch.chdir(REPO)
    out = tmp_path / "o"
    assert cli.main(["sweep", str(SHIPPED), "--local", flag, value, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {SHIPPED}: {flag}: {message}\n"
    assert not out.exists()
