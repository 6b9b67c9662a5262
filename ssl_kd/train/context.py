"""Where a training loop runs: rank, devices, checkpoints and progress, local or distributed.

The student loop talks only to a :class:`RunContext`; :class:`LocalContext` is one process
checkpointing to ``out/checkpoint.pt``, and ``ssl_kd.train.ray_trainer.RayContext`` a Ray Train
worker.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ssl_kd import storage
from ssl_kd.device import resolve_device
from ssl_kd.models.checkpoint import load_checkpoint, save_checkpoint


class RunContext(Protocol):
    """What a training loop needs to know about where it runs."""

    rank: int
    world_size: int

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

    def __init__(self, out: str) -> None:
        self.path = storage.join(out, "checkpoint.pt")

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
        return tqdm(total=total, initial=initial, unit="step", desc="train", disable=not enabled,
                    mininterval=1)  # fmt: skip
