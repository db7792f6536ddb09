"""Argument validation: every bad value is refused before any work starts."""

from __future__ import annotations

import math
import os

import pytest

from llamarocm import GenerateConfig, LoadConfig

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_tokens": 0}, ValueError),
        ({"max_tokens": -5}, ValueError),
        ({"max_tokens": 1.5}, TypeError),
        ({"max_tokens": True}, TypeError),
        ({"max_tokens": "10"}, TypeError),
        ({"temperature": -0.1}, ValueError),
        ({"temperature": math.nan}, ValueError),
        ({"temperature": "hot"}, TypeError),
        ({"top_k": -1}, ValueError),
        ({"top_p": 1.5}, ValueError),
        ({"min_p": -0.5}, ValueError),
        ({"repeat_penalty": 0}, ValueError),
        ({"seed": -1}, ValueError),
        ({"seed": 2**40}, ValueError),
        ({"stop": [1]}, TypeError),
        ({"stop": b"x"}, TypeError),
        ({"stop": [""]}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": math.inf}, ValueError),
        ({"extra": ["n_probs"]}, TypeError),
        ({"json_schema": "{}"}, TypeError),
        ({"grammar": 5}, TypeError),
        ({"grammar": " "}, ValueError),
        ({"grammar": "root ::= \"a\"", "json_schema": {}}, ValueError),
        ({"logprobs": 21}, ValueError),
        ({"logprobs": 1.0}, TypeError),
        ({"extra": {1: 2}}, TypeError),
    ],
)
def test_generate_config_rejects(kwargs, error):
    with pytest.raises(error):
        GenerateConfig(**kwargs)


def test_generate_config_normalises_and_keeps_values():
    cfg = GenerateConfig(max_tokens=5, temperature=0, stop="END", seed=7, extra={"n_probs": 2})
    assert cfg.stop == ("END",)
    assert cfg.sampling_fields() == {"temperature": 0, "seed": 7, "stop": ["END"]}
    assert cfg.extra == {"n_probs": 2}


def test_unknown_generate_argument_is_named():
    with pytest.raises(TypeError, match="max_token") as info:
        GenerateConfig.from_kwargs({"max_token": 3})
    assert "extra=" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"model_path": 3}, TypeError),
        ({"model_path": ""}, ValueError),
        ({"context_length": 0}, ValueError),
        ({"context_length": "4096"}, TypeError),
        ({"gpu_layers": -2}, ValueError),
        ({"gpu_layers": "most"}, TypeError),
        ({"parallel": 0}, ValueError),
        ({"parallel": 2.0}, TypeError),
        ({"threads": 0}, ValueError),
        ({"devices": "0"}, TypeError),
        ({"devices": []}, ValueError),
        ({"devices": [-1]}, ValueError),
        ({"server_path": 5}, TypeError),
        ({"startup_timeout": -1}, ValueError),
        ({"extra_args": [1]}, TypeError),
    ],
)
def test_load_config_rejects(kwargs, error):
    kwargs.setdefault("model_path", "m.gguf")
    with pytest.raises(error):
        LoadConfig(**kwargs)


def test_load_config_accepts_all_gpu_layer_forms():
    assert LoadConfig("m.gguf", gpu_layers="all").gpu_layers == "all"
    # As llama-cpp-python and llama-server users write them:
    assert LoadConfig("m.gguf", gpu_layers=-1).gpu_layers == "all"
    assert LoadConfig("m.gguf", gpu_layers="auto").gpu_layers is None
    assert LoadConfig("~/m.gguf").model_path == os.path.expanduser("~/m.gguf")
    server = "~/bin/llama-server"
    assert LoadConfig("m.gguf", server_path=server).server_path == os.path.expanduser(server)
    assert LoadConfig("m.gguf").request_timeout == 30.0
    assert LoadConfig("m.gguf", gpu_layers=0).gpu_layers == 0
    assert LoadConfig("m.gguf", devices=[0, 1]).devices == (0, 1)


