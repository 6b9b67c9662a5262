"""A PyTorch IterableDataset over WebDataset shards with epoch-deterministic shuffling.

The order of an epoch is a pure function of ``(seed, epoch)``, and ``skip`` drops the first
decoded samples of an epoch before any random augmentation runs, so a run resumed from a
checkpoint at step ``s`` sees the same samples as a run that never stopped. In DataLoader worker
processes each worker reads its own slice of the shards, skips its own count, and (with
``sample_seed``) seeds each sample's transform from its position, so its stream replays too.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssl_kd.shards import soft_label
from ssl_kd.shards.decoded_cache import DecodedCache
from ssl_kd.shards.reader import (
    DEFAULT_MAX_PIXELS,
    ReadStats,
    decoded_samples,
    iter_samples,
    read_label,
)

T = TypeVar("T")


def buffer_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream with a reservoir of ``size`` items (size <= 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class ShardImageDataset(IterableDataset):
    """Yields ``(image_tensor, label)`` (or ``(key, image_tensor, label)`` with ``with_keys``).

    With ``soft_k``, ``embedding_dim`` or ``weights`` the label is a dict of arrays: ``label``
    (the class), ``topk_class`` and ``topk_prob`` (the first ``soft_k`` of each sample's
    ``.json`` soft label), ``embedding`` (its ``.emb`` member, ``embedding_dim`` values) and
    ``weight`` (float32, the ``weight`` of its ``.json``); ``part=(i, n)`` keeps every n-th
    sample from the i-th (one rank's share).
    ``decode_size`` is the side ``transform`` resizes to (large JPEGs decode at a reduced scale).
    With ``sample_seed``, a DataLoader worker seeds torch's RNG before each sample's transform
    from ``(sample_seed, epoch, worker, index)``: a worker's RNG is not checkpointed, so this is
    what makes its random transforms replay on resume (in-process, the caller's RNG is used).
    ``cache_bytes`` of decoded images are kept for the next epochs when it is read in-process.
    """

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        channels: int,
        *,
        labeled: bool = True,
        num_classes: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        with_keys: bool = False,
        soft_k: int = 0,
        embedding_dim: int = 0,
        part: tuple[int, int] = (0, 1),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode_size: int = 0,
        sample_seed: int | None = None,
        weights: bool = False,
        cache_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.channels = channels
        self.labeled = labeled
        self.num_classes = num_classes
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.with_keys = with_keys
        self.soft_k = soft_k
        self.embedding_dim = embedding_dim
        self.part = part
        self.max_pixels = max_pixels
        self.decode_size = decode_size
        self.sample_seed = sample_seed
        self.weights = weights
        self.cache_bytes = cache_bytes
        self._cache: DecodedCache | None = None  # made in the process that reads
        self.epoch = 0
        self.skip: int | Sequence[int] = 0
        self.stats = ReadStats()

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker gets the dataset pickled: it keeps its own images, not ours.
        return {**self.__dict__, "_cache": None}

    def set_epoch(self, epoch: int, skip: int | Sequence[int] = 0) -> None:
        """Select the epoch's order; drop its first ``skip`` samples (for resuming), or
        ``skip[i]`` of DataLoader worker i's."""
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        urls = list(self.urls)
        if self.shuffle_buffer > 1:
            rng.shuffle(urls)
        info = get_worker_info()
        skip = self.skip
        transform = self.transform
        if info is not None:
            urls = urls[info.id :: info.num_workers]
            if not isinstance(skip, int):
                skip = skip[info.id]
            if self.sample_seed is not None:
                base = (self.sample_seed, self.epoch, info.id)
                transform = SeededTransform(transform, base, start=skip)
        samples = iter_samples(urls, self.stats)
        index, count = self.part
        if count > 1:  # every count-th sample, before decoding (fewer shards than ranks)
            samples = itertools.islice(samples, index, None, count)
        raw = buffer_shuffle(samples, self.shuffle_buffer, rng)
        targets = None
        if self.soft_k or self.embedding_dim or self.weights:
            targets = _TargetReader(self.num_classes, self.soft_k, self.embedding_dim, self.weights)
        if self._cache is None and self.cache_bytes and info is None:
            # In-process only: a DataLoader worker lives for one epoch and reads each image once.
            self._cache = DecodedCache(self.cache_bytes)
        decoded = decoded_samples(
            raw,
            self.stats,
            self.channels,
            self.labeled,
            self.num_classes,
            targets,
            skip=skip,
            transform=transform,
            max_pixels=self.max_pixels,
            size=self.decode_size,
            cache=self._cache,
        )
        for key, x, label in decoded:
            yield (key, x, label) if self.with_keys else (x, label)


class _TargetReader:
    """A pseudo-labeled sample's training targets as a dict of arrays (a picklable callable:
    DataLoader workers receive it)."""

    def __init__(
        self, num_classes: int | None, soft_k: int, embedding_dim: int, weights: bool = False
    ) -> None:
        self.num_classes = num_classes
        self.soft_k = soft_k
        self.embedding_dim = embedding_dim
        self.weights = weights

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.soft_k:
            label, topk_class, topk_prob = soft_label.decode(sample, self.num_classes, self.soft_k)
            out: dict[str, Any] = {"label": label, "topk_class": topk_class, "topk_prob": topk_prob}
        else:
            out = {"label": read_label(sample, self.num_classes)}
        if self.embedding_dim:
            out["embedding"] = soft_label.decode_embedding(sample, self.embedding_dim)
        if self.weights:
            out["weight"] = soft_label.decode_weight(sample)
        return out


class SeededTransform:
    """``transform`` with torch's default RNG seeded before each call from ``base`` and the
    call's index, counted from ``start`` (the samples a resumed stream skips untransformed)."""

    def __init__(
        self,
        transform: Callable[[torch.Tensor], torch.Tensor],
        base: tuple[int, ...],
        start: int = 0,
    ) -> None:
        self.transform = transform
        self.prefix = ":".join(map(str, base)).encode()
        self.index = start

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        digest = hashlib.blake2b(b"%s:%d" % (self.prefix, self.index), digest_size=8).digest()
        self.index += 1
        # The CPU generator alone: torch.manual_seed also visits every accelerator (40x slower).
        torch.default_generator.manual_seed(int.from_bytes(digest, "little"))
        return self.transform(img)
