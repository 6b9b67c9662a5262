"""``ssl-kd run`` on several Ray nodes (tests/ray_nodes.py): the whole pipeline, through
``RAY_ADDRESS`` as a user runs it, its Ray work on the worker nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_the_pipeline_runs_on_several_nodes(tmp_path: Path, fake_fmnist: Path, ray_nodes) -> None:
    from ray.util.state import list_actors, list_tasks

    config = {**TINY, "executor": "ray", "seeds": [0], "out": str(tmp_path / "run")}
    config["source"] = str(fake_fmnist)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "ssl_kd.cli",
        "-q",
        "run",
        "--config",
        str(tmp_path / "config.yaml"),
    ]
    done = subprocess.run(cmd, env=ray_nodes.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "run/results/results.json").read_text())
    assert {m["model"] for m in doc["models"]} >= {"teacher", "baseline", "finetuned"}

    # The tiny pool is one shard (one labeling actor): spreading is labeling's test; here,
    # every labeling actor and stage task ran on a worker node, none on the head (no CPU).
    workers = {w.node_id for w in ray_nodes.workers}
    api = ray_nodes.jobs_address
    actors = [a for a in list_actors(address=api, detail=True, limit=1000) if a.class_name]
    tasks = list_tasks(address=api, detail=True, limit=10_000)
    labelers = {a.node_id for a in actors if "LabelWorker" in a.class_name}
    # The stages' own tasks (a zero-CPU probe of --out runs on every node, head included).
    stage_tasks = ("_single_threaded_partial", "map_source_shard", "reduce_output_shard")
    ran_on = {t.node_id for t in tasks if any(name in (t.name or "") for name in stage_tasks)}
    assert labelers and ran_on, (actors, tasks)
    assert labelers | ran_on <= workers, (actors, tasks)
