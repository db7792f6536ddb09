"""Smoke test of the benchmark suite (``llamarocm bench``).

A tiny configuration runs against the real llama-server and must write valid JSON with
every requested figure and a table row per target. No timed assertions: the numbers of
a tiny run on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import os

import pytest

from llamarocm import bench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

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


def test_bench_quick_aggregate_writes_json_and_plot(tmp_path, model_path, server_binary):
    plot = tmp_path / "aggregate.png"
    result = _run(tmp_path, model_path, server_binary, "aggregate", "--plot", str(plot))
    points = result["figures"]["aggregate"]["points"]
    assert {(p["slots"], p["threads"]) for p in points} == {(1, 2), (2, 2)}
    if result["figures"]["aggregate"]["plot"]:  # None without matplotlib (not a test dependency)
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(180)
def test_rpc_benchmark_writes_json(tmp_path, model_path, server_binary, rpc_binary):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_rpc.py"
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
