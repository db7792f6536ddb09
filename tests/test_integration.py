"""End to end on the real llama-server with Gemma 3 270M.

Most tests share one loaded model (``shared_model``: 4 slots, 1024 tokens each);
tests that must own the process (crashes, cancellation with one slot, lifetimes)
load their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import wait_pid_gone

import llamarocm
from llamarocm import server as server_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GREEDY = {"temperature": 0.0, "top_k": 1}


def _wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; for states only a poll can see."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()



def _busy_slots(model) -> int:
    return sum(1 for slot in model.client.slots() if slot.get("is_processing"))


# -- streaming ----------------------------------------------------------------------


def test_generate_streams_tokens_with_ids_and_metrics(shared_model):
    stream = shared_model.generate("Once upon a time", max_tokens=12, **GREEDY)
    tokens = list(stream)
    assert 1 <= len(tokens) <= 12
    assert all(isinstance(t.id, int) for t in tokens)
    assert "".join(t.text for t in tokens).strip()
    m = stream.metrics
    assert m.generated_tokens == len(tokens)
    assert m.prompt_tokens and m.prompt_tokens >= 4
    assert 0 < m.time_to_first_token <= m.total_duration
    assert m.decode_tokens_per_second and m.decode_tokens_per_second > 0
    assert stream.finish_reason in ("length", "stop")
    # The ids are the model's own: they detokenize to the text that was streamed.
    assert shared_model.detokenize([t.id for t in tokens]) == "".join(t.text for t in tokens)


def test_max_tokens_gives_finish_reason_length(shared_model):
    stream = shared_model.generate("1, 2, 3, 4,", max_tokens=5, extra={"ignore_eos": True}, **GREEDY)
    assert len(list(stream)) == 5
    assert stream.finish_reason == "length"


def test_greedy_output_is_deterministic(shared_model):
    a = shared_model.generate("The capital of France is", max_tokens=16, **GREEDY).text()
    b = shared_model.generate("The capital of France is", max_tokens=16, **GREEDY).text()
    assert a == b and a


def test_seed_is_honoured_at_temperature_one(shared_model):
    def sample(seed):
        return shared_model.generate("My favourite animal is", max_tokens=24, temperature=1.0, seed=seed,
                                     top_k=0, top_p=1.0, min_p=0.0).text()

    first, again = sample(1), sample(1)
    assert first == again
    others = {sample(seed) for seed in (2, 3, 4)}
    assert others - {first}, "different seeds never changed the output"


def test_stop_string_ends_the_stream(shared_model):
    prompt = "1, 2, 3, 4, 5, 6, 7, 8,"
    free = shared_model.generate(prompt, max_tokens=24, **GREEDY).text()
    assert " 12" in free, f"unexpected greedy continuation {free!r}"
    stream = shared_model.generate(prompt, max_tokens=24, stop=[" 12"], **GREEDY)
    text = stream.text()
    assert text == free[: free.index(" 12")]
    assert stream.finish_reason == "stop"


def test_chat_uses_gemmas_turn_template(shared_model):
    # The Gemma 3 270M file carries no template; llama-server alone would render ChatML.
    assert shared_model.chat_template_source == "built-in gemma (fallback for gemma3)"
    messages = [{"role": "user", "content": "Say hello."}]
    rendered = shared_model.client.post_json("/apply-template", {"messages": messages})["prompt"]
    assert rendered == "<start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n"
    stream = shared_model.chat(messages, max_tokens=8, **GREEDY)
    tokens = list(stream)
    assert tokens and stream.metrics.generated_tokens == len(tokens)
    assert all(isinstance(t.id, int) for t in tokens)
    assert shared_model.detokenize([t.id for t in tokens]) == "".join(t.text for t in tokens)
    # What the server evaluated is that rendering: its tokens plus BOS (12, where
    # ChatML would take 26).
    assert stream.metrics.prompt_tokens == len(shared_model.tokenize(rendered)) + 1 == 12


def test_chat_template_override(model_path, server_binary):
    with llamarocm.load_model(model_path, context_length=256, server_path=server_binary,
                              chat_template="chatml") as model:
        rendered = model.client.post_json("/apply-template", {"messages": [{"role": "user", "content": "Hi"}]})
        assert rendered["prompt"].startswith("<|im_start|>user\nHi<|im_end|>")
        assert model.chat_template_source == "built-in chatml"


def test_unknown_template_name_spawns_nothing(model_path, server_binary):
    from conftest import llama_server_pids

    before = llama_server_pids()
    with pytest.raises(ValueError, match="built-in names"):
        llamarocm.load_model(model_path, server_path=server_binary, chat_template="gemma-ish")
    assert llama_server_pids() == before


def test_tokenize_detokenize_roundtrip(shared_model):
    text = "Hello, wörld! 123"
    ids = shared_model.tokenize(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert shared_model.detokenize(ids) == text


def test_context_overflow_is_a_context_length_error(shared_model):
    with pytest.raises(llamarocm.ContextLengthError):
        shared_model.generate("word " * 3000, max_tokens=4).text()
    assert isinstance(shared_model.last_error, llamarocm.ContextLengthError)


def test_bad_arguments_send_nothing(shared_model):
    with pytest.raises(ValueError):
        shared_model.generate("x", top_p=2)
    with pytest.raises(TypeError):
        shared_model.generate(None)


# -- concurrency ---------------------------------------------------------------------


def test_eight_threads_on_four_slots_match_their_solo_runs(shared_model):
    # Counting prompts: distinct per thread (so any cross-talk between streams shows)
    # and with confident greedy continuations. Open-ended prompts can legitimately
    # differ: the CPU kernels for a batch of 4 sequences round differently from
    # those for 1, which flips near-tied greedy choices.
    prompts = [f"{s}, {s + 1}, {s + 2}, {s + 3}," for s in range(10, 90, 10)]
    solo = [shared_model.generate(p, max_tokens=24, extra={"ignore_eos": True}, **GREEDY).text() for p in prompts]
    results = [None] * 8
    errors = []
    start = threading.Barrier(9)

    def worker(i):
        try:
            start.wait()
            results[i] = shared_model.generate(prompts[i], max_tokens=24, extra={"ignore_eos": True}, **GREEDY).text()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    start.wait()
    max_busy = 0

    def observe():
        nonlocal max_busy
        max_busy = max(max_busy, _busy_slots(shared_model))
        return max_busy >= 2 or not any(t.is_alive() for t in threads)

    _wait_until(observe, 60)
    for t in threads:
        t.join(120)
    assert not errors
    assert results == solo
    assert max_busy >= 2, "the server never ran two requests at once"


# -- cancellation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot_model(model_path, server_binary):
    with llamarocm.load_model(model_path, parallel=1, context_length=1024, server_path=server_binary) as model:
        yield model


def test_cancel_frees_the_only_slot_at_once(one_slot_model):
    model = one_slot_model
    long = model.generate("Once upon a time", max_tokens=600, extra={"ignore_eos": True}, **GREEDY)
    first = [next(long) for _ in range(3)]
    assert len(first) == 3
    assert _busy_slots(model) == 1
    long.close()
    assert long.finish_reason == "cancelled"
    assert _wait_until(lambda: _busy_slots(model) == 0, 5.0), "the slot stayed busy after cancel"
    # A 600-token run takes ~20 s here; the next request must not wait for it.
    started = time.monotonic()
    quick = model.generate("Hello", max_tokens=2, **GREEDY)
    assert quick.text() is not None
    assert quick.metrics.time_to_first_token < 5.0
    assert time.monotonic() - started < 8.0


def test_breaking_out_of_a_loop_cancels(one_slot_model):
    model = one_slot_model
    for i, _ in enumerate(model.generate("Count: 1, 2,", max_tokens=600, extra={"ignore_eos": True}, **GREEDY)):
        if i == 2:
            break
    assert _wait_until(lambda: _busy_slots(model) == 0, 5.0)


def test_close_from_another_thread(one_slot_model):
    stream = one_slot_model.generate("Once", max_tokens=600, extra={"ignore_eos": True}, **GREEDY)
    next(stream)
    threading.Thread(target=stream.close).start()
    rest = list(stream)  # ends promptly instead of after 600 tokens
    assert len(rest) < 590
    assert stream.finish_reason == "cancelled"


# -- faults and lifetimes -----------------------------------------------------------------


def test_server_killed_mid_stream(model_path, server_binary):
    with llamarocm.load_model(model_path, context_length=512, server_path=server_binary) as model:
        stream = model.generate("Once upon a time", max_tokens=400, extra={"ignore_eos": True}, **GREEDY)
        next(stream)
        os.kill(model.server.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(llamarocm.ServerCrashedError) as info:
            for _ in stream:
                pass
        assert time.monotonic() - killed_at < 2.0
        assert info.value.returncode == -signal.SIGKILL
        assert not model.server.alive()
        assert model.last_error is info.value
        # Later calls fail fast, without touching the network.
        with pytest.raises(llamarocm.ServerCrashedError):
            model.generate("again")
        with pytest.raises(llamarocm.ServerCrashedError):
            model.tokenize("again")


def test_with_block_stops_the_server(model_path, server_binary):
    with llamarocm.load_model(model_path, context_length=256, server_path=server_binary) as model:
        pid = model.server.pid
        assert model.server.alive()
        # Readiness is read from these lines; a llama.cpp that rewords them would
        # leave only the slower fallback probe. (The probe may have found the server
        # ready a moment before the line reached us: wait for output, not for time.)
        proc, deadline = model.server._process, time.monotonic() + 10
        log_text = model.server.stderr_tail(400)
        while not any(m in log_text for m in server_module.READY_MARKERS) and time.monotonic() < deadline:
            proc.wait_output(proc.line_count, deadline - time.monotonic())
            log_text = model.server.stderr_tail(400)
        assert any(marker in log_text for marker in server_module.READY_MARKERS), log_text
        for text in (repr(model), repr(model.server)):
            assert model.server.api_key not in text
        assert repr(model).startswith("<Model gemma") and model.server.url in repr(model)
        assert f"pid={pid} alive" in repr(model.server)
        assert model.client.request_timeout == 30.0
    assert not model.server.alive()
    assert wait_pid_gone(pid, 1.0)
    with pytest.raises(llamarocm.LlamaRocmError, match="closed"):
        model.generate("x")


def test_model_outlives_the_thread_that_loaded_it(model_path, server_binary):
    box = {}
    loader = threading.Thread(
        target=lambda: box.update(model=llamarocm.load_model(model_path, context_length=256, server_path=server_binary))
    )
    loader.start()
    loader.join(120)
    model = box["model"]
    try:
        # The parent-death signal is tied to the forking thread: had the loader
        # thread forked the server, its exit would have killed it.
        assert model.server.wait(0.5) is None
        assert model.generate("Hi", max_tokens=2, **GREEDY).text() is not None
    finally:
        model.close()


OWNER = textwrap.dedent(
    """
    import sys, llamarocm
    model = llamarocm.load_model(sys.argv[1], context_length=256, server_path=sys.argv[2])
    print(model.server.pid, flush=True)
    sys.stdin.read()
    """
)


def test_no_server_survives_its_owner_being_sigkilled(model_path, server_binary):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, model_path, server_binary],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(owner.stdout.readline())
        assert os.path.exists(f"/proc/{pid}")
        owner.kill()
        owner.wait(10)
        assert wait_pid_gone(pid, 10.0), "llama-server outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait()


def test_missing_and_junk_files_spawn_nothing(tmp_path, server_binary):
    from conftest import llama_server_pids

    before = llama_server_pids()
    with pytest.raises(llamarocm.ModelNotFoundError):
        llamarocm.load_model(tmp_path / "nope.gguf", server_path=server_binary)
    with pytest.raises(FileNotFoundError):
        llamarocm.load_model(str(tmp_path / "nope.gguf"), server_path=server_binary)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 100)
    with pytest.raises(llamarocm.GGUFError):
        llamarocm.load_model(junk, server_path=server_binary)
    with pytest.raises(ValueError):
        llamarocm.load_model(junk, server_path=server_binary)
    with pytest.raises(ValueError):
        llamarocm.load_model(junk, parallel=0)
    assert llama_server_pids() == before
