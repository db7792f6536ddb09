"""llamarocm.ray on a real Ray cluster simulated on this machine, every address loopback.

One cluster for the module (``ray.cluster_utils.Cluster``: a head without GPUs and two
worker nodes with one fake GPU each), real replicas with real llama-servers, real
failures (a server SIGKILLed, an actor ``ray.kill``-ed) in the middle of a batch. After
the module no Ray process and no replica's llama-server may be left.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

# Before Ray is imported: keep every Ray address on 127.0.0.1 (by default Ray binds the
# machine's external interface), and send no usage report anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import pytest  # noqa: E402
from conftest import _unavailable, running, wait_pid_gone  # noqa: E402

try:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # reported by the fixtures: a failure under CI=true
    ray = None

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GREEDY = {"temperature": 0.0, "top_k": 1}
# Counting prompts: confident greedy continuations, so a server running several
# sequences at once (whose CPU kernels round differently) still gives the same text.
PROMPTS = [f"{s}, {s + 1}, {s + 2}, {s + 3}," for s in range(10, 170, 10)]
LOAD = {"parallel": 2, "context_length": 256}
RAY_DIR = os.path.dirname(ray.__file__) if ray is not None else None


def _pool(model_path, server_binary, **options):
    """A replica pool with the tests' load options; it gives up quickly if Ray cannot
    place it (the cluster has a GPU per worker node, no more)."""
    import llamarocm.ray

    return llamarocm.ray.ReplicaPool(model_path, server_path=server_binary, ready_timeout=120, **LOAD, **options)


def _need_ray():
    if ray is None:
        _unavailable("ray is not installed (pip install '.[ray]')")


def _ray_processes():
    """Processes running this venv's Ray: raylet, gcs_server and agents by their path,
    workers by the title Ray gives them ("ray::Replica", "ray::IDLE")."""
    found = []
    for pattern in (f"{RAY_DIR}/", "^ray::"):
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        found += [line for line in out.splitlines() if line.strip()]
    return found


def _descendants(root):
    """``root`` and every process below it (Ray's nodes are children of this process,
    their workers children of the raylets)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _replica_servers():
    """llama-server processes started inside a Ray worker (Ray's variables in their
    environment): the replicas' servers, alive or orphaned."""
    found = []
    for pid in subprocess.run(["pgrep", "-f", "llama-server"], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"RAY_RAYLET_PID=" in f.read():
                    found.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


def _environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [entry.split(b"=", 1) for entry in f.read().split(b"\0") if b"=" in entry]
    return {k.decode(): v.decode() for k, v in pairs}


def _lines(path):
    """The JSON lines of a checkpoint file, which must hold whole lines only."""
    data = path.read_bytes() if path.exists() else b""
    assert data == b"" or data.endswith(b"\n"), "the file must hold whole lines"
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def cli_logging():
    """main() gives the ``llamarocm`` logger a handler on the stderr of the moment (a
    test's capture, closed after it) and a level: put both back after the test."""
    logger = logging.getLogger("llamarocm")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.2)
    return predicate()


