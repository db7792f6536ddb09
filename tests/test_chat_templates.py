"""Choosing the chat template's server arguments (no server needed)."""

from __future__ import annotations

import pytest

from llamarocm.chat_templates import ARCHITECTURE_FALLBACKS, BUILTIN_TEMPLATES, template_args
from llamarocm.client import Client
from llamarocm.model import Model

pytestmark = pytest.mark.timeout(10)


def test_embedded_template_uses_jinja():
    assert template_args(None, "{{ messages }}", "llama") == (["--jinja"], "embedded in the GGUF file")


def test_gemma_without_template_falls_back_to_builtin_gemma():
    args, desc = template_args(None, None, "gemma3")
    assert args == ["--no-jinja", "--chat-template", "gemma"] and "fallback" in desc


def test_unknown_architecture_without_template_gets_none():
    assert template_args(None, None, "llama") == ([], None)
    assert template_args(None, "", None) == ([], None)


def test_override_forms(tmp_path):
    assert template_args("chatml", "{{x}}", "gemma3")[0] == ["--no-jinja", "--chat-template", "chatml"]
    jinja = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert template_args(jinja, None, "llama")[0] == ["--jinja", "--chat-template", jinja]
    path = tmp_path / "t.jinja"
    path.write_text(jinja)
    assert template_args(str(path), None, "llama")[0] == ["--jinja", "--chat-template-file", str(path)]


@pytest.mark.parametrize("bad, error", [("gemma-ish", ValueError), ("", TypeError), (3, TypeError)])
def test_bad_override_is_refused(bad, error):
    with pytest.raises(error):
        template_args(bad, None, "gemma3")


def test_every_fallback_is_a_builtin():
    assert set(ARCHITECTURE_FALLBACKS.values()) <= BUILTIN_TEMPLATES


def test_chat_without_a_template_is_refused_not_chatml():
    model = Model(Client("http://127.0.0.1:9"), no_chat_template_reason="no chat template for 'llama'")
    with pytest.raises(ValueError, match="no chat template"):
        model.chat([{"role": "user", "content": "hi"}])
    model.close()
