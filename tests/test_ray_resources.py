"""The checks before workers start on a Ray cluster (ssl_kd/ray_resources.py), without Ray: the
cluster is described by hand, and the nodes' answers are injected."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ssl_kd.errors import UserError
from ssl_kd.ray_resources import Workers, check_shared_dir, missing_resources
from ssl_kd.train.ray_trainer import _failure_line, _torch_config

HEAD = {"CPU": 0.0, "memory": 1e9}
ONE_CPU = {"CPU": 1.0, "memory": 1e9}
TRAIN = "lower --workers"


def test_enough_resources_pass() -> None:
    assert missing_resources(Workers("training", 2, 1, 0, TRAIN), [HEAD, ONE_CPU, ONE_CPU]) is None
    gpu_node = {"CPU": 8.0, "GPU": 2.0}
    assert missing_resources(Workers("training", 2, 0, 1, TRAIN), [HEAD, gpu_node]) is None
    assert missing_resources(Workers("labeling", 0, 1, 0, TRAIN), []) is None  # nothing to run


def test_too_few_cpus_in_total() -> None:
    problem = missing_resources(Workers("training", 3, 1, 0, TRAIN), [HEAD, ONE_CPU, ONE_CPU])
    assert problem == (
        "training asks for 3 worker(s) of 1 CPU but the Ray cluster has 2 CPUs in total "
        "(3 node(s)): lower --workers, or add nodes"
    )


def test_no_gpu() -> None:
    problem = missing_resources(
        Workers("training", 2, 0, 1, "lower --workers or drop --use-gpu"), [HEAD, ONE_CPU]
    )
    assert problem is not None
    assert problem.startswith("training asks for 2 worker(s) of 1 GPU but the Ray cluster has no")
    assert "drop --use-gpu" in problem and "\n" not in problem


def test_a_worker_larger_than_any_node() -> None:
    problem = missing_resources(Workers("labeling", 1, 2, 0, TRAIN), [ONE_CPU, ONE_CPU])
    assert problem is not None and "the largest Ray node has 1 CPU" in problem


def test_workers_that_fit_in_total_but_not_on_the_nodes() -> None:
    nodes = [{"CPU": 3.0}, {"CPU": 1.0}]  # 4 CPUs, but one 2-CPU worker per node at most
    problem = missing_resources(Workers("labeling", 2, 2, 0, TRAIN), nodes)
    assert problem is not None and "hold only 1 such worker(s) at once" in problem
    gpus = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 0.0, "GPU": 1.0}]  # a GPU worker needs a CPU too
    problem = missing_resources(Workers("labeling", 2, 1, 1, TRAIN), gpus)
    assert problem is not None and "hold only 1" in problem


def test_an_autoscaling_cluster_is_judged_by_what_it_can_grow_to() -> None:
    # No GPU node up yet, but the autoscaler may start up to 8 GPUs: the request waits for them.
    workers = Workers("training", 4, 0, 1, TRAIN)
    assert missing_resources(workers, [HEAD], autoscaler_max={"CPU": 64, "GPU": 8}) is None
    problem = missing_resources(workers, [HEAD], autoscaler_max={"CPU": 64, "GPU": 2})
    assert problem is not None
    assert "autoscaling Ray cluster can grow to at most 2 GPUs" in problem
    assert "max_workers" in problem


def everywhere(fn, *args):  # stands for ray_cluster.on_every_node
    return {"node-a": fn(*args), "node-b": fn(*args)}


def test_a_directory_every_node_sees(tmp_path: Path) -> None:
    check_shared_dir(str(tmp_path), ask_nodes=everywhere)
    assert list(tmp_path.iterdir()) == []  # the probe is removed


def test_a_node_that_does_not_see_the_directory(tmp_path: Path) -> None:
    def one_blind(fn, *args):  # node-b has a disk of its own
        return {"node-a": fn(*args), "node-b": fn(str(tmp_path / "elsewhere"), *args[1:])}

    with pytest.raises(UserError) as err:
        check_shared_dir(str(tmp_path), ask_nodes=one_blind)
    message = str(err.value)
    assert "Ray node node-b does not see it" in message and "node-a" not in message
    assert "s3://BUCKET/PATH" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_node_that_could_not_answer_is_not_a_verdict(tmp_path: Path, caplog) -> None:
    # A node lost a moment ago may still be listed alive: its probe fails, it gets no work.
    def lost(fn, *args):
        return {"node-a": fn(*args), "node-b": TimeoutError("no answer in 120 s")}

    with caplog.at_level("WARNING"):
        check_shared_dir(str(tmp_path), ask_nodes=lost)
    assert "node-b could not look" in caplog.text and "no answer in 120 s" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_stale_token_is_not_seeing(tmp_path: Path) -> None:
    def stale(fn, path, token):  # another run's probe at the same path
        return {"node-a": fn(path, token), "node-b": fn(path, "another run's token")}

    with pytest.raises(UserError, match="node-b does not see it"):
        check_shared_dir(str(tmp_path), ask_nodes=stale)


def _cfg(**kw: object) -> SimpleNamespace:
    base = {"workers": 2, "use_gpu": False, "max_failures": 1, "start_timeout": 20.0}
    return SimpleNamespace(**{**base, "dist_timeout": 600.0, **kw})


def test_the_failure_line_of_a_restart_that_found_no_room() -> None:
    class WorkerGroupStartupTimeoutError(Exception):  # Ray Train V2's, by name
        pass

    class ControllerError(Exception):
        def __init__(self) -> None:
            super().__init__("Training failed due to controller error:\nmore lines")
            self.controller_failure = WorkerGroupStartupTimeoutError("timed out")

    line = _failure_line(_cfg(), ControllerError())
    assert line.startswith("training stopped: the Ray cluster had no room for 2 worker(s) of 1 CPU")
    assert "--start-timeout 20 s, 2 time(s)" in line and "rerun" in line and "\n" not in line
    other = _failure_line(_cfg(), RuntimeError("boom\ntraceback"))
    assert other == "training failed after 1 restarts: boom"


def test_the_process_group_timeout_is_the_option() -> None:
    config = _torch_config(_cfg(dist_timeout=90.0), local=True)
    assert config.timeout_s == 90 and config.backend == "gloo"
    assert _torch_config(_cfg(use_gpu=True), local=False).backend == "nccl"


def test_the_line_says_who_writes_there(tmp_path: Path) -> None:
    def one_blind(fn, path, token):
        return {"node-a": fn(path, token), "node-b": False}

    with pytest.raises(UserError, match="node-b does not see it: labeling workers write"):
        check_shared_dir(str(tmp_path), "labeling workers write there", ask_nodes=one_blind)
