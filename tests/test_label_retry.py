"""Failed shards are retried a bounded number of times, in-process and on Ray (dead actors)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import make_teacher, write_unlabeled_shards

from ssl_kd.cli import main
from ssl_kd.label.files import LabelSet
from ssl_kd.label.run import LabelConfig, LabelWorker, format_problems, run_label


class FlakyWorker(LabelWorker):
    """Fails the first attempt at every shard (marker files remember attempts across actors)."""

    def label(self, url: str) -> dict:
        marker = Path(self.cfg.out).parent / f"attempted-{Path(url).name}"
        if not marker.exists():
            marker.touch()
            raise OSError(f"simulated I/O error on {url}")
        return super().label(url)


class DyingWorker(LabelWorker):
    """Kills its own process on the first shard it sees (a crashed Ray worker)."""

    def label(self, url: str) -> dict:
        marker = Path(self.cfg.out).parent / "died-once"
        if not marker.exists():
            marker.touch()
            os._exit(1)
        return super().label(url)


class BrokenWorker(LabelWorker):
    def label(self, url: str) -> dict:
        raise OSError("disk on fire")


@pytest.fixture
def cfg(tmp_path: Path) -> LabelConfig:
    (tmp_path / "s").mkdir()
    write_unlabeled_shards(tmp_path / "s", n_shards=3, per_shard=10)
    return LabelConfig(
        teacher=str(make_teacher(tmp_path / "t.pt")),
        shards=str(tmp_path / "s"),
        out=str(tmp_path / "l"),
        executor="local",
        device="cpu",
        k=2,
        max_retries=1,
    )


def _shard_log(cfg: LabelConfig, summary: dict) -> list[dict]:
    """Every shard's status, as the run streamed it to its shard log."""
    text = (Path(cfg.out) / summary["shard_log"]).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_local_retry_then_success(cfg: LabelConfig) -> None:
    summary = run_label(cfg, progress=False, worker_cls=FlakyWorker)
    assert summary["labeled"] == 3 and not summary["failed"]
    assert {s["attempts"] for s in _shard_log(cfg, summary)} == {2}
    assert LabelSet(cfg.out).num_rows == 30


def test_bounded_retries_then_failure_reported(
    cfg: LabelConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run_label(cfg, progress=False, worker_cls=BrokenWorker)
    assert summary["labeled"] == 0 and len(summary["failed"]) == 3
    assert all(f["attempts"] == 2 and "disk on fire" in f["error"] for f in summary["failed"])
    assert not list(Path(cfg.out).glob("*.parquet"))

    monkeypatch.setattr(LabelWorker, "label", BrokenWorker.label)
    argv = [
        "-q",
        "label",
        "--teacher",
        cfg.teacher,
        "--shards",
        cfg.shards,
        "--out",
        cfg.out,
        "--executor",
        "local",
        "--k",
        "2",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "3 shard(s) failed" in err
    problems = format_problems(cfg, summary)
    assert len(problems) == 1 and problems[0] in err


@pytest.mark.slow
def test_ray_replaces_a_dead_worker_and_retries(cfg: LabelConfig) -> None:
    import ray.cloudpickle

    # Ray workers cannot import this test module: ship the worker class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from dataclasses import replace

    summary = run_label(
        replace(cfg, executor="ray", workers=1), progress=False, worker_cls=DyingWorker
    )
    assert summary["labeled"] == 3 and not summary["failed"]
    assert sorted(s["attempts"] for s in _shard_log(cfg, summary)) in ([1, 1, 2], [1, 2, 2])
    assert LabelSet(cfg.out).num_rows == 30


class BuggyWorker(LabelWorker):
    """Fails every shard with an error no retry can fix."""

    def label(self, url: str) -> dict:
        marker = Path(self.cfg.out).parent / f"attempted-{Path(url).name}"
        marker.write_text(str(int(marker.read_text() or 0) + 1) if marker.exists() else "1")
        raise ValueError(f"deterministic failure on {url}")


def test_a_deterministic_failure_is_not_retried(cfg: LabelConfig) -> None:
    summary = run_label(cfg, progress=False, worker_cls=BuggyWorker)
    assert summary["labeled"] == 0 and len(summary["failed"]) == 3
    assert {f["attempts"] for f in summary["failed"]} == {1}
    attempts = [int(p.read_text()) for p in Path(cfg.out).parent.glob("attempted-*")]
    assert attempts == [1, 1, 1]
