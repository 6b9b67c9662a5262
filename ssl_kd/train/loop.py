"""The reusable pieces of a training loop: one optimisation step and an endless batch stream.

The training loop (:mod:`ssl_kd.train.worker`) and the throughput benchmark drive these.

With DataLoader worker processes the stream stays resumable step for step: each worker batches
its own slice of the shards and says when it is done, the main process takes their batches in a
fixed round-robin (not the order they arrive in) and counts what it took from each worker, and a
resumed worker skips exactly its count (:class:`StreamState`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ssl_kd import atomic, storage
from ssl_kd.device import autocast
from ssl_kd.errors import UserError
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.features import STUDENT_FEATURES

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, Any], dict[str, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops instead of corrupting the weights."""


@dataclass
class StreamState:
    """Where the batch stream is: which epoch, and how many samples of it were consumed; with
    DataLoader workers also how many from each worker, and whose batch comes next."""

    epoch: int = 0
    seen_in_epoch: int = 0
    worker_seen: list[int] = field(default_factory=list)
    turn: int = 0

    def fit_workers(self, num_workers: int) -> None:
        """Make the state one of ``num_workers`` loader workers (0: in-process). A stream saved
        with another number carries on approximately: the same share of the epoch is skipped,
        not the same samples."""
        n = num_workers
        if len(self.worker_seen) == n:
            return
        if self.seen_in_epoch:
            log.warning(
                "the batch stream was saved with %d loader worker(s) and continues with %d: "
                "epoch %d resumes at about the same point, not at the same samples",
                len(self.worker_seen),
                n,
                self.epoch,
            )
        self.worker_seen = [self.seen_in_epoch // n] * n if n else []
        if n:
            self.seen_in_epoch = sum(self.worker_seen)
        self.turn = 0


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: Any,
    optimizer: torch.optim.Optimizer,
    lr: float,
    loss_fn: LossFn,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One SGD step at learning rate ``lr``; returns the loss parts as floats.

    The forward pass runs under autocast at ``precision``; the loss is computed in fp32 from
    the logits (and, for a model that also returns projected features, from those too).
    ``scaler`` (fp16) scales the loss so small gradients do not underflow.
    """
    for group in optimizer.param_groups:
        group["lr"] = float(lr)  # a numpy scalar would break weights_only loading
    model.train()
    with autocast(images.device, precision):
        logits = model(images)
    if isinstance(logits, tuple):  # a FeatureDistiller: the projected features go to the loss
        logits, projected = logits
        labels = {**labels, STUDENT_FEATURES: projected.float()}
    parts = loss_fn(logits.float(), labels)
    loss = parts["loss"]
    if not math.isfinite(loss.item()):
        raise NonFiniteLossError(f"loss is {loss.item()}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    return {k: v.item() for k, v in parts.items()}


def batch_targets(labels: Any, device: torch.device, non_blocking: bool) -> dict[str, torch.Tensor]:
    """The loss's targets on ``device``: a batch of class ids, or the dict a pseudo-labeled
    batch carries (soft label, stored embedding)."""
    if isinstance(labels, dict):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in labels.items()}
    return {"label": labels.to(device, non_blocking=non_blocking)}


def stream_batches(
    dataset: ShardImageDataset,
    batch_size: int,
    state: StreamState,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield training batches forever, epoch after epoch, updating ``state`` as it goes.

    Restarting with a saved ``state`` continues mid-epoch at the same batch, with or without
    ``num_workers`` loader processes (as long as their number is the same). Partial last
    batches are dropped (BatchNorm cannot train on a batch of one); with workers, each worker's.
    """
    state.fit_workers(num_workers)
    while True:
        reasons_before = Counter(dataset.stats.reasons)
        if num_workers:
            epoch = _worker_epoch(dataset, batch_size, state, num_workers, pin_memory)
        else:
            epoch = _epoch(dataset, batch_size, state, pin_memory)
        produced = 0
        for batch in epoch:
            produced += 1
            yield batch
        if produced == 0 and state.seen_in_epoch == 0:
            raise UserError(
                f"the training shards gave no full batch of {batch_size} usable samples; "
                "lower --batch-size or check the shards"
            )
        _log_epoch_skips(state.epoch, dataset.stats.reasons - reasons_before)
        state.epoch += 1
        state.seen_in_epoch = 0
        state.worker_seen = [0] * num_workers
        state.turn = 0


def _epoch(
    dataset: ShardImageDataset, batch_size: int, state: StreamState, pin_memory: bool
) -> Iterator[tuple[torch.Tensor, Any]]:
    """The rest of the epoch, read in this process."""
    dataset.set_epoch(state.epoch, skip=state.seen_in_epoch)
    # A private generator: DataLoader draws a seed per iterator, and drawing it from the
    # global RNG would shift the augmentation stream of a resumed run.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=True,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(state.epoch),
    )
    for images, labels in loader:
        if not isinstance(labels, dict):  # pseudo-labels come as a dict of tensors
            labels = torch.as_tensor(labels)
        state.seen_in_epoch += len(images)
        yield images, labels


