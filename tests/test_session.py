"""Chat sessions with the real server: history recorded only for replies read to their
end, one open reply per session, many sessions on one model from many threads, and
the KV state saved, carried across a restart and loaded back (with the proof that the
next turn evaluated only its new tokens), refused for another model or build, or a
damaged file.
"""

from __future__ import annotations

import gc
import os
import stat
import threading

import pytest

import llamarocm
from llamarocm import ChatSession, SessionFileError, SessionMismatchError, _kv_setup, _slot_state
from llamarocm import session as session_module
from llamarocm._slot_state import read_state_file, slot_file_holds, write_state_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GREEDY = {"temperature": 0.0, "top_k": 1}
# About 330 tokens: enough that evaluating it again is plainly visible in the counts.
LONG_TEXT = "Here is a list to remember. " + " ".join(f"Item {i} is a {c}." for i, c in
                                                       zip(range(60), ["red cup", "blue pen", "green hat"] * 20,
                                                           strict=True))


@pytest.fixture(scope="module")
def session_model(model_path, server_binary):
    """A model that can save sessions, with two slots and a small prompt cache."""
    with llamarocm.load_model(
        model_path, parallel=2, context_length=2048, sessions=True, cache_ram=256, server_path=server_binary
    ) as model:
        yield model


def _evaluated(stream):
    metrics = stream.metrics
    return metrics.prompt_tokens - metrics.cached_prompt_tokens


# -- history -----------------------------------------------------------------


def test_a_reply_read_to_its_end_joins_the_history(shared_model):
    chat = shared_model.session("You answer briefly.")
    stream = chat.send("Say hello.", max_tokens=6, **GREEDY)
    assert chat.messages == [{"role": "system", "content": "You answer briefly."}]  # not read yet
    text = stream.text()
    assert chat.messages == [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": text},
    ]
    assert stream.finish_reason in ("stop", "length")
    second = "".join(token.text for token in chat.send("Again.", max_tokens=6, **GREEDY))
    assert chat.messages[3:] == [{"role": "user", "content": "Again."}, {"role": "assistant", "content": second}]


def test_messages_is_a_copy(shared_model):
    chat = shared_model.session(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    copy = chat.messages
    copy.append({"role": "user", "content": "sneaked in"})
    copy[0]["content"] = "changed"
    assert chat.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


def test_a_closed_reply_leaves_no_trace_and_the_message_can_be_sent_again(shared_model):
    chat = shared_model.session()
    stream = chat.send("Count to twenty.", max_tokens=40, **GREEDY)
    next(stream)
    stream.close()
    assert chat.messages == []
    assert chat.send("Count to twenty.", max_tokens=4, **GREEDY).text() is not None
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_a_dropped_reply_frees_the_session(shared_model):
    chat = shared_model.session()
    chat.send("Tell me a story.", max_tokens=40, **GREEDY)  # never read
    gc.collect()
    chat.send("Hi", max_tokens=2, **GREEDY).text()
    assert [m["content"] for m in chat.messages][0] == "Hi"


def test_a_failed_reply_leaves_no_trace(shared_model):
    chat = shared_model.session()
    with pytest.raises(llamarocm.ContextLengthError):
        chat.send("word " * 3000, max_tokens=4).text()  # more than the slot's 1024 tokens
    assert chat.messages == []
    chat.send("Hi", max_tokens=2, **GREEDY).text()
    assert len(chat.messages) == 2


def test_a_second_send_while_a_reply_is_open_is_refused(shared_model):
    chat = shared_model.session()
    stream = chat.send("Count to ten.", max_tokens=12, **GREEDY)
    next(stream)
    with pytest.raises(RuntimeError, match="still open"):
        chat.send("Interrupting.")
    # From another thread too: one session is one conversation.
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_refused(chat)))
    worker.start()
    worker.join(30)
    assert errors == [True]
    rest = "".join(token.text for token in stream)
    assert chat.messages[-1]["content"].endswith(rest)
    chat.send("Thanks.", max_tokens=2, **GREEDY).text()
    assert len(chat.messages) == 4


def _refused(chat):
    try:
        chat.send("From elsewhere.")
    except RuntimeError:
        return True
    return False


