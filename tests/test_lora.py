"""LoRA adapters: ``load_model(lora=...)``, a request's ``lora={name: scale}``,
``model.set_lora``, the checks of an adapter file, and ``--lora`` on the command line.

The adapter is real: built here with the ``gguf`` package's writer for Gemma 3 270M
(LoRA pairs on every layer's ``attn_q``, ``lora_b`` non-zero so it changes the output),
and loaded by the real llama-server. Greedy texts are compared with the prompt cache
off (``cache_prompt: False``): a prompt evaluated whole and one restored from the cache
may differ in the last bits, which is enough to change a near tie.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from conftest import llama_server_pids

import llamarocm
from llamarocm import cli
from llamarocm.checkpoint import settings_identity
from llamarocm.cli.arguments import lora_spec
from llamarocm.config import GenerateConfig, LoadConfig
from llamarocm.lora import LoraAdapters, check_adapter_file, parse_lora

pytestmark = pytest.mark.timeout(120)

PROMPT = "The capital of France is"
# Greedy, and the whole prompt evaluated every time (see the module's docstring).
GREEDY = {"max_tokens": 16, "temperature": 0.0, "extra": {"cache_prompt": False}}
DOCS = Path(__file__).resolve().parent.parent / "docs"


def build_adapter(path, *, architecture="gemma3", general_type="adapter", adapter_type="lora", rank=8, seed=0):
    """Write a LoRA GGUF for Gemma 3 270M: ``blk.N.attn_q.weight.lora_a`` (r x 640) and
    ``.lora_b`` (1024 x r) on each of its 18 layers."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(general_type)
    writer.add_string("adapter.type", adapter_type)
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(seed)
    for layer in range(18):
        name = f"blk.{layer}.attn_q.weight"
        writer.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, 640)) * 0.05).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", (rng.standard_normal((1024, rank)) * 0.05).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return build_adapter(tmp_path_factory.mktemp("lora") / "style.gguf")


@pytest.fixture(scope="module")
def lora_model(model_path, server_binary, adapter):
    """Two slots, the adapter loaded at scale 0 (off unless a request says otherwise)."""
    with llamarocm.load_model(
        model_path, parallel=2, context_length=512, server_path=server_binary, lora=[(adapter, 0.0)]
    ) as model:
        yield model


@pytest.fixture(scope="module")
def base_text(model_path, server_binary):
    with llamarocm.load_model(model_path, context_length=512, server_path=server_binary) as model:
        return model.generate(PROMPT, **GREEDY).text()


# -- arguments ----------------------------------------------------------------------


def test_adapters_are_paths_or_path_scale_pairs(tmp_path):
    home = os.path.expanduser("~")
    assert parse_lora([("a.gguf", 0.5), tmp_path / "b.gguf", "~/c.gguf"]) == [
        ("a.gguf", os.path.abspath("a.gguf"), 0.5),
        (str(tmp_path / "b.gguf"), str(tmp_path / "b.gguf"), 1.0),
        ("~/c.gguf", os.path.join(home, "c.gguf"), 1.0),
    ]
    assert parse_lora("a.gguf") == [("a.gguf", os.path.abspath("a.gguf"), 1.0)]
    assert parse_lora(()) == parse_lora(None) == []


@pytest.mark.parametrize(
    "lora, error",
    [
        (b"a.gguf", TypeError),
        ({"a.gguf": 1.0}, TypeError),
        ([("a.gguf",)], TypeError),
        ([("a.gguf", "1")], TypeError),
        ([("a.gguf", float("nan"))], ValueError),
        ([(3, 1.0)], TypeError),
        (["a,b.gguf"], ValueError),
        (["a.gguf", ("./a.gguf", 0.5)], ValueError),
    ],
)
def test_bad_adapter_arguments_are_refused(lora, error):
    with pytest.raises(error):
        parse_lora(lora)


def test_a_requests_scales_are_checked():
    assert GenerateConfig(lora={"a.gguf": 1}).lora == {"a.gguf": 1.0}
    assert GenerateConfig(lora={}).lora is None
    for bad, error in (([("a", 1.0)], TypeError), ({"": 1.0}, TypeError), ({1: 1.0}, TypeError),
                       ({"a": "1"}, TypeError), ({"a": float("inf")}, ValueError)):
        with pytest.raises(error):
            GenerateConfig(lora=bad)


def test_the_scales_are_part_of_a_batch_items_identity():
    plain = settings_identity(GenerateConfig())
    half = settings_identity(GenerateConfig(lora={"a.gguf": 0.5}))
    full = settings_identity(GenerateConfig(lora={"a.gguf": 1}))
    assert len({plain, half, full}) == 3
    assert full == settings_identity(GenerateConfig(lora={"a.gguf": 1.0}))
    assert settings_identity(GenerateConfig(lora={})) == plain


def test_extra_args_cannot_add_adapters_behind_the_ids_back():
    for flag in ("--lora", "--lora-scaled", "--lora_scaled"):
        with pytest.raises(ValueError, match="lora="):
            LoadConfig("m.gguf", extra_args=[flag, "x.gguf"])


