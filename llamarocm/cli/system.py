"""The commands that run llama.cpp's binaries by themselves: ``rpc-worker`` and
``setup`` (does llama-server run here, else build it from source)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

import llamarocm

from .._binaries import SOURCE_BUILD_REQUIREMENT, find_binary
from ..rpc import DEFAULT_STARTUP_TIMEOUT as WORKER_STARTUP_TIMEOUT
from ..rpc import check_worker_arguments
from .console import print_stderr
from .options import model_path

# llama.cpp's own build runs one compiler per core with no limit unless told;
# each takes up to ~1 GB, so the source build is capped.
_BUILD_JOBS_CAP = 4
_SOURCE_BUILD_CMAKE_ARGS = (
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
    "-DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_RPC=ON"
)


def check_worker_options(args: argparse.Namespace) -> None:
    """``rpc-worker``'s options, with the checks ``RpcWorker`` makes."""
    check_worker_arguments(
        args.host, args.port, args.devices, WORKER_STARTUP_TIMEOUT, args.threads, (), args.allow_remote
    )


def cmd_rpc_worker(args: argparse.Namespace) -> int:
    with llamarocm.RpcWorker(
        host=args.host,
        port=args.port,
        devices=args.devices,
        server_path=args.server,
        threads=args.threads,
        allow_remote=args.allow_remote,
    ) as worker:
        print_stderr(f"RPC worker listening on {worker.address} (pid {worker.pid}); Ctrl-C to stop")
        code = worker.wait()
        print_stderr(f"the worker exited with code {code}:\n{worker.output_tail()}")
        return 1


def _server_works(server_path: Optional[str]) -> "tuple[bool, str]":
    """Start the found server on the embedded model once: does it run on this CPU?"""
    try:
        binary = find_binary("server", server_path)
        model = model_path(None)  # the embedded model
        with llamarocm.Server(model, ["-c", "256", "--parallel", "1"], server_path=binary.path):
            return True, f"{binary.path} ({binary.source}) runs on this machine"
    except llamarocm.LlamaRocmError as exc:
        return False, str(exc)


def cmd_setup(args: argparse.Namespace) -> int:
    ok, message = _server_works(args.server)
    print_stderr(message)
    if ok:
        return 0
    if args.check or "SIGILL" not in message:
        return 1
    jobs = str(min(os.cpu_count() or 1, _BUILD_JOBS_CAP))
    print_stderr(
        f"building llama-server from source for this CPU ({SOURCE_BUILD_REQUIREMENT}, {jobs} jobs); "
        "this takes a while once, pip caches the result..."
    )
    env = dict(os.environ)
    env.setdefault("LLAMA_CPP_BUILD_JOBS", jobs)
    env.setdefault("CMAKE_ARGS", _SOURCE_BUILD_CMAKE_ARGS)
    pip = [sys.executable, "-m", "pip", "install", SOURCE_BUILD_REQUIREMENT]
    if subprocess.call(pip, env=env) != 0:
        print_stderr("the source build failed; see pip's output above")
        return 1
    ok, message = _server_works(args.server)
    print_stderr(message)
    return 0 if ok else 1
