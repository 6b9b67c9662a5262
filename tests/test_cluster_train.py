"""Pretraining on several Ray nodes (tests/ray_nodes.py): a node lost mid-run, a cluster too
small for the request, and the output on an object store.

The node-loss tests hold every rank after step ``HOLD`` (``SSL_KD_HOLD_AT``) until the test has
seen that step's checkpoint registered by Ray Train and killed a node, so the loss lands at a
known step however loaded the machine is. What is asserted is what was computed (the summary,
``metrics.jsonl``, the checkpoints), never what the logs claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_nodes import wait_for
from test_student import write_pseudo_labeled

from ssl_kd import storage
from ssl_kd.models.checkpoint import load_checkpoint
from ssl_kd.train.fault_hooks import HOLD_ENV

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

STEPS, CKPT_EVERY, HOLD = 16, 4, 8


@pytest.fixture
def go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file that releases the ranks held after step HOLD. Request it before ``ray_nodes``:
    the nodes' workers inherit the environment the nodes start with."""
    monkeypatch.setenv(HOLD_ENV, f"{tmp_path / 'go'}:{HOLD}")
    return tmp_path / "go"


def pretrain(data: Path, out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ssl_kd.cli",
        "-q",
        "pretrain",
        *("--data", str(data), "--out", out, "--arch", "cnn", "--width", "0.5"),
        *("--loss", "soft", "--temperature", "2", "--steps", str(STEPS), "--batch-size", "16"),
        *("--lr", "0.05", "--warmup-steps", "2", "--ckpt-every", str(CKPT_EVERY)),
        *("--log-every", "2", "--shuffle-buffer", "64", "--executor", "ray", "--workers", "2"),
        *("--max-failures", "1", "--start-timeout", "20"),
        *extra,
    ]


class Run:
    """A CLI command running against the nodes, its output in files (no pipe to fill)."""

    def __init__(self, cmd: list[str], env: dict[str, str], logs: Path) -> None:
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no exit in {timeout:.0f} s:\n{self.tail()}") from None

    def tail(self) -> str:
        return self.err.read_text()[-3000:]