def test_bad_arguments_are_refused_before_any_request(shared_model):
    with pytest.raises(TypeError):
        shared_model.session(system=3)
    with pytest.raises(TypeError):
        shared_model.session(messages="Hi")
    with pytest.raises(TypeError):
        shared_model.session(messages=[{"role": "user"}])
    chat = shared_model.session()
    with pytest.raises(TypeError):
        chat.send(b"bytes")
    with pytest.raises(TypeError):
        chat.send("Hi", max_tokens="four")
    with pytest.raises(ValueError):
        chat.send("Hi", temperature=-1)
    assert chat.messages == []
    chat.send("Hi", max_tokens=2).text()  # nothing was left open


def _each_in_a_thread(work, sessions):
    """Run ``work(n, session)`` for every session, each on a thread of its own, and
    return what they raised (reported by the test, not lost in the threads)."""
    failures = []

    def run(n, chat):
        try:
            work(n, chat)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n, chat)) for n, chat in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    return failures


def test_many_sessions_share_a_model_from_many_threads(shared_model):
    """Eight conversations in eight threads, two turns each: each history holds its
    own messages only, in order."""
    sessions = [shared_model.session(f"You are assistant {n}.") for n in range(8)]
    barrier = threading.Barrier(len(sessions))

    def converse(n, chat):
        barrier.wait(30)
        for turn in range(2):
            chat.send(f"Session {n}, turn {turn}: say a word.", max_tokens=4, **GREEDY).text()

    failures = _each_in_a_thread(converse, sessions)
    assert not failures, failures
    for n, chat in enumerate(sessions):
        users = [m["content"] for m in chat.messages if m["role"] == "user"]
        assert users == [f"Session {n}, turn 0: say a word.", f"Session {n}, turn 1: say a word."]
        assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]


# -- load options --------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error",
    [
        ({"cache_ram": "1G"}, TypeError),
        ({"cache_ram": -2}, ValueError),
        ({"cache_ram": True}, TypeError),
        ({"sessions": "yes"}, TypeError),
        ({"extra_args": ["--slot-save-path", "/tmp"]}, ValueError),
        ({"extra_args": ["-cram", "0"]}, ValueError),
        ({"extra_args": ["--cache_ram", "0"]}, ValueError),
    ],
)
def test_session_load_options_are_checked_before_a_server_starts(model_path, options, error):
    with pytest.raises(error):
        llamarocm.load_model(model_path, server_path="/nonexistent/llama-server", **options)


