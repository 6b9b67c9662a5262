"""Exactly once: SIGKILL a labeling job mid-run, rerun it, every key appears exactly once."""

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

from ssl_kd.label.files import LabelSet
from ssl_kd.shards import ReadStats, iter_samples

SHARDS = 20


def _label_cmd(root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ssl_kd.cli",
        "-q",
        "label",
        "--teacher",
        str(root / "t.pt"),
        "--shards",
        str(root / "s"),
        "--out",
        str(root / "l"),
        "--batch-size",
        "8",
    ]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_labels_every_key_exactly_once(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    urls = write_unlabeled_shards(tmp_path / "s", n_shards=SHARDS, per_shard=100, size=32)
    make_teacher(tmp_path / "t.pt", arch="resnet18", size=32, num_classes=10)
    out = tmp_path / "l"

    # Own process group: the kill takes the driver and every Ray process it started, as a
    # crashed node would; actors are cut off mid-shard, leaving temp files behind.
    job = subprocess.Popen(_label_cmd(tmp_path), start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None:
            if len(list(out.glob("*.parquet"))) >= 1:
                break
            time.sleep(0.02)
        assert job.poll() is None, "the job finished before it could be killed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    done_at_kill = len(list(out.glob("*.parquet")))
    assert 1 <= done_at_kill < SHARDS

    rerun = subprocess.run(
        _label_cmd(tmp_path), capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["already_done"] >= done_at_kill and summary["labeled"] >= 1
    assert summary["already_done"] + summary["labeled"] == SHARDS

    expected = [
        (s["__url__"].rsplit("/", 1)[-1], s["__key__"]) for s in iter_samples(urls, ReadStats())
    ]
    got = [
        (shard, key)
        for b in LabelSet(out).iter_batches(columns=["shard", "key"])
        for shard, key in zip(
            b.column("shard").to_pylist(), b.column("key").to_pylist(), strict=True
        )
    ]
    assert len(got) == len(set(got)) == len(expected) == SHARDS * 100
    assert set(got) == set(expected)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
