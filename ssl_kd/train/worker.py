"""The training loop of ``ssl-kd train``, ``pretrain`` and ``finetune``, on one rank.

:func:`train_worker` runs on every rank. It streams its own share of the shards endlessly,
epoch after epoch, and stops after exactly ``steps`` steps, so every rank takes the same number
of steps and DDP never waits on a rank that ran out of data: the budget is steps, not epochs.
Where it runs is a :class:`~ssl_kd.train.context.RunContext`: in-process (one rank), or a Ray
Train worker (``TorchTrainer``, DDP over gloo on CPU or NCCL on GPU).

The teacher and the baseline (:class:`~ssl_kd.train.options.TrainConfig`) are this loop with the
hard loss, no init checkpoint and no RandAugment; the configs differ only in their keys and in
how a rank seeds its augmentation and data order (``cfg.stream_seeds``).

The augmentation recipes and the input format are :mod:`ssl_kd.train.recipes`'s.

Outputs in ``out``: ``config.yaml``, ``metrics.jsonl`` (rank 0), ``checkpoint.pt`` (the final
weights, loadable like every checkpoint here) and ``summary.json``. Resumable state (optimizer,
step, per-rank stream positions and RNG states; see :mod:`ssl_kd.models.checkpoint`) is
checkpointed every ``ckpt_every`` steps: to ``out/checkpoint.pt`` locally, through
``ray.train.report`` under ``out/ray`` on Ray, where ``FailureConfig(max_failures)`` restarts
resume from it and rerunning the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.device import grad_scaler, use_channels_last
from ssl_kd.evaluate.metrics import eval_loader, evaluate
from ssl_kd.models.checkpoint import (
    check_resumable,
    load_checkpoint,
    make_meta,
    model_from_checkpoint,
    rank_states,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ssl_kd.models.preprocess import (
    augment,
    normalize,
)
from ssl_kd.models.registry import create_model
from ssl_kd.shards import expand_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.context import RunContext
from ssl_kd.train.features import FeatureDistiller, with_feature_loss
from ssl_kd.train.inputs import Inputs, read_inputs
from ssl_kd.train.loop import LossFn, MetricsLog, StreamState, stream_batches, train_step
from ssl_kd.train.losses import joint_loss, student_loss
from ssl_kd.train.optim import build_optimizer
from ssl_kd.train.options import Config, joint_split
from ssl_kd.train.recipes import image_transform, loader_workers
from ssl_kd.train.schedule import lr_schedule

log = logging.getLogger(__name__)


# Fault injection for the restart tests: "PATH:STEP" fails once at STEP, leaving PATH behind.
FAIL_ONCE_ENV = "SSL_KD_FAIL_ONCE"


@dataclass
class _Run:
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
    metrics_log: MetricsLog | None
    scaler: torch.amp.GradScaler | None  # fp16 only
    channels_last: bool
    loader_workers: int  # DataLoader worker processes (0: read in this process)
    labeled: ShardImageDataset | None = None  # joint training's true-labeled images
    distiller: FeatureDistiller | None = None  # feature distillation: model + projection
    train_model: nn.Module | None = None  # DDP-wrapped after the resume
    step: int = 0
    start_step: int = 0
    stream: StreamState = field(default_factory=StreamState)
    labeled_stream: StreamState = field(default_factory=StreamState)

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches copy to a GPU asynchronously (``non_blocking``)."""
        return self.device.type == "cuda"

    @property
    def lead(self) -> bool:
        """Rank 0 writes the metrics, the final checkpoint and the summary."""
        return self.ctx.rank == 0


def train_worker(cfg: Config, ctx: RunContext, progress: bool = True) -> dict[str, Any]:
    """The training loop of one rank; rank 0 returns the summary, the others an empty dict."""
    run = _setup(cfg, ctx)
    _resume(run)
    seconds = _train_steps(run, progress)
    return _finish(run, seconds)


