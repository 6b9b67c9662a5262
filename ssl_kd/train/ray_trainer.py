"""A training loop on Ray Train (V2): ``TorchTrainer`` with DDP over ``cfg.workers`` workers.

:func:`fit` runs any loop ``loop(cfg, ctx, progress)`` on every worker with a
:class:`~ssl_kd.train.context.RayContext`. Checkpoints go through ``ray.train.report`` into
``out/ray/train``; a worker-group failure is restarted up to ``max_failures`` times from the
latest one, and rerunning the same command (same ``RunConfig(name, storage_path)``) resumes from
it too.

On a Ray that listens on 127.0.0.1 only (the one :func:`~ssl_kd.executor.connect_ray` starts)
the workers' process group keeps to loopback as well (:class:`_LoopbackTorchConfig`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
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
    ``cfg`` needs ``out``, ``workers``, ``use_gpu`` and ``max_failures``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ssl_kd.executor import connect_ray

    connect_ray()
    # Ray Train opens an s3:// storage path with pyarrow itself; a local one must be absolute.
    out = cfg.out if storage.is_remote(cfg.out) else str(Path(cfg.out).resolve())
    # A Ray whose node is 127.0.0.1 has no other node: its workers can meet on loopback.
    local = ray.util.get_node_ip_address() == "127.0.0.1"
    backend = "nccl" if cfg.use_gpu else "gloo"
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"loop": loop, "cfg": cfg, "progress": progress},
        torch_config=_LoopbackTorchConfig(backend=backend) if local else None,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name="train",
            storage_path=storage.join(out, "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error; its first line says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"training failed after {cfg.max_failures} restarts: {first}") from exc
    summary_path = storage.join(out, "summary.json")
    if not storage.is_file(summary_path):
        raise UserError(f"training ended without writing {summary_path}")
    return json.loads(storage.read_text(summary_path))
