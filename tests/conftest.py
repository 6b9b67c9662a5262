"""Shared fixtures: tiny synthetic shard sets and fake Fashion-MNIST idx files, made per test."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ssl_kd.datasets.idx import write_idx
from ssl_kd.shards import array_samples, write_shards


def separable_images(n_per_class: int, num_classes: int, size: int, seed: int) -> tuple:
    """Grayscale images whose class is a bright horizontal band (flip-invariant), plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    band = size // num_classes
    for c in range(num_classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            img[c * band : (c + 1) * band, :] = 230
            images.append(img)
            labels.append(c)
    order = rng.permutation(len(labels))
    return np.stack(images)[order], np.array(labels)[order]


def write_labeled_shards(
    root: Path, name: str, images: np.ndarray, labels: np.ndarray, per_shard: int
) -> list[str]:
    """Write images with ``.cls`` labels as ``root/name-%06d.tar``."""
    keys = [f"{name}-{i:05d}" for i in range(len(images))]
    samples = array_samples(images, labels, keys)
    return write_shards(samples, str(root / f"{name}-%06d.tar"), per_shard)


@pytest.fixture
def separable_shards(tmp_path: Path) -> dict[str, Path]:
    """Train (4 classes x 48) and test (4 x 16) shards of a linearly separable 16x16 set."""
    train_x, train_y = separable_images(48, 4, 16, seed=1)
    test_x, test_y = separable_images(16, 4, 16, seed=2)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    write_labeled_shards(tmp_path / "train", "train", train_x, train_y, per_shard=64)
    write_labeled_shards(tmp_path / "test", "test", test_x, test_y, per_shard=64)
    return {"train": tmp_path / "train", "test": tmp_path / "test"}


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    """The four Fashion-MNIST idx.gz files with 10 classes x 12 train and 3 test images, 8x8."""
    rng = np.random.default_rng(0)
    src = tmp_path / "fmnist"
    src.mkdir()
    train_y = np.repeat(np.arange(10, dtype=np.uint8), 12)
    test_y = np.repeat(np.arange(10, dtype=np.uint8), 3)
    rng.shuffle(train_y)
    write_idx(src / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (120, 8, 8), np.uint8))
    write_idx(src / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(src / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (30, 8, 8), np.uint8))
    write_idx(src / "t10k-labels-idx1-ubyte.gz", test_y)
    return src


def make_teacher(
    path: Path, arch: str = "cnn", channels: int = 1, size: int = 16, num_classes: int = 4,
    seed: int = 0,
) -> Path:  # fmt: skip
    """A randomly initialised checkpoint in the format ``ssl-kd train`` writes."""
    import torch

    from ssl_kd.models import create_model
    from ssl_kd.preprocess import Preprocess
    from ssl_kd.train.checkpoint import make_meta, save_checkpoint

    torch.manual_seed(seed)
    width = 0.5 if arch == "cnn" else 1.0
    model = create_model(arch, num_classes, channels, size, width=width)
    classes = [f"c{i}" for i in range(num_classes)]
    meta = make_meta(arch, width, 0.0, classes, Preprocess(channels, size), {})
    save_checkpoint(path, {"model": model.state_dict(), "step": 0, "meta": meta})
    return path


def write_unlabeled_shards(
    root: Path, n_shards: int, per_shard: int, size: int = 16, seed: int = 0
) -> list[str]:
    """``root/u-%06d.tar`` shards of random grayscale PNGs without labels."""
    rng = np.random.default_rng(seed)
    n = n_shards * per_shard
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    keys = [f"img-{i:06d}" for i in range(n)]
    return write_shards(array_samples(images, None, keys), str(root / "u-%06d.tar"), per_shard)


def write_plain_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar written by Python's tarfile (not our writer), members in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ssl-kd argv`` in-process: (exit status, stdout, stderr); argparse exits included."""
    from ssl_kd.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
