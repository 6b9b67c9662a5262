"""Several Ray nodes on this machine: the test bed of work spread over nodes and nodes lost.

A head with 0 CPUs that only drives (it also serves the Jobs API and the state API) and 1-CPU
worker nodes, each with its own raylet, object store and workers, all on 127.0.0.1, as Ray's
own tests do (``ray.cluster_utils.Cluster``). A stage runs against it as a user's would: a
subprocess with ``RAY_ADDRESS`` set (:attr:`RayNodes.env`). Token authentication is on, with a
token that lives in the environment only. ``kill`` is a hard node loss: every process of that
node is SIGKILLed. Only the nodes this fixture started are ever stopped.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

# One token per test session: Ray's in-process clients read it once.
TOKEN = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    """A head (0 CPUs) and worker nodes on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        workers: int = 2,
        object_store_memory: int = 150 * 1024**2,
        temp_dir: str | None = None,
        env: dict[str, str | None] | None = None,
        **node: Any,
    ):
        """``env``: more variables for the nodes this process starts (None removes one)."""
        from ray.cluster_utils import Cluster

        # Token authentication with this session's token, in this process's environment while
        # the nodes live (the nodes it starts inherit it); restored by shutdown().
        changes = {**_ENV, **(env or {})}
        self._saved = {key: os.environ.get(key) for key in changes}
        _set_env(changes)
        try:
            self._node = {
                "node_ip_address": "127.0.0.1",
                "object_store_memory": object_store_memory,
            }
            self.dashboard_port = free_port()
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    **self._node,
                    "num_cpus": 0,
                    "include_dashboard": True,
                    "dashboard_host": "127.0.0.1",
                    "dashboard_port": self.dashboard_port,
                    # Ray's default (52365) is taken whenever another Ray runs on this machine.
                    "dashboard_agent_listen_port": free_port(),
                    # Ray's own directory (the worker nodes take the head's) instead of /tmp/ray.
                    **({"temp_dir": temp_dir} if temp_dir else {}),
                },
            )
            if temp_dir:
                # A job's driver is told the cluster that `temp_dir/ray_current_cluster` names
                # (Ray's job supervisor, "auto"); in /tmp/ray any Ray started later on this
                # machine overwrites it, and a job of this cluster then joins that one.
                from ray._private.utils import write_ray_address

                write_ray_address(self.cluster.address, temp_dir)
            self.workers: list[Any] = []
            for _ in range(workers):
                self.add(**node)
            self.cluster.wait_for_nodes()
        except BaseException:
            if hasattr(self, "cluster"):
                self.cluster.shutdown()
            self._restore()
            raise

    @property
    def address(self) -> str:
        """The GCS address, ``127.0.0.1:PORT``: what ``RAY_ADDRESS`` holds."""
        return self.cluster.address

    @property
    def jobs_address(self) -> str:
        """The Jobs API (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that runs against these nodes, as a user's shell."""
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "RAY_ADDRESS": self.address, "PATH": path}

    def add(self, num_cpus: int = 1, **node: Any) -> Any:
        """A new worker node (``num_gpus=1`` gives it a logical GPU); returns it."""
        worker = self.cluster.add_node(**{**self._node, "num_cpus": num_cpus, **node})
        self.workers.append(worker)
        return worker

    def kill(self, worker: Any) -> None:
        """A hard loss of ``worker``: all its processes are SIGKILLed, nothing shuts down."""
        self.workers.remove(worker)
        self.cluster.remove_node(worker, allow_graceful=False)

    def node_id(self, worker: Any) -> str:
        return worker.node_id

    def shutdown(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            self._restore()

    def _restore(self) -> None:
        _set_env(self._saved)


# The test bed's environment: token authentication with this session's token.
_ENV: dict[str, str | None] = {
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": TOKEN,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ADDRESS": None,
}


def _set_env(changes: dict[str, str | None]) -> None:
    """Set (None: remove) variables, then make this process's Ray read its auth mode and token
    again: it reads them once (when ``ray._raylet`` is first imported, and when a client first
    needs the token), so without this the nodes get the mode of whatever imported Ray first,
    and a later test's own Ray (whose token is ~/.ray/auth_token) is sent this one. Ray's own
    tests do the same."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    reset_auth_token_state()


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``predicate()`` until it returns something true; its value. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