class _WorkerBatches(IterableDataset):
    """Runs in a loader worker: its share of ``dataset`` in full batches, each tagged with the
    worker's id and the read counts since the previous item, then an end marker."""

    def __init__(self, dataset: ShardImageDataset, batch_size: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        assert info is not None, "runs in DataLoader workers only"
        stats = self.dataset.stats
        seen = (stats.samples, stats.skipped, Counter(stats.reasons))

        def counts() -> dict[str, Any]:
            # The worker's counts die with it: the main process adds up what each item says.
            nonlocal seen
            samples, skipped, reasons = seen
            seen = (stats.samples, stats.skipped, Counter(stats.reasons))
            return {
                "samples": stats.samples - samples,
                "skipped": stats.skipped - skipped,
                "reasons": dict(stats.reasons - reasons),
            }

        batch: list[Any] = []
        for sample in self.dataset:
            batch.append(sample)
            if len(batch) == self.batch_size:
                images, labels = default_collate(batch)
                yield "batch", info.id, images, labels, counts()
                batch = []
        yield "end", info.id, None, None, counts()


def _worker_epoch(
    dataset: ShardImageDataset,
    batch_size: int,
    state: StreamState,
    num_workers: int,
    pin_memory: bool,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """The rest of the epoch from ``num_workers`` loader processes, in round-robin order from
    ``state.turn`` over the workers not yet done: a function of the state alone, so a resumed
    stream repeats it."""
    dataset.set_epoch(state.epoch, skip=list(state.worker_seen))
    loader = DataLoader(
        _WorkerBatches(dataset, batch_size),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(state.epoch),
    )
    items = iter(loader)
    pending: list[deque[Any]] = [deque() for _ in range(num_workers)]
    live = [True] * num_workers
    while any(live):
        w = state.turn
        if not live[w]:
            state.turn = (w + 1) % num_workers
            continue
        while not pending[w]:  # the loader's own order differs: hold the others' items
            item = next(items, None)
            if item is None:
                raise RuntimeError(f"loader worker {w} stopped without finishing its stream")
            pending[item[1]].append(item)
        kind, _, images, labels, counts = pending[w].popleft()
        _add_counts(dataset, counts)
        if kind == "end":
            live[w] = False
            continue
        if not isinstance(labels, dict):
            labels = torch.as_tensor(labels)
        state.worker_seen[w] += len(images)
        state.seen_in_epoch += len(images)
        state.turn = (w + 1) % num_workers
        yield images, labels


def _add_counts(dataset: ShardImageDataset, counts: dict[str, Any]) -> None:
    stats = dataset.stats
    stats.samples += counts["samples"]
    stats.skipped += counts["skipped"]
    stats.reasons.update(counts["reasons"])


def _log_epoch_skips(epoch: int, reasons: Counter[str]) -> None:
    """One line per epoch with skips: each bad sample is logged by itself only once a run."""
    if reasons:
        counts = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
        log.info("epoch %d: %d samples skipped (%s)", epoch, sum(reasons.values()), counts)


def _step_of(line: str) -> int:
    """The ``step`` of a metrics line (-1 when it has none or is not JSON: such lines stay)."""
    try:
        return int(json.loads(line).get("step", -1))
    except (ValueError, TypeError, AttributeError):
        return -1


class MetricsLog:
    """Appends one JSON object per line (JSONL) and flushes, so a crash loses nothing written."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.remote = storage.is_remote(path)
        # An object cannot be appended to: keep the text (a run resumed keeps its old lines)
        # and put it whole on every write; a metrics log stays small.
        self._text = ""
        if self.remote:
            self._text = storage.read_text(path) if storage.is_file(path) else ""
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def keep_until(self, step: int) -> None:
        """Drop the lines past ``step``: a resumed run logs those steps again, once."""
        if not storage.is_file(self.path):
            return
        lines = storage.read_text(self.path).splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) < len(lines):
            self._text = "".join(kept)
            atomic.write_text(self.path, self._text)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line."""
        line = json.dumps(record, sort_keys=True) + "\n"
        if self.remote:
            self._text += line
            atomic.write_text(self.path, self._text)
            return
        with open(self.path, "a") as fh:
            fh.write(line)
