"""Argument validation: every bad value is refused before any work starts."""

from __future__ import annotations

import math

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
        ({"gpu_layers": -1}, ValueError),
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
