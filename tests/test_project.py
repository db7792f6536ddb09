"""The README's promises about set-up hold for the files that CI runs."""

from __future__ import annotations

import os
import re

import pytest

pytestmark = pytest.mark.timeout(10)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _setup_commands() -> "list[str]":
    first_block = re.search(r"```bash\n(.*?)```", _read("README.md"), re.S).group(1)
    return [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_exactly_two_commands():
    commands = _setup_commands()
    assert len(commands) == 2
    assert "llamarocm generate" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readmes_test_command():
    assert _setup_commands()[1] in _read(".ci/run")


def test_runtime_dependencies_are_only_requests():
    project = _read("pyproject.toml")
    requires = re.search(r"^dependencies = \[(.*)\]$", project, re.M).group(1)
    assert [r.strip(' "').split(">")[0].split("=")[0] for r in requires.split(",")] == ["requests"]


def test_the_package_says_it_is_typed():
    assert os.path.exists(os.path.join(ROOT, "llamarocm", "py.typed"))
    assert 'llamarocm = ["py.typed"]' in _read("pyproject.toml")


def test_import_stays_lean():
    # requests (~45 ms) loads with the first plain call, the benchmarks with their
    # command: neither is paid by a script that only imports the package.
    import subprocess
    import sys

    code = (
        "import sys, llamarocm\n"
        "print(sorted(m for m in sys.modules if m.startswith(('requests', 'llamarocm.bench'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
