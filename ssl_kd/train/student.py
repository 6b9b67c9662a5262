"""``ssl-kd pretrain`` and ``ssl-kd finetune``: the student trainer, local or on Ray Train.

One loop (:func:`train_worker`) runs on every rank. It streams its own share of the shards
endlessly, epoch after epoch, and stops after exactly ``steps`` steps, so every rank takes the
same number of steps and DDP never waits on a rank that ran out of data. The budget is steps,
not epochs. Where it runs is a :class:`~ssl_kd.train.context.RunContext`: in-process (one
rank), or a Ray Train worker (``TorchTrainer``, DDP over gloo on CPU or NCCL on GPU).

Outputs in ``out``: ``config.yaml``, ``metrics.jsonl`` (rank 0), ``checkpoint.pt`` (the final
weights, loadable like every checkpoint here) and ``summary.json``. Resumable state (optimizer,
step, per-rank stream positions and RNG states) is checkpointed every ``ckpt_every`` steps: to
``out/checkpoint.pt`` locally, through ``ray.train.report`` under ``out/ray`` on Ray, where
``FailureConfig(max_failures)`` restarts resume from it and rerunning the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.errors import UserError
from ssl_kd.evaluate.metrics import eval_loader, evaluate
from ssl_kd.models.checkpoint import (
    check_resumable,
    load_checkpoint,
    make_meta,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ssl_kd.models.preprocess import Preprocess, augment, fit_size, infer_preprocess, normalize
from ssl_kd.models.registry import create_model
from ssl_kd.shards import expand_shards
from ssl_kd.shards.classes import dataset_info_near, resolve_classes
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.context import RunContext
from ssl_kd.train.loop import MetricsLog, StreamState, stream_batches, train_step
from ssl_kd.train.losses import student_loss
from ssl_kd.train.optim import build_optimizer
from ssl_kd.train.options import TrainOptions
from ssl_kd.train.schedule import lr_schedule

log = logging.getLogger(__name__)

# Fault injection for the restart tests: "PATH:STEP" fails once at STEP, leaving PATH behind.
FAIL_ONCE_ENV = "SSL_KD_FAIL_ONCE"


@dataclass(frozen=True, kw_only=True)
class StudentConfig(TrainOptions):
    """``ssl-kd pretrain``: the student on pseudo-labeled shards (from ssl-kd materialize)."""

    data: str = option(help="training shards (dir, brace pattern, glob or list file)")
    init: str | None = option(None, help="start from this checkpoint's weights")
    fresh_head: bool = option(False, help="with init: a new, randomly initialised classifier head")
    arch: str = option("cnn", help="student architecture (see `ssl-kd models`; init overrides)")
    dropout: float = option(0.0, help="dropout before the head (student noise)", min=0, max=0.95)
    loss: Literal["hard", "soft", "mixed"] = option(
        "hard", help="hard: CE on the selected class; soft: KD on the top-k; mixed: both"
    )
    temperature: float = option(1.0, help="KD temperature T (soft, mixed)", gt=0)
    alpha: float = option(0.5, help="weight of the KD part in mixed", min=0, max=1)
    label_smoothing: float = option(0.0, help="label smoothing of the hard part", min=0, max=0.99)
    randaugment: int = option(0, help="RandAugment ops per image (student noise; 0: off)", min=0)
    randaugment_magnitude: int = option(9, help="RandAugment magnitude", min=0, max=30)
    steps: int = option(5000, help="optimisation steps (the training budget)", min=1)
    batch_size: int = option(128, help="images per step on each worker", min=2)
    warmup_steps: int = option(200, help="linear warm-up steps (cosine, constant)", min=0)
    workers: int = option(1, help="Ray Train workers (DDP ranks)", min=1)
    use_gpu: bool = option(False, help="one GPU per worker (NCCL); else CPU (gloo)")
    executor: Literal["ray", "local"] = option(
        "ray", help="Ray Train, or one local process", operational=True
    )
    max_failures: int = option(
        2, help="worker-group restarts from the last checkpoint", min=0, operational=True
    )
    num_workers: int = option(
        0, help="DataLoader workers per rank (0 keeps resume exact)", min=0, operational=True
    )
    device: str = option("auto", help="local executor: auto, cpu, cuda or cuda:N", operational=True)

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        if self.executor == "local" and self.workers > 1:
            raise UserError("--workers > 1 needs --executor ray (DDP ranks are Ray workers)")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(StudentConfig):
    """``ssl-kd finetune``: the pretrained student on the true labels only."""

    data: str = option(help="labeled shards (the true labels)")
    init: str = option(help="pretrained student checkpoint")  # type: ignore[assignment]
    loss: Literal["hard", "soft", "mixed"] = option("hard", help="hard: the true labels")
    steps: int = option(1000, help="optimisation steps (the training budget)", min=1)
    lr: float = option(0.01, help="peak learning rate (lower than pretraining)", gt=0)
    warmup_steps: int = option(50, help="linear warm-up steps (cosine, constant)", min=0)


@dataclass(frozen=True)
class _Setup:
    """Everything a rank derives from the config before the first step."""

    urls: list[str]
    classes: list[str]
    pp: Preprocess
    soft_k: int
    label_temperature: float


def _setup(cfg: StudentConfig) -> _Setup:
    urls = expand_shards(cfg.data)
    classes = resolve_classes(urls, cfg.class_names, cfg.num_classes)
    soft = (dataset_info_near(urls) or {}).get("soft_label") or {}
    if cfg.loss != "hard" and not soft:
        raise UserError(
            f"--loss {cfg.loss} needs soft labels, and {cfg.data} has none: use the shards "
            "written by ssl-kd materialize, or --loss hard"
        )
    if cfg.init:
        init_meta = load_checkpoint(cfg.init)["meta"]
        pp = Preprocess.from_dict(init_meta["preprocess"])
        if not cfg.fresh_head and init_meta["num_classes"] != len(classes):
            raise UserError(
                f"{cfg.init} predicts {init_meta['num_classes']} classes and {cfg.data} has "
                f"{len(classes)}: add --fresh-head to train a new classifier head"
            )
    else:
        pp = infer_preprocess(urls, cfg.channels, cfg.image_size, cfg.mean, cfg.std)
    return _Setup(urls, classes, pp, int(soft.get("k", 0)) if cfg.loss != "hard" else 0,
                  float(soft.get("temperature", 1.0)))  # fmt: skip


def _build_model(cfg: StudentConfig, s: _Setup) -> tuple[nn.Module, dict[str, Any]]:
    if cfg.init:
        model, meta = model_from_checkpoint(load_checkpoint(cfg.init))
        if cfg.fresh_head:
            model.head = nn.Linear(model.feature_dim, len(s.classes))
        arch, width, dropout = meta["arch"], meta["width"], meta.get("dropout", 0.0)
    else:
        arch, width, dropout = cfg.arch, cfg.width, cfg.dropout
        model = create_model(arch, len(s.classes), s.pp.channels, s.pp.image_size, width, dropout)
    meta = make_meta(arch, width, dropout, s.classes, s.pp, cfglib.to_dict(cfg))
    return model, meta


def _transform(cfg: StudentConfig, pp: Preprocess):  # type: ignore[no-untyped-def]
    fit = fit_size(pp)
    if not cfg.randaugment:
        return fit
    from torchvision.transforms import v2

    noise = v2.RandAugment(num_ops=cfg.randaugment, magnitude=cfg.randaugment_magnitude)

    def transform(img: torch.Tensor) -> torch.Tensor:
        return noise(fit(img))

    return transform


def _targets(labels: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(labels, (list, tuple)):
        label, topk_class, topk_prob = labels
        return {"label": label.to(device), "topk_class": topk_class.to(device),
                "topk_prob": topk_prob.to(device)}  # fmt: skip
    return {"label": labels.to(device)}


def _maybe_fail(step: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    path, at = spec.rsplit(":", 1)
    if step == int(at) and not os.path.exists(path):
        Path(path).write_text(f"failed once at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")


def train_worker(cfg: StudentConfig, ctx: RunContext, progress: bool = True) -> dict[str, Any]:
    """The training loop of one rank; rank 0 returns the summary, the others an empty dict."""
    s = _setup(cfg)
    device = ctx.device(cfg.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    random.seed(cfg.seed)
    model, meta = _build_model(cfg, s)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    schedule = lr_schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps)
    # Each rank augments with its own stream; a resume restores it from the checkpoint.
    torch.manual_seed(cfg.seed * 1009 + ctx.rank + 1)
    step, state = 0, StreamState()
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        check_resumable(
            ckpt["meta"]["config"], cfglib.to_dict(cfg), cfglib.operational_keys(type(cfg)), cfg.out
        )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        ranks = ckpt["ranks"]
        if len(ranks) == ctx.world_size:
            mine = ranks[ctx.rank]
            state = StreamState(int(mine["epoch"]), int(mine["seen_in_epoch"]))
            set_rng_state(mine["rng"])
        else:  # another number of ranks: the data order restarts, the weights carry on
            log.warning("resuming %d ranks from a %d-rank checkpoint", ctx.world_size, len(ranks))
        log.info("rank %d resuming from step %d", ctx.rank, step)
    model.to(device)
    train_model = ctx.wrap_model(model)

    # Fewer shards than ranks: every rank reads all shards and keeps every world-th sample.
    split_shards = len(s.urls) >= ctx.world_size
    dataset = ShardImageDataset(
        s.urls[ctx.rank :: ctx.world_size] if split_shards else s.urls,
        _transform(cfg, s.pp),
        s.pp.channels,
        num_classes=len(s.classes),
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed * 7919 + ctx.rank,
        soft_k=s.soft_k,
        part=(0, 1) if split_shards else (ctx.rank, ctx.world_size),
    )
    loss_fn = student_loss(cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha,
                           label_smoothing=cfg.label_smoothing,
                           label_temperature=s.label_temperature)  # fmt: skip
    val_urls = expand_shards(cfg.val_data) if cfg.val_data else []
    out = cfg.out
    lead = ctx.rank == 0
    metrics_log = MetricsLog(storage.join(out, "metrics.jsonl")) if lead else None

    def checkpoint_state() -> dict[str, Any]:
        mine = {"epoch": state.epoch, "seen_in_epoch": state.seen_in_epoch, "rng": rng_state()}
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"kind": cfg.schedule, "step": step},
            "step": step,
            "ranks": ctx.gather(mine),
            "meta": meta,
        }

    def run_eval() -> dict[str, Any]:
        loader = eval_loader(val_urls, s.pp, len(s.classes), 256, cfg.num_workers)
        result = evaluate(model, loader, device, s.pp)
        if metrics_log:
            metrics_log.write({"step": step, **{f"val_{k}": v for k, v in result.items()}})
        return result

    start_step, t0 = step, time.perf_counter()
    window: list[dict[str, float]] = []
    bar = ctx.progress(cfg.steps, step, enabled=progress and lead)
    batches = stream_batches(dataset, cfg.batch_size, state, cfg.num_workers)
    while step < cfg.steps:
        images, labels = next(batches)
        images = augment(images.to(device), cfg.crop_padding, cfg.flip)
        parts = train_step(train_model, normalize(images, s.pp), _targets(labels, device),
                           optimizer, schedule[step], loss_fn)  # fmt: skip
        step += 1
        window.append(parts)
        bar.update(1)
        _maybe_fail(step)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            rate = (step - start_step) * cfg.batch_size * ctx.world_size / elapsed
            mean = {k: sum(p[k] for p in window) / len(window) for k in window[0]}
            if metrics_log:
                metrics_log.write({"step": step, "epoch": state.epoch,
                                   "lr": float(schedule[step - 1]), **mean,
                                   "images_per_s": rate})  # fmt: skip
            bar.set_postfix(loss=f"{mean['loss']:.3f}", img_s=f"{rate:.0f}")
            window.clear()
        if lead and val_urls and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            log.info("step %d: val top1 %.4f", step, run_eval()["top1"])
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            ctx.save_checkpoint(checkpoint_state(), {"step": step})
    bar.close()
    seconds = time.perf_counter() - t0
    steps_per_rank = ctx.gather(step - start_step)
    final = checkpoint_state()  # collective (gathers every rank's state): all ranks call it
    if not lead:
        return {}
    save_checkpoint(storage.join(out, "checkpoint.pt"), final)
    summary: dict[str, Any] = {
        "step": step,
        "resumed_at": start_step,
        "arch": meta["arch"],
        "loss": cfg.loss,
        "classes": s.classes,
        "workers": ctx.world_size,
        "steps_per_rank": steps_per_rank,
        "train_seconds": round(seconds, 2),
        "images_per_s": round((step - start_step) * cfg.batch_size * ctx.world_size / seconds, 1)
        if step > start_step
        else None,
        "skipped_samples": dataset.stats.skipped,
        "checkpoint": storage.join(out, "checkpoint.pt"),
    }
    if val_urls:
        summary["val"] = run_eval()
    atomic.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def run_student(cfg: StudentConfig, progress: bool = True) -> dict[str, Any]:
    """Pretrain or fine-tune as ``cfg`` says (local or Ray Train); returns the summary."""
    _setup(cfg)  # bad input fails here, before any worker starts
    out = cfg.out
    storage.makedirs(out)
    cfglib.save(cfg, storage.join(out, "config.yaml"))
    if cfg.executor == "local":
        from ssl_kd.train.context import LocalContext

        return train_worker(cfg, LocalContext(out), progress)
    from ssl_kd.train.ray_trainer import fit

    return fit(cfg, progress)
