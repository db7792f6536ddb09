"""Which chat template ``llama-server`` should apply, as command-line arguments.

llama-server renders chat messages with the Jinja template embedded in the GGUF file.
When the file has none it silently falls back to ChatML, which is wrong for most
models (Gemma 3 270M's file has none). So a file without a template gets its
architecture's llama.cpp built-in template where that is unambiguous, and otherwise
no template at all: ``chat()`` then refuses clearly instead of rendering ChatML.

A built-in name only works with the Jinja engine off (``--no-jinja``): under
``--jinja`` the server takes the name itself as a literal template.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

__all__ = ["BUILTIN_TEMPLATES", "ARCHITECTURE_FALLBACKS", "template_args"]

#: llama.cpp's built-in template names (``llama-server --help``, --chat-template).
BUILTIN_TEMPLATES = frozenset(
    [
        "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r", "deepseek",
        "deepseek-ocr", "deepseek2", "deepseek3", "exaone-moe", "exaone3", "exaone4", "falcon3", "gemma",
        "gigachat", "glmedge", "gpt-oss", "granite", "granite-4.0", "granite-4.1", "grok-2", "hunyuan-dense",
        "hunyuan-moe", "hunyuan-vl", "kimi-k2", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip",
        "llama3", "llama4", "megrez", "minicpm", "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7",
        "mistral-v7-tekken", "monarch", "openchat", "orion", "pangu-embedded", "phi3", "phi4", "rwkv-world",
        "seed_oss", "smolvlm", "solar-open", "vicuna", "vicuna-orca", "yandex", "zephyr",
    ]
)

#: Architectures whose chat format is one built-in template, whatever the checkpoint.
#: ``llama`` and ``mistral`` are absent on purpose: their checkpoints disagree.
ARCHITECTURE_FALLBACKS = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "phi3": "phi3",
    "command-r": "command-r",
    "chatglm": "chatglm4",
    "exaone": "exaone3",
    "granite": "granite",
    "deepseek2": "deepseek2",
}


def _looks_like_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def template_args(
    chat_template: Optional[str], embedded: Optional[str], architecture: Optional[str]
) -> Tuple[List[str], Optional[str]]:
    """Server arguments for the chat template, and a description (``None``: no template).

    ``chat_template`` is the caller's override: a built-in name, a path to a Jinja
    file, or a Jinja template string. Raises ``ValueError`` for anything else.

    >>> template_args(None, None, "gemma3")
    (['--no-jinja', '--chat-template', 'gemma'], 'built-in gemma (fallback for gemma3)')
    >>> template_args(None, None, "llama")
    ([], None)
    """
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise TypeError("chat_template must be a non-empty str (a built-in name, a file, or Jinja)")
        if chat_template in BUILTIN_TEMPLATES:
            return ["--no-jinja", "--chat-template", chat_template], f"built-in {chat_template}"
        if _looks_like_jinja(chat_template):
            return ["--jinja", "--chat-template", chat_template], "custom Jinja template"
        if os.path.isfile(chat_template):
            return ["--jinja", "--chat-template-file", os.path.abspath(chat_template)], f"file {chat_template}"
        raise ValueError(
            f"chat_template {chat_template!r} is not a built-in template name, an existing file, "
            f"or a Jinja template; built-in names: {', '.join(sorted(BUILTIN_TEMPLATES))}"
        )
    if embedded:
        return ["--jinja"], "embedded in the GGUF file"
    fallback = ARCHITECTURE_FALLBACKS.get(architecture or "")
    if fallback:
        return ["--no-jinja", "--chat-template", fallback], f"built-in {fallback} (fallback for {architecture})"
    return [], None
