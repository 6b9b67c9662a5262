"""Faults on several Ray nodes (tests/ray_nodes.py): nodes lost, actors and drivers killed.

Every stage command runs as a user's would (a subprocess with ``RAY_ADDRESS``), a fault is
injected once the run has visibly made progress (files appearing, tasks running on the node to
lose), and the outputs are compared with one fault-free run of the same command: nothing lost,
nothing twice, the same labels, the same bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from helpers import make_teacher, write_unlabeled_shards
from ray_nodes import RayNodes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SHARDS, PER_SHARD = 24, 60
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds a stage command may take under load before the test fails


def _cli(stage: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "ssl_kd.cli", "-q", stage, *map(str, args)]


def _label_cmd(data: dict[str, Path], out: Path, *extra: object) -> list[str]:
    shards, teacher = data["shards"], data["teacher"]
    return _cli("label", "--teacher", teacher, "--shards", shards, "--out", out, "--k", "3",
                "--batch-size", "32", *extra)  # fmt: skip


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _local_env() -> dict[str, str]:
    """A fault-free in-process run, with one torch thread as each 1-CPU actor has."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards, a teacher, and the fault-free outputs of label, select and materialize."""
    root = tmp_path_factory.mktemp("faults")
    (root / "s").mkdir()
    write_unlabeled_shards(root / "s", n_shards=SHARDS, per_shard=PER_SHARD, size=32)
    make_teacher(root / "t.pt", arch="resnet18", size=32, num_classes=10)
    data = {"shards": root / "s", "teacher": root / "t.pt", "root": root}
    env = _local_env()
    # One reference for every test: the Ray runs with faults must match it exactly, which also
    # checks that labels do not depend on the executor, the actor or the order of the shards.
    _run(_label_cmd(data, root / "ref-l", "--executor", "local"), env)
    _run(_select_cmd(root / "ref-l", root / "ref-sel", "--executor", "local"), env)
    mat = _materialize_cmd(root / "ref-sel", root / "ref-mat", "--executor", "local")
    _run(mat, env)
    return {
        **data,
        "labels": root / "ref-l",
        "selection": root / "ref-sel",
        "mat": root / "ref-mat",
    }


def _select_cmd(labels: Path, out: Path, *extra: object) -> list[str]:
    return _cli("select", "--labels", labels, "--out", out, "--per-class", 150, "--top-p", 3,
                *extra)  # fmt: skip


def _materialize_cmd(selection: Path, out: Path, *extra: object) -> list[str]:
    # A shard per sample: hundreds of short tasks, so that a fault lands while some run.
    return _cli("materialize", "--selection", selection, "--out", out, "--samples-per-shard", 1,
                *extra)  # fmt: skip


def _labels(out: Path) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """Every label row by (shard, key); fails on a row that appears twice."""
    rows: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for f in sorted(out.glob("*.parquet")):
        t = pq.read_table(f, columns=["shard", "key", "topk_class", "topk_prob"]).to_pydict()
        for shard, key, cls, prob in zip(*t.values(), strict=True):
            assert (shard, key) not in rows, f"{shard}/{key} labeled twice"
            rows[(shard, key)] = (cls, prob)
    return rows


def _shard_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "run_shards.jsonl").read_text().splitlines()]


def _check_labels(out: Path, data: dict[str, Path], retried: bool = True) -> None:
    """Exactly once and identical to the fault-free labels: one file per shard, no temp files,
    every (shard, key) once with the same classes and probabilities."""
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == [f"u-{i:06d}.parquet" for i in range(SHARDS)]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    got, want = _labels(out), _labels(data["labels"])
    assert len(got) == SHARDS * PER_SHARD
    assert got == want
    summary = json.loads((out / "run_summary.json").read_text())
    assert not summary["failed"], summary["failed"]
    if retried:  # the fault hit work in flight (else the test proved nothing)
        assert any(s["attempts"] > 1 for s in _shard_log(out)), _shard_log(out)


