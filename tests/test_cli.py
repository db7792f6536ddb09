"""The ``llamarocm`` command: usage errors, runtime errors, and a real generation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llamarocm.cli import main

pytestmark = pytest.mark.timeout(120)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    assert 'llamarocm generate "Once upon a time"' in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "x", "--max-tokens", "many"])
    assert info.value.code == 2


def test_runtime_error_exits_1_without_traceback(capsys, tmp_path):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err
    assert "model file not found" in err and "Traceback" not in err


@pytest.mark.integration
def test_generate_prints_text(model_path, server_binary):
    proc = subprocess.run(
        [sys.executable, "-m", "llamarocm.cli", "generate", "Once upon a time", "--model", model_path,
         "--max-tokens", "8", "--temperature", "0", "--server", server_binary, "-v"],
        capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "tok/s" in proc.stderr
