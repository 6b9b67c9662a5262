"""A training loop on Ray Train (V2): ``TorchTrainer`` with DDP over ``cfg.workers`` workers.

:func:`fit` runs any loop ``loop(cfg, ctx, progress)`` on every worker with a
:class:`~ssl_kd.train.context.RayContext`. Checkpoints go through ``ray.train.report`` into
``out/ray/train``; a worker-group failure is restarted up to ``max_failures`` times from the
latest one, and rerunning the same command (same ``RunConfig(name, storage_path)``) resumes from
it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.train.context import RayContext

Loop = Callable[[Any, Any, bool], dict[str, Any]]


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
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"loop": loop, "cfg": cfg, "progress": progress},
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