def _parquet_count(out: Path) -> int:
    return len(list(out.glob("*.parquet"))) if out.exists() else 0


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A stage command in its own process group, stderr to ``log``."""
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"),
        start_new_session=True,
    )  # fmt: skip


def _until_files(job: subprocess.Popen, count: Callable[[], int], n: int, what: str) -> None:
    """Wait until ``count() >= n`` while ``job`` still runs (the fault must land mid-run)."""
    wait_for(lambda: count() >= n or job.poll() is not None, TIMEOUT, what, every=0.05)
    assert job.poll() is None, f"the run ended before the fault ({what})"


def _finish(job: subprocess.Popen, log: Path) -> str:
    try:
        job.wait(TIMEOUT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    err = log.read_text()
    assert job.returncode == 0, err[-4000:]
    return err


def _actors(nodes: RayNodes, class_name: str) -> list[Any]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=nodes.jobs_address, detail=True, limit=1000, raise_on_missing_output=False
    )
    return [a for a in actors if a.class_name == class_name and a.state == "ALIVE"]


def _label_with_faults(
    tmp_path: Path, data: dict[str, Path], nodes: RayNodes, fault: Callable[[Any], None]
) -> Path:
    """Label on ``nodes``; ``fault(progress)`` runs once 3 shards are done (``progress(n)``
    waits for ``n`` more)."""
    out = tmp_path / "l"
    job = _start(_label_cmd(data, out), nodes.env, tmp_path / "label.err")
    count = lambda: _parquet_count(out)  # noqa: E731
    _until_files(job, count, 3, "3 label files")

    def progress(n: int) -> None:
        at = count()
        _until_files(job, count, at + n, f"{n} more label files")

    fault(progress)
    _finish(job, tmp_path / "label.err")
    return out


def _working_node(nodes: RayNodes, progress: Any) -> Any:
    """A worker node whose labeling actor has been working (it holds shards): the one to lose.
    Waits until every worker node has a live actor, then for 2 more label files."""

    def all_up() -> bool:
        up = {a.node_id for a in _actors(nodes, "LabelWorker")}
        return all(w.node_id in up for w in nodes.workers)

    wait_for(all_up, TIMEOUT, "a live LabelWorker on every worker node")
    progress(2)
    return nodes.workers[0]


def test_label_node_lost_then_replaced(tmp_path: Path, data: dict[str, Path], ray_nodes) -> None:
    def fault(progress: Any) -> None:
        ray_nodes.kill(_working_node(ray_nodes, progress))
        ray_nodes.add()

    _check_labels(_label_with_faults(tmp_path, data, ray_nodes, fault), data)


def test_label_node_lost_not_replaced(tmp_path: Path, data: dict[str, Path], ray_nodes) -> None:
    def fault(progress: Any) -> None:
        ray_nodes.kill(_working_node(ray_nodes, progress))

    _check_labels(_label_with_faults(tmp_path, data, ray_nodes, fault), data)


def test_label_actor_killed_mid_shard(tmp_path: Path, data: dict[str, Path], ray_nodes) -> None:
    def fault(progress: Any) -> None:
        actors = wait_for(lambda: _actors(ray_nodes, "LabelWorker"), 60, "a live LabelWorker")
        os.kill(actors[0].pid, signal.SIGKILL)

    _check_labels(_label_with_faults(tmp_path, data, ray_nodes, fault), data)


def test_label_two_nodes_lost_in_turn(tmp_path: Path, data: dict[str, Path], ray_nodes) -> None:
    ray_nodes.add()
    ray_nodes.cluster.wait_for_nodes()

    def fault(progress: Any) -> None:
        ray_nodes.kill(_working_node(ray_nodes, progress))
        progress(3)
        ray_nodes.kill(_working_node(ray_nodes, progress))

    _check_labels(_label_with_faults(tmp_path, data, ray_nodes, fault), data)


def _tasks_on(nodes: RayNodes, name: str, node_id: str) -> list[Any]:
    """Tasks named ``name`` running on node ``node_id``."""
    from ray.util.state import list_tasks

    tasks = list_tasks(
        address=nodes.jobs_address,
        filters=[("func_or_class_name", "=", name)],
        detail=True,
        limit=1000,
        raise_on_missing_output=False,
    )
    return [t for t in tasks if t.node_id == node_id and t.state == "RUNNING"]


class _Busiest:
    """The worker node that ran the most tasks named ``name`` in the last look, looked up in
    a thread while ``job`` runs."""

    def __init__(self, nodes: RayNodes, name: str, job: subprocess.Popen) -> None:
        self.nodes, self.name, self.job = nodes, name, job
        self.node: Any = None
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        from ray.util.state import list_tasks

        while self.job.poll() is None:
            tasks = list_tasks(
                address=self.nodes.jobs_address,
                filters=[("func_or_class_name", "=", self.name)],
                limit=10_000,
                raise_on_missing_output=False,
            )
            ran = [t.node_id for t in tasks]
            workers = list(self.nodes.workers)
            if ran and workers:
                self.node = max(workers, key=lambda w: ran.count(w.node_id))


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_select_and_materialize_node_lost(tmp_path: Path, data: dict[str, Path], ray_nodes) -> None:
    """A worker node lost while select's tasks run, then another while materialize's run:
    the same selection, row for row, and the same shards, byte for byte."""
    sel, mat = tmp_path / "sel", tmp_path / "mat"
    job = _start(_select_cmd(data["labels"], sel), ray_nodes.env, tmp_path / "select.err")
    victim = ray_nodes.workers[0]
    wait_for(
        lambda: job.poll() is not None or _tasks_on(ray_nodes, "_single_threaded_partial",
                                                     victim.node_id),
        TIMEOUT, "a select task on the first worker node",
    )  # fmt: skip
    assert job.poll() is None, "select ended before the fault"
    ray_nodes.kill(victim)
    ray_nodes.add()
    err = _finish(job, tmp_path / "select.err")
    assert "retrying" in err, err[-3000:]  # the lost node held a task
    want = pq.read_table(data["selection"] / "selection.parquet")
    got = pq.read_table(sel / "selection.parquet")
    assert got.equals(want)

    job = _start(_materialize_cmd(sel, mat), ray_nodes.env, tmp_path / "mat.err")
    # The driver keeps sending these short tasks to the node that ran the last ones: lose the
    # busiest node. The state API answers in seconds under load, so it is asked all along.
    busiest = _Busiest(ray_nodes, "reduce_output_shard", job)
    _until_files(job, lambda: len(list(mat.glob("train-*.tar"))), 20, "20 output shards")
    ray_nodes.kill(wait_for(lambda: busiest.node, TIMEOUT, "the busiest node"))
    assert len(list(mat.glob("train-*.tar"))) < len(list(data["mat"].glob("train-*.tar")))
    # A task that was running is retried by the executor ("retrying" on stderr); one still
    # queued on the lost node is sent elsewhere by Ray itself: either way nothing is lost.
    _finish(job, tmp_path / "mat.err")
    got_files, want_files = _files(mat), _files(data["mat"])
    assert not [n for n in got_files if n.endswith(".tmp")]
    tars = sorted(n for n in want_files if n.endswith(".tar"))
    assert tars and sorted(n for n in got_files if n.endswith(".tar")) == tars
    assert all(got_files[n] == want_files[n] for n in tars)
    # dataset.json records the command's config, whose paths differ: all else is the same.
    got_info, want_info = (json.loads(f["dataset.json"]) for f in (got_files, want_files))
    assert {**got_info, "config": None} == {**want_info, "config": None}


def test_driver_and_node_killed_then_rerun(
    tmp_path: Path, data: dict[str, Path], ray_nodes
) -> None:
    """The labeling driver (its process group) and a worker node killed together mid-run; the
    same command again labels the rest, exactly once."""
    out = tmp_path / "l"
    job = _start(_label_cmd(data, out), ray_nodes.env, tmp_path / "label.err")
    try:
        _until_files(job, lambda: _parquet_count(out), 3, "3 label files")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        ray_nodes.kill(ray_nodes.workers[0])
        job.wait()
    at_kill = _parquet_count(out)
    assert at_kill < SHARDS
    ray_nodes.add()
    _run(_label_cmd(data, out), ray_nodes.env)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["already_done"] >= at_kill
    assert summary["already_done"] + summary["labeled"] == SHARDS
    _check_labels(out, data, retried=False)


def test_small_object_store(tmp_path: Path, data) -> None:
    """Object stores of 80 MiB (about Ray's minimum) and a run whose images are several times
    that: label, select and materialize complete, nothing lost."""
    import numpy as np

    from ssl_kd.shards import array_samples, write_shards

    n_shards, per_shard, side = 8, 40, 512  # 320 incompressible 512x512 PNGs: ~84 MB
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n_shards * per_shard, side, side), dtype=np.uint8)
    keys = [f"big-{i:06d}" for i in range(len(images))]
    (tmp_path / "s").mkdir()
    write_shards(array_samples(images, None, keys), str(tmp_path / "s" / "u-%06d.tar"), per_shard)
    size = sum(p.stat().st_size for p in (tmp_path / "s").iterdir())
    store = 80 * 1024**2
    assert size > store
    nodes = RayNodes(workers=2, object_store_memory=store)
    try:
        env = nodes.env
        shards = {"shards": tmp_path / "s", "teacher": data["teacher"]}
        _run(_label_cmd(shards, tmp_path / "l", "--embeddings"), env)
        assert len(_labels(tmp_path / "l")) == len(images)
        _run(_select_cmd(tmp_path / "l", tmp_path / "sel"), env)
        rows = pq.read_table(tmp_path / "sel" / "selection.parquet").num_rows
        _run(_materialize_cmd(tmp_path / "sel", tmp_path / "mat", "--samples-per-shard", 16), env)
        manifest = json.loads((tmp_path / "mat" / "materialize.json").read_text())
        written = sum(p.stat().st_size for p in (tmp_path / "mat").glob("*.tar"))
        assert manifest["samples"] == rows and written > store
    finally:
        nodes.shutdown()


def test_job_submit_spreads_over_the_nodes(
    tmp_path: Path, data: dict[str, Path], jobs_nodes: RayNodes
) -> None:
    """``ray job submit`` of jobs/label.py to a cluster of two worker nodes: the labels of a
    fault-free run, made by actors on both worker nodes."""
    from ray.util.state import list_actors, list_nodes
    from test_job_submit import _submit, _wait_for_success

    address = jobs_nodes.jobs_address
    # RAY_ADDRESS would win over --address (Ray's Jobs CLI reads it first).
    env = {k: v for k, v in jobs_nodes.env.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "l"
    label = _label_cmd(data, out)[5:]  # the flags of `ssl-kd label`
    job_id = f"ssl-kd-faults-{os.getpid()}"
    head = ["--address", address, "--submission-id", job_id, "--working-dir", "."]
    submitted = _submit([*head, "--no-wait", "--", sys.executable, "jobs/label.py", *label], env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    logs = _wait_for_success(address, job_id, env)
    assert f"labeled {SHARDS} shards" in logs, logs[-3000:]
    _check_labels(out, data, retried=False)
    workers = {n.node_id for n in list_nodes(address=address) if not n.is_head_node}
    actors = list_actors(address=address, detail=True, limit=1000)
    assert len(workers) == 2
    assert {a.node_id for a in actors if "LabelWorker" in (a.class_name or "")} == workers, actors
