"""Decoding on worker processes: the same labels and skips as decoding in one thread, and a
worker that raises, dies or hangs fails the read instead of hanging it."""

from __future__ import annotations

import io
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_teacher, mixed_images, write_plain_tar
from PIL import Image

from ssl_kd.config import ConfigError, from_dict
from ssl_kd.label.run import LabelConfig
from ssl_kd.label.teacher import Teacher, decode_spec, label_shard, label_shard_to_dir
from ssl_kd.label.workers import LabelWorker, split_cpus
from ssl_kd.models.preprocess import Preprocess
from ssl_kd.shards import decode_pool, process_pool
from ssl_kd.shards.decode_pool import DecodeSpec, decode_in_order
from ssl_kd.shards.process_pool import WorkerDied
from ssl_kd.shards.reader import ReadStats, decoded_samples, iter_shard

WORKERS = 2  # one pool size for the whole file: the pool is started once and reused


def _jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def mixed_shard(tmp_path: Path) -> str:
    """A shard of good images of every mode and size, with one of each kind of skip between
    them; its tar is cut short at the end."""
    members: list[tuple[str, bytes]] = []
    for i, (ext, data) in enumerate(mixed_images(24, seed=3)):
        members.append((f"img{i:03d}.{ext}", data))
        if i == 2:
            members.append(("corrupt.jpg", _jpeg(32, 0)[:150]))
        if i == 5:
            members.append(("big.jpg", _jpeg(200, 1)))  # over the max_pixels of the tests
        if i == 9:
            members.append(("img003.jpg", _jpeg(32, 2)))  # a key seen before
        if i == 11:
            members.append(("nolabel.txt", b"no image here"))
        if i == 17:
            members.append(("../escape.jpg", _jpeg(32, 3)))
    members.append(("last.jpg", _jpeg(64, 4)))
    path = tmp_path / "u-000000.tar"
    write_plain_tar(path, members)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"last.jpg") + 512 + 100])  # cut inside the last image
    return str(path)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 samples: skips fall on both sides of chunk boundaries."""
    monkeypatch.setattr(decode_pool, "CHUNK", 3)


def test_pooled_labels_and_skips_equal_one_thread(
    tmp_path: Path, mixed_shard: str, small_chunks: None
) -> None:
    teacher = Teacher(str(make_teacher(tmp_path / "t.pt", channels=3, size=16)), k=3)
    files = {}
    for workers in (1, WORKERS):
        out = tmp_path / f"out{workers}"
        status = label_shard_to_dir(teacher, mixed_shard, out, 5, 100 * 100, workers)
        files[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        files[workers]["status"] = repr({k: status[k] for k in status if k != "seconds"})
    assert files[1] == files[WORKERS]  # Parquet and errors file byte for byte, and the status
    status = files[1]["status"]
    for reason in (
        "corrupt image",
        "image too large",
        "duplicate key",
        "no image member",
        "unsafe key",
        "truncated tar",
    ):
        assert reason in status
    assert "'truncated': True" in status


def test_pooled_read_matches_serial_read(mixed_shard: str, small_chunks: None) -> None:
    spec = decode_spec(Preprocess(3, 16), 100 * 100)
    serial_stats, pooled_stats = ReadStats(), ReadStats()
    serial = decoded_samples(
        iter_shard(mixed_shard, serial_stats),
        serial_stats,
        spec.channels,
        labeled=False,
        transform=spec.transform,
        max_pixels=spec.max_pixels,
        size=spec.size,
    )
    expected = [(key, img) for key, img, _ in serial]
    pooled = list(decode_in_order(partial(iter_shard, mixed_shard), pooled_stats, spec, WORKERS))
    assert [k for k, _ in pooled] == [k for k, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(pooled, expected, strict=True))
    assert pooled_stats.as_dict() == serial_stats.as_dict()
    assert pooled_stats.errors == serial_stats.errors


def test_a_read_stopped_early_leaves_the_pool_usable(mixed_shard: str, small_chunks: None) -> None:
    spec = decode_spec(Preprocess(3, 16), 100 * 100)
    stopped = decode_in_order(partial(iter_shard, mixed_shard), ReadStats(), spec, WORKERS)
    next(stopped)
    stopped.close()  # chunks already sent are still decoded: their results must be dropped
    first = list(decode_in_order(partial(iter_shard, mixed_shard), ReadStats(), spec, WORKERS))
    again = list(decode_in_order(partial(iter_shard, mixed_shard), ReadStats(), spec, WORKERS))
    assert [k for k, _ in first] == [k for k, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))


class Boom(BaseException):
    """Not an Exception: a bad sample's error is caught as a skip, this one is not."""


