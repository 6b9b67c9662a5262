"""Connecting to Ray, and asking the cluster about itself.

:func:`connect_ray` joins the cluster in ``RAY_ADDRESS`` (a refused token becomes one line) or
starts a one-machine Ray that listens on 127.0.0.1 only; the rest say what the cluster has: its
resources, its alive nodes, what an autoscaler may grow it to, and what a function finds when it
runs once on every node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ssl_kd.errors import UserError
from ssl_kd.ray_internals import autoscaler_limits, local_only

log = logging.getLogger(__name__)


def connect_ray() -> Any:
    """Connect to the cluster in ``RAY_ADDRESS`` when set, else start Ray in this process with
    every listener on 127.0.0.1 (:func:`_start_local_ray`)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            _start_local_ray(ray)
        elif _on_loopback(address):
            # A cluster whose nodes are 127.0.0.1 (`ray start --node-ip-address=127.0.0.1`):
            # Ray would swap 127.0.0.1 for this machine's address, where no node listens.
            with local_only():
                _join(ray, address)
        else:
            _join(ray, address)
    return ray


def _join(ray: Any, address: str) -> None:
    """``ray.init(address)``; a refused token becomes one UserError line.

    A token that is missing here fails at once (``AuthenticationError``); one the cluster refuses
    (wrong, or not sent because ``RAY_AUTH_MODE`` is not ``token``: an explicit address never
    turns token mode on) is retried by Ray about once a second, ``RAY_NUM_REDIS_GET_RETRIES``
    times (20 by default), then ends as a ``ConnectionError`` whose cause names Ray's
    ``InvalidAuthToken``. Either way the driver stops within about half a minute.
    """
    try:
        ray.init(address=address, log_to_driver=False)
    except (ray.exceptions.AuthenticationError, ConnectionError, RuntimeError) as exc:
        if not _refused_token(exc, ray.exceptions.AuthenticationError):
            raise
        mode = os.environ.get("RAY_AUTH_MODE", "")
        hint = "" if mode.lower() == "token" else f" (RAY_AUTH_MODE is '{mode}', not 'token')"
        raise UserError(
            f"the Ray cluster at {address} refused this driver: its authentication token is "
            f"missing or wrong{hint}; set RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
        ) from None


def _refused_token(exc: BaseException, auth_error: type[BaseException]) -> bool:
    """Whether ``exc`` or an exception it came from is Ray's refusal of a token."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        # Ray's connect loop keeps only the text of its last error (a traceback) in its own.
        if isinstance(cause, auth_error) or "InvalidAuthToken" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _on_loopback(address: str) -> bool:
    """Whether a ``RAY_ADDRESS`` (``host:port``, optionally ``ray://``) names this machine's
    loopback interface."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _start_local_ray(ray: Any) -> None:
    """A one-machine Ray in this process that listens on 127.0.0.1 only.

    Every Ray server binds to loopback when the node's IP is 127.0.0.1 and to all interfaces
    otherwise: the GCS, raylet and worker gRPC servers, the dashboard and runtime-env agents,
    the Prometheus ``/metrics`` servers of the agent, dashboard and autoscaler. The node IP
    is not a public argument: it is 127.0.0.1 in Ray's local-only mode
    (:func:`~ssl_kd.ray_internals.local_only`). Ray's token authentication (on by default for a
    cluster ``ray.init`` starts, ``RAY_AUTH_MODE``) guards its gRPC and agent HTTP servers.
    """
    with local_only():
        # "local", not None: with None, ray.init attaches to any cluster that `ray start`
        # left running on this machine (someone else's, or one about to be stopped).
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def cluster_resources() -> dict[str, float]:
    """The Ray cluster's resources (``CPU``, ``GPU``, ...), connecting first."""
    return dict(connect_ray().cluster_resources())


def alive_nodes() -> list[dict[str, Any]]:
    """Every alive node of the cluster as ``{"node_id", "address", "resources"}``, connecting
    first (``resources``: what the node has in total, ``CPU``, ``GPU``, ...)."""
    ray = connect_ray()
    return [
        {
            "node_id": n["NodeID"],
            "address": n.get("NodeManagerAddress", "?"),
            "resources": dict(n.get("Resources") or {}),
        }
        for n in ray.nodes()
        if n.get("Alive")
    ]


def only_this_node() -> bool:
    """Whether the cluster is this process's node alone (nothing another node could miss)."""
    ray = connect_ray()
    this = ray.get_runtime_context().get_node_id()
    return [n["node_id"] for n in alive_nodes()] == [this]


def on_every_node(fn: Callable[..., Any], *args: Any, timeout: float = 120) -> dict[str, Any]:
    """``fn(*args)`` once on each alive node, as a task that needs no CPU pinned there; node ID
    → its result, or the exception it raised (a node that did not answer within ``timeout``
    seconds: a ``TimeoutError``)."""
    ray = connect_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(fn)
    refs = {
        n["node_id"]: task.options(
            num_cpus=0,
            max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["node_id"], soft=False),
        ).remote(*args)
        for n in alive_nodes()
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    answers: dict[str, Any] = {}
    for node, ref in refs.items():
        if ref not in ready:
            ray.cancel(ref, force=True)
            answers[node] = TimeoutError(f"no answer in {timeout:.0f} s")
            continue
        try:
            answers[node] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            answers[node] = exc
    return answers


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource an autoscaling cluster may grow to (its node types' limits),
    or None when the cluster does not autoscale."""
    connect_ray()
    return autoscaler_limits()
