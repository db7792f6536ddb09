"""Durable batches with the real server: ``map(checkpoint=...)`` and ``llamarocm batch``
killed, interrupted, crashed under, and resumed.

Every run is greedy (``temperature=0``, ``top_k=1``) over counting prompts, whose
continuations do not depend on how the server batches them (see docs/reliability.rst),
so a resumed run must end with the very texts of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import llama_server_pids, running, wait_pid_gone

import llamarocm
from llamarocm.batch import BatchItem, read_back
from llamarocm.checkpoint import Checkpoint, Record
from llamarocm.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"max_tokens": 8, "temperature": 0.0, "top_k": 1}
CLI_SETTINGS = ["--max-tokens", "8", "--temperature", "0", "--top-k", "1", "--context-length", "1024"]
PROMPTS = [f"{n}, {n + 1}, {n + 2}," for n in range(1, 31)]


@pytest.fixture(scope="module")
def reference(shared_model):
    """The texts of an uninterrupted run, by prompt."""
    results = shared_model.map(PROMPTS, **SETTINGS)
    assert all(r.ok for r in results)
    return {prompt: r.text for prompt, r in zip(PROMPTS, results, strict=True)}


@pytest.fixture
def spy(shared_model, monkeypatch):
    """Every prompt the shared model is asked to complete from here on."""
    calls = []
    real = shared_model.generate

    def generate(prompt, **options):
        calls.append(prompt)
        return real(prompt, **options)

    monkeypatch.setattr(shared_model, "generate", generate)
    return calls


def _lines(path: Path) -> list:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the file must hold whole lines"
    return [json.loads(line) for line in data.splitlines()]


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for_lines(path: Path, count: int, timeout: float, proc=None) -> None:
    """Wait until ``path`` holds ``count`` lines (a condition, checked every 20 ms)."""
    deadline = time.monotonic() + timeout
    while _count_lines(path) < count:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the batch ended early ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} never reached {count} lines"
        time.sleep(0.02)


# -- map(checkpoint=...) ------------------------------------------------------------------


def test_a_run_writes_a_line_per_item_and_a_rerun_sends_no_request(shared_model, reference, spy, tmp_path):
    out = tmp_path / "results.jsonl"
    results = shared_model.map(PROMPTS, checkpoint=out, **SETTINGS)
    assert [r.text for r in results] == [reference[p] for p in PROMPTS]
    lines = _lines(out)
    assert sorted(line["index"] for line in lines) == list(range(len(PROMPTS)))
    assert all(line["error"] is None and line["metrics"]["generated_tokens"] == 8 for line in lines)
    assert len(spy) == len(PROMPTS)

    spy.clear()
    seen = []
    again = shared_model.map(PROMPTS, checkpoint=out, progress=lambda done, total: seen.append(done), **SETTINGS)
    assert spy == [] and _count_lines(out) == len(PROMPTS)
    outcome = [(r.prompt, r.text, r.finish_reason) for r in results]
    assert [(r.prompt, r.text, r.finish_reason) for r in again] == outcome
    assert again[0].metrics == results[0].metrics
    assert seen == [len(PROMPTS)]


def test_a_torn_last_line_is_redone(shared_model, reference, spy, tmp_path):
    out = tmp_path / "results.jsonl"
    shared_model.map(PROMPTS[:6], checkpoint=out, **SETTINGS)
    data = out.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    out.write_bytes(data[: len(data) - len(last) - 1] + last[: len(last) // 2])  # as a SIGKILL mid-write leaves it
    torn_index = json.loads(last)["index"]
    spy.clear()
    results = shared_model.map(PROMPTS[:6], checkpoint=out, **SETTINGS)
    assert spy == [PROMPTS[torn_index]]
    assert [r.text for r in results] == [reference[p] for p in PROMPTS[:6]]
    assert sorted(line["index"] for line in _lines(out)) == list(range(6))


def test_a_changed_prompt_or_setting_is_redone(shared_model, reference, spy, tmp_path):
    out = tmp_path / "results.jsonl"
    prompts = PROMPTS[:5]
    shared_model.map(prompts, checkpoint=out, **SETTINGS)
    changed = [*prompts[:2], PROMPTS[20], *prompts[3:]]
    spy.clear()
    results = shared_model.map(changed, checkpoint=out, **SETTINGS)
    assert spy == [PROMPTS[20]] and results[2].text == reference[PROMPTS[20]]
    assert [line["index"] for line in _lines(out)][5:] == [2]
    spy.clear()
    shorter = shared_model.map(changed, checkpoint=out, **{**SETTINGS, "max_tokens": 4})
    assert sorted(spy) == sorted(changed) and all(r.metrics.generated_tokens == 4 for r in shorter)


def test_a_second_run_on_the_same_file_is_refused(shared_model, spy, tmp_path):
    out = tmp_path / "results.jsonl"
    with Checkpoint(out):
        with pytest.raises(llamarocm.CheckpointLockedError, match=str(out)):
            shared_model.map(PROMPTS[:3], checkpoint=out, **SETTINGS)
    assert spy == []


def test_a_server_crash_keeps_what_finished_and_the_rest_runs_after_a_restart(model_path, server_binary, tmp_path):
    out = tmp_path / "results.jsonl"
    with llamarocm.load_model(model_path, parallel=2, context_length=512, server_path=server_binary) as model:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(results=model.map(PROMPTS, checkpoint=out, **SETTINGS)))
        thread.start()
        _wait_for_lines(out, 4, 60)
        os.kill(model.server.pid, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive()
        results = outcome["results"]
        finished = {i for i, r in enumerate(results) if r.ok}
        failed = {i for i, r in enumerate(results) if not r.ok}
        assert finished and failed
        assert all(isinstance(results[i].error, llamarocm.ServerCrashedError) for i in failed)
        lines = _lines(out)
        assert {line["index"] for line in lines if line["error"] is None} == finished
        assert {line["index"] for line in lines if line["error"] is not None} == failed
        assert {line["error"]["type"] for line in lines if line["error"]} == {"ServerCrashedError"}

        model.restart()
        calls = []
        real = model.generate
        model.generate = lambda prompt, **options: (calls.append(prompt), real(prompt, **options))[1]
        again = model.map(PROMPTS, checkpoint=out, **SETTINGS)
    assert all(r.ok for r in again)
    assert sorted(calls) == sorted(PROMPTS[i] for i in failed)
    assert [again[i].text for i in finished] == [results[i].text for i in finished]


# -- llamarocm batch ----------------------------------------------------------------------


def _write_input(path: Path, prompts=PROMPTS) -> None:
    path.write_text("".join(json.dumps({"id": f"item-{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))


def _batch_argv(model_path, server_binary, inp, out, *extra):
    return [sys.executable, "-m", "llamarocm", "batch", str(inp), str(out), "--model", model_path,
            "--server", server_binary, *CLI_SETTINGS, *extra]


def _stop_mid_run(argv, out: Path, sig: int) -> "tuple[int, str]":
    """Start the batch, wait for its first lines, send ``sig``; its exit code and stderr."""
    with running(argv) as proc:
        _wait_for_lines(out, 5, 90, proc)
        servers = llama_server_pids(proc.pid)
        assert servers, "no llama-server under the batch"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    for pid in servers:
        assert wait_pid_gone(pid, 15), "the batch's llama-server outlived it"
    return proc.returncode, err


def _resume_and_check(argv, out: Path, reference, lines_before: int) -> None:
    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["total"] == summary["done"] == len(PROMPTS)
    assert summary["failed"] == 0 and summary["resumed"] == lines_before
    lines = _lines(out)
    ids = [line["id"] for line in lines]
    assert sorted(ids) == sorted(f"item-{i}" for i in range(len(PROMPTS))), "every id exactly once"
    assert {line["id"]: line["text"] for line in lines} == {f"item-{i}": reference[p] for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)],
                         ids=["sigkill", "ctrl-c"])
def test_a_batch_stopped_mid_run_resumes_to_the_uninterrupted_result(
    sig, code, model_path, server_binary, reference, tmp_path
):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    _write_input(inp)
    argv = _batch_argv(model_path, server_binary, inp, out, "--parallel", "2")
    returncode, err = _stop_mid_run(argv, out, sig)
    assert returncode == code, err
    if sig == signal.SIGINT:
        assert "interrupted" in err and "run the same command again" in err
    with Checkpoint(out):  # opening cuts a torn last line off, as the rerun would
        pass
    lines_before = len(_lines(out))
    assert 5 <= lines_before < len(PROMPTS), "stopped too late to test a resume"
    _resume_and_check(argv, out, reference, lines_before)


def test_batch_with_per_line_settings_chats_and_a_failure(model_path, server_binary, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text("\n".join(json.dumps(line) for line in [
        {"id": 1, "prompt": PROMPTS[0]},
        {"id": "short", "prompt": PROMPTS[1], "max_tokens": 2},
        {"id": "chat", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3},
        {"id": "too-long", "prompt": "word " * 1200},
    ]) + "\n\n")
    argv = [*_batch_argv(model_path, server_binary, inp, out, "--parallel", "2"), "--context-length", "512"]
    first = subprocess.run([*argv, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert first.returncode == 1, first.stderr
    assert "1 of 4 items failed" in first.stderr
    summary = json.loads(first.stdout)
    assert (summary["total"], summary["done"], summary["failed"], summary["resumed"]) == (4, 3, 1, 0)
    by_id = {line["id"]: line for line in _lines(out)}
    assert by_id[1]["metrics"]["generated_tokens"] == 8 and by_id["short"]["metrics"]["generated_tokens"] == 2
    assert by_id["chat"]["text"] and by_id["chat"]["metrics"]["generated_tokens"] <= 3
    assert by_id["too-long"]["error"]["type"] == "ContextLengthError"
    again = subprocess.run([*argv, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert again.returncode == 1
    summary = json.loads(again.stdout)
    assert (summary["resumed"], summary["ran"], summary["failed"]) == (3, 1, 1)  # the failure was retried
    assert len(_lines(out)) == 5


def test_batch_with_everything_done_loads_no_model(monkeypatch, tmp_path, capsys):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    _write_input(inp, PROMPTS[:2])
    monkeypatch.setattr(llamarocm, "load_model", _no_load)
    with pytest.raises(AssertionError, match="no model may load"):
        main(["batch", str(inp), str(out), "--model", "x.gguf"])
    # The lines a finished run leaves:
    items = [BatchItem(p, {"max_tokens": 256}, f"item-{i}") for i, p in enumerate(PROMPTS[:2])]
    with Checkpoint(out) as file:
        for index, digest in enumerate(read_back(items, file).digests):
            file.append(Record(index, f"item-{index}", digest, "text", "stop", None, None))
    assert main(["batch", str(inp), str(out), "--model", "x.gguf", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["resumed"], summary["ran"]) == (2, 2, 0)


def _no_load(*args, **kwargs):
    raise AssertionError("no model may load")


@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"}', '{"id": 1, "prompt": "c"}'],
     "line 3: the id 1 is already on line 1"),
    (['{"id": 1, "prompt": "a"}', '{"prompt": "b"}'], "line 2: no id"),
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"'], "line 2: Expecting"),
    (['{"id": 1, "prompt": "a", "temprature": 0}'], "line 1: unknown key(s) temprature"),
    (['{"id": 1, "prompt": "a", "messages": []}'], "line 1: give either a prompt or messages"),
    (['{"id": 1, "prompt": "a", "max_tokens": 0}'], "line 1: max_tokens must be >= 1"),
    (['{"id": 1.5, "prompt": "a"}'], "line 1: the id must be a string or an integer"),
    (['{"id": 1, "messages": [{"role": "user"}]}'], "line 1: messages[0]['content'] must be a str"),
    (['["id", 1]'], "line 1: expected a JSON object"),
    (["", "  "], "holds no prompts"),
])
def test_bad_input_is_a_usage_error_naming_the_line_before_anything_loads(
    lines, message, monkeypatch, tmp_path, capsys
):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(llamarocm, "load_model", _no_load)
    with pytest.raises(SystemExit) as info:
        main(["batch", str(inp), str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(inp) in err, err
    assert not out.exists()


def test_a_missing_input_or_the_same_file_twice_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(llamarocm, "load_model", _no_load)
    with pytest.raises(SystemExit) as info:
        main(["batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")])
    assert info.value.code == 2 and "cannot read" in capsys.readouterr().err
    inp = tmp_path / "prompts.jsonl"
    _write_input(inp, PROMPTS[:1])
    with pytest.raises(SystemExit) as info:
        main(["batch", str(inp), str(inp)])
    assert info.value.code == 2 and "different files" in capsys.readouterr().err


def test_batch_on_a_file_another_run_holds_exits_1_naming_it(monkeypatch, tmp_path, capsys):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    _write_input(inp, PROMPTS[:2])
    monkeypatch.setattr(llamarocm, "load_model", _no_load)
    with Checkpoint(out):
        assert main(["batch", str(inp), str(out), "--model", "x.gguf"]) == 1
    err = capsys.readouterr().err
    assert f"{out} is in use by another run" in err


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_batch_whose_model_does_not_start_leaves_no_empty_output_it_created(existing, monkeypatch, tmp_path, capsys):
    def fail_to_start(*args, **kwargs):
        raise llamarocm.ServerStartError("llama-server exited with status 1 before it was ready")

    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    _write_input(inp, PROMPTS[:2])
    if existing:
        out.write_bytes(b"")
    monkeypatch.setattr(llamarocm, "load_model", fail_to_start)
    assert main(["batch", str(inp), str(out), "--model", "x.gguf"]) == 1
    assert "before it was ready" in capsys.readouterr().err
    assert out.exists() == existing  # created by the run and empty: removed; there before: kept


# -- the benchmark ------------------------------------------------------------------------


def test_batch_benchmark_quick_run_writes_json(model_path, server_binary, tmp_path):
    out = tmp_path / "batch.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), "--quick", "--model", model_path,
         "--server", server_binary, "--output", str(out)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=170,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {p["parallel"] for p in result["map_vs_raw"]} == {1, 2}
    assert all(p["same_tokens"] for p in result["map_vs_raw"])
    assert all(p["ours_cpu_seconds"]["median"] > 0 < p["baseline_cpu_seconds"]["median"] for p in result["map_vs_raw"])
    assert result["durable_vs_memory"]["ratio"]["runs"] >= 1
    assert result["resume"]["lines"] > 0
    assert "map / raw" in done.stdout
