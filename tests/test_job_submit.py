"""``ray job submit`` against a real Ray head on 127.0.0.1: the labeling job runs unchanged.

The head is started with ``ray start --head --block`` in its own process group, with token
authentication on (the token lives in the environment only), and stopped by that PID's group at
the end, whatever happens in between.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import S3_SECRET, make_teacher, write_unlabeled_shards

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RAY), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _submit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the head's job agent is still starting (Ray answers
    "No available agent to submit job, please try again later" until it is up)."""
    deadline = time.monotonic() + 120
    while True:
        done = _ray(["job", "submit", *args], env)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with the Jobs API on 127.0.0.1; yields (address, env)."""
    if not RAY.exists():
        pytest.skip(f"no ray executable beside {sys.executable}")
    # `python` in a job entrypoint is this environment's, as on a node that installed the project.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": path,
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    # Every agent port explicit and free: the defaults (52365 for the dashboard agent) are
    # already taken when an earlier test left an in-process Ray running, and the head's agent
    # then never starts ("No available agent to submit job").
    agent_ports = [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
            *agent_ports,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:  # the Jobs API answers once the dashboard is up
            if head.poll() is not None:
                pytest.fail(f"ray start exited: {(tmp_path / 'head.log').read_text()[-2000:]}")
            if _ray(["job", "list", "--address", address], env, 30).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail("the Ray head did not come up in 90 s")
            time.sleep(1)
        yield address, env
    finally:
        # Stop what we started, by PID: the whole process group of `ray start --block`.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()


def _wait_for_success(address: str, job_id: str, env: dict[str, str]) -> str:
    """Poll until the job ends; fails unless it SUCCEEDED. Returns its logs."""
    deadline, status = time.monotonic() + 180, ""
    while time.monotonic() < deadline:
        status = _ray(["job", "status", "--address", address, job_id], env, 30).stdout.upper()
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(2)
    logs = _ray(["job", "logs", "--address", address, job_id], env, 30).stdout
    assert "SUCCEEDED" in status, f"{status}\n{logs[-3000:]}"
    return logs


def _label_job(address: str, env: dict[str, str], *paths: object) -> tuple[str, str]:
    """Submit ``jobs/label.py --teacher T --shards S --out O --k 3`` and wait for it to succeed;
    returns the job id and its logs."""
    teacher, shards, out = map(str, paths)
    job_id = f"ssl-kd-test-{secrets.token_hex(4)}"
    entry = ["python", "jobs/label.py", "--teacher", teacher, "--shards", shards, "--out", out]
    head = ["--address", address, "--submission-id", job_id, "--working-dir", ".", "--no-wait"]
    submitted = _submit([*head, "--", *entry, "--k", "3"], env)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    return job_id, _wait_for_success(address, job_id, env)


def test_label_job_through_ray_job_submit(tmp_path, ray_head):
    address, env = ray_head
    shards = tmp_path / "shards"
    shards.mkdir()
    write_unlabeled_shards(shards, n_shards=3, per_shard=20)
    teacher = make_teacher(tmp_path / "teacher.pt")
    out = tmp_path / "labels"
    job_id, logs = _label_job(address, env, teacher, shards, out)
    assert "labeled 3 shards" in logs

    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == [f"u-{i:06d}.parquet" for i in range(3)]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["rows"] == 60 and not summary["failed"]
    # A reused submission id is refused: the natural guard against submitting twice.
    again = _ray(
        [
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job_id,
            "--no-wait",
            "--",
            "python",
            "-c",
            "pass",
        ],
        env,
    )
    assert again.returncode != 0


def test_label_job_on_s3_through_ray_job_submit(s3, tmp_path, ray_head):
    """The same job with every path in the S3 test server: the head (started after ``s3`` set
    the environment) passes the credentials to the job's processes; none shows in its logs."""
    from ssl_kd import storage
    from ssl_kd.shards import array_samples, write_shards

    address, env = ray_head
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 16, 16), dtype=np.uint8)
    keys = [f"img-{i:06d}" for i in range(40)]
    write_shards(array_samples(images, None, keys), f"{s3}/u/u-%06d.tar", 20)
    teacher = make_teacher(f"{s3}/teacher.pt")  # type: ignore[arg-type]
    _, logs = _label_job(address, env, teacher, f"{s3}/u", f"{s3}/labels")
    assert S3_SECRET not in logs
    files = storage.list_dir(f"{s3}/labels", "*.parquet")
    assert [storage.name(f) for f in files] == ["u-000000.parquet", "u-000001.parquet"]
    summary = json.loads(storage.read_text(f"{s3}/labels/run_summary.json"))
    assert summary["rows"] == 40 and not summary["failed"]
