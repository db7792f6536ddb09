"""A whole run: the figures asked for, in order, with the machine's state around each, as one
result (the JSON that ``llamarocm bench`` writes)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import llamarocm

from .._binaries import find_binary
from .aggregate import figure_aggregate
from .common import loadavg, log, machine_facts, package_version, perf
from .figures import figure_client, figure_gguf, figure_memory, figure_startup, figure_stream
from .options import FIGURES, Options
from .replay import record_streams
from .report import build_table, plot_aggregate

Step = Callable[[str, Callable[[], Dict[str, Any]]], None]


def environment(opts: Options) -> Dict[str, Any]:
    """The machine, the programs and the packages a run measures with."""
    binary = find_binary("server", opts.server)
    env = machine_facts(opts.model, llama_server=binary.path, llama_server_source=binary.source,
                        model_bytes=os.path.getsize(opts.model))
    for name in ("openai", "matplotlib", "gguf", "requests"):
        env[name] = package_version(name)
    return env


def run(opts: Options, figures: Sequence[str] = FIGURES) -> Dict[str, Any]:
    """Measure ``figures`` and return the result (also the JSON written by ``llamarocm bench``)."""
    unknown = set(figures) - set(FIGURES)
    if unknown:
        raise ValueError(f"unknown figures: {', '.join(sorted(unknown))}")
    started = perf()
    result: Dict[str, Any] = {
        "environment": environment(opts),
        "options": {k: v for k, v in vars(opts).items() if k != "model"},
        "load_average": {"start": loadavg()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "figures": {},
    }
    out = result["figures"]
    step = _stepper(result)
    if "startup" in figures:
        step("startup", lambda: figure_startup(opts))
    recordings = _on_one_server(opts, figures, result, step)
    if recordings is not None and "client" in figures:
        step("client", lambda: figure_client(opts, recordings))
    if recordings is not None and "memory" in figures:
        step("memory", lambda: figure_memory(opts, recordings))
    if "aggregate" in figures:
        step("aggregate", lambda: figure_aggregate(opts))
        if opts.plot:
            title = f"{os.path.basename(opts.model)}, {os.cpu_count()} CPUs ({opts.agg_tokens} tokens per request)"
            out["aggregate"]["plot"] = plot_aggregate(out["aggregate"], opts.plot, title)
    if "gguf" in figures:
        step("gguf", lambda: figure_gguf(opts))
    result["table"] = build_table(out)
    result["seconds"] = round(perf() - started, 1)
    return result


def _stepper(result: Dict[str, Any]) -> Step:
    """``step(name, figure)``: measure a figure into ``result``, with its time and the load after it."""

    def step(name: str, fn: Callable[[], Dict[str, Any]]) -> None:
        log(f"{name}...")
        t = perf()
        result["figures"][name] = fn()
        result["figures"][name]["seconds"] = round(perf() - t, 1)
        result["load_average"][name] = loadavg()

    return step


def _on_one_server(
    opts: Options, figures: Sequence[str], result: Dict[str, Any], step: Step
) -> Optional[Dict[str, bytes]]:
    """The figures that share one loaded server: the stream figure, and the recordings the
    client and memory figures replay (None when neither is asked for)."""
    if not {"stream", "client", "memory"} & set(figures):
        return None
    with llamarocm.load_model(opts.model, **opts.load_kwargs()) as model:
        assert model.server is not None
        result["environment"]["server_props"] = {
            k: model.server.props.get(k) for k in ("build_info", "total_slots", "model_path")
        }
        if "stream" in figures:
            step("stream", lambda: figure_stream(opts, model))
        if not {"client", "memory"} & set(figures):
            return None
        log("recording streams for the replay server...")
        return record_streams(model, opts.replay_tokens)
