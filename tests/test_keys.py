"""The key registry is the one vocabulary: the docs are generated from it, library code
emits keys from it (never literals), and nothing points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from rlmonitor.core import docs, keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", ["README.md", "docs/metrics.md"])
def test_generated_key_tables_are_current(doc):
    text = (ROOT / doc).read_text()
    assert "<!-- keys:begin -->" in text
    assert docs.render(text) == text, f"run: python -m rlmonitor.core.docs --update {doc}"


def test_docs_name_every_key_and_record_field():
    text = (ROOT / "docs/metrics.md").read_text()
    for key in keys.KEYS:
        assert f"`{key}`" in text, key
    for field in keys.MATRIX_FIELDS:
        assert f"`{field}`" in text, field


def test_keys_fill_their_placeholders_and_match_their_own_names():
    assert keys.UPDATE_SPARSITY_KIND(kind="q") == "geometry/update_sparsity/q"
    assert keys.lookup("geometry/layers/12/principal_angle_max_deg") is keys.ANGLE_MAX_LAYER_I
    assert keys.lookup("geometry/update_sparsity") is keys.UPDATE_SPARSITY
    assert keys.lookup("train/loss") is None
    with pytest.raises(KeyError):
        keys.UPDATE_SPARSITY_KIND(layer=3)


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split()]


def test_library_code_types_no_metric_key_literals():
    literal = re.compile(r"""["'](geometry|kl|collapse)/[A-Za-z_<*{]""")
    offenders = []
    for path in _tracked("rlmonitor/*.py", "callbacks/*.py"):
        if path.name == "keys.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line) and not line.lstrip().startswith(("#", '"""', "-", "``")):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "use rlmonitor.core.keys:\n" + "\n".join(offenders)


def test_nothing_points_outside_the_repository():
    hits = []
    for path in _tracked():
        if path.suffix in {".png", ".jpg", ".safetensors"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        if re.search(r"(?<![\w.])shared[/]", text):  # written so that this line does not match itself
            hits.append(str(path.relative_to(ROOT)))
    assert not hits, hits