def test_the_server_gets_the_cache_size_and_a_private_slot_directory(session_model):
    with open(f"/proc/{session_model.server.pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[argv.index(b"--cache-ram") + 1] == b"256"
    assert b"--swa-full" in argv
    directory = argv[argv.index(b"--slot-save-path") + 1].decode()
    info = os.stat(directory)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()


def test_the_slot_directory_goes_with_the_model(model_path, server_binary):
    model = llamarocm.load_model(model_path, context_length=256, sessions=True, server_path=server_binary)
    directory = model._slot_dir.path
    chat = model.session()
    chat.send("Hi", max_tokens=2).text()
    assert os.path.isdir(directory)
    model.close()
    assert not os.path.exists(directory)


def test_save_and_load_need_the_sessions_option(shared_model, tmp_path):
    chat = shared_model.session()
    with pytest.raises(ValueError, match="sessions=True"):
        chat.save(tmp_path / "chat.state")
    with pytest.raises(ValueError, match="sessions=True"):
        ChatSession.load(shared_model, tmp_path / "chat.state")
    assert not (tmp_path / "chat.state").exists()


# -- saved state ---------------------------------------------------------------


def _conversation(model):
    chat = model.session("You keep lists.")
    chat.send(LONG_TEXT, max_tokens=8, **GREEDY).text()
    return chat


def test_a_saved_session_resumes_after_a_restart_without_evaluating_its_history(session_model, tmp_path):
    chat = _conversation(session_model)
    path = tmp_path / "chat.state"
    chat.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(session_model._slot_dir.path) == []  # the server's file is gone
    state = read_state_file(str(path))
    assert state.messages == chat.messages and state.tokens > 300

    session_model.restart()
    resumed = ChatSession.load(session_model, path)
    assert resumed.messages == chat.messages
    stream = resumed.send("Which colour is item 4?", max_tokens=4, **GREEDY)
    stream.text()
    # The history came from the restored slot: only the new message was evaluated.
    assert stream.metrics.cached_prompt_tokens >= state.tokens - 2
    assert _evaluated(stream) < 30, stream.metrics
    assert len(resumed.messages) == len(chat.messages) + 2

    # A second turn, and a second save/load, go on from there.
    resumed.send("And item 5?", max_tokens=4, **GREEDY).text()
    resumed.save(path)
    session_model.restart()
    again = ChatSession.load(session_model, path)
    stream = again.send("And item 6?", max_tokens=4, **GREEDY)
    stream.text()
    assert _evaluated(stream) < 30, stream.metrics
    assert [m["role"] for m in again.messages][-2:] == ["user", "assistant"]


def test_the_same_history_sent_cold_evaluates_everything(session_model):
    """The control for the test above: without a restored slot, a restart costs the
    whole history."""
    chat = _conversation(session_model)
    session_model.restart()
    stream = session_model.chat([*chat.messages, {"role": "user", "content": "Which colour is item 4?"}],
                                max_tokens=4, **GREEDY)
    stream.text()
    assert _evaluated(stream) > 300, stream.metrics


def test_a_save_is_right_when_another_request_takes_the_slot_first(session_model, tmp_path, monkeypatch):
    """Between priming the slot and saving it, another conversation takes the slot:
    the save notices (its tokens are not the conversation's) and does it again."""
    chat = _conversation(session_model)
    real_save = session_module._save_slot
    attempts = []

    def save_after_intruder(model, slot_dir, slot):
        attempts.append(slot)
        if len(attempts) == 1:
            model.generate("An intruder's prompt, quite different.", max_tokens=2,
                           extra={"id_slot": slot}).text()
        return real_save(model, slot_dir, slot)

    monkeypatch.setattr(session_module, "_save_slot", save_after_intruder)
    path = tmp_path / "chat.state"
    chat.save(path)
    assert len(attempts) == 2
    monkeypatch.undo()
    session_model.restart()
    stream = ChatSession.load(session_model, path).send("Which colour is item 4?", max_tokens=4, **GREEDY)
    stream.text()
    assert _evaluated(stream) < 30, stream.metrics


def test_sessions_saved_from_many_threads_each_load_back_their_own(session_model, tmp_path):
    """Four conversations on two slots, each saved from its own thread at the same
    moment: each file holds its own conversation, and each loads back and goes on."""
    sessions = [session_model.session(f"You keep list {n}.") for n in range(4)]
    barrier = threading.Barrier(len(sessions))

    def converse_and_save(n, chat):
        chat.send(f"List {n}: " + LONG_TEXT[: 200 + 40 * n], max_tokens=4, **GREEDY).text()
        barrier.wait(60)
        chat.save(tmp_path / f"{n}.state")

    failures = _each_in_a_thread(converse_and_save, sessions)
    assert not failures, failures
    session_model.restart()
    for n, chat in enumerate(sessions):
        loaded = ChatSession.load(session_model, tmp_path / f"{n}.state")
        assert loaded.messages == chat.messages
        stream = loaded.send("Which colour is item 2?", max_tokens=2, **GREEDY)
        stream.text()
        # Loaded one after the other, each is sent at once: its restored slot is intact.
        assert _evaluated(stream) < 30, (n, stream.metrics)


def test_a_file_from_another_model_or_build_is_refused(session_model, tmp_path):
    chat = _conversation(session_model)
    path = tmp_path / "chat.state"
    chat.save(path)
    state = read_state_file(str(path))
    other_model = dict(state.header["model"], header_sha256="0" * 64)
    for identity, build, words in [
        (other_model, state.header["server_build"], "another model file"),
        (state.header["model"], "b9999-elsewhere", "build"),
    ]:
        forged = tmp_path / "forged.state"
        write_state_file(str(forged), identity=identity, server_build=build, adapters=[],
                         kv_flags=state.header["kv_flags"], messages=state.messages, tokens=state.tokens,
                         slot_bytes=state.slot_bytes)
        with pytest.raises(SessionMismatchError, match=words) as caught:
            ChatSession.load(session_model, forged)
        assert caught.value.messages == chat.messages  # the conversation is not lost
        assert isinstance(caught.value, ValueError)


def test_a_conversation_longer_than_the_context_is_refused(session_model, model_path, server_binary, tmp_path):
    chat = _conversation(session_model)
    path = tmp_path / "chat.state"
    chat.save(path)
    with llamarocm.load_model(model_path, context_length=128, parallel=2, sessions=True,
                              server_path=server_binary) as small:
        with pytest.raises(SessionMismatchError, match="context_length"):
            ChatSession.load(small, path)


def test_damaged_files_are_refused(session_model, tmp_path):
    chat = _conversation(session_model)
    path = tmp_path / "chat.state"
    chat.save(path)
    data = path.read_bytes()
    cases = {
        "truncated-slot": data[:-100],
        "truncated-header": data[:30],
        "flipped": data[:-50] + bytes([data[-50] ^ 0xFF]) + data[-49:],
        "appended": data + b"more",
        "not-ours": b"GGUF" + data[4:],
        "empty": b"",
        "header-junk": data[:29] + b"{" * 10 + data[39:],
    }
    for name, content in cases.items():
        damaged = tmp_path / name
        damaged.write_bytes(content)
        with pytest.raises(SessionFileError) as caught:
            ChatSession.load(session_model, damaged)
        assert str(damaged) in str(caught.value), name
    with pytest.raises(FileNotFoundError):
        ChatSession.load(session_model, tmp_path / "missing.state")
    state = read_state_file(str(path))
    forged = tmp_path / "bad-messages.state"
    write_state_file(str(forged), identity=state.header["model"], server_build=state.header["server_build"],
                     adapters=[], kv_flags=state.header["kv_flags"], messages=[{"role": "user"}],
                     tokens=state.tokens, slot_bytes=state.slot_bytes)
    with pytest.raises(SessionFileError, match="messages"):
        ChatSession.load(session_model, forged)


def test_save_refuses_while_a_reply_is_open(session_model, tmp_path):
    chat = session_model.session()
    stream = chat.send("Count to ten.", max_tokens=12, **GREEDY)
    next(stream)
    with pytest.raises(RuntimeError, match="still open"):
        chat.save(tmp_path / "chat.state")
    stream.close()
    chat.save(tmp_path / "chat.state")  # nothing recorded: an empty conversation
    assert ChatSession.load(session_model, tmp_path / "chat.state").messages == []


def test_slot_file_holds_finds_the_tokens_only_where_they_are():
    import struct

    tokens = [2, 105, 7, 9]
    data = struct.pack("<III", 0x67677371, 2, 8) + struct.pack("<8i", -1, 1, 4, *tokens, 0) + b"kv"
    assert slot_file_holds(data, tokens)
    assert not slot_file_holds(data, [2, 105, 8])
    assert not slot_file_holds(data[:20], tokens)
    assert not slot_file_holds(b"junk" * 10, tokens)


def test_sessions_benchmark_quick_run_writes_json(model_path, server_binary, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "sessions.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sessions.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--model", model_path, "--server", server_binary,
         "--output", str(out)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=220,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    resumed = result["resumed_vs_cold"]
    assert max(resumed["resumed_evaluated_tokens"]) < 30 < min(resumed["cold_evaluated_tokens"])
    assert result["interleaved"]["sessions"] == 4
    assert "first token" in done.stdout


def test_a_checkpoint_line_written_before_cached_prompt_tokens_existed_keeps_its_metrics():
    """GenerateMetrics grew a field with a default: lines written without it read back."""
    from llamarocm.batch import _read_back
    from llamarocm.checkpoint import Record

    old = {"prompt_tokens": 30, "generated_tokens": 16, "time_to_first_token": 0.05, "total_duration": 0.5,
           "prefill_tokens_per_second": 600.0, "decode_tokens_per_second": 35.0}
    result = _read_back("a prompt", Record(0, 0, "d", "text", "length", old, None))
    assert result.metrics == llamarocm.GenerateMetrics(30, 16, 0.05, 0.5, 600.0, 35.0)
    assert result.metrics.cached_prompt_tokens is None


def test_a_load_that_fails_leaves_no_slot_directory(model_path, fake_server, monkeypatch):
    from llamarocm import _slot_state, loading

    made = []

    class Recorded(_slot_state.PrivateDirectory):
        def __init__(self):
            super().__init__()
            made.append(self.path)

    monkeypatch.setattr(loading, "PrivateDirectory", Recorded)
    monkeypatch.setenv("FAKE_MODE", "exit")
    with pytest.raises(llamarocm.ServerStartError):
        llamarocm.load_model(model_path, sessions=True, server_path=fake_server, startup_timeout=30)
    assert len(made) == 1 and not os.path.exists(made[0])


# -- what a saved state depends on: adapters, their scales, KV-cache flags ---------


@pytest.fixture(scope="module")
def session_adapter(tmp_path_factory):
    from test_lora import build_adapter

    return build_adapter(tmp_path_factory.mktemp("session-lora") / "style.gguf")


@pytest.fixture(scope="module")
def adapter_session_model(model_path, server_binary, session_adapter):
    """A model that saves sessions, with one LoRA adapter at scale 1.0."""
    with llamarocm.load_model(model_path, context_length=512, sessions=True, lora=[(session_adapter, 1.0)],
                              server_path=server_binary) as model:
        yield model


@pytest.fixture(scope="module")
def f32_session_model(model_path, server_binary):
    """A model that saves sessions, with an f32 K cache instead of the default f16."""
    with llamarocm.load_model(model_path, context_length=512, sessions=True, extra_args=["-ctk", "f32"],
                              server_path=server_binary) as model:
        yield model


def _short_conversation(model):
    chat = model.session("You keep lists.")
    chat.send("Item 1 is a red cup.", max_tokens=4, **GREEDY).text()
    return chat


def test_a_file_saved_with_an_adapter_is_refused_by_a_model_without_it(adapter_session_model, session_model,
                                                                       tmp_path):
    chat = _short_conversation(adapter_session_model)
    path = tmp_path / "with-adapter.state"
    chat.save(path)
    with pytest.raises(SessionMismatchError, match="LoRA adapter") as caught:
        ChatSession.load(session_model, path)
    assert caught.value.messages == chat.messages
    # And the other way round.
    plain = tmp_path / "plain.state"
    _short_conversation(session_model).save(plain)
    with pytest.raises(SessionMismatchError, match="LoRA adapter"):
        ChatSession.load(adapter_session_model, plain)
    # The same setup loads it.
    assert ChatSession.load(adapter_session_model, path).messages == chat.messages


def test_a_file_saved_at_one_adapter_scale_is_refused_at_another(adapter_session_model, tmp_path):
    chat = _short_conversation(adapter_session_model)
    path = tmp_path / "scale.state"
    chat.save(path)
    adapter_session_model.set_lora({"style.gguf": 0.5})
    try:
        with pytest.raises(SessionMismatchError, match="scale"):
            ChatSession.load(adapter_session_model, path)
    finally:
        adapter_session_model.set_lora({"style.gguf": 1.0})
    assert ChatSession.load(adapter_session_model, path).messages == chat.messages


def test_a_file_saved_with_another_adapter_file_is_refused(adapter_session_model, tmp_path):
    from test_lora import build_adapter

    chat = _short_conversation(adapter_session_model)
    path = tmp_path / "adapter.state"
    chat.save(path)
    state = read_state_file(str(path))
    other = build_adapter(tmp_path / "style.gguf", seed=1, rank=4)  # same name, other file
    forged = tmp_path / "other-adapter.state"
    write_state_file(str(forged), identity=state.header["model"], server_build=state.header["server_build"],
                     adapters=[dict(_slot_state.model_identity(str(other)), scale=1.0)],
                     kv_flags=state.header["kv_flags"], messages=state.messages, tokens=state.tokens,
                     slot_bytes=state.slot_bytes)
    with pytest.raises(SessionMismatchError, match="LoRA adapter"):
        ChatSession.load(adapter_session_model, forged)


def test_a_file_saved_with_other_kv_cache_flags_is_refused(session_model, f32_session_model, tmp_path):
    chat = _short_conversation(session_model)
    path = tmp_path / "f16.state"
    chat.save(path)
    with pytest.raises(SessionMismatchError, match="cache-type-k") as caught:
        ChatSession.load(f32_session_model, path)
    assert caught.value.messages == chat.messages
    flags = read_state_file(str(path)).header["kv_flags"]
    assert flags == _kv_setup.kv_flags(session_model.server.args)
    assert ["--swa-full"] in flags and ["--parallel", "2"] in flags


def test_a_file_saved_with_another_slot_count_is_refused(session_model, model_path, server_binary, tmp_path):
    """llama-server restores a slot's state only into a server with as many slots
    (measured: parallel 2 into 1 or 4 is refused, with words about KV space)."""
    chat = _short_conversation(session_model)
    path = tmp_path / "two-slots.state"
    chat.save(path)
    with llamarocm.load_model(model_path, context_length=2048, sessions=True, server_path=server_binary) as one:
        with pytest.raises(SessionMismatchError, match="--parallel 2.*--parallel 1"):
            ChatSession.load(one, path)


def test_a_restore_the_server_refuses_is_a_mismatch(session_model, f32_session_model, tmp_path):
    """Past our own checks (a forged identity), the server itself refuses f16 KV bytes
    for an f32 cache: that is a mismatch too, with the messages kept."""
    chat = _short_conversation(session_model)
    path = tmp_path / "f16.state"
    chat.save(path)
    state = read_state_file(str(path))
    forged = tmp_path / "forged.state"
    write_state_file(str(forged), identity=state.header["model"], server_build=state.header["server_build"],
                     adapters=[], kv_flags=_kv_setup.kv_flags(f32_session_model.server.args),
                     messages=state.messages, tokens=state.tokens, slot_bytes=state.slot_bytes)
    with pytest.raises(SessionMismatchError, match="llama-server refused") as caught:
        ChatSession.load(f32_session_model, forged)
    assert caught.value.messages == chat.messages
    assert os.listdir(f32_session_model._slot_dir.path) == []


def test_kv_flags_are_read_from_the_server_arguments():
    flags = _kv_setup.kv_flags(["-c", "512", "-np", "3", "-ctk", "q8_0", "--cache_type_v", "q8_0", "-fa", "on",
                                  "--rope-scale", "2", "--control-vector-layer-range", "1", "5",
                                  "--swa-full", "--threads", "2", "-fa"])
    assert flags == [["--parallel", "3"], ["--cache-type-k", "q8_0"], ["--cache-type-v", "q8_0"],
                     ["--flash-attn", "on"], ["--rope-scale", "2"], ["--control-vector-layer-range", "1", "5"],
                     ["--swa-full"], ["--flash-attn"]]


def test_a_file_of_the_previous_format_is_refused_as_a_mismatch(session_model, tmp_path):
    import json
    import struct

    chat = _short_conversation(session_model)
    path = tmp_path / "new.state"
    chat.save(path)
    state = read_state_file(str(path))
    header = {key: value for key, value in state.header.items() if key not in ("adapters", "kv_flags")}
    header["format"] = 1
    encoded = json.dumps(header).encode()
    old = tmp_path / "old.state"
    old.write_bytes(_slot_state.MAGIC + struct.pack("<Q", len(encoded)) + encoded + state.slot_bytes)
    with pytest.raises(SessionMismatchError, match="older llamarocm") as caught:
        ChatSession.load(session_model, old)
    assert caught.value.messages == chat.messages


# -- save checks its target first ------------------------------------------------


@pytest.fixture
def counted_calls(session_model, monkeypatch):
    calls = []
    real = session_model._call

    def counting(fn):
        calls.append(fn)
        return real(fn)

    monkeypatch.setattr(session_model, "_call", counting)
    return calls


def test_save_checks_its_target_before_any_request(session_model, tmp_path, counted_calls):
    chat = session_model.session(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for target, error in [
        (tmp_path, IsADirectoryError),
        (tmp_path / "missing" / "chat.state", FileNotFoundError),
        (a_file / "chat.state", NotADirectoryError),
        (str(tmp_path / "ends-with-a-slash") + os.sep, IsADirectoryError),
    ]:
        with pytest.raises(error, match=str(target)):
            chat.save(target)
    if os.getuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError):
            chat.save(locked / "chat.state")
    assert counted_calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "locked"][: 1 if os.getuid() == 0 else 2]
    chat.save(tmp_path / "chat.state")
    assert counted_calls  # the checks do not refuse a good target


# -- tool calls in a session -----------------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_a_turn_that_calls_a_tool_is_recorded_and_answered(shared_model):
    chat = shared_model.session()
    stream = chat.send("Add 2 and 3", tools=[add], tool_choice="required", max_tokens=40, **GREEDY)
    text = stream.text()
    assert stream.finish_reason == "tool_calls"
    call = stream.tool_calls[0]
    assert chat.messages == [
        {"role": "user", "content": "Add 2 and 3"},
        # OpenAI's shape: no content (None) unless the reply said something before its call.
        {"role": "assistant", "content": text or None, "tool_calls": [c.to_openai() for c in stream.tool_calls]},
    ]
    with pytest.raises(ValueError, match="add_tool_result"):
        chat.send("And 4 and 5?", tools=[add])  # the calls are not answered yet
    with pytest.raises(ValueError, match="no call"):
        chat.add_tool_result("not-a-call-id", "5")
    with pytest.raises(TypeError):
        chat.add_tool_result(call.id, 5)
    chat.add_tool_result(call.id, str(add(**call.arguments)))
    assert chat.messages[-1] == {"role": "tool", "tool_call_id": call.id, "name": "add", "content": "5"}
    with pytest.raises(ValueError, match="already"):
        chat.add_tool_result(call.id, "5")
    reply = chat.send(tools=[add], tool_choice="none", max_tokens=12, **GREEDY)  # the model answers the result
    text = reply.text()
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[-1] == {"role": "assistant", "content": text}


def test_send_without_a_message_needs_tool_results_to_answer(shared_model):
    chat = shared_model.session()
    with pytest.raises(ValueError, match="tool result"):
        chat.send()
    with pytest.raises(ValueError, match="no call"):
        chat.add_tool_result("call-1", "5")


# -- settings are checked before anything is sent ---------------------------------


@pytest.mark.parametrize(
    "settings, error",
    [
        ({"extra": "x"}, TypeError),
        ({"extra": {1: 2}}, TypeError),
        ({"extra": {"prompt": "x"}}, ValueError),
        ({"max_tokens": "4"}, TypeError),
        ({"temperature": "hot"}, TypeError),
        ({"top_k": 1.5}, TypeError),
        ({"top_p": "x"}, TypeError),
        ({"min_p": "x"}, TypeError),
        ({"repeat_penalty": "x"}, TypeError),
        ({"seed": "x"}, TypeError),
        ({"stop": 3}, TypeError),
        ({"json_schema": "x"}, TypeError),
        ({"grammar": 3}, TypeError),
        ({"logprobs": "x"}, TypeError),
        ({"timeout": "x"}, TypeError),
        ({"lora": "x"}, TypeError),
        ({"reasoning": "x"}, TypeError),
        ({"chat_template_kwargs": "x"}, TypeError),
        ({"tools": "x"}, TypeError),
        ({"tools": [add], "tool_choice": 3}, TypeError),
        ({"response_format": 3}, TypeError),
        ({"no_such_setting": 1}, TypeError),
    ],
)
def test_bad_settings_are_refused_with_clear_messages_before_any_request(shared_model, monkeypatch, settings,
                                                                         error):
    calls = []
    real = shared_model._call
    monkeypatch.setattr(shared_model, "_call", lambda fn: calls.append(fn) or real(fn))
    chat = shared_model.session()
    chat._pinned_slot = 0  # the path that adds id_slot to extra
    with pytest.raises(error) as caught:
        chat.send("Hi", **settings)
    assert "dictionary update" not in str(caught.value)
    assert calls == [] and chat.messages == []