def test_a_request_names_an_adapter_by_its_path_or_file_name(tmp_path):
    adapters = LoraAdapters.from_parsed(
        parse_lora([("one/style.gguf", 0.25), (str(tmp_path / "two" / "style.gguf"), 0.5), "tone.gguf"])
    )
    assert adapters.id_of("one/style.gguf") == 0
    assert adapters.id_of(os.path.abspath("one/style.gguf")) == 0
    assert adapters.id_of("./one/../one/style.gguf") == 0
    assert adapters.id_of(str(tmp_path / "two" / "style.gguf")) == 1
    assert adapters.id_of("tone.gguf") == 2
    with pytest.raises(ValueError, match="ambiguous"):
        adapters.id_of("style.gguf")
    with pytest.raises(ValueError, match=r"no LoRA adapter 'other.gguf'.*'tone.gguf'"):
        adapters.id_of("other.gguf")
    # Every adapter's scale in every request: the request's own over the defaults.
    assert adapters.request_field({"tone.gguf": 2}) == [
        {"id": 0, "scale": 0.25}, {"id": 1, "scale": 0.5}, {"id": 2, "scale": 2.0}
    ]
    with pytest.raises(ValueError, match="without adapters"):
        LoraAdapters(()).request_field({"tone.gguf": 1.0})


# -- the adapter file -----------------------------------------------------------------


@pytest.fixture
def no_new_server():
    before = llama_server_pids()
    yield
    assert llama_server_pids() == before, "a server was started for a load that was refused"


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda d: str(d / "missing.gguf"), llamarocm.ModelNotFoundError, "not found"),
        (lambda d: _write(d / "notes.gguf", b"# not a model\n" * 4), llamarocm.GGUFError, "not a valid GGUF"),
        (lambda d: build_adapter(d / "cv.gguf", adapter_type="control_vector"), llamarocm.GGUFError,
         "adapter.type is 'control_vector'"),
        (lambda d: build_adapter(d / "llama.gguf", architecture="llama"), llamarocm.GGUFError,
         "for 'llama' models, but the model's architecture is 'gemma3'"),
        (lambda d: build_adapter(d / "model.gguf", general_type="model"), llamarocm.GGUFError,
         "general.type is 'model'"),
    ],
    ids=["missing", "not-gguf", "control-vector", "other-architecture", "a-model"],
)
def test_a_bad_adapter_file_is_refused_before_the_server_starts(
    tmp_path, model_path, server_binary, no_new_server, make, error, words
):
    path = make(tmp_path)
    with pytest.raises(error, match=re.escape(words)):
        llamarocm.load_model(model_path, server_path=server_binary, lora=[path])


def test_the_model_file_itself_is_no_adapter(model_path):
    with pytest.raises(llamarocm.GGUFError, match="general.type is 'model'"):
        check_adapter_file(model_path, "gemma3")


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# -- the real server --------------------------------------------------------------------


@pytest.mark.integration
def test_scale_zero_gives_the_base_models_text(lora_model, adapter, base_text):
    assert lora_model.lora == {adapter: 0.0}
    assert lora_model.generate(PROMPT, **GREEDY).text() == base_text
    assert lora_model.generate(PROMPT, lora={adapter: 0}, **GREEDY).text() == base_text


@pytest.mark.integration
def test_a_nonzero_scale_changes_the_text(lora_model, base_text):
    changed = lora_model.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text()
    assert changed and changed != base_text
    # The same request again gives the same text: the scale, not chance, changed it.
    assert lora_model.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text() == changed


@pytest.mark.integration
def test_scales_of_concurrent_requests_do_not_leak(lora_model, base_text):
    solo = {0.0: base_text, 1.0: lora_model.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text()}
    assert solo[0.0] != solo[1.0]
    for _ in range(3):
        start = threading.Barrier(2)
        texts = {}

        def run(scale, start=start, texts=texts):
            start.wait()
            texts[scale] = lora_model.generate(PROMPT, lora={"style.gguf": scale}, **GREEDY).text()

        threads = [threading.Thread(target=run, args=(scale,)) for scale in solo]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert texts == solo


@pytest.mark.integration
def test_set_lora_changes_the_default_scale(lora_model, adapter, base_text):
    changed = lora_model.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text()
    try:
        lora_model.set_lora({"style.gguf": 1})
        assert lora_model.lora == {adapter: 1.0}
        assert lora_model.client.get_json("/lora-adapters")[0]["scale"] == 1.0
        assert lora_model.generate(PROMPT, **GREEDY).text() == changed
        # A request's own scale still wins over the new default.
        assert lora_model.generate(PROMPT, lora={"style.gguf": 0.0}, **GREEDY).text() == base_text
        with pytest.raises(ValueError, match="no LoRA adapter 'other.gguf'"):
            lora_model.set_lora({"other.gguf": 0.0, "style.gguf": 0.0})
        assert lora_model.lora == {adapter: 1.0}, "a refused change changed nothing"
    finally:
        lora_model.set_lora({adapter: 0.0})
    assert lora_model.client.get_json("/lora-adapters")[0]["scale"] == 0.0
    assert lora_model.generate(PROMPT, **GREEDY).text() == base_text


