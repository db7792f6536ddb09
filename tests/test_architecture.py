"""The package's shape: every module has a layer, imports point down only, no cycles.

The layer order is written here and in docs/how-it-works.rst (which says what each
module is for); a new module must be given its layer in both. Imports are read with
``ast``, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(__file__).resolve().parent.parent / "llamarocm"
DOC = PACKAGE.parent / "docs" / "how-it-works.rst"

#: Bottom up. A module may import from lower layers only; the modules of a
#: subpackage (``bench``, ``cli``, ``ray``) form one unit, free to import each other without a cycle.
LAYERS: List[List[str]] = [
    ["errors"],
    ["config", "_sse", "_chunked", "chat_templates", "_binaries", "_default_model", "_gguf_values", "_gpu_topology",
     "reasoning", "tool_schema", "_files"],
    ["_gguf_header", "messages", "structured", "tools"],
    ["gguf", "devices"],
    ["client", "_process", "lora", "_slot_state"],
    ["server", "rpc", "stream", "checkpoint", "_kv_setup"],
    ["batch", "session", "tool_stream", "act"],
    ["model"],
    ["loading"],
    ["pool"],
    ["__init__"],
    ["bench", "ray"],
    ["cli"],
    ["__main__"],
]


def _unit(module: str) -> str:
    """The layer entry a module belongs to: itself, or its subpackage."""
    return module.split(".", 1)[0]


def _modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> Set[str]:
    """The package's modules that ``module`` imports (relative or absolute)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "llamarocm" or node.module.startswith("llamarocm.")):
                target = node.module[len("llamarocm."):] if "." in node.module else ""
            else:
                continue
            names = [target] if target else []
            # "from . import bench" / "from llamarocm import rpc" name modules too.
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                if candidate in _modules():
                    names.append(candidate)
            found.update(names or ["__init__"])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "llamarocm":
                    found.add("__init__")
                elif alias.name.startswith("llamarocm."):
                    found.add(alias.name[len("llamarocm."):])
    return {name for name in found if name in _modules() and name != module}


def _subpackages() -> Set[str]:
    """The subpackages (``bench``, ``cli``, ``ray``): the docs name them ``bench/``."""
    return {name for name, path in _modules().items() if path.name == "__init__.py" and name != "__init__"}


def _layer_of() -> Dict[str, int]:
    return {name: index for index, layer in enumerate(LAYERS) for name in layer}


def test_every_module_has_a_layer():
    layer_of = _layer_of()
    missing = sorted(m for m in _modules() if _unit(m) not in layer_of)
    assert not missing, f"give these modules a layer here and in docs/how-it-works.rst: {missing}"
    stale = sorted(set(layer_of) - {_unit(m) for m in _modules()})
    assert not stale, f"layers name modules that no longer exist: {stale}"


def test_imports_point_down_only():
    layer_of = _layer_of()
    upward = []
    for module, path in _modules().items():
        for target in _imports(module, path):
            if _unit(target) == _unit(module):
                continue  # within one subpackage
            if layer_of[_unit(target)] >= layer_of[_unit(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, f"imports that do not point down: {sorted(upward)}"


def test_no_import_cycle():
    graph = {module: _imports(module, path) for module, path in _modules().items()}
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: List[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_docs_list_the_same_layers_and_every_module():
    text = DOC.read_text()
    listing = text.split("Bottom up:", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    documented = re.findall(r"^\d+\. (.+)$", listing, re.MULTILINE)
    layers = [[name.strip(" `") for name in names.split(",")] for names in documented]
    packages = _subpackages()
    assert layers == [[f"{name}/" if name in packages else f"{name}.py" for name in layer] for layer in LAYERS], (
        "docs/how-it-works.rst's numbered layer list differs from LAYERS"
    )
    for module in _modules():
        name = module.replace(".", "/") + ("/" if module in packages else ".py")
        assert f"``{name}``" in text, f"docs/how-it-works.rst does not say what {name} is for"


def test_the_checker_sees_an_upward_import(tmp_path):
    # The walk must understand the relative forms used in the package.
    probe = tmp_path / "probe.py"
    probe.write_text("from .model import Model\nfrom . import rpc\nimport llamarocm\n")
    assert _imports("errors", probe) >= {"model", "rpc", "__init__"}
