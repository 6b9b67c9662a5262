"""The training loop of ``ssl-kd train``, ``pretrain`` and ``finetune``, on one rank.

:func:`train_worker` runs on every rank. It streams its own share of the shards endlessly,
epoch after epoch, and stops after exactly ``steps`` steps, so every rank takes the same number
of steps and DDP never waits on a rank that ran out of data: the budget is steps, not epochs.
Where it runs is a :class:`~ssl_kd.train.context.RunContext`: in-process (one rank), or a Ray
Train worker (``TorchTrainer``, DDP over gloo on CPU or NCCL on GPU).

The teacher and the baseline (:class:`~ssl_kd.train.options.TrainConfig`) are this loop with the
hard loss; the configs differ in their keys and in how a rank seeds its augmentation and data
order (``cfg.stream_seeds``). With ``ssl`` any of them also learns from an unlabeled pool
(:mod:`ssl_kd.train.consistency`). Recipes and input format: :mod:`ssl_kd.train.recipes`.

Outputs in ``out``: ``config.yaml``, ``metrics.jsonl`` and ``tensorboard/`` (rank 0:
:mod:`ssl_kd.train.tensorboard`), ``checkpoint.pt``, ``summary.json``. Resumable state
(:mod:`ssl_kd.train.run_state`) is checkpointed every ``ckpt_every`` steps: to
``out/checkpoint.pt`` locally, through ``ray.train.report`` under ``out/ray`` on Ray, where
``FailureConfig(max_failures)`` restarts resume from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from typing import Any

import torch
from torch import nn

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.device import autocast, grad_scaler, use_channels_last
from ssl_kd.evaluate.metrics import eval_loader, evaluate
from ssl_kd.models.checkpoint import (
    load_checkpoint,
    make_meta,
    model_from_checkpoint,
    save_checkpoint,
)
from ssl_kd.models.preprocess import augment, normalize
from ssl_kd.models.registry import create_model
from ssl_kd.shards import expand_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.consistency import WEAK_LOGITS, Thresholds, fixmatch_loss
from ssl_kd.train.context import RunContext
from ssl_kd.train.ema import WeightEMA
from ssl_kd.train.fault_hooks import maybe_fail, maybe_hold
from ssl_kd.train.features import FeatureDistiller, with_feature_loss
from ssl_kd.train.inputs import Inputs, read_inputs
from ssl_kd.train.loop import batch_targets, stream_batches, train_step
from ssl_kd.train.losses import joint_loss, student_loss
from ssl_kd.train.optim import build_optimizer
from ssl_kd.train.options import Config, joint_split
from ssl_kd.train.recipes import image_transform, loader_workers
from ssl_kd.train.run_state import TrainRun, checkpoint_state, resume
from ssl_kd.train.schedule import lr_schedule
from ssl_kd.train.strong_augment import strong_augment
from ssl_kd.train.tensorboard import RunLog

log = logging.getLogger(__name__)


def train_worker(cfg: Config, ctx: RunContext, progress: bool = True) -> dict[str, Any]:
    """The training loop of one rank; rank 0 returns the summary, the others an empty dict."""
    run = _setup(cfg, ctx)
    with run.metrics_log or contextlib.nullcontext():  # closed after a failure too
        resume(run)
        return _finish(run, _train_steps(run, progress))


def _setup(cfg: Config, ctx: RunContext) -> TrainRun:
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
    thresholds = None
    if cfg.ssl == "fixmatch":
        thresholds = Thresholds(
            len(inputs.classes), cfg.threshold_mode, cfg.threshold, cfg.threshold_momentum
        )
        loss_fn = fixmatch_loss(loss_fn, thresholds, cfg.unsup_weight)
    metrics = RunLog(cfg.out) if ctx.rank == 0 else None
    val_urls = expand_shards(cfg.val_data) if cfg.val_data else []
    dataset = _dataset(cfg, inputs, ctx, data_seed)
    workers = loader_workers(
        cfg.num_workers, inputs.recipe, len(dataset.urls), ctx.local_world_size
    )
    labeled = None
    if inputs.labeled_urls:  # its own order and crops: another seed than the pseudo stream's
        labeled = _dataset(cfg, inputs, ctx, data_seed + 1, "labeled")
    pool = None
    if inputs.pool_urls:  # unlabeled: its own order and crops, like joint training's stream
        pool = _dataset(cfg, inputs, ctx, data_seed + 2, "pool")
    ema = WeightEMA(model, cfg.ema()) if cfg.ema() else None
    return TrainRun(
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
        pool,
        thresholds,
        ema,
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


# Each stream's crops come from seeds of their own: (labeled, pool) offsets of sample_seed.
_STREAM_SEEDS = {"train": 0, "labeled": 500_009, "pool": 700_001}


def _dataset(
    cfg: Config, inputs: Inputs, ctx: RunContext, seed: int, stream: str = "train"
) -> ShardImageDataset:
    """This rank's images of one stream: ``train``, the config's shards; ``labeled``, joint
    training's true-labeled shards; ``pool``, --ssl's unlabeled pool (no labels)."""
    urls = {"train": inputs.urls, "labeled": inputs.labeled_urls, "pool": inputs.pool_urls}[stream]
    plain = stream != "train"  # no soft labels or embeddings in these shards
    # Fewer shards than ranks: every rank reads all shards and keeps every world-th sample.
    split_shards = len(urls) >= ctx.world_size
    return ShardImageDataset(
        urls[ctx.rank :: ctx.world_size] if split_shards else urls,
        image_transform(cfg, inputs.pp, inputs.recipe),
        inputs.pp.channels,
        labeled=stream != "pool",
        num_classes=len(inputs.classes),
        shuffle_buffer=cfg.shuffle_buffer,
        seed=seed,
        soft_k=0 if plain else inputs.soft_k,
        embedding_dim=0 if plain else inputs.embedding_dim,
        part=(0, 1) if split_shards else (ctx.rank, ctx.world_size),
        max_pixels=cfg.max_pixels,
        decode_size=inputs.pp.resize_to,
        # Loader workers seed each image's crop by its place in their stream, per rank.
        sample_seed=cfg.seed * 1_000_003 + ctx.rank + _STREAM_SEEDS[stream],
        weights=inputs.sample_weights and stream == "train",  # true labels carry no weight
        cache_bytes=cfg.decoded_cache_mb << 20,
    )


def _train_steps(run: TrainRun, progress: bool) -> float:
    """Step until ``cfg.steps``, logging, evaluating and checkpointing; returns the seconds."""
    cfg, pp = run.cfg, run.inputs.pp
    assert run.train_model is not None
    t0 = time.perf_counter()
    window: list[dict[str, float]] = []
    bar = run.ctx.progress(cfg.steps, run.step, enabled=progress and run.lead)
    n_pseudo, n_labeled = joint_split(cfg)
    batches = stream_batches(run.dataset, n_pseudo, run.stream, run.loader_workers, run.pin_memory)
    labeled = pool = None
    if run.labeled is not None:
        labeled = stream_batches(
            run.labeled, n_labeled, run.labeled_stream, run.loader_workers, run.pin_memory
        )
    if run.pool is not None:
        pool_size = cfg.mu * cfg.batch_size
        pool = stream_batches(
            run.pool, pool_size, run.pool_stream, run.loader_workers, run.pin_memory
        )
    while run.step < cfg.steps:
        images, labels = next(batches)
        targets = batch_targets(labels, run.device, run.pin_memory)
        if labeled is not None:  # joint training: true-labeled images last in the batch
            true_images, true_labels = next(labeled)
            images = torch.cat([images, true_images])
            targets["true_label"] = true_labels.to(run.device, non_blocking=run.pin_memory)
        run.images_read += len(images)
        images = _augment(run, images)
        if run.cfg.strong_augment:  # student noise; its labels saw the clean image
            images = strong_augment(images, cfg.strong_ops, cfg.cutout)
        if pool is not None and run.step >= cfg.ssl_start:
            pool_images = next(pool)[0]
            run.images_read += len(pool_images)
            images, targets[WEAK_LOGITS] = _with_pool(run, images, pool_images)
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        parts = train_step(
            run.train_model,
            normalize(images, pp),
            targets,
            run.optimizer,
            run.schedule[run.step],
            run.loss_fn,
            precision=cfg.precision,
            scaler=run.scaler,
        )
        run.step += 1
        if run.ema is not None:
            run.ema.update(run.model)
        window.append(parts)
        bar.update(1)
        maybe_fail(run.step)
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            _log_window(run, window, time.perf_counter() - t0, bar)
            window.clear()
        _evaluate_and_checkpoint(run, bar)
        maybe_hold(run.step)
    batches.close()  # stops the loader workers now, not whenever the generator is collected
    for stream in (labeled, pool):
        if stream is not None:
            stream.close()
    bar.close()
    return time.perf_counter() - t0


def _augment(run: TrainRun, images: torch.Tensor) -> torch.Tensor:
    """The batch part of the recipe, on the training device: the small recipe's padded crops
    and flips, the real one's flips (its crops were taken per image)."""
    images = images.to(run.device, non_blocking=run.pin_memory)
    padding = run.cfg.crop_padding if run.inputs.recipe == "small" else 0
    return augment(images, padding, run.cfg.flip)


