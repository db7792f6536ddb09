"""How many replicas the cluster's nodes can hold, asked of Ray before any actor is made."""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Sequence

import ray

from ..errors import ServerStartError

log = logging.getLogger("llamarocm")


def replica_needs(gpus_per_replica: float, ray_options: Mapping[str, Any]) -> Dict[str, float]:
    """The resources one replica holds on its node while it lives, by Ray's resource
    names: its GPUs, its CPUs (Ray's default for an actor that asks for any resource is
    one), and the memory and custom resources of ``ray_options``."""
    cpus = ray_options.get("num_cpus")
    needs = {"CPU": float(1 if cpus is None else cpus), "GPU": float(gpus_per_replica)}
    if ray_options.get("memory"):
        needs["memory"] = float(ray_options["memory"])
    if ray_options.get("accelerator_type"):
        needs[f"accelerator_type:{ray_options['accelerator_type']}"] = 0.001  # Ray's own amount
    needs.update({name: float(amount) for name, amount in (ray_options.get("resources") or {}).items()})
    return {name: amount for name, amount in needs.items() if amount > 0}


def replicas_that_fit(nodes: Sequence[Mapping[str, Any]], needs: Mapping[str, float]) -> Optional[int]:
    """How many replicas, each whole on one node, the live ``nodes`` (as ``ray.nodes()``
    lists them) can hold at once with all their resources free; ``None`` when a replica
    needs nothing that runs out."""
    if not needs:
        return None
    fit = 0
    for node in nodes:
        if node.get("Alive"):
            have = node.get("Resources", {})
            # Ray counts resources in units of 1/10000: no float rounding below that.
            fit += min(int(have.get(name, 0.0) / amount + 1e-6) for name, amount in needs.items())
    return fit


def _amount(name: str, amount: float) -> str:
    """``2 GPUs``, ``1 CPU``, ``0.5 GPU``, ``1 of 'custom'``."""
    if name in ("CPU", "GPU"):
        return f"{amount:g} {name}{'s' if amount != 1 else ''}"
    return f"{amount:g} of {name!r}"


def _where_replicas_go(nodes: Sequence[Mapping[str, Any]], needs: Mapping[str, float]) -> str:
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    wanted = ", ".join(_amount(name, amount) for name, amount in needs.items())
    have = []
    for name in needs:
        amounts = [resources.get(name, 0.0) for resources in alive]
        have.append(f"{_amount(name, sum(amounts))} in all, at most {_amount(name, max(amounts, default=0.0))} "
                    "on one node")
    return f"each replica needs {wanted} on one node; the cluster's {len(alive)} node(s) have " + "; ".join(have)


def _replicas_to_start(replicas: int, gpus_per_replica: float, ray_options: Mapping[str, Any]) -> int:
    """``replicas``, or as many as the cluster's nodes can ever hold (with a warning);
    a clear error when they hold none, instead of Ray waiting for a node that will not
    come. Counts the nodes present: on a cluster whose autoscaler adds nodes on demand,
    ask for them first (see docs/distributed.md)."""
    needs = replica_needs(gpus_per_replica, ray_options)
    nodes = ray.nodes()
    fit = replicas_that_fit(nodes, needs)
    if fit is None or fit >= replicas:
        return replicas
    where = _where_replicas_go(nodes, needs)
    if fit == 0:
        # Named as the library and as the command line (llamarocm batch --ray) take it.
        hint = (" (a cluster without GPUs: gpus_per_replica=0, or --gpus-per-replica 0, runs on the CPU)"
                if "GPU" in needs else "")
        raise ServerStartError(f"no node of this Ray cluster can hold a replica: {where}{hint}")
    log.warning("only %d of the %d replicas fit on this Ray cluster: %s; starting %d", fit, replicas, where, fit)
    return fit
