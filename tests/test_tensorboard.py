"""TensorBoard curves of a training run: the same numbers at the same steps as metrics.jsonl,
one curve per tag after a resume, FixMatch's parts, rank 0 only, and an object-store ``out``."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import crash_after, run_cli, separable_images, write_labeled_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from ssl_kd import storage
from ssl_kd.shards import array_samples, write_shards
from ssl_kd.train.context import LocalContext
from ssl_kd.train.options import TrainConfig
from ssl_kd.train.run import run_train
from ssl_kd.train.worker import train_worker

Curves = dict[str, list[tuple[int, float]]]


def _read_curves(logdir: Path) -> Curves:
    """Every scalar curve as TensorBoard shows it (purges applied), all points kept."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _metrics_curves(out: Path) -> Curves:
    """metrics.jsonl as curves: ``train/<key>`` for step lines, ``val/<key>`` for evaluations."""
    curves: Curves = defaultdict(list)
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key != "step":
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                curves[tag].append((record["step"], value))
    return dict(curves)


def _assert_same_curves(tensorboard: Curves, metrics: Curves) -> None:
    assert set(tensorboard) == set(metrics)
    for tag, points in metrics.items():
        assert [s for s, _ in tensorboard[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tensorboard[tag]] == pytest.approx([v for _, v in points], rel=1e-6)


def _event_files(out: Path) -> list[Path]:
    return sorted((out / "tensorboard").glob("events.out.tfevents.*"))


def _cfg(shards: dict[str, Path], out: Path | str, **kw: object) -> TrainConfig:
    base = TrainConfig(
        data=str(shards["train"]),
        val_data=str(shards["test"]),
        out=str(out),
        num_classes=4,
        steps=12,
        batch_size=32,
        lr=0.05,
        warmup_steps=2,
        log_every=1,
        ckpt_every=4,
        eval_every=4,
        shuffle_buffer=64,
        device="cpu",
    )
    return replace(base, **kw)


def test_train_writes_the_metrics_as_tensorboard_curves(
    separable_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", str(separable_shards["train"]), "--out", str(out)]
    argv += ["--val-data", str(separable_shards["test"]), "--num-classes", "4", "--steps", "12"]
    argv += ["--batch-size", "32", "--log-every", "3", "--eval-every", "6", "--ckpt-every", "6"]
    code, _, err = run_cli([*argv, "--shuffle-buffer", "64", "--device", "cpu"], capsys)
    assert code == 0, err

    assert len(_event_files(out)) == 1
    curves = _read_curves(out / "tensorboard")
    assert set(curves) == {
        *("train/loss", "train/ce", "train/lr", "train/images_per_s", "train/epoch"),
        *("val/top1", "val/top5", "val/loss", "val/n"),
    }
    assert [s for s, _ in curves["train/loss"]] == [3, 6, 9, 12]
    assert [s for s, _ in curves["val/top1"]] == [6, 12]  # at --eval-every and at the end
    _assert_same_curves(curves, _metrics_curves(out))


def test_a_resumed_run_continues_each_curve_once(
    separable_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _cfg(separable_shards, tmp_path / "straight")
    run_train(straight, progress=False)
    resumed = replace(straight, out=str(tmp_path / "resumed"))
    with monkeypatch.context() as m:
        crash_after(m, 6)  # steps 5 and 6 logged past the checkpoint of step 4
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(resumed, progress=False)
    run_train(resumed, progress=False)
    out = tmp_path / "resumed"

    # The interrupted attempt's file does hold steps 5 and 6: the purge is what drops them.
    raw = [
        e.step for f in _event_files(out) for e in EventFileLoader(str(f)).Load() if e.summary.value
    ]
    assert raw.count(5) > 1 and raw.count(6) > 1
    curves = _read_curves(out / "tensorboard")
    assert [s for s, _ in curves["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in curves["val/top1"]] == [4, 8, 12]
    _assert_same_curves(curves, _metrics_curves(out))
    # The same curve as a run that never stopped (exact resume).
    before = _read_curves(tmp_path / "straight" / "tensorboard")["train/loss"]
    assert [v for _, v in curves["train/loss"]] == pytest.approx([v for _, v in before], abs=1e-5)

    # A finished run run again logs nothing: its final evaluation stays once.
    files = _event_files(out)
    assert run_train(resumed, progress=False)["resumed_at"] == 12
    assert _event_files(out) == files
    assert [s for s, _ in _read_curves(out / "tensorboard")["val/top1"]] == [4, 8, 12]
    assert [s for s, _ in _metrics_curves(out)["val/top1"]] == [4, 8, 12]


def test_fixmatch_logs_its_loss_parts(tmp_path: Path) -> None:
    x, y = separable_images(4, 4, 16, seed=1)
    pool, _ = separable_images(24, 4, 16, seed=2)
    (tmp_path / "train").mkdir()
    write_labeled_shards(tmp_path / "train", "train", x, y, per_shard=16)
    keys = [f"u-{i:05d}" for i in range(len(pool))]
    write_shards(array_samples(pool, None, keys), str(tmp_path / "pool" / "u-%06d.tar"), 48)
    cfg = TrainConfig(
        data=str(tmp_path / "train"),
        unlabeled=str(tmp_path / "pool"),
        ssl="fixmatch",
        out=str(tmp_path / "run"),
        num_classes=4,
        steps=6,
        batch_size=8,
        mu=2,
        threshold=0.3,
        warmup_steps=0,
        log_every=2,
        ckpt_every=3,
        shuffle_buffer=16,
        device="cpu",
    )
    run_train(cfg, progress=False)
    curves = _read_curves(tmp_path / "run" / "tensorboard")
    assert {"train/ce", "train/unsup", "train/mask", "train/threshold"} <= set(curves)
    assert [s for s, _ in curves["train/mask"]] == [2, 4, 6]
    _assert_same_curves(curves, _metrics_curves(tmp_path / "run"))


class _SecondRank(LocalContext):
    """Rank 1 of 2 in this process: what the loop does on a rank that is not rank 0."""

    rank = 1
    world_size = 2

    def gather(self, obj: object) -> list[object]:
        return [obj, obj]


def test_only_rank_0_writes_curves(separable_shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(separable_shards, tmp_path / "rank1", steps=4, val_data=None)
    assert train_worker(cfg, _SecondRank(cfg.out), progress=False) == {}
    assert (tmp_path / "rank1" / "checkpoint.pt").is_file()  # it did train
    assert not (tmp_path / "rank1" / "tensorboard").exists()
    assert not (tmp_path / "rank1" / "metrics.jsonl").exists()


def test_curves_of_a_run_in_an_object_store(
    separable_shards: dict[str, Path],
    s3: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = _cfg(separable_shards, f"{s3}/run", steps=8)
    with monkeypatch.context() as m:
        crash_after(m, 6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(cfg, progress=False)
    run_train(cfg, progress=False)

    local = tmp_path / "downloaded"
    local.mkdir()
    for url in storage.list_dir(f"{s3}/run/tensorboard"):
        (local / storage.name(url)).write_bytes(storage.read_bytes(url))
    assert len(list(local.iterdir())) == 2  # the interrupted attempt's file and the resumed one
    curves = _read_curves(local)
    assert [s for s, _ in curves["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in curves["val/top1"]] == [4, 8]
    assert not list((tmp_path / "tmp").glob("ssl_kd-tensorboard-*"))  # temp directories gone
