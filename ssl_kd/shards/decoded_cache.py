"""Decoded images kept in memory across epochs, up to a byte budget.

Training reads a small labeled set hundreds of times (1,000 images over 1,500 steps of 128 is
192 epochs), and decoding is most of what reading costs. The first decode of each image is kept
until the budget is full; later reads of it copy the kept pixels instead. Nothing is evicted: in a
shuffled stream larger than the budget an LRU would thrash, while a fixed set keeps paying off.
The pixels are exactly what decoding gives, so training is the same with or without it.
"""

from __future__ import annotations

from typing import Any

import torch


class DecodedCache:
    """Decoded images by ``(shard url, key)``, at most ``max_bytes`` of them (0: none kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.hits = 0
        self._images: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, sample: dict[str, Any]) -> torch.Tensor | None:
        """A copy of the sample's kept image, or None (decode it, then :meth:`put` it)."""
        kept = self._images.get(_ident(sample))
        if kept is None:
            return None
        self.hits += 1
        return kept.clone()  # the caller's transform may work in place

    def put(self, sample: dict[str, Any], img: torch.Tensor) -> None:
        """Keep a copy of the sample's decoded image while there is room."""
        size = img.numel() * img.element_size()
        if self.used + size <= self.max_bytes:
            self._images[_ident(sample)] = img.clone()
            self.used += size

    def __len__(self) -> int:
        return len(self._images)


def _ident(sample: dict[str, Any]) -> tuple[str, str]:
    return sample.get("__url__", ""), sample.get("__key__", "")
