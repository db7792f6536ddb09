"""Sphinx configuration for the llamarocm documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Sphinx and myst-parser are needed (the ``docs`` extra): most pages are
reStructuredText, benchmarks.md and distributed.md are MyST Markdown. No network, no
theme packages, no extensions beyond Sphinx's own and myst-parser.
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# autodoc imports the package from the working tree, not from an installed copy.
sys.path.insert(0, ROOT)


def _version() -> str:
    # Read, not imported: the version must be known even if an import fails, so
    # that autodoc's own error (not this file's) is what the build reports.
    with open(os.path.join(ROOT, "llamarocm", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    return match.group(1) if match else "unknown"


project = "llamarocm"
author = "the llamarocm authors"
copyright = "the llamarocm authors"
release = _version()
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {
    ".rst": "restructuredtext",
    ".md": "markdown",
}
# MyST syntax extensions, only those the Markdown pages use: definition lists ("term" then
# ": definition"), for the benchmark options and figures.
myst_enable_extensions = ["deflist"]

root_doc = "index"
exclude_patterns = ["_build"]
# Every reference must resolve (sphinx-build -n). The standard library's pages are not
# reachable without a network (no intersphinx), so its names are taken as they are.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(os|collections\.abc|typing|subprocess|concurrent\.futures|logging|queue)\..*"),
    ("py:obj", r"typing\..*"),
]

autodoc_member_order = "bysource"
# llamarocm.ray needs Ray (the ray extra; the test extra installs it). Where Ray is
# missing, its page is still built from the docstrings, with Ray stood in for.
try:
    import ray  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["ray"]
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"

html_theme = "alabaster"
html_title = f"llamarocm {release}"
html_theme_options = {
    "description": "GGUF models on AMD GPUs from plain Python",
    "fixed_sidebar": True,
}


def _skip_errors_module_docstring(app, what, name, obj, options, lines):
    # errors.rst shows the exception tree from this docstring next to its own
    # explanations; rendering the docstring again under automodule would print
    # the same tree twice on one page.
    if what == "module" and name == "llamarocm.errors":
        del lines[:]


def _resolve_reexported_errors(app, env, node, contnode):
    # The exceptions are documented once, as llamarocm.errors.X, but users (and the
    # library's docstrings) name them as re-exported: llamarocm.X. Link those too.
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("llamarocm."):
        return None
    name = target.rsplit(".", 1)[1]
    qualified = f"llamarocm.errors.{name}"
    domain = env.get_domain("py")
    if qualified not in domain.objects or qualified == target:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], qualified, node, contnode)


def setup(app):
    app.connect("autodoc-process-docstring", _skip_errors_module_docstring)
    app.connect("missing-reference", _resolve_reexported_errors)
