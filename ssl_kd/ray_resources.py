"""What a Ray cluster must have before a stage starts its workers there, checked up front.

Ray waits for what it cannot schedule: an actor or a placement group that no node can hold stays
pending without end (Ray Train V2 gives up on a worker group after 60 s, then tries again, also
without end), so asking for more CPUs or GPUs than the cluster has would hang. Two checks turn
that into one line before any work starts:

- :func:`missing_resources` (pure): do ``count`` workers of so many CPUs and GPUs fit on the
  nodes at once? On an autoscaling cluster, against what its node types can grow to instead.
- :func:`check_shared_dir`: does every node see the output directory this driver writes (Ray
  Train's checkpoints, the rank-0 outputs)? Emulated nodes of one machine always do; real ones
  only through a shared mount, else the output belongs on an object store (``s3://``).

:func:`check_resources` and :func:`check_shared_dir` ask the cluster through
:mod:`ssl_kd.ray_cluster`; their decisions are plain functions a test calls without Ray.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ssl_kd import ray_cluster
from ssl_kd.errors import UserError

log = logging.getLogger(__name__)

_NAMES = {"CPU": ("CPU", "CPUs"), "GPU": ("GPU", "GPUs")}


@dataclass(frozen=True)
class Workers:
    """``count`` workers that must all run at once, each needing ``cpus`` CPUs and ``gpus`` GPUs
    on one node; ``what`` names the stage and ``lower`` the flags that ask for less."""

    what: str
    count: int
    cpus: float
    gpus: float
    lower: str

    def need(self) -> dict[str, float]:
        """Per worker: the resources it asks for (none listed at 0)."""
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}


def _amount(n: float, resource: str) -> str:
    one, many = _NAMES.get(resource, (resource, resource))
    value = int(n) if float(n).is_integer() else n
    return f"{value} {one if n == 1 else many}"


def _fits(node: Mapping[str, float], need: Mapping[str, float]) -> int:
    """How many workers of ``need`` one node of ``node``'s resources holds."""
    return min((int(node.get(k, 0) // v) for k, v in need.items()), default=math.inf)


def missing_resources(
    workers: Workers,
    nodes: Sequence[Mapping[str, float]],
    autoscaler_max: Mapping[str, float] | None = None,
) -> str | None:
    """None when ``workers`` fit on ``nodes`` (each node's total resources) all at once, else
    the one line saying what is missing. ``autoscaler_max``: an autoscaling cluster's limits,
    compared with instead of the nodes up now (nodes it will add are not known one by one)."""
    need = workers.need()
    if workers.count <= 0 or not need:
        return None
    asks = f"{workers.what} asks for {workers.count} worker(s) of " + " and ".join(
        _amount(v, k) for k, v in need.items()
    )
    for resource, each in need.items():
        wanted = each * workers.count
        if autoscaler_max is not None:
            most = autoscaler_max.get(resource, 0.0)
            if most < wanted:
                return (
                    f"{asks} but the autoscaling Ray cluster can grow to at most "
                    f"{_amount(most, resource)}: {workers.lower}, or raise its node types' "
                    "max_workers"
                )
            continue
        total = sum(n.get(resource, 0.0) for n in nodes)
        if total < wanted:
            has = f"{_amount(total, resource)} in total" if total else f"no {_NAMES[resource][0]}"
            return (
                f"{asks} but the Ray cluster has {has} ({len(nodes)} node(s)): "
                f"{workers.lower}, or add nodes"
            )
        largest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        if largest < each:
            return (
                f"{asks} but the largest Ray node has {_amount(largest, resource)}: "
                f"{workers.lower}, or add larger nodes"
            )
    if autoscaler_max is None:
        room = sum(_fits(n, need) for n in nodes)
        if room < workers.count:
            return (
                f"{asks} but the Ray nodes hold only {room} such worker(s) at once: "
                f"{workers.lower}, or add nodes"
            )
    return None


def check_resources(workers: Workers) -> None:
    """Raise a UserError when the Ray cluster (connected to first) cannot hold ``workers``."""
    nodes = [n["resources"] for n in ray_cluster.alive_nodes()]
    problem = missing_resources(workers, nodes, ray_cluster.autoscaler_max_resources())
    if problem:
        raise UserError(problem)


# Answers node ID → True (sees the probe), False (does not) or the exception the probe raised.
AskNodes = Callable[..., Mapping[str, Any]]


def _sees(path: str, token: str) -> bool:
    """On a node: whether ``path`` exists there and holds ``token``."""
    try:
        with open(path) as fh:
            return fh.read() == token
    except OSError:
        return False


TRAINING_WRITES = "Ray Train and rank 0 write there from every node"


def unshared_dir(
    out: str, answers: Mapping[str, Any], writers: str = TRAINING_WRITES
) -> str | None:
    """None unless a node looked and did not see the probe the driver wrote under ``out``;
    then the one line naming it (``writers`` says who writes there from the nodes). A node
    that could not look (it died, or did not answer in time) is only logged: nodes come and go,
    and Ray gives work to none that is gone."""
    for node, seen in sorted(answers.items()):
        if seen is True:
            continue
        if seen is not False:
            log.warning("Ray node %s could not look for %s: %s", node, out, _first_line(seen))
            continue
        return (
            f"--out {out} is a local directory and Ray node {node} does not see it: {writers}; "
            "use s3://BUCKET/PATH or a filesystem that every node mounts at the same path"
        )
    return None


def _first_line(exc: Any) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_shared_dir(
    out: str, writers: str = TRAINING_WRITES, ask_nodes: AskNodes | None = None
) -> None:
    """Raise a UserError unless every alive Ray node sees the local directory ``out``: the
    driver writes a probe file with a random token there and a task on each node reads it.
    Nodes that join later (an autoscaler's, a replacement) are not checked.

    ``ask_nodes(fn, *args)`` runs ``fn`` on each node (default: :func:`ray_cluster.on_every_node`,
    and nothing to check when the cluster is this node alone)."""
    if ask_nodes is None:
        if ray_cluster.only_this_node():
            return
        ask_nodes = ray_cluster.on_every_node
    token = secrets.token_hex(16)
    probe = os.path.join(out, f".ssl-kd-probe-{token[:8]}")
    with open(probe, "w") as fh:
        fh.write(token)
    try:
        answers = ask_nodes(_sees, probe, token)
    finally:
        os.remove(probe)
    log.debug("shared-directory probe of %s: %s", out, answers)
    if problem := unshared_dir(out, answers, writers):
        raise UserError(problem)
