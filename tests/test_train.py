"""ssl-kd train: learns a separable set, weights_only checkpoints, exact resume (also from the
legacy checkpoint layout), one checkpoint layout with the student, Ray Train."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import crash_after
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from ssl_kd.errors import UserError
from ssl_kd.evaluate.run import EvalConfig, run_evaluate
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ssl_kd.train.options import StudentConfig, TrainConfig
from ssl_kd.train.run import format_summary, run_student, run_train


def _cfg(shards: dict[str, Path], out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(
        data=str(shards["train"]),
        val_data=str(shards["test"]),
        out=str(out),
        num_classes=4,
        steps=60,
        batch_size=32,
        lr=0.05,
        warmup_steps=5,
        log_every=10,
        ckpt_every=30,
        shuffle_buffer=64,
        device="cpu",
    )
    return replace(base, **kw)


def test_learns_a_separable_set(separable_shards: dict[str, Path], tmp_path: Path) -> None:
    summary = run_train(_cfg(separable_shards, tmp_path / "run"), progress=False)
    assert summary["step"] == 60
    assert summary["val"]["n"] == 64
    assert summary["val"]["top1"] >= 0.9  # chance is 0.25
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [10, 20, 30, 40, 50, 60]
    assert lines[-1]["val_top1"] == summary["val"]["top1"]
    assert (tmp_path / "run" / "config.yaml").is_file()

    result = run_evaluate(
        EvalConfig(
            checkpoint=str(tmp_path / "run" / "checkpoint.pt"),
            data=str(separable_shards["test"]),
            out=str(tmp_path / "eval.json"),
            device="cpu",
        )
    )
    assert result["top1"] == pytest.approx(summary["val"]["top1"])
    assert result["top5"] == 1.0  # 4 classes: top-5 covers them all
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["top1"] == result["top1"] and written["config"]["data"].endswith("test")


def test_checkpoint_loads_with_weights_only(
    separable_shards: dict[str, Path], tmp_path: Path
) -> None:
    run_train(_cfg(separable_shards, tmp_path / "run", steps=4, ckpt_every=2), progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 4 and raw["scheduler"] == {"kind": "cosine", "step": 4}
    ckpt = load_checkpoint(path)
    model, meta = model_from_checkpoint(ckpt)
    assert meta["arch"] == "cnn" and meta["num_classes"] == 4
    assert meta["preprocess"] == {
        "channels": 1,
        "image_size": 16,
        "mean": [0.5],
        "std": [0.5],
        "resize": 0,
    }
    assert meta["config"]["steps"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["model"][k])
    assert raw["optimizer"]["state"]  # momentum buffers saved for resume


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_checkpoint(a_dir / "checkpoint.pt")
    b = load_checkpoint(b_dir / "checkpoint.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    stream = [{k: r[k] for k in ("epoch", "seen_in_epoch")} for r in a["ranks"]]
    assert stream == [{k: r[k] for k in ("epoch", "seen_in_epoch")} for r in b["ranks"]]


def test_interrupted_run_resumes_to_the_same_weights(
    separable_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _cfg(separable_shards, tmp_path / "straight", steps=20, ckpt_every=5, log_every=1)
    run_train(straight, progress=False)

    resumed = replace(straight, out=str(tmp_path / "resumed"))
    with monkeypatch.context() as m:
        crash_after(m, 12)  # steps 11 and 12 logged past the checkpoint of step 10
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(resumed, progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 10
    summary = run_train(resumed, progress=False)
    assert summary["step"] == 20 and summary["resumed_at"] == 10
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")

    def logged_steps(run: str) -> list[int]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["step"] for r in map(json.loads, lines) if "loss" in r]

    # Each step once, as if the run had never stopped.
    assert logged_steps("resumed") == logged_steps("straight") == list(range(1, 21))


def test_resumes_a_checkpoint_in_the_legacy_layout(
    separable_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before one layout, ssl-kd train kept its stream position and RNG at top level."""
    straight = _cfg(separable_shards, tmp_path / "straight", steps=20, ckpt_every=5)
    run_train(straight, progress=False)
    legacy = replace(straight, out=str(tmp_path / "legacy"))
    with monkeypatch.context() as m:
        crash_after(m, 12)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(legacy, progress=False)
    path = tmp_path / "legacy" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    (rank,) = ckpt.pop("ranks")
    save_checkpoint(path, {**ckpt, **rank})  # top-level epoch, seen_in_epoch and rng
    assert {"epoch", "seen_in_epoch", "rng"} <= set(torch.load(path, weights_only=True))

    summary = run_train(legacy, progress=False)
    assert summary["resumed_at"] == 10 and summary["step"] == 20
    _assert_same_weights(tmp_path / "straight", tmp_path / "legacy")
    assert "ranks" in load_checkpoint(path) and "rng" not in load_checkpoint(path)


