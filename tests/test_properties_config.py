"""Property tests: the settings classes accept or refuse *any* value of any field, and a
refusal is always ``TypeError`` or ``ValueError``, never another exception."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Dict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamarocm import GenerateConfig, LoadConfig
from llamarocm.config import MAX_TIMEOUT

pytestmark = pytest.mark.timeout(60)

# No example database: runs leave no files behind, and each run explores afresh.
EXAMPLES = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class _Opaque:
    """An object no validator knows."""


class _BadFspath:
    """A path-like whose ``__fspath__`` answers with something that is no path."""

    def __fspath__(self) -> Any:
        return 42


class _BytesPath:
    """A path-like naming a bytes path, which no argv built from str can carry."""

    def __fspath__(self) -> bytes:
        return b"m.gguf"


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # any size: far beyond 64 bits too
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 2**63, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e10, 1e300, 5e-324, -0.0, MAX_TIMEOUT, 3.5e38]),
    st.text(max_size=20),
    st.sampled_from(["", "all", "--host", "-H", "--ctx_size", "a\0b", "127.0.0.1:1", "h:²", "h:٣"]),
    st.binary(max_size=10),
    st.builds(_Opaque),
    st.builds(_BadFspath),
    st.builds(_BytesPath),
    st.builds(pathlib.PurePosixPath, st.text(max_size=10)),
    st.sampled_from([object(), object, len, Ellipsis, NotImplemented, 1j, range(3), frozenset({1})]),
)

values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=4),
    ),
    max_leaves=8,
)


def _only_typed_refusals(build: Callable[[], Any]) -> None:
    try:
        build()
    except (TypeError, ValueError):
        pass


def _field_names(cls: type) -> "list[str]":
    return [f.name for f in dataclasses.fields(cls)]


@EXAMPLES
@given(name=st.sampled_from(_field_names(GenerateConfig)), value=values)
def test_generate_config_refuses_any_field_value_with_a_typed_error(name: str, value: Any) -> None:
    _only_typed_refusals(lambda: GenerateConfig(**{name: value}))


@EXAMPLES
@given(name=st.sampled_from(_field_names(LoadConfig)), value=values)
def test_load_config_refuses_any_field_value_with_a_typed_error(name: str, value: Any) -> None:
    kwargs: Dict[str, Any] = {"model_path": "m.gguf", name: value}
    _only_typed_refusals(lambda: LoadConfig(**kwargs))


@EXAMPLES
@given(kwargs=st.dictionaries(st.sampled_from(_field_names(GenerateConfig)), values, max_size=5))
def test_generate_config_refuses_any_combination_with_a_typed_error(kwargs: Dict[str, Any]) -> None:
    _only_typed_refusals(lambda: GenerateConfig(**kwargs))


@EXAMPLES
@given(kwargs=st.dictionaries(st.sampled_from(_field_names(LoadConfig)), values, max_size=5))
def test_load_config_refuses_any_combination_with_a_typed_error(kwargs: Dict[str, Any]) -> None:
    kwargs.setdefault("model_path", "m.gguf")
    _only_typed_refusals(lambda: LoadConfig(**kwargs))


@EXAMPLES
@given(
    timeout=st.one_of(st.integers(min_value=1, max_value=10**20), st.floats(min_value=1e-9, max_value=1e20)),
)
def test_an_accepted_timeout_is_one_a_socket_takes(timeout: float) -> None:
    import socket

    try:
        cfg = GenerateConfig(timeout=timeout)
    except ValueError:
        assert timeout > MAX_TIMEOUT
        return
    with socket.socket() as sock:
        sock.settimeout(cfg.timeout)


@EXAMPLES
@given(
    max_tokens=st.integers(min_value=1),
    top_k=st.integers(min_value=0),
    seed=st.integers(min_value=0),
)
def test_accepted_counts_fit_llama_servers_fields(max_tokens: int, top_k: int, seed: int) -> None:
    for name, value, limit in (("max_tokens", max_tokens, 2**31 - 1), ("top_k", top_k, 2**31 - 1),
                               ("seed", seed, 2**32 - 2)):
        try:
            GenerateConfig(**{name: value})
        except ValueError:
            assert value > limit
        else:
            assert value <= limit
