"""The commands that only read files or sysfs: ``models``, ``info`` and ``vram``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

import llamarocm

from .console import print_json, print_stderr
from .options import model_path


def _size(size: Optional[int]) -> str:
    if size is None:
        return "-"
    n = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    found = llamarocm.discover_models(args.folder, recursive=args.recursive)
    if args.json:
        print_json([dataclasses.asdict(info) for info in found])
        return 0
    if not found:
        print_stderr(f"no GGUF models in {args.folder}")
        return 0
    rows = [("PATH", "ARCH", "QUANT", "SIZE", "PARAMS", "CONTEXT")] + [
        (
            os.path.relpath(m.path, args.folder),
            m.architecture or "-",
            m.quantization or "-",
            _size(m.file_size),
            m.size_label or (f"{m.parameters / 1e6:.0f}M" if m.parameters else "-"),
            str(m.context_length or "-"),
        )
        for m in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    meta = llamarocm.read_metadata(model_path(args.model))
    fields = {
        "path": meta.path,
        "gguf_version": meta.version,
        "architecture": meta.architecture,
        "name": meta.name,
        "quantization": meta.quantization,
        "file_type": meta.file_type,
        "size_label": meta.size_label,
        "parameters": meta.parameters,
        "file_size": meta.file_size,
        "context_length": meta.context_length,
        "block_count": meta.block_count,
        "embedding_length": meta.embedding_length,
        "head_count": meta.head_count,
        "head_count_kv": meta.head_count_kv,
        "tensor_count": meta.tensor_count,
        "has_chat_template": meta.chat_template is not None,
    }
    if args.json:
        print_json(fields)
        return 0
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        shown = _size(meta.file_size) if key == "file_size" else ("-" if value is None else value)
        print(f"{key.ljust(width)}  {shown}")
    return 0


def cmd_vram(args: argparse.Namespace) -> int:
    gpus = llamarocm.list_devices()
    if args.json:
        print_json([dict(dataclasses.asdict(g), memory=g.memory._asdict()) for g in gpus])
        return 0
    if not gpus:
        print_stderr("no AMD GPU found (sysfs lists none); llama-server will run on the CPU")
        return 0
    for g in gpus:
        kind = "integrated" if g.is_integrated else "discrete"
        mem = g.memory
        print(f"{g.index}: {g.name} ({kind}) {_size(mem.used)} used of {_size(mem.total)}, {_size(mem.free)} free")
    return 0
