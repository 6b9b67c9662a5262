"""Supervised training: learns a separable set, weights_only checkpoints, exact resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ssl_kd.errors import UserError
from ssl_kd.evaluate.run import EvalConfig, run_evaluate
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint
from ssl_kd.train import supervised
from ssl_kd.train.supervised import TrainConfig, run_train


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
    assert meta["preprocess"] == {"channels": 1, "image_size": 16, "mean": 0.5, "std": 0.5}
    assert meta["config"]["steps"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["model"][k])
    assert raw["optimizer"]["state"]  # momentum buffers saved for resume


def test_interrupted_run_resumes_to_the_same_weights(
    separable_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _cfg(separable_shards, tmp_path / "straight", steps=20, ckpt_every=5)
    run_train(straight, progress=False)

    real_step = supervised.train_step
    calls = {"n": 0}

    def crashing_step(*args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    resumed = replace(straight, out=str(tmp_path / "resumed"))
    monkeypatch.setattr(supervised, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(resumed, progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 10
    monkeypatch.setattr(supervised, "train_step", real_step)
    summary = run_train(resumed, progress=False)
    assert summary["step"] == 20

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    assert (a["epoch"], a["seen_in_epoch"]) == (b["epoch"], b["seen_in_epoch"])


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