def registered_step(out: Path) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered (what a restart
    resumes from), or None."""
    snapshot = out / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not there yet, or being rewritten
        return None
    return latest["metrics"]["step"] if latest else None


def kill_after_hold(run: Run, out: Path, ray_nodes, go: Path) -> None:
    """Wait until step HOLD's checkpoint is registered, then lose a worker node and release
    the surviving rank."""
    wait_for(
        lambda: registered_step(out) == HOLD or run.proc.poll() is not None,
        300,
        f"the step-{HOLD} checkpoint",
    )
    assert run.proc.poll() is None, run.tail()
    ray_nodes.kill(ray_nodes.workers[0])
    go.touch()


def train_steps(out: Path) -> list[int]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "loss" in x]


def assert_resumed_at_hold(out: Path, summary: dict) -> None:
    assert summary["step"] == STEPS
    assert summary["resumed_at"] == HOLD  # not 0: Ray issue #46814 said "restored" and was not
    assert summary["steps_per_rank"] == [STEPS - HOLD] * 2
    assert load_checkpoint(out / "checkpoint.pt")["step"] == STEPS
    assert train_steps(out) == list(range(2, STEPS + 1, 2))  # each step logged once


def test_node_lost_mid_run_resumes_on_a_replacement(tmp_path: Path, go: Path, ray_nodes) -> None:
    data = write_pseudo_labeled(tmp_path / "pseudo")
    out = tmp_path / "student"
    run = Run(pretrain(data, str(out)), ray_nodes.env, tmp_path / "pretrain")
    kill_after_hold(run, out, ray_nodes, go)
    ray_nodes.add()  # the restart's room
    assert run.wait(300) == 0, run.tail()
    summary = json.loads((out / "summary.json").read_text())
    assert_resumed_at_hold(out, summary)
    # One TensorBoard file per attempt of rank 0: exactly one restart.
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert not list(out.glob(".ssl-kd-probe-*"))  # the shared-directory probe was removed


def test_node_lost_with_no_replacement_fails_in_bounded_time(
    tmp_path: Path, go: Path, ray_nodes
) -> None:
    data = write_pseudo_labeled(tmp_path / "pseudo")
    out = tmp_path / "student"
    cmd = pretrain(data, str(out))
    run = Run(cmd, ray_nodes.env, tmp_path / "pretrain")
    kill_after_hold(run, out, ray_nodes, go)
    lost = time.monotonic()
    # A restart waits --start-timeout 20 s for room, twice (--max-failures 1), then gives up.
    assert run.wait(240) == 2, run.tail()
    waited = time.monotonic() - lost
    lines = run.err.read_text().strip().splitlines()
    errors = [x for x in lines if x.startswith("ssl-kd: error:")]
    assert errors == [lines[-1]], run.tail()
    assert "no room for 2 worker(s) of 1 CPU" in errors[0] and "rerun" in errors[0]
    assert "Traceback" not in run.err.read_text()
    assert 40 <= waited < 240
    # A node back, the same command resumes from the last checkpoint, not from step 0.
    ray_nodes.add()
    again = Run(cmd, ray_nodes.env, tmp_path / "again")
    assert again.wait(300) == 0, again.tail()
    assert_resumed_at_hold(out, json.loads((out / "summary.json").read_text()))


def test_a_stuck_rank_fails_its_peer_after_the_dist_timeout(
    tmp_path: Path, go: Path, ray_nodes
) -> None:
    """A rank that stops answering (SIGSTOP: alive, silent) is not waited for 30 minutes: its
    peer's next collective fails after --dist-timeout, and the group restarts from the last
    checkpoint."""
    from ray.util.state import list_actors

    data = write_pseudo_labeled(tmp_path / "pseudo")
    out = tmp_path / "student"
    run = Run(pretrain(data, str(out), "--dist-timeout", "20"), ray_nodes.env, tmp_path / "p")
    wait_for(lambda: registered_step(out) == HOLD, 300, f"the step-{HOLD} checkpoint")
    actors = list_actors(address=ray_nodes.jobs_address, detail=True, limit=1000)
    ranks = [a for a in actors if "TrainWorker" in (a.class_name or "") and a.state == "ALIVE"]
    assert len(ranks) == 2, actors
    stuck = ranks[0].pid
    os.kill(stuck, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        go.touch()
        assert run.wait(300) == 0, run.tail()
        assert time.monotonic() - stopped < 240
    finally:
        with contextlib.suppress(ProcessLookupError):  # Ray killed it when the group restarted
            os.kill(stuck, signal.SIGKILL)
    assert_resumed_at_hold(out, json.loads((out / "summary.json").read_text()))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_requests_the_cluster_cannot_meet_fail_at_once(tmp_path: Path, ray_nodes) -> None:
    from helpers import make_teacher, write_unlabeled_shards

    data = write_pseudo_labeled(tmp_path / "pseudo")
    (tmp_path / "s").mkdir()
    write_unlabeled_shards(tmp_path / "s", n_shards=4, per_shard=4, size=16)
    make_teacher(tmp_path / "t.pt")
    label = [sys.executable, "-m", "ssl_kd.cli", "-q", "label", "--teacher", str(tmp_path / "t.pt")]
    label += ["--shards", str(tmp_path / "s"), "--out", str(tmp_path / "l"), "--k", "3"]
    cases = {
        "3 workers": (
            pretrain(data, str(tmp_path / "a"), "--workers", "3"),
            "training asks for 3 worker(s) of 1 CPU but the Ray cluster has 2 CPUs in total",
        ),
        "gpu": (
            pretrain(data, str(tmp_path / "b"), "--use-gpu"),
            "training asks for 2 worker(s) of 1 GPU but the Ray cluster has no GPU",
        ),
        "label on cuda": (
            [*label, "--device", "cuda"],
            "labeling asks for 1 worker(s) of 1 CPU and 1 GPU but the Ray cluster has no GPU",
        ),
        "label 3 workers": (
            [*label, "--workers", "3"],
            "labeling asks for 3 worker(s) of 1 CPU but the Ray cluster has 2 CPUs in total",
        ),
    }
    for name, (cmd, message) in cases.items():
        start = time.monotonic()
        done = subprocess.run(cmd, env=ray_nodes.env, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - start
        assert done.returncode == 2, (name, done.stderr[-3000:])
        lines = done.stderr.strip().splitlines()
        errors = [x for x in lines if x.startswith("ssl-kd: error:")]
        assert errors == [lines[-1]], (name, done.stderr[-3000:])
        assert message in errors[0], (name, errors[0])
        assert seconds < 60, (name, seconds)
    assert not (tmp_path / "a" / "ray").exists()  # refused before Ray Train started


def test_two_ranks_on_two_nodes_into_a_bucket(s3: str, tmp_path: Path, ray_nodes) -> None:
    """Pretraining, then fine-tuning from the bucket's checkpoint, each with 2 ranks on 2
    nodes. ``s3`` before ``ray_nodes``: the nodes start with the test server's credentials."""
    data = write_pseudo_labeled(tmp_path / "pseudo")
    out = storage.join(s3, "student")
    run = Run(pretrain(data, out), ray_nodes.env, tmp_path / "pretrain")
    assert run.wait(300) == 0, run.tail()
    summary = json.loads(storage.read_text(storage.join(out, "summary.json")))
    assert summary["step"] == STEPS and summary["steps_per_rank"] == [STEPS, STEPS]
    assert storage.is_file(storage.join(out, "checkpoint.pt"))
    assert storage.is_file(storage.join(out, "ray", "train", "checkpoint_manager_snapshot.json"))

    # Fine-tuning is the same loop and trainer with the true labels (the shards' .cls).
    tuned = storage.join(s3, "finetuned")
    cmd = pretrain(data, tuned, "--init", storage.join(out, "checkpoint.pt"))
    cmd[cmd.index("pretrain")] = "finetune"
    for flag in ("--arch", "--width", "--loss", "--temperature"):  # from the checkpoint, or none
        at = cmd.index(flag)
        del cmd[at : at + 2]
    run = Run(cmd, ray_nodes.env, tmp_path / "finetune")
    assert run.wait(300) == 0, run.tail()
    summary = json.loads(storage.read_text(storage.join(tuned, "summary.json")))
    assert summary["step"] == STEPS and summary["steps_per_rank"] == [STEPS, STEPS]
    assert storage.is_file(storage.join(tuned, "checkpoint.pt"))
