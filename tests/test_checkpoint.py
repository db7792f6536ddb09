"""The checkpoint file without a server: item identity, reading back, torn tails, the
lock, the fsync policy, and the batch runner's use of it with stand-in streams."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

import llamarocm
from llamarocm import checkpoint as checkpoint_module
from llamarocm.batch import BatchItem, read_back, run_batch, run_items
from llamarocm.checkpoint import Checkpoint, Record, item_hash, settings_identity
from llamarocm.config import GenerateConfig
from llamarocm.stream import GenerateMetrics

pytestmark = pytest.mark.timeout(30)


def _hash(prompt, **settings) -> str:
    return item_hash(prompt, settings_identity(GenerateConfig(**settings)))


def _ok(index: int, text: str = "text", digest: str = "h", item_id=None) -> Record:
    return Record(index, index if item_id is None else item_id, digest, text, "stop", None, None)


def _lines(path) -> list:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the file must hold whole lines"
    return [json.loads(line) for line in data.splitlines()]


# -- identity ----------------------------------------------------------------------------


def test_the_hash_is_sha256_of_the_canonical_json_of_prompt_and_settings():
    expected = json.dumps(
        {"prompt": "Ünïcode", "settings": {"max_tokens": 8, "temperature": 0.0, "stop": ["\n"]}},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True,
    )
    assert _hash("Ünïcode", max_tokens=8, temperature=0, stop="\n") == hashlib.sha256(expected.encode()).hexdigest()
    messages = [{"role": "user", "content": "hi"}]
    expected = json.dumps({"messages": messages, "settings": {}}, sort_keys=True, separators=(",", ":"))
    assert _hash(messages) == hashlib.sha256(expected.encode()).hexdigest()


def test_the_hash_ignores_how_settings_are_spelled():
    schema_a = {"type": "object", "properties": {"a": {"type": "string"}}}
    schema_b = {"properties": {"a": {"type": "string"}}, "type": "object"}
    base = _hash("p", temperature=0, stop="x", json_schema=schema_a, max_tokens=4)
    assert base == _hash("p", temperature=0.0, stop=["x"], json_schema=schema_b, max_tokens=4)
    # A default given explicitly is no setting; the timeout changes no output.
    assert base == _hash("p", temperature=0.0, stop=("x",), json_schema=schema_b, max_tokens=4, top_k=None,
                         timeout=5, extra={})
    assert _hash([{"role": "user", "content": "hi"}]) == _hash([{"content": "hi", "role": "user"}])


@pytest.mark.parametrize("changed", [
    {"prompt": "q"},
    {"max_tokens": 5},
    {"temperature": 0.1},
    {"seed": 1},
    {"extra": {"ignore_eos": True}},
    {"prompt": [{"role": "user", "content": "p"}]},
])
def test_the_hash_changes_with_the_prompt_or_a_setting(changed):
    base = {"prompt": "p", "max_tokens": 4, "temperature": 0}
    new = {**base, **changed}
    assert _hash(new.pop("prompt"), **new) != _hash(base.pop("prompt"), **base)


# -- reading back ------------------------------------------------------------------------


def test_lines_are_read_back_and_the_last_line_of_an_id_and_hash_wins(tmp_path):
    path = tmp_path / "r.jsonl"
    with Checkpoint(path) as file:
        file.append(Record.failure(0, 0, "a", ValueError("boom")))
        file.append(_ok(0, "first", "a"))
        file.append(_ok(1, "old", "b1"))
        file.append(_ok(1, "new", "b2"))
        file.append(_ok(2, "fine", "c"))
        file.append(Record.failure(2, 2, "c", RuntimeError("later failure")))
        file.append(_ok(3, "by name", "d", item_id="3"))
    with Checkpoint(path) as file:
        assert file.repaired == 0
        assert file.finished(0, "a").text == "first"
        assert file.finished(1, "b1").text == "old" and file.finished(1, "b2").text == "new"
        assert file.finished(1, "zz") is None
        assert file.finished(2, "c") is None  # its last line is a failure: run it again
        assert file.finished("3", "d").text == "by name" and file.finished(3, "d") is None
    lines = _lines(path)
    assert lines[0]["error"] == {"type": "ValueError", "message": "boom"} and lines[0]["text"] is None
    assert list(lines[1]) == ["id", "index", "text", "finish_reason", "error", "metrics", "hash"]


def test_texts_that_utf8_cannot_carry_still_make_whole_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    with Checkpoint(path) as file:
        file.append(_ok(0, "naïve ☃ 日本", "a"))
        file.append(_ok(1, "lone \ud800 surrogate", "b"))
    assert "☃".encode() in path.read_bytes()  # readable UTF-8, not escapes
    with Checkpoint(path) as file:
        assert file.finished(0, "a").text == "naïve ☃ 日本"
        assert file.finished(1, "b").text == "lone \ud800 surrogate"


@pytest.mark.parametrize("tail", [
    b'{"id":2,"index":2,"text":"cut sh',  # killed mid-write: no newline
    b'{"id":2,"index":2,"text":"cut short"}',  # even valid JSON is unfinished without its newline
    b"\0\0\0\0\0\0\0\0",  # a power cut: the size grew, the data never came
    b'{"id":2,"ind\n',  # garbage with a newline, as the last line
])
def test_a_torn_last_line_is_cut_off_and_its_item_runs_again(tmp_path, tail, caplog):
    path = tmp_path / "r.jsonl"
    with Checkpoint(path) as file:
        file.append(_ok(0, digest="a"))
        file.append(_ok(1, digest="b"))
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    with Checkpoint(path) as file:
        assert file.repaired == len(tail)
        assert path.read_bytes() == whole
        assert file.finished(1, "b") is not None and file.finished(2, "c") is None
        file.append(_ok(2, digest="c"))
    assert [line["index"] for line in _lines(path)] == [0, 1, 2]
    assert "cut short" in caplog.text


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(_ok(0).line() + b"not json\n" + _ok(1).line())
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"line 2 is not a result line"):
        Checkpoint(path)
    assert path.read_bytes() == before  # left as it was, for its owner to look at
    path.write_bytes(_ok(0).line() + b'{"id": 1, "index": 1, "hash": "h"}\n' + _ok(1).line())
    with pytest.raises(ValueError, match=r"line 2 .*neither an error nor a text"):
        Checkpoint(path)
    path.write_bytes(_ok(0).line() + _ok(1).line()[:-1] + b"," + _ok(2).line() + _ok(3).line())
    with pytest.raises(ValueError, match=r"line 2 is not a result line"):
        Checkpoint(path)  # two values on one line
    path.write_bytes(_ok(0).line() + b"\n   \n" + _ok(1).line())  # blank lines are fine
    with Checkpoint(path) as file:
        assert file.finished(1, "h") is not None


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(TypeError):
        Checkpoint(5)
    with pytest.raises(ValueError):
        Checkpoint("")
    with pytest.raises(OSError):
        Checkpoint(tmp_path)  # a folder
    with pytest.raises(OSError):
        Checkpoint(tmp_path / "missing" / "r.jsonl")


# -- the lock ----------------------------------------------------------------------------


def test_a_second_open_is_refused_in_this_process(tmp_path):
    path = tmp_path / "r.jsonl"
    with Checkpoint(path):
        with pytest.raises(llamarocm.CheckpointLockedError, match="in use by another run") as info:
            Checkpoint(path)
        assert str(path) in str(info.value) and info.value.path == str(path)
    with Checkpoint(path):  # released by the close
        pass


def test_a_run_in_another_process_holds_the_file(tmp_path):
    path = tmp_path / "r.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from llamarocm.checkpoint import Checkpoint
            with Checkpoint({str(path)!r}):
                print("locked", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(llamarocm.CheckpointLockedError):
            Checkpoint(path)
    finally:
        holder.stdin.close()
        assert holder.wait(20) == 0
    with Checkpoint(path):
        pass


# -- durability --------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fsync_runs_once_a_second_at_most_while_lines_come_and_at_the_close(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    path.touch()  # an existing file: no sync of the folder
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    clock = _Clock()
    file = Checkpoint(path, clock=clock)
    assert synced == []
    for now, expected in ((100.0, 0), (100.5, 0), (100.99, 0), (101.0, 1), (101.5, 1), (102.2, 2), (102.3, 2)):
        clock.now = now
        file.append(_ok(int(now * 100)))
        assert len(synced) == expected, now
    file.close()
    assert len(synced) == 3  # the lines since the last sync
    file.close()
    assert len(synced) == 3
    file = Checkpoint(path, clock=clock)
    file.close()
    assert len(synced) == 3  # nothing appended: nothing to sync


def test_a_new_file_and_a_repair_are_synced_at_once(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    Checkpoint(path).close()
    assert len(synced) == 1  # the folder, so the new name survives a power cut
    path.write_bytes(_ok(0).line() + b'{"id":')
    Checkpoint(path).close()
    assert len(synced) == 2  # the cut


def test_a_failing_sync_is_raised_to_the_writer_and_retried_at_the_close(tmp_path, monkeypatch, caplog):
    path = tmp_path / "r.jsonl"
    path.touch()
    clock = _Clock()
    file = Checkpoint(path, clock=clock)

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    clock.now += 2
    with pytest.raises(OSError, match="Input/output"):
        file.append(_ok(0))
    with pytest.raises(OSError, match="Input/output"):
        file.close()  # the line is still not on the disk: the close says so
    assert file._fd == -1  # closed all the same, and the lock released
    with pytest.raises(RuntimeError):
        with Checkpoint(path, clock=clock) as again:
            again.append(_ok(1))
            raise RuntimeError("the caller's error")
    assert "the last sync failed" in caplog.text  # logged, the caller's error raised


def test_a_failed_write_takes_back_its_part_and_stops_the_file(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    file = Checkpoint(path)
    file.append(_ok(0))
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        file.append(_ok(1))
    monkeypatch.setattr(checkpoint_module.os, "write", real_write)
    with pytest.raises(OSError, match="an earlier write"):
        file.append(_ok(2))
    file.close()
    assert [line["index"] for line in _lines(path)] == [0]


# -- the runner, with stand-in streams ------------------------------------------------------


class FakeStream:
    """What the batch runner uses of a TokenStream."""

    def __init__(self, text: str, error: Exception = None, finish_reason: str = "stop") -> None:
        self._text, self._error, self.finish_reason = text, error, finish_reason
        self.metrics = GenerateMetrics(3, 2, 0.01, 0.05, 300.0, float("nan"))

    def text(self) -> str:
        if self._error is not None:
            raise self._error
        return self._text

    def close(self) -> None:
        pass


class Openers:
    """Fake generate/chat: upper-case the prompt; prompts starting with "fail" fail."""

    def __init__(self, path=None) -> None:
        self.calls = []
        self.path = path

    def generate(self, prompt, **options):
        self.calls.append(prompt)
        if prompt.startswith("fail"):
            return FakeStream("", error=llamarocm.RequestError(f"refused {prompt}"))
        if prompt.startswith("cancel"):
            return FakeStream("par", finish_reason="cancelled")
        return FakeStream(prompt.upper() + str(options.get("max_tokens")))

    def chat(self, messages, **options):
        self.calls.append(messages)
        return FakeStream("reply")

    def map(self, prompts, checkpoint, **kwargs):
        return run_batch(self.generate, self.chat, prompts, max_workers=2, checkpoint=checkpoint, **kwargs)


def test_a_rerun_reads_everything_back_in_order_and_runs_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    prompts = [f"p{i}" for i in range(12)] + [[{"role": "user", "content": "hi"}]]
    first = Openers()
    results = first.map(prompts, path, max_tokens=4)
    assert [r.text for r in results] == [f"P{i}4" for i in range(12)] + ["reply"]
    assert len(_lines(path)) == 13 and len(first.calls) == 13
    again = Openers()
    seen = []
    back = again.map(prompts, path, max_tokens=4, progress=lambda done, total: seen.append((done, total)))
    assert again.calls == [] and len(_lines(path)) == 13
    assert [(r.prompt, r.text, r.finish_reason) for r in back] == [(r.prompt, r.text, r.finish_reason) for r in results]
    assert back[0].metrics == GenerateMetrics(3, 2, 0.01, 0.05, 300.0, None)  # NaN is stored as null
    assert seen == [(13, 13)]


def test_each_result_is_in_the_file_before_it_is_reported(tmp_path):
    path = tmp_path / "r.jsonl"
    openers = Openers()
    in_file = []
    openers.map([f"p{i}" for i in range(20)], path, progress=lambda done, total: in_file.append(
        (done, len(path.read_bytes().splitlines()))))
    assert all(lines >= done for done, lines in in_file), in_file


def test_failures_are_recorded_and_run_again_and_cancelled_items_are_not_recorded(tmp_path):
    path = tmp_path / "r.jsonl"
    prompts = ["a", "fail-b", "c", "cancel-d"]
    first = Openers()
    results = first.map(prompts, path)
    assert [r.ok for r in results] == [True, False, True, True] and results[3].finish_reason == "cancelled"
    lines = _lines(path)
    assert sorted(line["index"] for line in lines) == [0, 1, 2]
    failed = next(line for line in lines if line["index"] == 1)
    assert failed["error"] == {"type": "RequestError", "message": "refused fail-b"}
    again = Openers()
    again.map(prompts, path)
    assert sorted(again.calls) == ["cancel-d", "fail-b"]


def test_a_changed_prompt_or_setting_is_run_again(tmp_path):
    path = tmp_path / "r.jsonl"
    Openers().map(["a", "b", "c"], path, max_tokens=4)
    changed = Openers()
    results = changed.map(["a", "B", "c"], path, max_tokens=4)
    assert changed.calls == ["B"] and [r.text for r in results] == ["A4", "B4", "C4"]
    assert [line["index"] for line in _lines(path)] == [0, 1, 2, 1]
    resized = Openers()
    resized.map(["a", "B", "c"], path, max_tokens=5, timeout=9)
    assert sorted(resized.calls) == ["B", "a", "c"]
    assert Openers().map(["a", "b", "c"], path, max_tokens=4)[1].text == "B4"  # the old line still counts


def test_items_are_known_by_their_id_and_carry_their_own_settings(tmp_path):
    path = tmp_path / "r.jsonl"
    openers = Openers()
    items = [BatchItem("x", {"max_tokens": 2}, "first"), BatchItem("y", {"max_tokens": 3}, 7)]
    with Checkpoint(path) as file:
        run = run_items(openers.generate, openers.chat, items, max_workers=2, resume=read_back(items, file))
    assert [r.text for r in run.results] == ["X2", "Y3"] and run.resumed == 0
    assert {line["id"] for line in _lines(path)} == {"first", 7}
    # Reordered, the items are still found by their ids.
    with Checkpoint(path) as file:
        resume = read_back(items[::-1], file)
        assert resume.pending == 0
        run = run_items(openers.generate, openers.chat, items[::-1], max_workers=2, resume=resume)
    assert [r.text for r in run.results] == ["Y3", "X2"] and run.resumed == 2 and len(openers.calls) == 2


def test_a_write_failure_stops_the_batch_and_is_raised(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    real_write = os.write
    writes = []

    def failing(fd, data):
        writes.append(data)
        if len(writes) >= 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    monkeypatch.setattr(checkpoint_module.os, "write", failing)
    openers = Openers()
    with pytest.raises(OSError, match="Input/output"):
        openers.map([f"p{i}" for i in range(50)], path)
    assert len(openers.calls) < 50  # the rest were skipped
    assert len(_lines(path)) == 2


def test_fail_fast_records_the_failure_but_not_the_skipped_items(tmp_path):
    path = tmp_path / "r.jsonl"
    openers = Openers()
    with pytest.raises(llamarocm.RequestError):
        run_batch(openers.generate, openers.chat, ["fail"] + [f"p{i}" for i in range(30)], max_workers=1,
                  fail_fast=True, checkpoint=path)
    lines = _lines(path)
    assert lines[0]["error"]["type"] == "RequestError" and len(lines) == len(openers.calls) < 31
