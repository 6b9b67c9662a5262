"""Shared fixtures: tiny synthetic shard sets and fake Fashion-MNIST idx files, made per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import S3_SECRET, separable_images, write_labeled_shards
from ray_nodes import RayNodes

from ssl_kd.datasets.idx import write_idx


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) on 127.0.0.1; yields its endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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
        endpoint_override=s3_server,
        allow_bucket_creation=True,
        region="us-east-1",
        access_key="ssl-kd-test-key",
        secret_key=S3_SECRET,
    )
    admin.create_dir(bucket)
    storage.clear_cache()
    yield f"s3://{bucket}"
    storage.clear_cache()


@pytest.fixture
def ray_nodes() -> Iterator[RayNodes]:
    """A head (0 CPUs, drives only) and two 1-CPU worker nodes on 127.0.0.1, with token
    authentication; stopped at the end, whatever the test did to them (tests/ray_nodes.py)."""
    nodes = RayNodes(workers=2)
    try:
        yield nodes
    finally:
        nodes.shutdown()


@pytest.fixture
def jobs_nodes() -> Iterator[RayNodes]:
    """The ``ray_nodes`` test bed whose Jobs API answers ``ray job submit``. Ray's Jobs server
    connects to its GCS with ``ray.init``, which swaps 127.0.0.1 for this machine's address,
    where no node of the test bed listens, and hangs: Ray's local-only mode, read from the
    environment when each of the nodes' processes imports ``ray``, keeps 127.0.0.1. A real
    cluster's nodes have real addresses and need none of it. Its own temp directory keeps its
    jobs on it while other Rays start on this machine."""
    # `python` in a job entrypoint is this environment's, as on a node that installed the project.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": path}
    # A short private directory: Ray's unix sockets live under it (a path of at most 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="ray-jobs-")
    nodes = RayNodes(workers=2, temp_dir=temp_dir, env=env)
    try:
        yield nodes
    finally:
        nodes.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
