"""An exponential moving average of a model's weights (Polyak averaging), the model that a
semi-supervised teacher labels with (FixMatch evaluates and labels with its EMA).

The decay warms up as TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` does,
``min(decay, (1 + t) / (10 + t))``: without it a short run's average would still hold a large
share of the random initial weights (0.999**1000 = 37% after 1,000 steps).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """A frozen copy of ``model`` whose floating-point weights and buffers follow the model's
    as an EMA; integer buffers (BatchNorm's batch counter) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Take one step towards ``model``'s current weights."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine = self.model.state_dict()
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                mine[name].mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                mine[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Weights and step count, for checkpoints."""
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
