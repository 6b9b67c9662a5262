"""A training loop on Ray Train (V2): ``TorchTrainer`` with DDP over ``cfg.workers`` workers.

:func:`fit` runs any loop ``loop(cfg, ctx, progress)`` on every worker with a
:class:`~ssl_kd.train.context.RayContext`. Checkpoints go through ``ray.train.report`` into
``out/ray/train``; a worker-group failure is restarted up to ``max_failures`` times from the
latest one, and rerunning the same command (same ``RunConfig(name, storage_path)``) resumes from
it too.

Before any worker starts, :func:`check_cluster` refuses in one line a request the cluster cannot
hold and a local ``out`` some node cannot see (:mod:`ssl_kd.ray_resources`). A start or restart
of the workers waits at most ``start_timeout`` seconds for room (Ray Train's own default: 60 s,
retried without end), and a rank waits at most ``dist_timeout`` seconds in a collective for a
stuck peer (torch's default: 30 minutes).

On a Ray that listens on 127.0.0.1 only (the one :func:`~ssl_kd.ray_cluster.connect_ray` starts)
the workers' process group keeps to loopback as well (:class:`_LoopbackTorchConfig`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.train.context import RayContext

Loop = Callable[[Any, Any, bool], dict[str, Any]]

_listener: socket.socket | None = None  # rank 0's, from _listen_on_loopback to _join_group
_SHUTDOWN_TIMEOUT_S = 30  # as Ray's torch backend (TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)


def _listen_on_loopback() -> int:
    """On rank 0: a socket listening on 127.0.0.1 for the process group's store; its port."""
    global _listener
    _listener = socket.create_server(("127.0.0.1", 0))
    return _listener.getsockname()[1]


def _join_group(config: TorchConfig, rank: int, world_size: int, port: int) -> None:
    """Join the process group through the TCPStore that rank 0 serves on 127.0.0.1:port."""
    import torch.distributed as dist

    # gloo and NCCL listen on the address the host name resolves to, or the first interface
    # that is not loopback; all ranks are on this machine.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=config.timeout_s)
    # A store that torch binds itself (env://, tcp://) listens on every interface whatever the
    # host; one given a bound socket (master_listen_fd) serves on that socket.
    fd = _listener.detach() if rank == 0 and _listener is not None else None
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout, master_listen_fd=fd)
    dist.init_process_group(
        config.backend, store=store, rank=rank, world_size=world_size, timeout=timeout
    )


def _set_torch_env_vars() -> None:
    """The variables ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ...), from Ray Train's context,
    for libraries that read them."""
    from ray.train.torch import get_device

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(ctx.get_local_world_size())
    os.environ["NODE_RANK"] = str(ctx.get_node_rank())
    os.environ["RANK"] = str(ctx.get_world_rank())
    os.environ["WORLD_SIZE"] = str(ctx.get_world_size())
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(get_device())


def _leave_group(destroy: bool) -> None:
    """Leave the process group (when there is one to leave) and free cached GPU memory."""
    import torch
    import torch.distributed as dist

    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _LoopbackTorchBackend(Backend):
    """A torch backend (Ray's public ``Backend`` hooks) whose rendezvous is on 127.0.0.1; it
    does what Ray's own does for gloo and NCCL, with the store on loopback."""

    # As Ray's torch backend: GPU workers on one node see each other's GPUs (NCCL peer access).
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        port = worker_group.execute_single(0, _listen_on_loopback)
        n = len(worker_group)
        join = worker_group.execute_single_async
        ray.get([join(i, _join_group, backend_config, i, n, port) for i in range(n)])

    def on_training_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        # Ray Train's context exists from here on in both worker-group versions.
        worker_group.execute(_set_torch_env_vars)

    def on_shutdown(self, worker_group: Any, backend_config: TorchConfig) -> None:
        leave = worker_group.execute_async(_leave_group, len(worker_group) > 1)
        # On a timeout the workers are stopped next in any case.
        with contextlib.suppress(ray.exceptions.GetTimeoutError):
            ray.get(leave, timeout=_SHUTDOWN_TIMEOUT_S)


@dataclass
class _LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group meets on 127.0.0.1: for a Ray on this machine only."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend


