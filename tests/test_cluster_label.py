"""Labeling on several Ray nodes (tests/ray_nodes.py): the work is spread over the nodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_teacher, write_unlabeled_shards

from ssl_kd.label.files import LabelSet

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_labeling_spreads_over_the_nodes(tmp_path: Path, ray_nodes) -> None:
    from ray.util.state import list_actors

    (tmp_path / "s").mkdir()
    write_unlabeled_shards(tmp_path / "s", n_shards=8, per_shard=20, size=16)
    make_teacher(tmp_path / "t.pt")
    cmd = [
        sys.executable,
        "-m",
        "ssl_kd.cli",
        "-q",
        "label",
        "--teacher",
        str(tmp_path / "t.pt"),
        "--shards",
        str(tmp_path / "s"),
        "--out",
        str(tmp_path / "l"),
        "--k",
        "3",
    ]
    done = subprocess.run(cmd, env=ray_nodes.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    labels = LabelSet(tmp_path / "l")
    assert labels.num_rows == 160
    actors = list_actors(address=ray_nodes.jobs_address, detail=True, limit=1000)
    nodes = {a.node_id for a in actors if "LabelWorker" in (a.class_name or "")}
    assert nodes == {w.node_id for w in ray_nodes.workers}, actors
