"""The architecture guard: the import-linter contracts in pyproject.toml (layers point down, no import cycles)
hold for fewstep, and they catch a violation when one is made."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src" / "fewstep"


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` with the project's contracts on the ``fewstep`` package found in ``package_parent``."""
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}, cwd=package_parent,
                          capture_output=True, text=True, timeout=120)


def test_fewstep_keeps_its_layers_and_has_no_import_cycles():
    result = lint_imports(SRC.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers point down KEPT" in result.stdout and "No import cycles KEPT" in result.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("solvers.py", "import fewstep.pipeline", "Layers point down"),  # a base piece reaching up
    ("data/sources.py", "import fewstep.methods.base", "Layers point down"),  # data above methods
    ("methods/losses.py", "import fewstep.methods.consistency.consistency_distillation", "No import cycles"),
])
def test_the_contracts_catch_an_upward_import_or_a_cycle(tmp_path, module, line, broken):
    shutil.copytree(SRC, tmp_path / "fewstep", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "fewstep" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"{broken} BROKEN" in result.stdout, result.stdout


def test_no_method_counts_teacher_evaluations_by_hand():
    """The counting wrapper around the teacher counts; a method file that adds to a count has gone around it."""
    for path in (SRC / "methods").rglob("*.py"):
        assert not re.search(r"teacher_evals\s*\+=", path.read_text()), path


def test_no_module_guesses_what_data_are_from_their_shape():
    """A dataset declares its kind and metric (``DatasetSpec``): only the digits metrics know the digits shape."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "DIGITS_SHAPE" not in text or path.name == "digits.py", path
        assert not re.search(r"len\(\w*\.?data_shape\) [>=]", text), path
