"""One rank's training run as a record (:class:`TrainRun`), and its resumable state: what a
checkpoint holds of it (:func:`checkpoint_state`) and how a restarted run takes it back
(:func:`resume`), so that a resumed run continues step for step as if it had never stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_kd import config as cfglib
from ssl_kd import storage
from ssl_kd.models.checkpoint import check_resumable, rank_states, rng_state, set_rng_state
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.consistency import Thresholds
from ssl_kd.train.context import RunContext
from ssl_kd.train.ema import WeightEMA
from ssl_kd.train.features import FeatureDistiller
from ssl_kd.train.inputs import Inputs
from ssl_kd.train.loop import LossFn, StreamState
from ssl_kd.train.options import Config
from ssl_kd.train.tensorboard import RunLog

log = logging.getLogger(__name__)


@dataclass
class TrainRun:
    """One rank's training: what the steps read, and the position they advance."""

    cfg: Config
    ctx: RunContext
    inputs: Inputs
    device: torch.device
    model: nn.Module
    meta: dict[str, Any]
    optimizer: torch.optim.Optimizer
    schedule: np.ndarray
    dataset: ShardImageDataset
    loss_fn: LossFn
    val_urls: list[str]
    metrics_log: RunLog | None  # rank 0's metrics.jsonl and TensorBoard files
    scaler: torch.amp.GradScaler | None  # fp16 only
    channels_last: bool
    loader_workers: int  # DataLoader worker processes (0: read in this process)
    labeled: ShardImageDataset | None = None  # joint training's true-labeled images
    distiller: FeatureDistiller | None = None  # feature distillation: model + projection
    pool: ShardImageDataset | None = None  # --ssl: the unlabeled pool
    thresholds: Thresholds | None = None  # --ssl: the pseudo-labels' confidence thresholds
    ema: WeightEMA | None = None  # the averaged weights the final checkpoint holds
    train_model: nn.Module | None = None  # DDP-wrapped after the resume
    step: int = 0
    start_step: int = 0
    stream: StreamState = field(default_factory=StreamState)
    labeled_stream: StreamState = field(default_factory=StreamState)
    pool_stream: StreamState = field(default_factory=StreamState)
    images_read: int = 0  # by this rank since the start or resume, pool images included

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches copy to a GPU asynchronously (``non_blocking``)."""
        return self.device.type == "cuda"

    @property
    def lead(self) -> bool:
        """Rank 0 writes the metrics, the final checkpoint and the summary."""
        return self.ctx.rank == 0


def resume(run: TrainRun) -> None:
    """Continue from the context's checkpoint, if any; then write config.yaml and wrap the model."""
    cfg, ctx = run.cfg, run.ctx
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        check_resumable(
            _saved_config(ckpt), cfglib.to_dict(cfg), cfglib.operational_keys(type(cfg)), cfg.out
        )
        run.model.load_state_dict(ckpt["model"])
        if run.distiller is not None and "projection" in ckpt:
            run.distiller.projection.load_state_dict(ckpt["projection"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.scaler is not None and "scaler" in ckpt:
            run.scaler.load_state_dict(ckpt["scaler"])
        if run.ema is not None:  # a finished run's checkpoint holds the averaged weights
            run.ema.load_state_dict(ckpt.get("ema") or {"model": ckpt["model"], "updates": 0})
        if run.thresholds is not None and "thresholds" in ckpt:
            run.thresholds.load_state_dict(ckpt["thresholds"])
        run.step = run.start_step = int(ckpt["step"])
        ranks = rank_states(ckpt)
        if len(ranks) == ctx.world_size:
            _resume_stream(run, ranks[ctx.rank])
            if run.labeled is not None and "labeled" in ranks[ctx.rank]:
                run.labeled_stream = _stream_state(ranks[ctx.rank]["labeled"])
            if run.pool is not None and "pool" in ranks[ctx.rank]:
                run.pool_stream = _stream_state(ranks[ctx.rank]["pool"])
        else:  # another number of ranks: the data order restarts, the weights carry on
            log.warning("resuming %d ranks from a %d-rank checkpoint", ctx.world_size, len(ranks))
        log.info("rank %d resuming %s from step %d", ctx.rank, cfg.out, run.step)
    if run.lead:  # after the check: a refused config does not overwrite the run's own
        cfglib.save(cfg, storage.join(cfg.out, "config.yaml"))
        if run.metrics_log:
            run.metrics_log.keep_until(run.step)
        if run.step >= cfg.steps and storage.is_file(storage.join(cfg.out, "summary.json")):
            run.metrics_log = None  # a finished run run again: its final evaluation is logged
    run.train_model = ctx.wrap_model(run.distiller or run.model)


def _saved_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config in today's form (a single mean and std were numbers)."""
    saved = dict(ckpt["meta"]["config"])
    for key in ("mean", "std"):
        if isinstance(saved.get(key), (int, float)):
            saved[key] = [float(saved[key])]
    return saved


def _resume_stream(run: TrainRun, mine: dict[str, Any]) -> None:
    """This rank's batch stream and RNG as checkpointed; ``num_workers: auto`` takes the
    checkpoint's number of loader workers, the one number that replays the stream exactly."""
    worker_seen = mine.get("worker_seen", [])
    if run.cfg.num_workers == "auto" and len(worker_seen) != run.loader_workers:
        log.info("num_workers auto: %d, as the run started with", len(worker_seen))
        run.loader_workers = len(worker_seen)
    run.stream = _stream_state(mine)
    set_rng_state(mine["rng"])


def _stream_state(saved: dict[str, Any]) -> StreamState:
    worker_seen = [int(n) for n in saved.get("worker_seen", [])]
    epoch, seen, turn = int(saved["epoch"]), int(saved["seen_in_epoch"]), int(saved.get("turn", 0))
    return StreamState(epoch, seen, worker_seen, turn)


def checkpoint_state(run: TrainRun) -> dict[str, Any]:
    """The resumable state; collective (gathers every rank's stream): all ranks call it."""
    mine = {**_stream_dict(run.stream), "rng": rng_state()}
    if run.labeled is not None:
        mine["labeled"] = _stream_dict(run.labeled_stream)
    if run.pool is not None:
        mine["pool"] = _stream_dict(run.pool_stream)
    model = run.model.state_dict()
    if run.ema is not None and run.step >= run.cfg.steps:  # the final weights are the average
        model = run.ema.model.state_dict()
    state = {
        "model": model,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"kind": run.cfg.schedule, "step": run.step},
        "step": run.step,
        "ranks": run.ctx.gather(mine),
        "meta": run.meta,
    }
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    if run.distiller is not None:
        state["projection"] = run.distiller.projection.state_dict()
    if run.ema is not None and run.step < run.cfg.steps:
        state["ema"] = run.ema.state_dict()
    if run.thresholds is not None:
        state["thresholds"] = run.thresholds.state_dict()
    return state


def _stream_dict(stream: StreamState) -> dict[str, Any]:
    return {
        "epoch": stream.epoch,
        "seen_in_epoch": stream.seen_in_epoch,
        "worker_seen": list(stream.worker_seen),  # one count per loader worker
        "turn": stream.turn,
    }