def _explode(img: torch.Tensor) -> torch.Tensor:
    raise Boom("raised in the decode worker")


def _die(img: torch.Tensor) -> torch.Tensor:
    os._exit(3)


def _hang(img: torch.Tensor) -> torch.Tensor:
    time.sleep(300)
    return img


def _read(url: str, transform: object) -> list[tuple[str, torch.Tensor]]:
    spec = DecodeSpec(3, size=16, transform=transform)  # type: ignore[arg-type]
    return list(decode_in_order(partial(iter_shard, url), ReadStats(), spec, WORKERS))


def test_an_exception_in_a_worker_surfaces_in_the_reader(mixed_shard: str) -> None:
    with pytest.raises(Boom, match="raised in the decode worker") as info:
        _read(mixed_shard, _explode)
    assert "_explode" in str(info.value.__cause__)  # the worker's traceback
    assert len(_read(mixed_shard, None)) > 20  # the same pool goes on working


def test_a_worker_that_dies_fails_the_read_and_is_replaced(mixed_shard: str) -> None:
    with pytest.raises(WorkerDied, match="exit code 3"):
        _read(mixed_shard, _die)
    assert len(_read(mixed_shard, None)) > 20


def test_a_hung_worker_fails_the_read(mixed_shard: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_pool, "HUNG_AFTER_S", 2.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="hung"):
        _read(mixed_shard, _hang)
    assert time.monotonic() - t0 < 30
    # A fresh pool replaced the killed one (its start-up, seconds on a busy machine, is no hang).
    monkeypatch.setattr(process_pool, "HUNG_AFTER_S", 600.0)
    assert len(_read(mixed_shard, None)) > 20


def test_an_idle_pool_is_stopped_and_started_again(
    mixed_shard: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _read(mixed_shard, None)
    procs = process_pool._SHARED.procs  # type: ignore[union-attr]
    monkeypatch.setattr(process_pool, "IDLE_STOP_S", 0.5)
    deadline = time.monotonic() + 30
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_pool._SHARED is None
    assert all(p.poll() is not None for p in procs)  # the processes are gone
    monkeypatch.setattr(process_pool, "IDLE_STOP_S", 60.0)
    assert [k for k, _ in _read(mixed_shard, None)] == [k for k, _ in first]


def test_decode_workers_are_checked_and_default_to_the_workers_cpus(tmp_path: Path) -> None:
    ckpt = str(make_teacher(tmp_path / "t.pt", channels=3, size=16))
    with pytest.raises(ValueError, match="decode_workers must be >= 1"):
        label_shard(Teacher(ckpt, k=2), "unused.tar", decode_workers=0)
    values = {"teacher": ckpt, "shards": str(tmp_path), "out": str(tmp_path / "out"), "k": 2}
    with pytest.raises(ConfigError, match="decode_workers"):
        from_dict(LabelConfig, {**values, "decode_workers": -1})
    cfg = from_dict(LabelConfig, values)
    threads = torch.get_num_threads()
    try:
        assert LabelWorker(cfg, threads=1).decode_workers == 1
        # A teacher on the CPU: one decode thread, every CPU to the forward pass.
        serial = LabelWorker(cfg, threads=WORKERS)
        assert (serial.decode_workers, serial.forward_threads) == (1, WORKERS)
        # A decode process per CPU asked for: the forward pass keeps one thread.
        both = LabelWorker(replace(cfg, decode_workers=WORKERS), threads=WORKERS)
        assert (both.decode_workers, both.forward_threads) == (WORKERS, 1)
    finally:
        torch.set_num_threads(threads)
    # With a GPU, the default is a decode process per CPU, the forward pass keeping one thread.
    gpu = torch.device("cuda")
    assert split_cpus(0, 8, gpu, 8) == (8, 1)
    assert split_cpus(6, 8, gpu, 8) == (6, 2)
    assert split_cpus(1, 8, gpu, 8) == (1, 8)
