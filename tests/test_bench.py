"""Smoke test of the benchmark suite (``llamarocm bench``).

A tiny configuration runs against the real llama-server and must write valid JSON with
every requested figure and a table row per target. No timed assertions: the numbers of
a tiny run on a shared machine mean nothing. Without a server: the suite stays out of
``import llamarocm`` and of the command's start-up, and the runner script names its
results after the figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamarocm import bench

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent

ROW_KEYS = {"figure", "ours", "baseline", "ratio", "target", "met"}


def _our_llama_servers() -> "list[int]":
    """llama-server processes whose parent is this process (another session's are not ours)."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        ppid = stat.rpartition(")")[2].split()[1]
        if ppid == me and b"llama-server" in cmdline:
            found.append(int(entry))
    return found


def _run(tmp_path, model_path: str, server_binary: str, figures: str, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    before = set(_our_llama_servers())  # a session-wide model of other tests may be running
    argv = ["--quick", "--model", model_path, "--server", server_binary, "--figures", figures,
            "--output", str(out), *extra]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["figures"]) == set(figures.split(","))
    assert result["load_average"]["start"] is None or len(result["load_average"]["start"]) == 3
    for row in result["table"]:
        assert set(row) >= ROW_KEYS
    assert set(_our_llama_servers()) <= before, "the benchmark left a llama-server running"
    return result


@pytest.mark.integration
def test_bench_quick_run_writes_json(tmp_path, model_path, server_binary):
    result = _run(tmp_path, model_path, server_binary, "startup,stream,client,memory", "--no-plot")
    figures = result["figures"]
    assert figures["startup"]["ours_ms"]["runs"] == 1
    assert figures["stream"]["decode_tok_s"]["tokens"] == 8
    assert figures["client"]["us_per_token"]["ours"]["runs"] >= 1
    assert figures["memory"]["streams"] == 20
    assert {"start-up", "time to first token", "client cost"} <= {
        row["figure"].split(":")[0].split(" per")[0] for row in result["table"]
    }


@pytest.mark.integration
def test_bench_quick_aggregate_writes_json_and_plot(tmp_path, model_path, server_binary):
    plot = tmp_path / "aggregate.png"
    result = _run(tmp_path, model_path, server_binary, "aggregate", "--plot", str(plot))
    points = result["figures"]["aggregate"]["points"]
    assert {(p["slots"], p["threads"]) for p in points} == {(1, 2), (2, 2)}
    if result["figures"]["aggregate"]["plot"]:  # None without matplotlib (not a test dependency)
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_rpc_benchmark_writes_json(tmp_path, model_path, server_binary, rpc_binary):
    script = ROOT / "benchmarks" / "bench_rpc.py"
    out = tmp_path / "rpc.json"
    done = subprocess.run(
        [sys.executable, str(script), "--model", model_path, "--server", server_binary,
         "--rpc-server", rpc_binary, "--tokens", "4", "--repeat", "1", "--output", str(out)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=170,
    )
    assert done.returncode == 0, done.stderr
    configs = json.loads(out.read_text())["configs"]
    assert set(configs) == {"local", "1 worker", "2 workers"}
    # Over workers the weights really moved, and the greedy tokens are the local run's.
    assert len(configs["2 workers"]["rpc_placement_mib"]) == 2
    assert all(c["same_tokens_as_local"] for c in configs.values())
    assert all(c["decode_tok_s"]["runs"] == 1 for c in configs.values())


def _loaded_after(code: str) -> "set[str]":
    """The bench modules a fresh interpreter has loaded after running ``code``."""
    probe = code + "\nimport sys\nprint(' '.join(m for m in sys.modules if m.startswith('llamarocm.bench')))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_import_llamarocm_leaves_bench_alone():
    assert _loaded_after("import llamarocm") == set()


def test_command_line_loads_only_the_bench_options():
    # The parser has the bench command's options; the measuring code waits for a run.
    loaded = _loaded_after("from llamarocm.cli import build_parser\nbuild_parser()")
    assert "llamarocm.bench.command" in loaded
    assert not loaded & {f"llamarocm.bench.{m}" for m in ("runner", "figures", "aggregate", "baselines", "replay")}


def _runner_script():
    spec = importlib.util.spec_from_file_location("bench_runner", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_script_names_results_after_the_figures():
    runner = _runner_script()
    results = ROOT / "benchmarks" / "results"
    every = runner.parse([])
    assert every.figures == bench.FIGURES and every.output == str(results / "bench.json")
    some = runner.parse(["client", "--quick", "memory"])
    assert some.figures == ("client", "memory") and some.quick
    assert some.output == str(results / "client-memory.json")
    assert runner.parse(["--figures", "gguf", "--output", "x.json"]).figures == ("gguf",)
    for wrong in (["nosuch"], ["stream", "--figures", "client"]):
        with pytest.raises(SystemExit):
            runner.parse(wrong)