def _with_pool(
    run: TrainRun, images: torch.Tensor, pool: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's step: the labeled images then the strong views of the pool's, and the
    model's logits of the weak views, the strong views' targets.

    The weak views go through the model without gradient, in training mode as FixMatch's one
    joint batch does: their predictions are targets only, and a forward pass without the
    backward one costs about a third as much.
    """
    weak = _augment(run, pool)
    strong = strong_augment(weak, run.cfg.strong_ops, run.cfg.cutout)
    assert run.train_model is not None
    run.train_model.train()
    if run.channels_last:
        weak = weak.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(run.device, run.cfg.precision):
        weak_logits = run.train_model(normalize(weak, run.inputs.pp)).float()
    return torch.cat([images, strong]), weak_logits


def _log_window(run: TrainRun, window: list[dict[str, float]], elapsed: float, bar: Any) -> None:
    """One metrics line: the mean loss parts since the last one, the LR and the speed."""
    rate = run.images_read * run.ctx.world_size / elapsed
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


def _evaluate_and_checkpoint(run: TrainRun, bar: Any) -> None:
    cfg, step = run.cfg, run.step
    every = cfg.eval_every
    if run.lead and run.val_urls and every and step % every == 0 and step < cfg.steps:
        note = f"step {step}: val top1 {_evaluate(run)['top1']:.4f}"
        if cfg.evals_on_stdout:
            bar.write(note)
        else:
            log.info(note)
    if step % cfg.ckpt_every == 0 or step == cfg.steps:
        if run.metrics_log:  # the curves on storage reach the step a resume starts from
            run.metrics_log.flush()
        run.ctx.save_checkpoint(checkpoint_state(run), {"step": step})


def _evaluate(run: TrainRun) -> dict[str, Any]:
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
    model = run.ema.model if run.ema is not None else run.model  # the model that ships
    result = evaluate(model, loader, run.device, pp, precision=cfg.precision)
    if run.metrics_log:
        run.metrics_log.write({"step": run.step, **{f"val_{k}": v for k, v in result.items()}})
    return result


def _finish(run: TrainRun, seconds: float) -> dict[str, Any]:
    """Rank 0 writes the final checkpoint (when it changed) and summary.json, and returns it."""
    cfg, ctx, trained = run.cfg, run.ctx, run.step - run.start_step
    steps_per_rank = ctx.gather(trained)
    final = checkpoint_state(run)
    if not run.lead:
        return {}
    path = storage.join(cfg.out, "checkpoint.pt")
    if not cfg.keep_projection:  # it served training; the student is the plain classifier
        final.pop("projection", None)
    if trained or not storage.is_file(path):  # a finished run's checkpoint stays untouched
        save_checkpoint(path, final)
    rate = run.images_read * ctx.world_size / seconds if trained else None
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
        "ssl": cfg.ssl,
        "ema_decay": cfg.ema(),
        "embedding_dim": run.inputs.embedding_dim,
        "skipped_samples": run.dataset.stats.skipped,
        "skipped_reasons": dict(run.dataset.stats.reasons),
        "checkpoint": path,
    }
    if run.val_urls:
        summary["val"] = _evaluate(run)
    atomic.write_text(storage.join(cfg.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary
