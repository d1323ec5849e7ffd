"""The layers of docs/architecture.md, checked by import-linter's contracts in pyproject.toml: imports only go down
(cli -> sweep | verify -> train -> data -> core | runtime), handgrad.core imports torch and the standard library only,
and no package has an import cycle (lazy imports inside functions included: import-linter reads every import)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports (import-linter, a dev extra) is not installed beside this Python")
    run = subprocess.run([lint, "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0 and "3 kept, 0 broken" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_math_files_import_nothing_else_of_handgrad():
    """Read the sources directly too (a second, independent check of the first contract's core rule)."""
    for path in (REPO / "src" / "handgrad" / "core").glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1 and words[1].startswith("handgrad"):
                assert words[1].startswith("handgrad.core"), f"{path.name}: {line}"


def test_an_import_that_goes_up_breaks_the_contracts(tmp_path):
    """The contracts can fail: a copy of the package where data/ imports train/ (a layer above) is refused."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports (import-linter, a dev extra) is not installed beside this Python")
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    planted = tmp_path / "src" / "handgrad" / "data" / "normalization.py"
    planted.write_text(planted.read_text() + "\nfrom handgrad.train import module  # planted: goes up\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    run = subprocess.run([lint, "--no-cache"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode != 0 and "BROKEN" in run.stdout.upper(), run.stdout[-3000:] + run.stderr[-2000:]
    assert "handgrad.data.normalization -> handgrad.train.module" in run.stdout, run.stdout[-3000:]
