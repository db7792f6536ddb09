"""``llamarocm batch``: its options checked with the whole input file, then the run,
on this machine or on a Ray cluster (``--ray``), each result appended to OUTPUT."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from typing import Any, Dict, List

from ..batch import BatchItem, Resume, read_back, run_items
from ..checkpoint import Checkpoint
from .batch_input import read_batch_input
from .batch_progress import BatchTally, format_duration
from .console import print_json, print_stderr
from .options import (
    EMBEDDED_MODEL_STAND_IN,
    check_generation_options,
    generation_options,
    load,
    load_options,
    model_path,
)


def check_batch_options(args: argparse.Namespace) -> None:
    """The options, then the whole input file: a bad line is a usage error before the
    output file is touched or a model loads. The items are kept for the run."""
    check_generation_options(args)
    _check_ray_options(args)
    if os.path.exists(args.output) and os.path.exists(args.input) and os.path.samefile(args.input, args.output):
        raise ValueError("INPUT and OUTPUT must be different files")
    args.batch_items = read_batch_input(args.input, generation_options(args))


def _ray_load_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Each replica's ``load_model()`` options: those given (Ray chooses the devices)."""
    options = load_options(args)
    return {name: value for name, value in options.items() if value not in (None, []) and name != "devices"}


def _check_ray_options(args: argparse.Namespace) -> None:
    """``--ray`` and its options, with the library's checks; Ray is imported only here,
    and only with ``--ray``."""
    if args.ray is None:
        given = [flag for flag, value in (("--replicas", args.replicas), ("--gpus-per-replica", args.gpus_per_replica))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --ray")
        return
    check_ray_address(args.ray)
    if args.devices is not None:
        raise ValueError("--devices does not go with --ray: Ray chooses each replica's GPUs (--gpus-per-replica)")
    if args.rpc:
        raise ValueError("--rpc does not go with --ray: each replica runs the whole model on its own node")
    _bound_ray_connection()
    try:
        import llamarocm.ray
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray, which does not import here ({exc}): pip install 'llamarocm[ray]'") from None
    llamarocm.ray.check_pool_arguments(
        args.model if args.model is not None else EMBEDDED_MODEL_STAND_IN,
        _ray_load_options(args),
        **_ray_pool_options(args),
    )


# HOST:PORT or ray://HOST:PORT; HOST a name, an IPv4 address or a bracketed IPv6 one.
_RAY_ADDRESS = re.compile(r"(?:ray://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(?P<port>[0-9]+)")


def check_ray_address(address: str) -> None:
    """``--ray``'s value: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (Ray Client),
    with a port in 1-65535; anything else is a usage error, refused before OUTPUT is
    opened (Ray would take it as an address and wait)."""
    match = _RAY_ADDRESS.fullmatch(address)
    if address != "auto" and match is None:
        raise ValueError(
            f"--ray needs auto or the address of a Ray cluster (HOST:PORT or ray://HOST:PORT), got {address!r}"
        )
    if match is not None and not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"--ray {address}: port {int(match['port'])} is not a port (1-65535)")


#: Ray's C++ side reads these when Ray is imported. Its defaults try twenty times, about
#: forty seconds each, to reach a cluster that does not answer (a closed port, a wrong
#: host): here one attempt, some twenty seconds. Set in the environment, they win.
_RAY_CONNECT_BOUNDS = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "10"}


def _bound_ray_connection() -> None:
    if "ray" in sys.modules:
        return  # too late to bound (a program that imported Ray chose its own settings)
    for name, value in _RAY_CONNECT_BOUNDS.items():
        os.environ.setdefault(name, value)


def _ray_pool_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options of ``--ray``'s replica pool that were given (the pool's defaults otherwise)."""
    options = {"replicas": args.replicas, "gpus_per_replica": args.gpus_per_replica}
    return {name: value for name, value in options.items() if value is not None}



def _run_batch_on_ray(args: argparse.Namespace, items: List[BatchItem], resume: Resume, tally: BatchTally) -> None:
    """The batch over a pool of replicas on the Ray cluster ``--ray`` names; the output
    file stays on this machine, written as each item comes back."""
    import ray

    import llamarocm.ray

    # A program that calls main() already connected keeps its connection (and Ray
    # refuses a second init); otherwise this command connects, and disconnects after.
    connect = not ray.is_initialized()
    if connect:
        # log_to_driver=False: the workers' output must not mix with --json on stdout.
        try:
            ray.init(address=args.ray, log_to_driver=False,
                     logging_level=logging.INFO if args.debug else logging.WARNING)
        except ConnectionError as exc:  # Ray's message names its own flags: say it in ours
            raise ConnectionError(
                f"cannot connect to a Ray cluster (--ray {args.ray}): {exc} Start one with 'ray start --head', "
                "or give its head's HOST:PORT"
            ) from exc
    try:
        with llamarocm.ray.ReplicaPool(
            model_path(args.model), load_options=_ray_load_options(args), **_ray_pool_options(args)
        ) as pool:
            tally.started = time.monotonic()  # the rate leaves Ray's connection out
            pool.run_items(items, progress=tally.progress, on_result=tally.result, resume=resume)
    finally:
        if connect:
            ray.shutdown()


def _run_batch(args: argparse.Namespace, items: List[BatchItem], resume: Resume, tally: BatchTally) -> None:
    if args.ray is not None:
        _run_batch_on_ray(args, items, resume, tally)
        return
    with load(args) as model:
        tally.started = time.monotonic()  # the rate and the time left leave the load out
        run_items(
            model.generate, model.chat, items, max_workers=args.parallel,
            progress=tally.progress, on_result=tally.result, resume=resume,
        )


def cmd_batch(args: argparse.Namespace) -> int:
    items: List[BatchItem] = args.batch_items
    # Opened (and locked) before the model loads: a second run on the file is refused at once.
    with Checkpoint(args.output) as checkpoint:
        resume = read_back(items, checkpoint)
        tally = BatchTally(len(items), len(items) - resume.pending, sys.stderr.isatty())
        try:
            if resume.pending:  # else all is done already: no model to load
                _run_batch(args, items, resume, tally)
        except Exception:
            # No cluster, no model, no server: an OUTPUT this run created and never
            # wrote to is not left behind (one that was there stays).
            checkpoint.remove_if_unused()
            raise
        except KeyboardInterrupt:
            tally.clear()
            print_stderr(f"interrupted: {tally.done} of {tally.total} items are done in {args.output}; "
                    "run the same command again to resume")
            return 130
    tally.clear()
    summary = tally.summary(args)
    if args.json:
        print_json(summary)
    elif tally.show:
        print_stderr(f"{summary['done']} of {summary['total']} done ({summary['resumed']} from an earlier run), "
                f"{summary['failed']} failed, {format_duration(summary['seconds'])}, "
                f"{summary['tokens_per_second'] or 0:.1f} tok/s")
    if tally.failed:
        print_stderr(f"{tally.failed} of {tally.total} items failed (their errors are in {args.output}); "
                "run the same command again to retry them")
        return 1
    return 0
