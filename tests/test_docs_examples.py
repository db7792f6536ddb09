"""The documentation's examples run: every ``.. code-block:: python`` in docs/ named
``run-...`` (``:name: run-...``) is executed against the embedded model.

An example sees ``model`` (a loaded model with 4 slots), ``path`` (the model file) and
``llamarocm``; the file name the docs use, ``gemma-3-270m-q4_k_m.gguf``, stands for
``path``. The examples of one page run in order and share their names, as a reader
trying them one after the other would.
"""

from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import llamarocm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
_BLOCK = re.compile(r"^\.\. code-block:: python\n((?:   :[\w-]+:.*\n)*)\n((?:(?:   .*)?\n)+)", re.MULTILINE)


def _examples(page: Path) -> List[Tuple[str, str]]:
    """``(name, code)`` of the page's runnable examples, in order."""
    found = []
    for options, body in _BLOCK.findall(page.read_text()):
        name = re.search(r":name: (run-[\w-]+)", options)
        if name:
            found.append((name.group(1), textwrap.dedent(body)))
    return found


PAGES = sorted(page for page in DOCS.glob("*.rst") if _examples(page))


def test_the_pages_have_runnable_examples():
    names = [name for page in PAGES for name, _ in _examples(page)]
    assert "run-asyncio" in names and "run-quick-start" in names, names
    assert len(names) == len(set(names)), "example names must be unique"


@pytest.fixture
def logging_restored():
    """Examples may configure logging as an application would: undo it afterwards."""
    package, root = logging.getLogger("llamarocm"), logging.getLogger()
    saved = (package.level, root.level, list(root.handlers))
    yield
    package.setLevel(saved[0])
    root.setLevel(saved[1])
    root.handlers[:] = saved[2]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_examples_run(page, shared_model, model_path, logging_restored):
    namespace: Dict[str, object] = {"model": shared_model, "path": model_path, "llamarocm": llamarocm}
    for name, code in _examples(page):
        namespace["model"] = shared_model  # an example may have bound (and closed) its own
        code = code.replace(repr(DOC_MODEL_NAME), repr(model_path)).replace(f'"{DOC_MODEL_NAME}"', repr(model_path))
        try:
            exec(compile(code, f"{page.name}:{name}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.name} example {name} failed: {exc!r}\n{code}") from exc
    assert shared_model.server is not None and shared_model.server.alive()
