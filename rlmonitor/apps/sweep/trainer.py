"""Parameter names checked against rlmonitor's trainer, before any run starts.

A sweep parameter becomes ``--name=value`` on the program's command line. When the
program is rlmonitor's trainer (``sweeps/train.py``, ``python -m rlmonitor.apps.train``
or ``rlmonitor train``), a name that is not a field of
:class:`rlmonitor.apps.train.TrainArguments` (``lr:`` for ``learning_rate:``) would
pass ``--dry-run`` and then fail every run; it is refused here with a suggestion.
The field names come from ``dataclasses.fields`` (``rlmonitor.apps.train`` imports no
transformers at module level). Other programs are not checked: their flags are
theirs.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import SweepSpecError

__all__ = ["check_trainer_parameters", "runs_rlmonitor_trainer", "suggest_names", "trainer_fields"]

#: A program file that runs rlmonitor's trainer mentions its module.
_TRAINER_MODULE = re.compile(r"\brlmonitor\.(?:apps\.)?train\b")
#: Usual short names of the trainer's fields (what other trainers or papers call them).
_ALIASES = {
    "lr": "learning_rate",
    "learning-rate": "learning_rate",
    "rank": "lora_rank",
    "r": "lora_rank",
    "alpha": "lora_alpha",
    "model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "bs": "per_device_train_batch_size",
    "kl_coef": "beta",
    "max_new_tokens": "max_completion_length",
    "num_samples": "num_train_samples",
    "dataset_name": "dataset",
}


def trainer_fields() -> tuple[str, ...]:
    """The ``--flags`` of rlmonitor's trainer: the fields of ``TrainArguments``."""
    from rlmonitor.apps.train import TrainArguments

    return tuple(f.name for f in dataclasses.fields(TrainArguments))


def runs_rlmonitor_trainer(program_path: Path | None, command: Sequence[str]) -> bool:
    """Whether ``command`` runs rlmonitor's trainer: ``rlmonitor train``, ``-m
    rlmonitor.apps.train``, or ``${program}`` being a file that uses that module."""
    names = [Path(c).name for c in command]
    if any(a == "rlmonitor" and b == "train" for a, b in itertools.pairwise(names)):
        return True
    if any(_TRAINER_MODULE.search(c) for c in command):
        return True
    if program_path is None or "${program}" not in command or not program_path.is_file():
        return False
    try:
        with open(program_path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(65536)
    except OSError:
        return False
    return bool(_TRAINER_MODULE.search(head))


def suggest_names(name: str, fields: Sequence[str]) -> list[str]:
    """Fields ``name`` probably meant: a usual alias, a field it is part of (``rank`` ->
    ``lora_rank``), a field whose initials it is (``mcl``), or a close spelling."""
    norm = name.replace("-", "_").lower()
    if _ALIASES.get(name.lower()) in fields:
        return [_ALIASES[name.lower()]]
    parts = [f for f in fields if f"_{norm}_" in f"_{f}_"]
    if len(parts) == 1:
        return parts
    initials = [f for f in fields if "".join(w[0] for w in f.split("_")) == norm]
    if initials:
        return initials[:2]
    return difflib.get_close_matches(norm, list(fields), n=1, cutoff=0.6)


def check_trainer_parameters(program_path: Path | None, command: Sequence[str], names: Sequence[str]) -> None:
    """Refuse a parameter name the trainer does not take (``SweepSpecError`` naming
    ``parameters.<name>``); a no-op when the program is not rlmonitor's trainer.
    ``learning-rate`` is accepted for ``learning_rate``, as the trainer's parser does."""
    if not runs_rlmonitor_trainer(program_path, command):
        return
    fields = trainer_fields()
    for name in names:
        if name in fields or name.replace("-", "_") in fields:
            continue
        close = suggest_names(name, fields)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise SweepSpecError(f"parameters.{name}", f"is not an argument of rlmonitor's trainer{hint}; it takes the "
                                                   "fields of rlmonitor.apps.train.TrainArguments (python "
                                                   "sweeps/train.py --help)")  # fmt: skip
