"""The ``llamarocm`` command: usage errors, runtime errors, and a real generation."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

import llamarocm
from llamarocm.cli import chat_loop, main

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


def _gguf_copy(model_path, folder):
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "gemma.gguf"
    os.symlink(model_path, target)
    return target


@pytest.mark.integration
def test_models_lists_a_folder(model_path, tmp_path, capsys):
    _gguf_copy(model_path, tmp_path / "sub")
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    assert main(["models", str(tmp_path)]) == 0
    assert "gemma.gguf" not in capsys.readouterr().out  # not recursive
    assert main(["models", str(tmp_path), "--recursive", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [os.path.basename(m["path"]) for m in listed] == ["gemma.gguf"]
    assert listed[0]["architecture"] == "gemma3" and listed[0]["quantization"] == "Q4_K_M"
    assert main(["models", str(tmp_path), "-r"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["PATH", "ARCH", "QUANT", "SIZE", "PARAMS", "CONTEXT"]
    assert "gemma3" in table[1] and "Q4_K_M" in table[1]


@pytest.mark.integration
def test_info_prints_metadata(model_path, capsys):
    assert main(["info", model_path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "gemma3" and data["context_length"] == 32768
    assert data["has_chat_template"] is False and data["tensor_count"] > 0
    assert main(["info", model_path]) == 0
    assert "Q4_K_M" in capsys.readouterr().out


def test_info_on_junk_exits_1(tmp_path, capsys):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"nope")
    assert main(["info", str(junk)]) == 1
    assert "GGUF" in capsys.readouterr().err


@pytest.mark.integration
def test_chat_command_answers_piped_input(model_path, server_binary):
    proc = subprocess.run(
        [sys.executable, "-m", "llamarocm", "chat", "--model", model_path, "--server", server_binary,
         "--max-tokens", "4", "--temperature", "0"],
        input="Hello there\n/exit\n", capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.integration
def test_chat_loop_keeps_history_and_resets(shared_model):
    lines = iter(["Hello", "", "How are you?", "/reset", "Again", "/exit", "never read"])
    out = io.StringIO()
    history = chat_loop(shared_model, lambda: next(lines), out, system="Be brief.", max_tokens=3, temperature=0)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "Again"
    assert history[2]["content"] and history[2]["content"] in out.getvalue()
    assert next(lines) == "never read"


def test_vram_without_gpus(capsys, monkeypatch):
    monkeypatch.setattr("llamarocm.list_devices", lambda: [])
    assert main(["vram", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["vram"]) == 0
    assert "no AMD GPU" in capsys.readouterr().err


@pytest.mark.integration
def test_rpc_worker_command_serves_a_generate_until_interrupted(model_path, server_binary):
    import signal
    import socket

    from llamarocm._binaries import find_binary

    rpc = find_binary("rpc").path
    proc = subprocess.Popen([sys.executable, "-m", "llamarocm", "rpc-worker", "--port", "0", "--server", rpc],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()
        assert "RPC worker listening on 127.0.0.1:" in line, line
        address = line.split(" on ")[1].split()[0]
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
        # The other command line: a generation whose layers run on that worker.
        out = subprocess.run(
            [sys.executable, "-m", "llamarocm", "generate", "1, 2, 3,", "--model", model_path, "--server",
             server_binary, "--rpc", address, "--max-tokens", "4", "--temperature", "0", "--context-length", "256"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip(), out.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.integration
def test_loading_shows_progress_only_on_a_terminal(model_path, server_binary):
    import pty

    args = [sys.executable, "-m", "llamarocm", "generate", "1, 2,", "--model", model_path, "--server", server_binary,
            "--max-tokens", "2", "--temperature", "0"]
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(args, stderr=slave, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=100)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's other side is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert b"\x1b[K" in shown  # the progress line, cleared once the model is ready
    piped = subprocess.run(args, capture_output=True, stdin=subprocess.DEVNULL, timeout=100)
    assert piped.returncode == 0 and b"loading model" not in piped.stderr and b"\x1b[K" not in piped.stderr


def test_rpc_workers_may_be_repeated_or_comma_separated(monkeypatch, capsys):
    seen = {}

    def fake_load_model(path, **kwargs):
        seen.update(kwargs, path=path)
        raise llamarocm.ServerStartError("stop here")

    monkeypatch.setattr("llamarocm.load_model", fake_load_model)
    args = ["generate", "x", "--model", "m.gguf", "--rpc", "a:1,b:2", "--rpc", "c:3"]
    assert main(args) == 1
    assert seen["rpc"] == ["a:1", "b:2", "c:3"] and seen["path"] == "m.gguf"
    assert "stop here" in capsys.readouterr().err


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if the command loads a model, starts a worker or finds the default
    model (which assembles a 253 MB file on first use)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a usage error must be reported before anything starts")

    monkeypatch.setattr("llamarocm.load_model", refuse)
    monkeypatch.setattr("llamarocm.RpcWorker", refuse)
    monkeypatch.setattr("llamarocm.cli.default_model_path", refuse)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["generate", "x", "--max-tokens", "0"], "max_tokens"),
        (["generate", "x", "--max-tokens", "-3"], "max_tokens"),
        (["generate", "x", "--max-tokens", str(2**40)], "max_tokens"),
        (["generate", "x", "--temperature", "nan"], "temperature"),
        (["generate", "x", "--temperature", "inf"], "temperature"),
        (["generate", "x", "--temperature", "-1"], "temperature"),
        (["generate", "x", "--seed", "-1"], "seed"),
        (["generate", "x", "--context-length", "0"], "context_length"),
        (["generate", "x", "--model", ""], "model path"),
        (["generate", "x", "--rpc", "nowhere"], "host:port"),
        (["chat", "--max-tokens", "0"], "max_tokens"),
        (["chat", "--temperature", "nan"], "temperature"),
        (["chat", "--context-length", str(2**30)], "context_length"),
        (["rpc-worker", "--devices", "a"], "comma-separated GPU indices"),
        (["rpc-worker", "--devices", "0,,1"], "comma-separated GPU indices"),
        (["rpc-worker", "--devices", "-1"], "device index"),
        (["rpc-worker", "--port", "70000"], "port"),
        (["rpc-worker", "--threads", "0"], "threads"),
        (["rpc-worker", "--host", "0.0.0.0"], "no authentication"),
    ],
)
def test_bad_options_are_usage_errors_before_anything_starts(nothing_starts, capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and words in err and "Traceback" not in err


def test_good_options_reach_load_model_and_generate(monkeypatch, capsys):
    seen = {}

    def fake_load_model(path, **kwargs):
        seen.update(kwargs, path=path)
        raise llamarocm.ServerStartError("stop here")

    monkeypatch.setattr("llamarocm.load_model", fake_load_model)
    args = ["generate", "x", "--model", "m.gguf", "--max-tokens", "5", "--temperature", "0.5",
            "--context-length", "256"]
    assert main(args) == 1
    assert seen["path"] == "m.gguf" and seen["context_length"] == 256
    assert "stop here" in capsys.readouterr().err
