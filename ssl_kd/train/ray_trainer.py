"""The student trainer on Ray Train (V2): ``TorchTrainer`` with DDP over the workers.

Checkpoints go through ``ray.train.report`` into ``out/ray/train``; a worker-group failure is
restarted up to ``max_failures`` times from the latest one, and rerunning the same command (same
``RunConfig(name, storage_path)``) resumes from it too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"


class RayContext:
    """A Ray Train worker: its rank, device, DDP wrapping and checkpoint reporting."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

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
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=total, desc="train", unit="step")
        bar.update(initial)
        return _RayBar(bar)


class _RayBar:
    """Ray's driver-drawn bar has no ``set_postfix``: the figures go into its description."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **kwargs: Any) -> None:
        self.bar.set_description("train " + " ".join(f"{k}={v}" for k, v in kwargs.items()))

    def close(self) -> None:
        self.bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _worker_loop(config: dict[str, Any]) -> None:
    from ssl_kd.train.student import train_worker

    train_worker(config["cfg"], RayContext(), config["progress"])


def fit(cfg: Any, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` (a StudentConfig) on ``cfg.workers`` Ray Train workers; rank 0's summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ssl_kd.executor import connect_ray

    connect_ray()
    # Ray Train opens an s3:// storage path with pyarrow itself; a local one must be absolute.
    out = cfg.out if storage.is_remote(cfg.out) else str(Path(cfg.out).resolve())
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "progress": progress},
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
