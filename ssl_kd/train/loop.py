"""The reusable pieces of a training loop: one optimisation step and an endless batch stream.

The training loop (:mod:`ssl_kd.train.worker`) and the throughput benchmark drive these.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError
from ssl_kd.shards.dataset import ShardImageDataset

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, Any], dict[str, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops instead of corrupting the weights."""


@dataclass
class StreamState:
    """Where the batch stream is: which epoch, and how many samples of it were consumed."""

    epoch: int = 0
    seen_in_epoch: int = 0


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: Any,
    optimizer: torch.optim.Optimizer,
    lr: float,
    loss_fn: LossFn,
) -> dict[str, float]:
    """One SGD step at learning rate ``lr``; returns the loss parts as floats."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)  # a numpy scalar would break weights_only loading
    model.train()
    parts = loss_fn(model(images), labels)
    loss = parts["loss"]
    if not math.isfinite(loss.item()):
        raise NonFiniteLossError(f"loss is {loss.item()}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {k: v.item() for k, v in parts.items()}


def stream_batches(
    dataset: ShardImageDataset,
    batch_size: int,
    state: StreamState,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield training batches forever, epoch after epoch, updating ``state`` as it goes.

    Restarting with a saved ``state`` continues mid-epoch. Partial last batches are dropped
    (BatchNorm cannot train on a batch of one).
    """
    while True:
        dataset.set_epoch(state.epoch, skip=state.seen_in_epoch)
        reasons_before = Counter(dataset.stats.reasons)
        # A private generator: DataLoader draws a seed per iterator, and drawing it from the
        # global RNG would shift the augmentation stream of a resumed run.
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(state.epoch),
        )
        produced = 0
        for images, labels in loader:
            if not isinstance(labels, (list, tuple)):  # soft labels come as a tuple of tensors
                labels = torch.as_tensor(labels)
            state.seen_in_epoch += len(images)
            produced += 1
            yield images, labels
        if produced == 0 and state.seen_in_epoch == 0:
            raise UserError(
                f"the training shards gave no full batch of {batch_size} usable samples; "
                "lower --batch-size or check the shards"
            )
        _log_epoch_skips(state.epoch, dataset.stats.reasons - reasons_before)
        state.epoch += 1
        state.seen_in_epoch = 0


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
