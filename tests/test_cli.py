"""The ``llamarocm`` command: usage errors, runtime errors, and a real generation."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import llamarocm
from llamarocm.cli import EXAMPLES, build_parser, chat_loop, main

# The integration tests start real servers; every other test here takes milliseconds.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def llamarocm_logger_restored():
    """main() configures the ``llamarocm`` logger (level, a stderr handler); put it back,
    so no other test sees that handler or its level."""
    logger = logging.getLogger("llamarocm")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


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
    monkeypatch.setattr("llamarocm.cli.options.default_model_path", refuse)


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
        (["generate", "x", "--gpu-layers", "some"], "--gpu-layers"),
        (["generate", "x", "--gpu-layers", "1.5"], "--gpu-layers"),
        (["generate", "x", "--gpu-layers", "-2"], "gpu_layers"),
        (["generate", "x", "--gpu-layers", "100001"], "gpu_layers"),
        (["generate", "x", "--devices", "a"], "comma-separated GPU indices"),
        (["generate", "x", "--devices", ""], "comma-separated GPU indices"),
        (["generate", "x", "--devices", "0,-1"], "device index"),
        (["generate", "x", "--top-p", "1.5"], "top_p"),
        (["generate", "x", "--top-p", "nan"], "top_p"),
        (["generate", "x", "--top-p", "most"], "--top-p"),
        (["generate", "x", "--top-k", "-1"], "top_k"),
        (["generate", "x", "--top-k", "2.5"], "--top-k"),
        (["generate", "x", "--top-k", str(2**31)], "top_k"),
        (["generate", "x", "--stop", ""], "stop strings"),
        (["generate", "x", "--seed", "lucky"], "--seed"),
        (["generate", "x", "--seed", str(2**32)], "seed"),
        (["chat", "--gpu-layers", "many"], "--gpu-layers"),
        (["chat", "--devices", "0,x"], "comma-separated GPU indices"),
        (["chat", "--devices", "1024"], "device index"),
        (["chat", "--top-p", "-0.1"], "top_p"),
        (["chat", "--top-k", "-5"], "top_k"),
        (["chat", "--stop", "User:", "--stop", ""], "stop strings"),
        (["chat", "--seed", "-1"], "seed"),
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


class FakeStream:
    """What the commands use of a TokenStream: iteration, a with block, close()."""

    metrics = None
    finish_reason = "stop"

    def __init__(self, text: str) -> None:
        self.tokens = [SimpleNamespace(text=text)]

    def __iter__(self):
        return iter(self.tokens)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        pass


class FakeModel:
    """A loaded model that records each generate() / chat() call."""

    def __init__(self) -> None:
        self.calls = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def generate(self, prompt, **kwargs):
        self.calls.append(("generate", prompt, kwargs))
        return FakeStream("generated")

    def chat(self, messages, **kwargs):
        self.calls.append(("chat", [dict(m) for m in messages], kwargs))
        return FakeStream("replied")


@pytest.fixture
def fake_load(monkeypatch):
    """``llamarocm.load_model`` replaced: each call is recorded as ``(path, kwargs)`` in
    ``loads`` and returns ``model``, a FakeModel."""
    recorder = SimpleNamespace(loads=[], model=FakeModel())

    def load_model(path, **kwargs):
        recorder.loads.append((path, kwargs))
        return recorder.model

    monkeypatch.setattr("llamarocm.load_model", load_model)
    return recorder


@pytest.fixture
def schema_file(tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    path = tmp_path / "person.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    return str(path), schema


def test_generate_options_reach_load_model_and_generate(fake_load, schema_file, capsys):
    schema_path, schema = schema_file
    argv = ["generate", "x", "--model", "m.gguf", "--server", "/opt/llama-server", "--context-length", "256",
            "--gpu-layers", "all", "--devices", "0,1", "--rpc", "a:1", "--max-tokens", "5", "--temperature", "0",
            "--top-k", "40", "--top-p", "0.9", "--seed", "7", "--stop", "\n\n", "--stop", "END",
            "--json-schema", schema_path, "--lora", "a.gguf", "--lora", "b.gguf:0.5"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "generated\n"
    [(path, load)] = fake_load.loads
    assert path == "m.gguf"
    assert load == {"context_length": 256, "gpu_layers": "all", "devices": [0, 1], "server_path": "/opt/llama-server",
                    "rpc": ["a:1"], "lora": [("a.gguf", 1.0), ("b.gguf", 0.5)], "progress": None}
    [(kind, prompt, options)] = fake_load.model.calls
    assert (kind, prompt) == ("generate", "x")
    assert options == {"max_tokens": 5, "temperature": 0.0, "top_k": 40, "top_p": 0.9, "seed": 7,
                       "stop": ["\n\n", "END"], "json_schema": schema}


def test_unset_options_are_left_to_the_library(fake_load, capsys):
    assert main(["generate", "x", "--model", "m.gguf"]) == 0
    [(_, load)] = fake_load.loads
    assert load["gpu_layers"] is None and load["devices"] is None and load["server_path"] is None
    assert fake_load.model.calls[0][2] == {"max_tokens": 64}


def test_chat_options_reach_load_model_and_chat(fake_load, schema_file, capsys, monkeypatch):
    schema_path, schema = schema_file
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/exit\n"))
    argv = ["chat", "--model", "m.gguf", "--system", "Be brief.", "--gpu-layers", "5", "--devices", "1",
            "--top-k", "3", "--top-p", "0.5", "--seed", "0", "--stop", "User:", "--json-schema", schema_path]
    assert main(argv) == 0
    assert "replied" in capsys.readouterr().out
    [(_, load)] = fake_load.loads
    assert load["gpu_layers"] == 5 and load["devices"] == [1]
    [(kind, messages, options)] = fake_load.model.calls
    assert kind == "chat"
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert options == {"max_tokens": 256, "top_k": 3, "top_p": 0.5, "seed": 0, "stop": ["User:"],
                       "json_schema": schema}


@pytest.mark.parametrize("given, passed", [("auto", "auto"), ("all", "all"), ("-1", -1), ("0", 0), ("12", 12)])
def test_gpu_layers_spellings(fake_load, capsys, given, passed):
    assert main(["generate", "x", "--model", "m.gguf", "--gpu-layers", given]) == 0
    assert fake_load.loads[0][1]["gpu_layers"] == passed


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "No such file"),
        ("", "is not valid JSON"),
        ("{not json", "is not valid JSON"),
        ('{"type": "number", "maximum": NaN}', "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
@pytest.mark.parametrize("command", [["generate", "x"], ["chat"]])
def test_bad_json_schema_file_is_a_usage_error_naming_it(nothing_starts, tmp_path, capsys, command, content, words):
    path = tmp_path / "schema.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(command + ["--json-schema", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--json-schema" in err and str(path) in err and words in err and "Traceback" not in err


def test_json_schema_folder_is_a_usage_error(nothing_starts, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "x", "--json-schema", str(tmp_path)])
    assert info.value.code == 2
    assert f"cannot read {str(tmp_path)!r}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["models", "."], ["info", "m.gguf"], ["vram"]])
def test_commands_without_a_server_refuse_server(nothing_starts, monkeypatch, capsys, argv):
    monkeypatch.setattr("llamarocm.list_devices", lambda: pytest.fail("the command must not run"))
    with pytest.raises(SystemExit) as info:
        main(argv + ["--server", "/opt/llama-server"])
    assert info.value.code == 2
    assert "unrecognized arguments: --server" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate", "x"], ["chat"], ["rpc-worker"], ["bench"], ["setup"]])
def test_commands_that_start_a_server_take_server(argv):
    assert build_parser().parse_args(argv + ["--server", "/opt/bin"]).server == "/opt/bin"


@pytest.mark.parametrize("argv", [["--debug", "vram"], ["vram", "--debug"], ["--debug", "vram", "--debug"]])
def test_debug_before_or_after_the_command_logs_to_stderr(monkeypatch, capsys, llamarocm_logger_restored, argv):
    monkeypatch.setattr("llamarocm.list_devices", lambda: [])
    assert main(argv) == 0
    assert llamarocm_logger_restored.getEffectiveLevel() == logging.DEBUG
    logging.getLogger("llamarocm.server").debug("a line of llama-server's output")
    logging.getLogger("llamarocm.http").debug("GET /health -> 200")
    err = capsys.readouterr().err
    assert "llamarocm.server: a line of llama-server's output" in err
    assert "llamarocm.http: GET /health -> 200" in err


def test_without_debug_only_warnings_are_shown(monkeypatch, capsys, llamarocm_logger_restored):
    monkeypatch.setattr("llamarocm.list_devices", lambda: [])
    assert main(["--debug", "vram"]) == 0
    assert main(["vram"]) == 0  # a second run replaces the first one's handler
    assert llamarocm_logger_restored.getEffectiveLevel() == logging.WARNING
    logging.getLogger("llamarocm.server").debug("hidden")
    logging.getLogger("llamarocm").warning("shown once")
    err = capsys.readouterr().err
    assert "hidden" not in err and err.count("llamarocm: shown once") == 1


def test_the_log_handler_writes_to_the_stderr_of_now(monkeypatch, llamarocm_logger_restored):
    # A program (or a test) that calls main() and later swaps or closes the stderr it
    # had must not have the handler write to the old one.
    monkeypatch.setattr("llamarocm.list_devices", lambda: [])
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main(["vram"]) == 0
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("llamarocm").warning("after the swap")
    assert "llamarocm: after the swap" in second.getvalue()


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, capsys, position):
    command = ["generate", "hi", "--model", str(tmp_path / "missing.gguf")]
    argv = ["--debug"] + command if position == "before" else command + ["--debug"]
    with pytest.raises(llamarocm.ModelNotFoundError):
        main(argv)


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_each_help_shows_its_examples(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(example in out for example in EXAMPLES[command])