def test_resume_refuses_a_changed_config_and_skips_a_finished_run(
    separable_shards: dict[str, Path], tmp_path: Path
) -> None:
    cfg = _cfg(separable_shards, tmp_path / "run", steps=3)
    run_train(cfg, progress=False)
    before = (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns
    assert run_train(replace(cfg, log_every=1), progress=False)["step"] == 3
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"different config.*lr"):
        run_train(replace(cfg, lr=0.2), progress=False)


def test_classes_must_be_known(separable_shards: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--num-classes"):
        run_train(_cfg(separable_shards, tmp_path / "r", num_classes=None), progress=False)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\n")
    summary = run_train(
        _cfg(separable_shards, tmp_path / "r", num_classes=None, class_names=str(names), steps=2),
        progress=False,
    )
    assert summary["classes"] == ["a", "b", "c", "d"]


def test_labels_out_of_range_are_skipped_and_counted(
    separable_shards: dict[str, Path], tmp_path: Path
) -> None:
    # 4 classes in the data, 3 declared: class-3 samples are bad input, not a crash.
    summary = run_train(
        _cfg(separable_shards, tmp_path / "r", num_classes=3, steps=8, val_data=None),
        progress=False,
    )
    assert summary["skipped_samples"] > 0
    # Every skip is a class-3 sample, and says so: no other sample was dropped.
    assert summary["skipped_reasons"] == {"label out of range": summary["skipped_samples"]}


def test_train_and_student_checkpoints_have_one_layout(
    separable_shards: dict[str, Path], tmp_path: Path
) -> None:
    run_train(_cfg(separable_shards, tmp_path / "t", steps=2, val_data=None), progress=False)
    student = StudentConfig(
        data=str(separable_shards["train"]),
        out=str(tmp_path / "s"),
        num_classes=4,
        steps=2,
        batch_size=32,
        warmup_steps=0,
        shuffle_buffer=64,
        executor="local",
        device="cpu",
    )
    run_student(student, progress=False)
    t = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)
    s = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)
    assert set(t) == set(s) == {"model", "optimizer", "scheduler", "step", "ranks", "meta"}
    assert set(t["meta"]) == set(s["meta"])
    assert [set(r) for r in t["ranks"]] == [set(r) for r in s["ranks"]]
    assert set(t["ranks"][0]) == {"epoch", "seen_in_epoch", "worker_seen", "turn", "rng"}
    assert t["scheduler"] == s["scheduler"] == {"kind": "cosine", "step": 2}


def test_summary_lines(tmp_path: Path) -> None:
    """The line each command prints: ssl-kd train without the student's (loss, workers)."""
    summary = {
        "step": 60,
        "resumed_at": 0,
        "arch": "cnn",
        "loss": "hard",
        "workers": 1,
        "checkpoint": "r/checkpoint.pt",
        "val": {"top1": 0.93125},
    }
    train = TrainConfig(data="d", out="r")
    assert format_summary(train, summary) == (
        "trained cnn for 60 steps -> r/checkpoint.pt; val top-1 93.12%"
    )
    student = StudentConfig(data="d", out="r", loss="soft", workers=2)
    done = {**summary, "resumed_at": 60, "loss": "soft", "workers": 2}
    del done["val"]
    assert format_summary(student, done) == (
        "already trained cnn (soft loss, 2 worker(s)) for 60 steps -> r/checkpoint.pt"
    )


@pytest.mark.slow
def test_ray_two_workers(separable_shards: dict[str, Path], tmp_path: Path) -> None:
    """The teacher on Ray Train: 2 DDP workers over gloo, the same outputs as locally."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = _cfg(
            separable_shards,
            tmp_path / "ray",
            steps=12,
            ckpt_every=6,
            log_every=3,
            executor="ray",
            workers=2,
            max_failures=0,
        )
        s = run_train(cfg, progress=False)
    finally:
        ray.shutdown()
    assert s["step"] == 12 and s["workers"] == 2 and s["steps_per_rank"] == [12, 12]
    assert s["loss"] == "hard" and 0 <= s["val"]["top1"] <= 1 and s["val"]["n"] == 64
    ckpt = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")
    assert ckpt["step"] == 12 and len(ckpt["ranks"]) == 2
    assert ckpt["ranks"][0]["seen_in_epoch"] != ckpt["ranks"][1]["seen_in_epoch"]
    assert ckpt["meta"]["config"]["executor"] == "ray"
    assert json.loads((tmp_path / "ray" / "summary.json").read_text()) == s
    assert (tmp_path / "ray" / "config.yaml").is_file()
    assert format_summary(cfg, s).startswith("trained cnn for 12 steps -> ")
    # TensorBoard curves from rank 0 alone: one event file, each logged step once.
    (events,) = (tmp_path / "ray" / "tensorboard").glob("events.out.tfevents.*")
    loaded = EventFileLoader(str(events)).Load()
    steps = [e.step for e in loaded for v in e.summary.value if v.tag == "train/loss"]
    assert steps == [3, 6, 9, 12]