@pytest.mark.integration
def test_chat_and_map_take_scales_too(lora_model):
    messages = [{"role": "user", "content": "Name a colour."}]
    base = lora_model.chat(messages, **GREEDY).text()
    changed = lora_model.chat(messages, lora={"style.gguf": 1.0}, **GREEDY).text()
    assert base != changed
    # One at a time: two requests batched together may differ in the last bits.
    results = lora_model.map([messages, PROMPT], max_workers=1, lora={"style.gguf": 1.0}, **GREEDY)
    styled = lora_model.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text()
    assert [r.text for r in results] == [changed, styled]


@pytest.mark.integration
def test_an_unknown_adapter_is_refused_before_anything_is_sent(lora_model, shared_model):
    for model in (lora_model, shared_model):
        with pytest.raises(ValueError, match="LoRA adapter 'other.gguf'"):
            model.generate(PROMPT, lora={"other.gguf": 1.0})
        with pytest.raises(ValueError, match="LoRA adapter 'other.gguf'"):
            model.chat([{"role": "user", "content": "Hi"}], lora={"other.gguf": 1.0})
        with pytest.raises(ValueError, match="LoRA adapter 'other.gguf'"):
            model.map([PROMPT, PROMPT], lora={"other.gguf": 1.0})  # once for the call, not per item
    assert lora_model.last_error is None or "other.gguf" not in str(lora_model.last_error)


@pytest.mark.integration
def test_a_restarted_server_gets_the_default_scales(lora_model, adapter):
    try:
        lora_model.set_lora({adapter: 0.5})
        lora_model.restart()
        assert lora_model.client.get_json("/lora-adapters")[0]["scale"] == 0.5
    finally:
        lora_model.set_lora({adapter: 0.0})


@pytest.mark.integration
def test_an_attached_model_knows_the_servers_adapters(lora_model, adapter, base_text):
    styled = lora_model.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text()
    with llamarocm.connect(lora_model.server.url, api_key=lora_model.server.api_key) as attached:
        assert attached.lora == {adapter: 0.0}
        assert attached.generate(PROMPT, **GREEDY).text() == base_text
        assert attached.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text() == styled


@pytest.mark.parametrize(
    "listing",
    [None, {}, [1], [{"id": 1, "path": "a.gguf", "scale": 1.0}], [{"id": 0, "scale": 1.0}],
     [{"id": 0, "path": "a.gguf", "scale": "1"}]],
)
def test_an_unexpected_adapter_listing_means_no_adapters(listing):
    assert not LoraAdapters.from_server(listing)


# -- the documentation's example and the command line --------------------------------


@pytest.mark.integration
def test_the_documented_example_runs(adapter, model_path):
    """docs/models.rst's LoRA example needs an adapter file, so the docs' runner cannot
    run it: it runs here, with this module's adapter as ``style.gguf``."""
    text = (DOCS / "models.rst").read_text()
    block = re.search(r"\.\. code-block:: python\n   :name: lora-example\n\n((?:(?:   .*)?\n)+)", text)
    assert block, "docs/models.rst has no lora-example block"
    code = "\n".join(line[3:] for line in block.group(1).splitlines())
    code = code.replace('"style.gguf"', repr(adapter)).replace('"gemma-3-270m-q4_k_m.gguf"', repr(model_path))
    namespace = {"llamarocm": llamarocm}
    exec(compile(code, "models.rst:lora-example", "exec"), namespace)
    assert namespace["plain"] != namespace["styled"]


@pytest.mark.parametrize(
    "text, spec",
    [("a.gguf", ("a.gguf", 1.0)), ("a.gguf:0.5", ("a.gguf", 0.5)), ("a.gguf:-1", ("a.gguf", -1.0)),
     ("dir:x/a.gguf", ("dir:x/a.gguf", 1.0)), ("dir:x/a.gguf:2", ("dir:x/a.gguf", 2.0))],
)
def test_the_command_lines_lora_option(text, spec):
    assert lora_spec(text) == spec


def test_a_bad_lora_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "Hi", "--lora", "a,b.gguf"])
    assert exit_info.value.code == 2
    assert "comma" in capsys.readouterr().err


@pytest.mark.integration
def test_generate_on_the_command_line_applies_the_adapter(lora_model, adapter, model_path, server_binary,
                                                          base_text, capsys):
    styled = lora_model.generate(PROMPT, lora={"style.gguf": 1.0}, **GREEDY).text()
    assert styled != base_text
    # A fresh server evaluates the whole prompt, as GREEDY asks of the others.
    args = ["generate", PROMPT, "--model", model_path, "--server", server_binary,
            "--max-tokens", "16", "--temperature", "0"]
    assert cli.main([*args, "--lora", f"{adapter}:1"]) == 0
    assert capsys.readouterr().out == styled + "\n"
