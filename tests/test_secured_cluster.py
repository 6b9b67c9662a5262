"""A cluster with token authentication (tests/ray_nodes.py) refuses whoever lacks its token.

A worker node, a driver (``ssl-kd label`` with ``RAY_ADDRESS``) and ``ray job submit`` are each
refused within a bounded time, exiting non-zero, when their token is missing or wrong; with the
token, the labeling job runs through ``ray job submit`` on the nodes. Every process started
here is stopped by its own process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_teacher, write_unlabeled_shards
from ray_nodes import wait_for
from test_job_submit import RAY, ROOT, _label_job

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

WRONG = "0" * 32

# `ray start --address=127.0.0.1:PORT`, as on another machine. Ray swaps 127.0.0.1 (in the
# address and in --node-ip-address) for this machine's address, where no node of the test bed
# listens; a real second machine gives its own address, so the swap is undone here, and
# nothing else.
RAY_START = """
import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray", "start", *sys.argv[1:]]
main()
"""


def _env(nodes, home: Path, **changes: str | None) -> dict[str, str]:
    """``nodes.env`` with ``changes`` (None removes a variable) and a HOME without
    ``~/.ray/auth_token``, so that only what a test gives is a token."""
    home.mkdir(exist_ok=True)
    env = {**nodes.env, "HOME": str(home)}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(cmd: list[str], env: dict[str, str], limit: float) -> tuple[int, str, float]:
    """Run ``cmd`` in its own process group; (exit status, stderr, seconds). Fails the test,
    after killing the group, when it runs past ``limit`` seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} was not refused within {limit:.0f} s")
    return proc.returncode, err, time.monotonic() - start


def _alive_nodes(nodes) -> int:
    from ray.util.state import list_nodes

    return len(list_nodes(address=nodes.jobs_address, filters=[("state", "=", "ALIVE")]))


def _worker(nodes, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A 1-CPU worker node joining through ``ray start --block``, in its own process group
    (``ray start`` refuses worker nodes in Ray's local-only mode: the machine is the node)."""
    env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    cmd = [sys.executable, "-c", RAY_START, f"--address={nodes.address}", "--block"]
    cmd += ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    with log.open("w") as sink:
        return subprocess.Popen(
            cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    """Stop what ``_worker`` started: the whole process group of its ``ray start``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_worker_node_without_the_token_is_refused(jobs_nodes, tmp_path: Path) -> None:
    before = _alive_nodes(jobs_nodes)
    cases = {
        "wrong": {"RAY_AUTH_TOKEN": WRONG},
        "missing": {"RAY_AUTH_TOKEN": None},
        "not sent": {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None},
    }
    for case, changes in cases.items():
        log = tmp_path / f"worker-{case.replace(' ', '-')}.log"
        proc = _worker(jobs_nodes, _env(jobs_nodes, tmp_path / "home", **changes), log)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a worker with the token {case} was not refused within 180 s")
        finally:
            _stop(proc)
        assert code != 0, f"{case}: {log.read_text()[-2000:]}"
        assert _alive_nodes(jobs_nodes) == before, case
    # The same command with the token joins: the refusals above were the token's.
    proc = _worker(jobs_nodes, _env(jobs_nodes, tmp_path / "home"), tmp_path / "worker-ok.log")
    try:
        wait_for(lambda: _alive_nodes(jobs_nodes) == before + 1, 120, "the worker with the token")
    finally:
        _stop(proc)


def test_a_driver_without_the_token_is_one_line(jobs_nodes, tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    write_unlabeled_shards(tmp_path / "s", n_shards=2, per_shard=10, size=16)
    make_teacher(tmp_path / "t.pt")
    label = [sys.executable, "-m", "ssl_kd.cli", "-q", "label", "--k", "3"]
    label += ["--teacher", str(tmp_path / "t.pt"), "--shards", str(tmp_path / "s")]
    label += ["--out", str(tmp_path / "l")]
    cases = {
        "wrong": {"RAY_AUTH_TOKEN": WRONG},
        "missing": {"RAY_AUTH_TOKEN": None},
        "not sent": {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None},
    }
    for case, changes in cases.items():
        env = _env(jobs_nodes, tmp_path / "home", **changes)
        code, err, took = _run(label, env, limit=180)
        ours = [line for line in err.splitlines() if line.startswith("ssl-kd: error:")]
        assert code == 2 and len(ours) == 1, f"{case} ({took:.0f} s): {err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
        assert "token is missing or wrong" in ours[0] and "RAY_AUTH_TOKEN" in ours[0], ours
        assert ("not 'token'" in ours[0]) == (case == "not sent"), ours
    assert not (tmp_path / "l").exists() or not list((tmp_path / "l").glob("*.parquet"))


def test_ray_job_submit_without_the_token_is_refused(jobs_nodes, tmp_path: Path) -> None:
    submit = [str(RAY), "job", "submit", "--address", jobs_nodes.jobs_address, "--no-wait"]
    submit += ["--", "python", "-c", "pass"]
    for changes in ({"RAY_AUTH_TOKEN": WRONG}, {"RAY_AUTH_TOKEN": None}):
        # RAY_ADDRESS would win over --address (Ray's Jobs CLI reads it first).
        env = _env(jobs_nodes, tmp_path / "home", RAY_ADDRESS=None, **changes)
        code, err, _ = _run(submit, env, limit=120)
        assert code != 0 and "AuthenticationError" in err, err[-2000:]
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(jobs_nodes.jobs_address).list_jobs() == []


def test_the_label_job_runs_through_ray_job_submit_with_the_token(
    jobs_nodes, tmp_path: Path
) -> None:
    from ray.util.state import list_actors

    if not RAY.exists():
        pytest.skip(f"no ray executable beside {sys.executable}")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_unlabeled_shards(shards, n_shards=4, per_shard=20)
    teacher = make_teacher(tmp_path / "teacher.pt")
    env = _env(jobs_nodes, tmp_path / "home", RAY_ADDRESS=None)
    _, logs = _label_job(jobs_nodes.jobs_address, env, teacher, shards, tmp_path / "labels")
    assert "labeled 4 shards" in logs
    summary = json.loads((tmp_path / "labels" / "run_summary.json").read_text())
    assert summary["rows"] == 80 and not summary["failed"]
    # The head has no CPU: the labeling actors ran on the worker nodes.
    actors = list_actors(address=jobs_nodes.jobs_address, detail=True, limit=1000)
    nodes = {a.node_id for a in actors if "LabelWorker" in (a.class_name or "")}
    assert nodes and nodes <= {w.node_id for w in jobs_nodes.workers}, actors