def _setup(cfg: Config, ctx: RunContext) -> _Run:
    """Model, optimizer, schedule, data and loss, seeded as ``cfg.stream_seeds`` says."""
    inputs = read_inputs(cfg)
    device = ctx.device(cfg.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    random.seed(cfg.seed)
    model, meta = _build_model(cfg, inputs)
    model.to(device)  # before the optimizer, so resumed optimizer state lands on the device
    channels_last = use_channels_last(device, cfg.precision, inputs.pp.image_size)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    distiller = None
    if inputs.embedding_dim:  # the projection trains with the student, on the same device
        distiller = FeatureDistiller(model, inputs.embedding_dim).to(device)
    trained = distiller or model
    optimizer = build_optimizer(trained, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    schedule = lr_schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps)
    augment_seed, data_seed = cfg.stream_seeds(ctx.rank)
    if augment_seed is not None:  # a resume restores the stream from the checkpoint
        torch.manual_seed(augment_seed)
    loss_fn = student_loss(
        cfg.loss,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        label_smoothing=cfg.label_smoothing,
        label_temperature=inputs.label_temperature,
        sample_weights=inputs.sample_weights,
    )
    n_labeled = joint_split(cfg)[1]
    if n_labeled:
        loss_fn = joint_loss(loss_fn, n_labeled, cfg.label_smoothing)
    if distiller is not None:
        loss_fn = with_feature_loss(loss_fn, cfg.feature_loss, cfg.feature_weight)
    metrics = MetricsLog(storage.join(cfg.out, "metrics.jsonl")) if ctx.rank == 0 else None
    val_urls = expand_shards(cfg.val_data) if cfg.val_data else []
    dataset = _dataset(cfg, inputs, ctx, data_seed)
    workers = loader_workers(
        cfg.num_workers, inputs.recipe, len(dataset.urls), ctx.local_world_size
    )
    labeled = None
    if inputs.labeled_urls:  # its own order and crops: another seed than the pseudo stream's
        labeled = _dataset(cfg, inputs, ctx, data_seed + 1, inputs.labeled_urls)
    return _Run(
        cfg,
        ctx,
        inputs,
        device,
        model,
        meta,
        optimizer,
        schedule,
        dataset,
        loss_fn,
        val_urls,
        metrics,
        grad_scaler(device, cfg.precision),
        channels_last,
        workers,
        labeled,
        distiller,
    )


def _build_model(cfg: Config, inputs: Inputs) -> tuple[nn.Module, dict[str, Any]]:
    if cfg.init:
        model, meta = model_from_checkpoint(load_checkpoint(cfg.init))
        if cfg.fresh_head:
            model.head = nn.Linear(model.feature_dim, len(inputs.classes))
        arch, width, dropout = meta["arch"], meta["width"], meta.get("dropout", 0.0)
    else:
        arch, width, dropout = cfg.arch, cfg.width, cfg.dropout
        pp, n = inputs.pp, len(inputs.classes)
        model = create_model(
            arch, n, pp.channels, pp.image_size, width, dropout, cfg.weights, cfg.stochastic_depth
        )
    meta = make_meta(arch, width, dropout, inputs.classes, inputs.pp, cfglib.to_dict(cfg))
    return model, meta


def _dataset(
    cfg: Config, inputs: Inputs, ctx: RunContext, seed: int, labeled: list[str] | None = None
) -> ShardImageDataset:
    """This rank's training images: the config's shards, or joint training's ``labeled`` ones
    (true labels only)."""
    urls = labeled or inputs.urls
    # Fewer shards than ranks: every rank reads all shards and keeps every world-th sample.
    split_shards = len(urls) >= ctx.world_size
    return ShardImageDataset(
        urls[ctx.rank :: ctx.world_size] if split_shards else urls,
        image_transform(cfg, inputs.pp, inputs.recipe),
        inputs.pp.channels,
        num_classes=len(inputs.classes),
        shuffle_buffer=cfg.shuffle_buffer,
        seed=seed,
        soft_k=0 if labeled else inputs.soft_k,
        embedding_dim=0 if labeled else inputs.embedding_dim,
        part=(0, 1) if split_shards else (ctx.rank, ctx.world_size),
        max_pixels=cfg.max_pixels,
        decode_size=inputs.pp.resize_to,
        # Loader workers seed each image's crop by its place in their stream, per rank.
        sample_seed=cfg.seed * 1_000_003 + ctx.rank + (500_009 if labeled else 0),
        weights=inputs.sample_weights and not labeled,  # true labels carry no weight
    )


def _resume(run: _Run) -> None:
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
        run.step = run.start_step = int(ckpt["step"])
        ranks = rank_states(ckpt)
        if len(ranks) == ctx.world_size:
            _resume_stream(run, ranks[ctx.rank])
            if run.labeled is not None and "labeled" in ranks[ctx.rank]:
                run.labeled_stream = _stream_state(ranks[ctx.rank]["labeled"])
        else:  # another number of ranks: the data order restarts, the weights carry on
            log.warning("resuming %d ranks from a %d-rank checkpoint", ctx.world_size, len(ranks))
        log.info("rank %d resuming %s from step %d", ctx.rank, cfg.out, run.step)
    if run.lead:  # after the check: a refused config does not overwrite the run's own
        cfglib.save(cfg, storage.join(cfg.out, "config.yaml"))
        if run.metrics_log:
            run.metrics_log.keep_until(run.step)
    run.train_model = ctx.wrap_model(run.distiller or run.model)


def _saved_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config in today's form (a single mean and std were numbers)."""
    saved = dict(ckpt["meta"]["config"])
    for key in ("mean", "std"):
        if isinstance(saved.get(key), (int, float)):
            saved[key] = [float(saved[key])]
    return saved


def _resume_stream(run: _Run, mine: dict[str, Any]) -> None:
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


def _train_steps(run: _Run, progress: bool) -> float:
    """Step until ``cfg.steps``, logging, evaluating and checkpointing; returns the seconds."""
    cfg, pp = run.cfg, run.inputs.pp
    assert run.train_model is not None
    t0 = time.perf_counter()
    window: list[dict[str, float]] = []
    bar = run.ctx.progress(cfg.steps, run.step, enabled=progress and run.lead)
    n_pseudo, n_labeled = joint_split(cfg)
    batches = stream_batches(run.dataset, n_pseudo, run.stream, run.loader_workers, run.pin_memory)
    labeled = None
    if run.labeled is not None:
        labeled = stream_batches(
            run.labeled, n_labeled, run.labeled_stream, run.loader_workers, run.pin_memory
        )
    while run.step < cfg.steps:
        images, labels = next(batches)
        targets = _targets(labels, run.device, run.pin_memory)
        if labeled is not None:  # joint training: true-labeled images last in the batch
            true_images, true_labels = next(labeled)
            images = torch.cat([images, true_images])
            targets["true_label"] = true_labels.to(run.device, non_blocking=run.pin_memory)
        parts = train_step(
            run.train_model,
            normalize(_augment(run, images), pp),
            targets,
            run.optimizer,
            run.schedule[run.step],
            run.loss_fn,
            precision=cfg.precision,
            scaler=run.scaler,
        )
        run.step += 1
        window.append(parts)
        bar.update(1)
        _maybe_fail(run.step)
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            _log_window(run, window, time.perf_counter() - t0, bar)
            window.clear()
        _evaluate_and_checkpoint(run, bar)
    batches.close()  # stops the loader workers now, not whenever the generator is collected
    if labeled is not None:
        labeled.close()
    bar.close()
    return time.perf_counter() - t0


def _augment(run: _Run, images: torch.Tensor) -> torch.Tensor:
    """The batch part of the recipe, on the training device: the small recipe's padded crops
    and flips, the real one's flips (its crops were taken per image)."""
    images = images.to(run.device, non_blocking=run.pin_memory)
    padding = run.cfg.crop_padding if run.inputs.recipe == "small" else 0
    images = augment(images, padding, run.cfg.flip)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _targets(labels: Any, device: torch.device, non_blocking: bool) -> dict[str, torch.Tensor]:
    """The loss's targets on ``device``: a batch of class ids, or the dict a pseudo-labeled
    batch carries (soft label, stored embedding)."""
    if isinstance(labels, dict):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in labels.items()}
    return {"label": labels.to(device, non_blocking=non_blocking)}