class _Session:
    """The module's cluster; ``shutdown()`` is idempotent (a test calls it, then the fixture)."""

    def __init__(self):
        started = time.monotonic()
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
        self.workers = [self.cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.cluster.wait_for_nodes()
        self.start_seconds = time.monotonic() - started
        self.down = False

    def shutdown(self):
        if not self.down:
            self.down = True
            ray.shutdown()
            self.cluster.shutdown()

    def leftovers(self):
        _wait(lambda: not _ray_processes() and not _replica_servers(), 20)
        return _ray_processes() + [f"llama-server {pid}" for pid in _replica_servers()]


@pytest.fixture(scope="module")
def session(model_path, server_binary):
    _need_ray()
    assert not _ray_processes(), "a Ray of this venv already runs: stop it first"
    session = _Session()
    try:
        yield session
    finally:
        session.shutdown()
    assert not session.leftovers(), "processes left after the Ray tests"


@pytest.fixture(scope="module")
def expected(shared_model):
    """Local ``Model.map`` on the same prompts: what every Ray batch must return."""
    return [r.text for r in shared_model.map(PROMPTS, max_tokens=8, **GREEDY)]


# -- without a cluster -----------------------------------------------------------------


def test_import_llamarocm_imports_no_ray():
    code = "import sys, llamarocm; print(sorted(m for m in sys.modules if m.split('.')[-1] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gpu_options_keep_the_server_on_rays_gpus():
    _need_ray()
    from llamarocm.ray import gpu_options

    # Fake GPUs, or AMD GPUs Ray cannot see: Ray set CUDA_VISIBLE_DEVICES; its ids
    # become the server's devices, which device_environment intersects with any limit.
    assert gpu_options({"CUDA_VISIBLE_DEVICES": "1"}, ["1"], {}) == {"devices": [1]}
    assert gpu_options({"CUDA_VISIBLE_DEVICES": "0,2"}, ["0", "2"], {}) == {"devices": [0, 2]}
    # Ray set ROCm's variable itself: that limit stands as it is.
    assert gpu_options({"HIP_VISIBLE_DEVICES": "3"}, ["3"], {}) == {}
    assert gpu_options({"ROCR_VISIBLE_DEVICES": "1,2"}, ["1", "2"], {}) == {}
    # A ROCm variable that is not Ray's (set on the node): Ray's ids are still applied.
    assert gpu_options({"HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "1"}, ["1"], {}) == {"devices": [1]}
    # Ids that are no index: CUDA_VISIBLE_DEVICES, inherited, is the limit.
    assert gpu_options({"CUDA_VISIBLE_DEVICES": "GPU-3f2a"}, ["GPU-3f2a"], {}) == {}
    # No GPU: nothing is offloaded, not even operations.
    cpu = {"gpu_layers": 0, "extra_args": ["--foo", "--device", "none"]}
    assert gpu_options({}, [], {"extra_args": ["--foo"]}) == cpu
    with pytest.raises(ValueError, match="gpu_layers"):
        gpu_options({}, [], {"gpu_layers": 10})


def test_bad_arguments_fail_before_anything_starts(model_path):
    _need_ray()
    import llamarocm.ray

    with pytest.raises(TypeError, match="unexpected argument 'max_tokenz'"):
        llamarocm.ray.map(model_path, PROMPTS, max_tokenz=8)
    with pytest.raises(ValueError, match="top_p"):
        llamarocm.ray.map(model_path, PROMPTS, top_p=2)
    with pytest.raises(ValueError, match="gpus_per_replica"):
        llamarocm.ray.map(model_path, PROMPTS, devices=[0])
    with pytest.raises(TypeError, match="given twice"):
        llamarocm.ray.map(model_path, PROMPTS, load_options={"parallel": 2}, parallel=3)
    with pytest.raises(ValueError, match="parallel"):
        llamarocm.ray.map(model_path, PROMPTS, parallel=0)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        llamarocm.ray.map(model_path, PROMPTS, checkpoint=3)
    with pytest.raises(ValueError, match="offloads no layers"):
        llamarocm.ray.map(model_path, PROMPTS, gpus_per_replica=0, gpu_layers="all")
    with pytest.raises(ValueError, match="max_retries"):
        llamarocm.ray.map(model_path, PROMPTS, max_retries=-1)
    with pytest.raises(TypeError, match="prompts"):
        llamarocm.ray.map(model_path, "one string")
    with pytest.raises(ValueError, match="replicas"):
        llamarocm.ray.ReplicaPool(model_path, replicas=0)
    with pytest.raises(ValueError, match="num_gpus"):
        llamarocm.ray.ReplicaPool(model_path, ray_options={"num_gpus": 2})
    with pytest.raises(TypeError, match="map"):
        llamarocm.ray.ReplicaPool(model_path, max_tokens=8)
    assert llamarocm.ray.map(model_path, []) == []
    assert not ray.is_initialized(), "a check started Ray"


@pytest.mark.parametrize("arguments, error, message", [
    ({"ray_options": 5}, TypeError, "ray_options must be a mapping of Ray actor options"),
    ({"ray_options": ["num_cpus"]}, TypeError, "ray_options must be a mapping"),
    ({"ray_options": {1: 2}}, TypeError, "ray_options' keys must be option names"),
    ({"ray_options": {"num_cpuz": 1}}, ValueError, "ray_options: Invalid option keyword num_cpuz"),
    ({"ray_options": {"num_cpus": -1}}, ValueError, "ray_options: .*cannot be negative"),
    ({"ray_options": {"resources": 5}}, TypeError, "ray_options: .*resources"),
    ({"load_options": 5}, TypeError, "load_options must be a mapping of load options"),
    ({"load_options": {1: 2}}, TypeError, "load_options' keys must be"),
    ({"gpus_per_replica": float("nan")}, ValueError, "gpus_per_replica must be a number >= 0"),
    ({"gpus_per_replica": float("inf")}, ValueError, "gpus_per_replica must be a number >= 0"),
    ({"gpus_per_replica": "1"}, ValueError, "gpus_per_replica must be a number >= 0"),
    ({"replicas": 2.0}, ValueError, "replicas must be a positive int"),
    ({"ready_timeout": -1}, ValueError, "ready_timeout"),
    ({"progress": 5}, TypeError, "progress must be callable"),
])
def test_bad_pool_arguments_fail_before_anything_starts(model_path, arguments, error, message):
    _need_ray()
    import llamarocm.ray

    with pytest.raises(error, match=message):
        llamarocm.ray.map(model_path, ["a"], **arguments)
    if "progress" not in arguments:
        with pytest.raises(error, match=message):
            llamarocm.ray.ReplicaPool(model_path, **arguments)
    assert not ray.is_initialized(), "a check started Ray"


def test_replicas_that_fit_counts_whole_replicas_per_node():
    _need_ray()
    from llamarocm.ray.placement import replica_needs, replicas_that_fit

    head = {"Alive": True, "Resources": {"CPU": 1.0, "memory": 1e9}}
    gpu_node = {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0, "memory": 1e9}}
    dead = {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}}
    nodes = [head, gpu_node, gpu_node, dead]
    # A replica holds one CPU (Ray's default for an actor that asks for resources).
    assert replica_needs(1, {}) == {"CPU": 1.0, "GPU": 1.0}
    assert replicas_that_fit(nodes, replica_needs(1, {})) == 2
    assert replicas_that_fit(nodes, replica_needs(0.5, {})) == 4
    assert replicas_that_fit(nodes, replica_needs(2, {})) == 0
    assert replicas_that_fit(nodes, replica_needs(0, {})) == 5  # CPUs: 1 + 2 + 2
    assert replicas_that_fit(nodes, replica_needs(0, {"num_cpus": 2})) == 2
    assert replicas_that_fit(nodes, replica_needs(1, {"resources": {"big": 1}})) == 0
    assert replicas_that_fit(nodes, replica_needs(0, {"num_cpus": 0})) is None  # no limit
    assert replicas_that_fit([], replica_needs(1, {})) == 0


def test_the_checkpoint_is_opened_before_any_replica_starts(model_path, shared_model, tmp_path):
    _need_ray()
    import llamarocm
    import llamarocm.ray
    from llamarocm.checkpoint import Checkpoint

    out = tmp_path / "results.jsonl"
    with Checkpoint(out), pytest.raises(llamarocm.CheckpointLockedError):
        llamarocm.ray.map(model_path, PROMPTS[:4], checkpoint=out, max_tokens=8, **GREEDY)
    # Every item already in the file (from a local map): read back, and no replica,
    # not even Ray, starts.
    local = shared_model.map(PROMPTS[:4], checkpoint=out, max_tokens=8, **GREEDY)
    calls = []
    results = llamarocm.ray.map(model_path, PROMPTS[:4], checkpoint=out, max_tokens=8,
                                progress=lambda done, total: calls.append((done, total)), **GREEDY)
    assert [(r.prompt, r.text, r.metrics) for r in results] == [(r.prompt, r.text, r.metrics) for r in local]
    assert calls == [(4, 4)]
    assert len(_lines(out)) == 4
    assert not ray.is_initialized(), "Ray started for a batch that was done"


@pytest.mark.parametrize("extra, message", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--replicas", "2", "--gpus-per-replica", "1"], "--replicas and --gpus-per-replica need --ray"),
    (["--ray", "auto", "--devices", "0"], "--devices does not go with --ray"),
    (["--ray", "auto", "--rpc", "127.0.0.1:50052"], "--rpc does not go with --ray"),
    (["--ray", "auto", "--replicas", "0"], "replicas must be a positive int"),
    (["--ray", "auto", "--gpus-per-replica", "-1"], "gpus_per_replica must be a number >= 0"),
    (["--ray", "auto", "--gpus-per-replica", "0", "--gpu-layers", "all"], "offloads no layers"),
    (["--ray", " "], "--ray needs auto or the address"),
    (["--ray", "bad address!!"], "--ray needs auto or the address of a Ray cluster (HOST:PORT or ray://HOST:PORT)"),
    (["--ray", "127.0.0.1"], "--ray needs auto or the address"),
    (["--ray", "127.0.0.1:99999"], "port 99999"),
    (["--ray", "127.0.0.1:0"], "port 0"),
    (["--ray", "ray://"], "--ray needs auto or the address"),
    (["--ray", "http://127.0.0.1:6379"], "--ray needs auto or the address"),
    (["--ray", "auto", "no-ray"], "--ray needs Ray, which does not import here"),
])
def test_batch_ray_usage_errors_exit_2_before_anything_starts(
    extra, message, tmp_path, capsys, monkeypatch, cli_logging
):
    _need_ray()
    from llamarocm.cli import main

    if "no-ray" in extra:
        extra = [arg for arg in extra if arg != "no-ray"]
        monkeypatch.setitem(sys.modules, "llamarocm.ray", None)  # as if Ray were not installed
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text('{"id": 1, "prompt": "1, 2, 3,"}\n')
    with pytest.raises(SystemExit) as info:
        main(["batch", str(inp), str(out), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: llamarocm batch" in err, err
    assert not out.exists()
    assert not ray.is_initialized()


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_batch_ray_auto_without_a_cluster_exits_1_saying_so(existing, tmp_path, capsys, monkeypatch, cli_logging):
    _need_ray()
    from llamarocm.cli import main

    assert not _ray_processes(), "a Ray of this venv runs: this test needs none"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text('{"id": 1, "prompt": "1, 2, 3,"}\n')
    if existing:
        out.write_bytes(b"")
    assert main(["batch", str(inp), str(out), "--ray", "auto"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to a Ray cluster (--ray auto)" in err and "ray start --head" in err, err
    assert not ray.is_initialized() and not _ray_processes()
    # Opened (and locked) first, as without --ray; an OUTPUT this run created and left
    # empty is removed, one that was there stays.
    assert out.exists() == existing


def test_batch_ray_on_a_closed_port_gives_up_soon(tmp_path):
    """In a process of its own: the bound on Ray's connection is set before Ray is
    imported (here it already is)."""
    _need_ray()
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text('{"id": 1, "prompt": "1, 2, 3,"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llamarocm", "batch", str(inp), str(out), "--ray", "127.0.0.1:1"],
                          capture_output=True, text=True, env=env, timeout=120)
    seconds = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert "cannot connect to a Ray cluster (--ray 127.0.0.1:1)" in proc.stderr, proc.stderr
    assert seconds < 45, f"gave up after {seconds:.0f} s"
    assert not out.exists()


# -- on the cluster ----------------------------------------------------------------------


@pytest.fixture(scope="class")
def pool(session, model_path, server_binary):
    """Two replicas, one per worker node, for the tests of one class, stopped after
    them (the tests that follow need the GPUs back)."""
    with _pool(model_path, server_binary, replicas=2) as pool:
        yield pool


class TestTwoReplicas:
    def test_ray_listens_on_loopback_only(self, session, pool):
        assert session.cluster.address.startswith("127.0.0.1:")
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        assert {info["node_ip"] for info in pool.describe()} == {"127.0.0.1"}
        pids = _descendants(os.getpid())
        assert {info["pid"] for info in pool.describe()} <= pids
        out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
        listening = []
        for line in out.splitlines():
            owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            if owners & pids:
                address = line.split()[4].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                listening.append((address, owners))
        owners = {pid for _, found in listening for pid in found}
        # The GCS, every raylet and both replicas' workers listen: the check is not empty.
        assert len(owners) >= 6 and {info["pid"] for info in pool.describe()} <= owners, listening
        assert all(address != "*" and ipaddress.ip_address(address).is_loopback for address, _ in listening), listening

    def test_greedy_results_equal_local_map(self, pool, expected):
        import llamarocm

        results = pool.map(PROMPTS, max_tokens=8, **GREEDY)
        assert all(isinstance(r, llamarocm.BatchResult) for r in results)
        assert [r.prompt for r in results] == PROMPTS
        assert [r.error for r in results] == [None] * len(PROMPTS)
        assert [r.text for r in results] == expected
        assert {r.finish_reason for r in results} == {"length"}
        assert all(r.metrics.generated_tokens == 8 for r in results)

    def test_each_replica_is_on_its_own_node_with_the_gpu_ray_assigned(self, pool):
        replicas = pool.describe()
        assert len(replicas) == 2
        assert len({info["node_id"] for info in replicas}) == 2
        for info in replicas:
            env = _environ(info["server_pid"])
            assert info["gpu_ids"] == ["0"]  # each worker node has one fake GPU
            # Ray's variable reaches the server, and the same GPU is its HIP limit.
            assert env["CUDA_VISIBLE_DEVICES"] == "0"
            assert env["HIP_VISIBLE_DEVICES"] == "0"
            # The server inherits the niceness of Ray's worker (15 by default), and
            # describe() says which it has.
            assert info["niceness"] == os.getpriority(os.PRIO_PROCESS, info["server_pid"]) == 15

    def test_a_checkpoint_half_filled_by_a_local_map_is_finished_on_ray(self, pool, shared_model, expected, tmp_path):
        out = tmp_path / "results.jsonl"
        half = len(PROMPTS) // 2
        local = shared_model.map(PROMPTS[:half], checkpoint=out, max_tokens=8, **GREEDY)
        calls = []
        results = pool.map(PROMPTS, checkpoint=out, progress=lambda done, total: calls.append(done),
                           max_tokens=8, **GREEDY)
        assert [r.prompt for r in results] == PROMPTS and [r.text for r in results] == expected
        # The first half is read back (the local run's own metrics), not run again.
        assert [r.metrics for r in results[:half]] == [r.metrics for r in local]
        assert calls == list(range(half, len(PROMPTS) + 1))
        lines = _lines(out)
        assert sorted(line["index"] for line in lines) == list(range(len(PROMPTS))), "every item exactly once"
        assert {line["index"]: line["text"] for line in lines} == dict(enumerate(expected))

    def test_a_stopped_ray_map_resumes_and_a_changed_prompt_is_redone(self, pool, shared_model, expected, tmp_path):
        out = tmp_path / "results.jsonl"

        class Stop(Exception):
            pass

        seen = []

        def stop_at_five(done, total):
            seen.append((done, len(_lines(out))))
            if done == 5:
                raise Stop  # the driver gives up, its replicas still busy

        with pytest.raises(Stop):
            pool.map(PROMPTS, checkpoint=out, progress=stop_at_five, max_tokens=8, **GREEDY)
        # Each item was in the file before it was reported, and nothing else was.
        assert seen == [(done, done) for done in range(1, 6)]
        assert len(_lines(out)) == 5
        calls = []
        results = pool.map(PROMPTS, checkpoint=out, progress=lambda done, total: calls.append(done),
                           max_tokens=8, **GREEDY)
        assert [r.text for r in results] == expected
        assert calls == list(range(5, len(PROMPTS) + 1))
        lines = _lines(out)
        assert sorted(line["index"] for line in lines) == list(range(len(PROMPTS))), "every item exactly once"

        changed = list(PROMPTS)
        changed[3] = "1, 2, 3, 4,"
        calls.clear()
        again = pool.map(changed, checkpoint=out, progress=lambda done, total: calls.append(done),
                         max_tokens=8, **GREEDY)
        assert calls == [len(PROMPTS) - 1, len(PROMPTS)]
        (new,) = _lines(out)[len(lines):]
        assert new["index"] == 3 and new["hash"] != lines[[line["index"] for line in lines].index(3)]["hash"]
        assert again[3].text == new["text"] == shared_model.map(changed[3:4], max_tokens=8, **GREEDY)[0].text
        assert [r.text for i, r in enumerate(again) if i != 3] == expected[:3] + expected[4:]


def test_a_replica_gets_exactly_the_gpus_ray_assigned(session, model_path, server_binary):
    class Holder:  # defined here so that Ray ships it by value to its worker
        def ids(self):
            return [str(i) for i in ray.get_runtime_context().get_accelerator_ids()["GPU"]]

    # A node with three fake GPUs, one of them taken first: the replica's two are then
    # not simply the first ones, and both must reach its server.
    node = session.cluster.add_node(num_cpus=2, num_gpus=3)  # Ray keeps a CPU per actor
    try:
        session.cluster.wait_for_nodes()
        on_node = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False)}
        holder = ray.remote(Holder).options(num_gpus=1, **on_node).remote()
        taken = ray.get(holder.ids.remote())
        # A runtime_env reaches the server: here the knob docs/distributed.md gives for
        # nodes with other work, normal priority for the replica's server.
        env_vars = {"RAY_worker_niceness": "0", "LLAMAROCM_TEST_MARK": "1"}
        options = {**on_node, "runtime_env": {"env_vars": env_vars}}
        with _pool(model_path, server_binary, gpus_per_replica=2, ray_options=options) as pool:
            (info,) = pool.describe()
            assert info["niceness"] == os.getpriority(os.PRIO_PROCESS, info["server_pid"]) == 0
            assert _environ(info["server_pid"])["LLAMAROCM_TEST_MARK"] == "1"
            assert len(info["gpu_ids"]) == 2 and not set(info["gpu_ids"]) & set(taken)
            env = _environ(info["server_pid"])
            assert env["CUDA_VISIBLE_DEVICES"] == ",".join(info["gpu_ids"])
            assert env["HIP_VISIBLE_DEVICES"] == ",".join(info["gpu_ids"])
        ray.kill(holder)
    finally:
        session.cluster.remove_node(node)


def _run_with_a_failure(model_path, server_binary, expected, caplog, fail, checkpoint=None):
    """A batch on two fresh replicas where ``fail(pool, victim)`` strikes replica 0
    after two items are done; every item must come back once, right (and be in the
    ``checkpoint`` file once: a retried item is no failure)."""
    with _pool(model_path, server_binary, replicas=2) as pool:
        victim = pool.describe()[0]
        calls = []

        def progress(done, total):
            calls.append(done)
            if done == 2:
                fail(pool, victim)

        with caplog.at_level(logging.WARNING, logger="llamarocm"):
            results = pool.map(PROMPTS, max_tokens=8, progress=progress, checkpoint=checkpoint, **GREEDY)
        assert calls == list(range(1, len(PROMPTS) + 1))  # each item finished once
        if checkpoint is not None:
            assert {line["index"]: line["text"] for line in _lines(checkpoint)} == dict(enumerate(expected))
            assert len(_lines(checkpoint)) == len(PROMPTS)
        assert [r.prompt for r in results] == PROMPTS
        assert [r.error for r in results] == [None] * len(PROMPTS)
        assert [r.text for r in results] == expected
        failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
        assert len(failed) == 1 and failed[0].startswith("replica 0 "), failed
        assert int(re.search(r"(\d+) unfinished item", failed[0]).group(1)) >= 1  # it had work in flight
        (survivor,) = pool.describe()
        assert survivor["node_id"] != victim["node_id"]
        # The pool goes on with the survivor.
        assert [r.text for r in pool.map(PROMPTS[:2], max_tokens=8, **GREEDY)] == expected[:2]
    assert wait_pid_gone(victim["server_pid"], 10)


def test_a_server_killed_mid_batch_has_its_items_retried_elsewhere(
    model_path, server_binary, expected, session, caplog, tmp_path
):
    def kill_server(pool, victim):
        os.kill(victim["server_pid"], signal.SIGKILL)

    _run_with_a_failure(model_path, server_binary, expected, caplog, kill_server, tmp_path / "results.jsonl")


def test_a_replica_actor_killed_mid_batch_has_its_items_retried_elsewhere(
    model_path, server_binary, expected, session, caplog
):
    # The actor's process dies at once; its llama-server follows by the parent-death signal.
    _run_with_a_failure(model_path, server_binary, expected, caplog, lambda pool, victim: ray.kill(pool.actors[0]))


def test_items_are_reported_once_retries_run_out(model_path, server_binary, session):
    import llamarocm

    # One replica, no retries: its server dies under the batch; what it ran fails with
    # the crash, what never ran is skipped. Each item has exactly one result.
    with _pool(model_path, server_binary) as pool:
        (info,) = pool.describe()

        def progress(done, total):
            if done == 1:
                os.kill(info["server_pid"], signal.SIGKILL)

        results = pool.map(PROMPTS, max_tokens=8, max_retries=0, progress=progress, **GREEDY)
        assert [r.prompt for r in results] == PROMPTS
        assert sum(r.ok for r in results) >= 1
        errors = [type(r.error) for r in results if not r.ok]
        assert set(errors) <= {llamarocm.ServerCrashedError, llamarocm.SkippedError}
        assert llamarocm.ServerCrashedError in errors and llamarocm.SkippedError in errors
        with pytest.raises(llamarocm.LlamaRocmError, match="no replica of this pool is left"):
            pool.map(PROMPTS[:1], **GREEDY)


def test_a_replica_that_cannot_load_fails_the_map(session, tmp_path):
    import llamarocm
    import llamarocm.ray

    with pytest.raises(llamarocm.ServerStartError, match="no replica started") as caught:
        llamarocm.ray.map(str(tmp_path / "missing.gguf"), PROMPTS[:1], ready_timeout=120)
    assert "missing.gguf" in str(caught.value)


class _CountActors:
    """Stands for the replica's actor class: counts the actors made through it."""

    def __init__(self, real):
        self.real, self.made = real, 0

    def options(self, **options):
        made = self.real.options(**options)
        counter = self

        class _Counted:
            def remote(self, *args, **kwargs):
                counter.made += 1
                return made.remote(*args, **kwargs)

        return _Counted()


def test_a_replica_no_node_can_hold_fails_at_once_saying_why(session, model_path, server_binary, monkeypatch):
    import llamarocm
    import llamarocm.ray

    actors = _CountActors(llamarocm.ray.pool._RemoteReplica)
    monkeypatch.setattr(llamarocm.ray.pool, "_RemoteReplica", actors)
    started = time.monotonic()
    # No node of the cluster has two GPUs: as a cluster without GPUs with the default 1.
    with pytest.raises(llamarocm.ServerStartError) as caught:
        llamarocm.ray.map(model_path, ["a"], gpus_per_replica=2, server_path=server_binary)
    message = str(caught.value)
    assert "2 GPUs" in message and "at most 1 GPU on one node" in message, message
    assert "gpus_per_replica=0" in message, message
    assert "--gpus-per-replica 0" in message, message  # what ``llamarocm batch --ray`` takes
    with pytest.raises(llamarocm.ServerStartError, match="'no-such-resource'"):
        _pool(model_path, server_binary, ray_options={"resources": {"no-such-resource": 1}})
    assert time.monotonic() - started < 20, "it waited for Ray to place a replica"
    assert actors.made == 0


def test_more_replicas_than_fit_start_what_fits_with_a_warning(session, model_path, server_binary, caplog, monkeypatch):
    import llamarocm.ray

    actors = _CountActors(llamarocm.ray.pool._RemoteReplica)
    monkeypatch.setattr(llamarocm.ray.pool, "_RemoteReplica", actors)
    with caplog.at_level(logging.WARNING, logger="llamarocm"):
        pool = _pool(model_path, server_binary, replicas=3)
    with pool:
        assert len(pool.actors) == actors.made == 2
    assert "only 2 of the 3 replicas fit" in caplog.text, caplog.text


def test_ray_data_predictor(session, model_path, server_binary, expected):
    try:
        import ray.data
    except ImportError as exc:
        _unavailable(f"ray.data does not import: {exc} (pip install 'ray[data]')")
    from llamarocm.ray import Predictor

    dataset = ray.data.from_items([{"prompt": p} for p in PROMPTS[:6]])
    options = {"model_path": model_path, "server_path": server_binary, "max_tokens": 8, **LOAD, **GREEDY}
    rows = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs=options,
        concurrency=1,
        num_gpus=1,
        batch_size=3,
    ).take_all()
    by_prompt = {row["prompt"]: row for row in rows}
    assert sorted(by_prompt) == sorted(PROMPTS[:6])
    assert [by_prompt[p]["text"] for p in PROMPTS[:6]] == expected[:6]
    assert {row["error"] for row in rows} == {None}
    assert {row["finish_reason"] for row in rows} == {"length"}


# -- llamarocm batch --ray ----------------------------------------------------------------

CLI_PROMPTS = [f"{n}, {n + 1}, {n + 2}," for n in range(1, 41)]


@pytest.fixture(scope="module")
def cli_expected(shared_model):
    """Local texts of the command's prompts, by input id."""
    return {f"item-{i}": r.text for i, r in enumerate(shared_model.map(CLI_PROMPTS, max_tokens=8, **GREEDY))}


def _count_lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)],
                         ids=["sigkill", "ctrl-c"])
