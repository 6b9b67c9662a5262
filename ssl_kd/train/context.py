"""Where a training loop runs: rank, devices, checkpoints and progress, local or distributed.

The loop (:mod:`ssl_kd.train.worker`) talks only to a :class:`RunContext`: :class:`LocalContext`
is one process checkpointing to ``out/checkpoint.pt``, :class:`RayContext` a Ray Train worker
reporting its checkpoints through ``ray.train.report``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ssl_kd import storage
from ssl_kd.device import resolve_device
from ssl_kd.models.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"


class RunContext(Protocol):
    """What a training loop needs to know about where it runs."""

    rank: int
    world_size: int
    local_world_size: int  # ranks on this machine, sharing its CPUs

    def device(self, requested: str) -> torch.device: ...

    def wrap_model(self, model: nn.Module) -> nn.Module: ...

    def load_checkpoint(self) -> dict[str, Any] | None: ...

    def save_checkpoint(self, ckpt: dict[str, Any], metrics: dict[str, Any]) -> None: ...

    def gather(self, obj: Any) -> list[Any]: ...

    def progress(self, total: int, initial: int, enabled: bool) -> Any: ...


class LocalContext:
    """One process, rank 0 of 1; resumable state in ``out/checkpoint.pt``."""

    rank = 0
    world_size = 1
    local_world_size = 1

    def __init__(self, out: str) -> None:
        self.path = storage.join(out, CHECKPOINT_FILE)

    def device(self, requested: str) -> torch.device:
        """The device asked for (``auto``: CUDA when present)."""
        return resolve_device(requested)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The model itself (no DDP with one rank)."""
        return model

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint of this output directory, if any."""
        return load_checkpoint(self.path) if storage.is_file(self.path) else None

    def save_checkpoint(self, ckpt: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Write atomically over the previous one."""
        save_checkpoint(self.path, ckpt)

    def gather(self, obj: Any) -> list[Any]:
        """``[obj]``: every rank's value, with one rank."""
        return [obj]

    def progress(self, total: int, initial: int, enabled: bool) -> Any:
        """A tqdm bar over steps."""
        return tqdm(
            total=total,
            initial=initial,
            unit="step",
            desc="train",
            disable=not enabled,
            mininterval=1,
        )


class RayContext:
    """A Ray Train worker: its rank, device, DDP wrapping and checkpoint reporting."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_world_size = ctx.get_local_world_size()

    def device(self, requested: str) -> torch.device:
        """The device Ray Train assigned to this worker."""
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """DDP across the workers (no-op with one)."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The latest reported checkpoint of this run (after a restart or a rerun), if any."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_checkpoint(Path(d) / CHECKPOINT_FILE)

    def save_checkpoint(self, ckpt: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Every rank reports; rank 0 attaches the checkpoint (all ranks hold the same weights)."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(Path(d) / CHECKPOINT_FILE, ckpt)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def progress(self, total: int, initial: int, enabled: bool) -> Any:
        """A bar the Ray driver draws (rank 0 only)."""
        if not enabled:
            return _NoBar()
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        bar = ray_tqdm(total=total, desc="train", unit="step")
        bar.update(initial)
        return _RayBar(bar)


class _RayBar:
    """Ray's driver-drawn bar has no ``set_postfix``: the figures go into its description."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.bar.update(n)

    def set_postfix(self, **kwargs: Any) -> None:
        """Show ``key=value`` figures after the bar's name."""
        self.bar.set_description("train " + " ".join(f"{k}={v}" for k, v in kwargs.items()))

    def write(self, text: str) -> None:
        """Print a line (the driver shows a worker's stdout)."""
        print(text, flush=True)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


class _NoBar:
    """No bar; lines written still print, as ``tqdm.write`` does with a disabled bar."""

    def update(self, n: int = 1) -> None:
        """Nothing to advance."""

    def set_postfix(self, **kwargs: Any) -> None:
        """Nothing to show."""

    def write(self, text: str) -> None:
        """Print a line."""
        print(text, flush=True)

    def close(self) -> None:
        """Nothing to remove."""