def _worker_loop(config: dict[str, Any]) -> None:
    config["loop"](config["cfg"], RayContext(), config["progress"])


def fit(loop: Loop, cfg: Any, progress: bool = True) -> dict[str, Any]:
    """Run ``loop`` on ``cfg.workers`` Ray Train workers; returns the summary.json it wrote.

    ``loop`` travels to the workers pickled: pass a module-level function (pickled by name).
    ``cfg`` needs ``out``, ``workers``, ``use_gpu``, ``max_failures``, ``start_timeout`` and
    ``dist_timeout``.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ssl_kd.ray_cluster import connect_ray

    connect_ray()
    # Ray Train opens an s3:// storage path with pyarrow itself; a local one must be absolute.
    out = cfg.out if storage.is_remote(cfg.out) else str(Path(cfg.out).resolve())
    check_cluster(cfg, out)
    # A Ray whose node is 127.0.0.1 has no other node: its workers can meet on loopback.
    local = ray.util.get_node_ip_address() == "127.0.0.1"
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"loop": loop, "cfg": cfg, "progress": progress},
        torch_config=_torch_config(cfg, local),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name="train",
            storage_path=storage.join(out, "ray"),
            failure_config=_failure_config(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        with _start_timeout(cfg.start_timeout):
            trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error; its first line says what failed
        raise UserError(_failure_line(cfg, exc)) from exc
    summary_path = storage.join(out, "summary.json")
    if not storage.is_file(summary_path):
        raise UserError(f"training ended without writing {summary_path}")
    return json.loads(storage.read_text(summary_path))


def check_cluster(cfg: Any, out: str) -> None:
    """Before any worker starts: the cluster can hold every worker at once, and a local ``out``
    is seen by every node (:mod:`ssl_kd.ray_resources`); else one line says what is missing."""
    from ssl_kd.ray_resources import Workers, check_resources, check_shared_dir

    lower = "lower --workers or drop --use-gpu" if cfg.use_gpu else "lower --workers"
    gpus = 1 if cfg.use_gpu else 0  # Ray Train's default worker: one GPU, else one CPU
    check_resources(Workers("training", cfg.workers, 1 - gpus, gpus, lower))
    if not storage.is_remote(out):
        check_shared_dir(out)


def _torch_config(cfg: Any, local: bool) -> TorchConfig:
    """The process group: gloo or NCCL, meeting on loopback on a one-machine Ray, with a
    collective timeout of ``cfg.dist_timeout`` (torch's default is 30 minutes)."""
    backend = "nccl" if cfg.use_gpu else "gloo"
    config_cls = _LoopbackTorchConfig if local else TorchConfig
    return config_cls(backend=backend, timeout_s=int(cfg.dist_timeout))


def _failure_config(cfg: Any) -> Any:
    """``max_failures`` restarts after worker failures, and as many after a start of the
    workers that failed or found no room (Ray's default retries those without end)."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=cfg.max_failures)


# Ray Train V2 reads it in the driver and hands it to its controller (ENV_VARS_TO_PROPAGATE).
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextmanager
def _start_timeout(seconds: float) -> Iterator[None]:
    """How long one start of the worker group waits for its placement group, for this fit."""
    before = os.environ.get(_START_TIMEOUT_ENV)
    os.environ[_START_TIMEOUT_ENV] = str(seconds)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_START_TIMEOUT_ENV, None)
        else:
            os.environ[_START_TIMEOUT_ENV] = before


def _failure_line(cfg: Any, exc: BaseException) -> str:
    """The one line of a failed fit: no room for the workers (a node lost and not replaced),
    or the first line of the worker's error."""
    cause = getattr(exc, "controller_failure", None)
    if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
        what = f"{cfg.workers} worker(s) of 1 {'GPU' if cfg.use_gpu else 'CPU'}"
        return (
            f"training stopped: the Ray cluster had no room for {what} within "
            f"--start-timeout {cfg.start_timeout:g} s, {cfg.max_failures + 1} time(s) (a node "
            "lost and not replaced?); add nodes or lower --workers, then rerun the same command "
            "to resume from the last checkpoint"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"training failed after {cfg.max_failures} restarts: {first}"