def test_batch_on_ray_stopped_mid_run_resumes_to_the_local_result(
    sig, code, session, model_path, server_binary, cli_expected, tmp_path, capsys, cli_logging
):
    from llamarocm.cli import main

    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text("".join(json.dumps({"id": f"item-{i}", "prompt": p}) + "\n" for i, p in enumerate(CLI_PROMPTS)))
    argv = ["batch", str(inp), str(out), "--model", model_path, "--server", server_binary, "--max-tokens", "8",
            "--temperature", "0", "--top-k", "1", "--context-length", "256", "--parallel", "2",
            "--ray", session.cluster.address]
    # A driver of its own (it connects to the cluster by its address), stopped once
    # five items are in the file.
    before = set(_replica_servers())
    with running([sys.executable, "-m", "llamarocm", *argv]) as proc:
        _wait(lambda: _count_lines(out) >= 5 or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.communicate()
        servers = set(_replica_servers()) - before
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    if sig == signal.SIGINT:
        assert "interrupted" in err and "run the same command again" in err, err
    assert servers, "no replica's llama-server ran the batch"
    for pid in servers:
        assert wait_pid_gone(pid, 30), "a replica's llama-server outlived its driver"
    lines_before = len(_lines(out))
    assert 5 <= lines_before < len(CLI_PROMPTS), "stopped too late to test a resume"

    # The same command again, in this process (already connected: main() keeps that).
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["total"], summary["done"], summary["failed"]) == (len(CLI_PROMPTS), len(CLI_PROMPTS), 0)
    assert (summary["resumed"], summary["ran"]) == (lines_before, len(CLI_PROMPTS) - lines_before)
    lines = _lines(out)
    assert sorted(line["id"] for line in lines) == sorted(cli_expected), "every id exactly once"
    assert {line["id"]: line["text"] for line in lines} == cli_expected
    assert ray.is_initialized(), "main() closed the connection it did not open"


def test_nothing_is_left_after_shutdown(session):
    session.shutdown()
    assert not session.leftovers()