@pytest.mark.parametrize(
    "address, message",
    [
        ("nowhere", "must be 'host:port'"),
        ("127.0.0.1:0", "must be 'host:port'"),
        ("127.0.0.1:1,127.0.0.1:2", r"one address per item: rpc=\['127.0.0.1:1', '127.0.0.1:2'\]"),
        ("[::1]:50052", "IPv4"),
        ("::1:50052", "IPv4"),
    ],
)
def test_rpc_addresses_llama_cpp_cannot_use_are_refused(address, message):
    with pytest.raises(ValueError, match=message):
        LoadConfig("m.gguf", rpc=(address,))
    assert LoadConfig("m.gguf", rpc=("gpu-box:50052", "10.0.0.2:50052")).rpc == ("gpu-box:50052", "10.0.0.2:50052")


@pytest.mark.parametrize(
    "extra_args, keyword",
    [
        (["--ctx_size", "64"], "context_length="),
        (["--ctx_size=64"], "context_length="),
        (["-c", "64"], "context_length="),
        (["--api_key", "k"], "fresh key"),
        (["--api_key_file", "keys.txt"], "fresh key"),
        (["--api-key=k"], "fresh key"),
        (["--host=0.0.0.0"], "127.0.0.1"),
        (["--port", "80"], "port"),
        (["-np", "4"], "parallel="),
        (["--api_key=k"], "fresh key"),
        (["-m", "other.gguf"], "load_model's path"),
        (["--model=other.gguf"], "load_model's path"),
        (["--rpc", "127.0.0.1:50052"], "rpc="),
        (["-ngl", "99"], "gpu_layers="),
        (["--n_gpu_layers", "99"], "gpu_layers="),
        (["--threads", "2"], "threads="),
    ],
)
def test_managed_server_flags_are_refused_in_every_spelling(extra_args, keyword):
    # llama.cpp reads "_" as "-" in long options, and the last occurrence wins.
    with pytest.raises(ValueError, match=f"extra_args must not contain .*{keyword}"):
        LoadConfig("m.gguf", extra_args=extra_args)


def test_other_server_flags_pass_in_any_spelling():
    args = ("--no_repack", "--tensor-split", "1,0", "-ctk", "q8_0", "--cache-reuse=256")
    assert LoadConfig("m.gguf", extra_args=args).extra_args == args


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 1e10},  # socket.settimeout overflows beyond ~9.2e9 s
        {"timeout": 1e300},
        {"timeout": 10**400},  # float() of this int overflows
        {"timeout": -(10**400)},
        {"max_tokens": 2**31},  # llama-server's n_predict is an int32: this would wrap
        {"max_tokens": 10**400},
        {"top_k": 2**31},
        {"seed": 2**32 - 1},  # 0xFFFFFFFF is llama-server's "random seed"
        {"seed": 10**400},
        {"logprobs": 10**400},
        {"temperature": 10**400},
        {"temperature": -(10**400)},
        {"top_p": 10**400},
        {"min_p": -(10**400)},
        {"repeat_penalty": 10**400},
        {"repeat_penalty": 1e39},  # beyond a 32-bit float: infinity to llama-server
    ],
)
def test_out_of_range_generate_numbers_are_value_errors(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GenerateConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"startup_timeout": 1e10},
        {"startup_timeout": 10**400},
        {"startup_timeout": math.nan},
        {"context_length": 10**400},
        {"gpu_layers": 10**400},
        {"parallel": 10**400},
        {"threads": -(10**400)},
        {"devices": [10**400]},
        # -c is context_length * parallel, an int32 to llama-server.
        {"context_length": 2**24, "parallel": 256},
    ],
)
def test_out_of_range_load_numbers_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        LoadConfig("m.gguf", **kwargs)


def test_the_longest_timeouts_are_usable():
    import socket

    from llamarocm.config import MAX_TIMEOUT

    cfg = GenerateConfig(timeout=MAX_TIMEOUT, max_tokens=2**31 - 1, top_k=2**31 - 1, seed=2**32 - 2)
    with socket.socket() as sock:
        sock.settimeout(cfg.timeout)
    assert LoadConfig("m.gguf", startup_timeout=MAX_TIMEOUT).startup_timeout == MAX_TIMEOUT


def test_load_model_expands_home_in_the_model_path(monkeypatch, tmp_path):
    import llamarocm

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(llamarocm.ModelNotFoundError, match=str(tmp_path)):
        llamarocm.load_model("~/nope.gguf")