def _maybe_fail(step: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    path, at = spec.rsplit(":", 1)
    if step == int(at) and not os.path.exists(path):
        Path(path).write_text(f"failed once at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")


def _log_window(run: _Run, window: list[dict[str, float]], elapsed: float, bar: Any) -> None:
    """One metrics line: the mean loss parts since the last one, the LR and the speed."""
    rate = (run.step - run.start_step) * run.cfg.batch_size * run.ctx.world_size / elapsed
    mean = {k: sum(p[k] for p in window) / len(window) for k in window[0]}
    if run.metrics_log:
        run.metrics_log.write(
            {
                "step": run.step,
                "epoch": run.stream.epoch,
                "lr": float(run.schedule[run.step - 1]),
                **mean,
                "images_per_s": rate,
            }
        )
    bar.set_postfix(loss=f"{mean['loss']:.3f}", img_s=f"{rate:.0f}")


def _evaluate_and_checkpoint(run: _Run, bar: Any) -> None:
    cfg, step = run.cfg, run.step
    every = cfg.eval_every
    if run.lead and run.val_urls and every and step % every == 0 and step < cfg.steps:
        note = f"step {step}: val top1 {_evaluate(run)['top1']:.4f}"
        if cfg.evals_on_stdout:
            bar.write(note)
        else:
            log.info(note)
    if step % cfg.ckpt_every == 0 or step == cfg.steps:
        run.ctx.save_checkpoint(_checkpoint_state(run), {"step": step})


def _evaluate(run: _Run) -> dict[str, Any]:
    pp = run.inputs.pp
    cfg = run.cfg
    loader = eval_loader(
        run.val_urls,
        pp,
        len(run.inputs.classes),
        256,
        run.loader_workers,
        cfg.max_pixels,
        pin_memory=run.pin_memory,
    )
    result = evaluate(run.model, loader, run.device, pp, precision=cfg.precision)
    if run.metrics_log:
        run.metrics_log.write({"step": run.step, **{f"val_{k}": v for k, v in result.items()}})
    return result


def _checkpoint_state(run: _Run) -> dict[str, Any]:
    """The resumable state; collective (gathers every rank's stream): all ranks call it."""
    mine = {**_stream_dict(run.stream), "rng": rng_state()}
    if run.labeled is not None:
        mine["labeled"] = _stream_dict(run.labeled_stream)
    state = {
        "model": run.model.state_dict(),
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
    return state


def _stream_dict(stream: StreamState) -> dict[str, Any]:
    return {
        "epoch": stream.epoch,
        "seen_in_epoch": stream.seen_in_epoch,
        "worker_seen": list(stream.worker_seen),  # one count per loader worker
        "turn": stream.turn,
    }


def _finish(run: _Run, seconds: float) -> dict[str, Any]:
    """Rank 0 writes the final checkpoint (when it changed) and summary.json, and returns it."""
    cfg, ctx, trained = run.cfg, run.ctx, run.step - run.start_step
    steps_per_rank = ctx.gather(trained)
    final = _checkpoint_state(run)
    if not run.lead:
        return {}
    path = storage.join(cfg.out, "checkpoint.pt")
    if not cfg.keep_projection:  # it served training; the student is the plain classifier
        final.pop("projection", None)
    if trained or not storage.is_file(path):  # a finished run's checkpoint stays untouched
        save_checkpoint(path, final)
    rate = trained * cfg.batch_size * ctx.world_size / seconds if trained else None
    summary: dict[str, Any] = {
        "step": run.step,
        "resumed_at": run.start_step,
        "arch": run.meta["arch"],
        "loss": cfg.loss,
        "classes": run.inputs.classes,
        "precision": cfg.precision,
        "augment": run.inputs.recipe,
        "workers": ctx.world_size,
        "loader_workers": run.loader_workers,
        "steps_per_rank": steps_per_rank,
        "train_seconds": round(seconds, 2),
        "images_per_s": round(rate, 1) if rate is not None else None,
        "labeled_per_batch": joint_split(cfg)[1],
        "feature_loss": cfg.feature_loss,
        "embedding_dim": run.inputs.embedding_dim,
        "skipped_samples": run.dataset.stats.skipped,
        "skipped_reasons": dict(run.dataset.stats.reasons),
        "checkpoint": path,
    }
    if run.val_urls:
        summary["val"] = _evaluate(run)
    atomic.write_text(storage.join(cfg.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary
