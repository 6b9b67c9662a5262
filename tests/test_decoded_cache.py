"""Decoded images kept in memory across epochs: the same pixels, one decode per image."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from helpers import count_decodes, separable_images, write_labeled_shards

from ssl_kd.shards import expand_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.shards.decoded_cache import DecodedCache


def test_keeps_images_up_to_its_budget_and_hands_out_copies() -> None:
    cache = DecodedCache(max_bytes=2 * 16)
    samples = [{"__url__": "a.tar", "__key__": str(i)} for i in range(3)]
    images = [torch.full((1, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    for s, img in zip(samples, images, strict=True):
        assert cache.get(s) is None
        cache.put(s, img)
    assert len(cache) == 2 and cache.used == 32  # the third did not fit
    assert cache.get(samples[2]) is None
    images[0].fill_(9)  # the caller's tensor is not the kept one
    got = cache.get(samples[0])
    assert got is not None and torch.equal(got, torch.zeros(1, 4, 4, dtype=torch.uint8))
    got.fill_(7)  # nor is a copy handed out
    assert torch.equal(cache.get(samples[0]), torch.zeros(1, 4, 4, dtype=torch.uint8))
    assert cache.get({"__url__": "b.tar", "__key__": "0"}) is None  # keys are per shard
    assert cache.hits == 2


@pytest.mark.parametrize("budget", [1 << 20, 40 * 16 * 16])
def test_later_epochs_read_kept_images(
    budget: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = separable_images(16, 4, 16, seed=0)  # 64 gray 16x16 images
    write_labeled_shards(tmp_path, "d", x, y, per_shard=20)
    urls = expand_shards(str(tmp_path))
    decodes = count_decodes(monkeypatch)

    def epochs(cache_bytes: int) -> list[list[tuple[torch.Tensor, int]]]:
        ds = ShardImageDataset(urls, lambda t: t, 1, shuffle_buffer=16, cache_bytes=cache_bytes)
        out = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            out.append(list(ds))
        return out

    plain = epochs(0)
    assert len(decodes) == 3 * 64
    decodes.clear()
    cached = epochs(budget)
    kept = min(64, budget // (16 * 16))
    assert len(decodes) == 64 + 2 * (64 - kept)
    for a, b in zip(plain, cached, strict=True):
        assert [int(label) for _, label in a] == [int(label) for _, label in b]
        assert all(torch.equal(ia, ib) for (ia, _), (ib, _) in zip(a, b, strict=True))


def test_a_pickled_dataset_leaves_its_images_behind(tmp_path: Path) -> None:
    x, y = separable_images(4, 4, 16, seed=0)
    write_labeled_shards(tmp_path, "d", x, y, per_shard=16)
    ds = ShardImageDataset(expand_shards(str(tmp_path)), torch.clone, 1, cache_bytes=1 << 20)
    assert len(list(ds)) == 16 and len(ds._cache) == 16
    copy = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets
    assert copy._cache is None and copy.cache_bytes == 1 << 20
    assert len(list(copy)) == 16 and len(copy._cache) == 16
