"""Shared fixtures: tiny synthetic shard sets and fake Fashion-MNIST idx files, made per test."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
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

    from ssl_kd.models.checkpoint import make_meta, save_checkpoint
    from ssl_kd.models.preprocess import Preprocess
    from ssl_kd.models.registry import create_model

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


# A throwaway credential: tests assert that it never reaches a log line or a written file.
S3_SECRET = "ssl-kd-test-secret-5f2c9a"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) on 127.0.0.1; yields its endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 test server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fresh bucket on the test server, with the AWS SDK pointed at it through the
    environment only (as on a cluster node); yields ``s3://BUCKET``."""
    import pyarrow.fs as pafs

    from ssl_kd import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ssl-kd-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probing
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    admin = pafs.S3FileSystem(
        endpoint_override=s3_server, allow_bucket_creation=True, region="us-east-1",
        access_key="ssl-kd-test-key", secret_key=S3_SECRET,
    )  # fmt: skip
    admin.create_dir(bucket)
    storage.clear_cache()
    yield f"s3://{bucket}"
    storage.clear_cache()
