"""Student trainer: losses by hand, exact resume, fine-tuning, joint training, Ray Train (DDP,
restarts)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import separable_images, write_labeled_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_kd.cli import main
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import load_checkpoint, rank_states
from ssl_kd.shards import array_samples, expand_shards, write_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.fault_hooks import FAIL_ONCE_ENV
from ssl_kd.train.loop import StreamState, stream_batches
from ssl_kd.train.losses import (
    hard_loss,
    joint_loss,
    kd_loss,
    student_loss,
    teacher_distribution,
)
from ssl_kd.train.options import FinetuneConfig, StudentConfig
from ssl_kd.train.run import run_student

C, K = 4, 3


def test_losses_against_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    topk_class = torch.tensor([[0, 1, 3], [3, 2, 0]])
    topk_prob = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.25, 0.125]])
    label = torch.tensor([0, 3])
    t, t0 = 2.0, 1.0

    def by_hand() -> float:
        total = 0.0
        for i in range(2):
            p = [float(x) ** (t0 / t) for x in topk_prob[i]]
            q = [x / sum(p) for x in p]
            z = [float(x) / t for x in logits[i]]
            log_norm = math.log(sum(math.exp(v) for v in z))
            total += sum(
                qj * (math.log(qj) - (z[int(c)] - log_norm))
                for qj, c in zip(q, topk_class[i], strict=True)
            )
        return total / 2 * t * t

    assert kd_loss(logits, topk_class, topk_prob, t0, t).item() == pytest.approx(by_hand(), 1e-5)
    targets = {"label": label, "topk_class": topk_class, "topk_prob": topk_prob}
    ce = (
        sum(
            -math.log(math.exp(float(logits[i, label[i]])) / float(logits[i].exp().sum()))
            for i in range(2)
        )
        / 2
    )
    hard = student_loss("hard")(logits, targets)
    assert hard["loss"].item() == pytest.approx(ce, 1e-5) and set(hard) == {"loss", "ce"}
    soft = student_loss("soft", temperature=t, label_temperature=t0)(logits, targets)
    assert soft["loss"].item() == pytest.approx(by_hand(), 1e-5) and set(soft) == {"loss", "kd"}
    mixed = student_loss("mixed", temperature=t, alpha=0.3, label_temperature=t0)(logits, targets)
    assert mixed["loss"].item() == pytest.approx(0.3 * by_hand() + 0.7 * ce, 1e-5)
    assert set(mixed) == {"loss", "kd", "ce"}
    # Re-tempering: stored at T0 = 2, wanted at T = 1 squares the probabilities.
    q = teacher_distribution(torch.tensor([[0.5, 0.25, 0.25]]), 2.0, 1.0)
    assert torch.allclose(q, torch.tensor([[4 / 6, 1 / 6, 1 / 6]]))
    smooth = student_loss("hard", label_smoothing=0.1)(logits, targets)["loss"].item()
    assert smooth == pytest.approx(
        torch.nn.functional.cross_entropy(logits, label, label_smoothing=0.1).item(), 1e-6
    )


def test_joint_loss_against_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 0.0]])
    targets = {
        "label": torch.tensor([0, 3]),
        "topk_class": torch.tensor([[0, 1, 3], [3, 2, 0]]),
        "topk_prob": torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.25, 0.125]]),
        "true_label": torch.tensor([2]),
    }
    soft = student_loss("soft", temperature=2.0)
    parts = joint_loss(soft, 1)(logits, targets)
    pseudo_only = {k: v for k, v in targets.items() if k != "true_label"}
    kd = soft(logits[:2], pseudo_only)["loss"].item()
    row = [float(v) for v in logits[2]]
    ce = -(row[2] - math.log(sum(math.exp(v) for v in row)))
    assert parts["loss"].item() == pytest.approx((2 * kd + ce) / 3, 1e-5)  # each image weighs 1
    assert parts["pseudo"].item() == pytest.approx(kd, 1e-5)
    assert parts["true_ce"].item() == pytest.approx(ce, 1e-5)
    assert set(parts) == {"loss", "pseudo", "true_ce", "kd"}
    smooth = joint_loss(soft, 1, label_smoothing=0.2)(logits, targets)["true_ce"].item()
    expected = torch.nn.functional.cross_entropy(
        logits[2:], targets["true_label"], label_smoothing=0.2
    )
    assert smooth == pytest.approx(expected.item(), 1e-6)


def test_weighted_losses_against_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 0.0]])
    targets = {
        "label": torch.tensor([0, 3, 2]),
        "topk_class": torch.tensor([[0, 1, 3], [3, 2, 0], [2, 0, 1]]),
        "topk_prob": torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.25, 0.125], [0.7, 0.2, 0.1]]),
        "weight": torch.tensor([0.5, 2.0, 0.0]),
    }
    each_ce = [
        -(float(logits[i, c]) - math.log(sum(math.exp(float(v)) for v in logits[i])))
        for i, c in enumerate(targets["label"])
    ]
    w = [0.5, 2.0, 0.0]
    ce = sum(wi * li for wi, li in zip(w, each_ce, strict=True)) / sum(w)
    hard = student_loss("hard", sample_weights=True)(logits, targets)
    assert hard["ce"].item() == pytest.approx(ce, 1e-6) and hard["loss"].item() == hard["ce"].item()
    each_kd = [
        kd_loss(
            logits[i : i + 1],
            targets["topk_class"][i : i + 1],
            targets["topk_prob"][i : i + 1],
            1.0,
            2.0,
        ).item()
        for i in range(3)
    ]
    kd = sum(wi * li for wi, li in zip(w, each_kd, strict=True)) / sum(w)
    mixed = student_loss("mixed", temperature=2.0, alpha=0.3, sample_weights=True)(logits, targets)
    assert mixed["kd"].item() == pytest.approx(kd, 1e-5)
    assert mixed["loss"].item() == pytest.approx(0.3 * kd + 0.7 * ce, 1e-5)
    # All weights 1: the unweighted losses; weights off: the weight is not even read.
    ones = {**targets, "weight": torch.ones(3)}
    for kind in ("hard", "soft", "mixed"):
        weighted = student_loss(kind, temperature=2.0, sample_weights=True)(logits, ones)
        plain = student_loss(kind, temperature=2.0)(logits, ones)
        assert torch.allclose(weighted["loss"], plain["loss"], atol=1e-6)
    unweighted = {k: v for k, v in targets.items() if k != "weight"}
    assert student_loss("hard")(logits, unweighted)["loss"].item() == pytest.approx(
        sum(each_ce) / 3, 1e-6
    )
    # A batch of zero weights teaches nothing, and is no NaN.
    zero = hard_loss(logits, targets["label"], weight=torch.zeros(3))
    assert zero.item() == 0.0
    smooth = hard_loss(logits, targets["label"], 0.1, torch.ones(3))
    expected = torch.nn.functional.cross_entropy(logits, targets["label"], label_smoothing=0.1)
    assert smooth.item() == pytest.approx(expected.item(), 1e-6)


def write_pseudo_labeled(
    root: Path, n_per_class: int = 64, per_shard: int = 64, weights: bool = False
) -> Path:
    """Shards as ssl-kd materialize writes them: .cls plus a .json top-k soft label (and, with
    ``weights``, a weight per sample: 0 for every fourth one)."""
    root.mkdir(parents=True)
    images, labels = separable_images(n_per_class, C, 16, seed=5)
    keys = [f"s-{i:05d}" for i in range(len(images))]
    samples = []
    for i, (sample, label) in enumerate(
        zip(array_samples(images, labels, keys), labels, strict=True)
    ):
        others = [c for c in range(C) if c != label][: K - 1]
        soft = {"topk_class": [int(label), *others], "topk_prob": [0.8, 0.15, 0.05]}
        if weights:
            soft["weight"] = 0.0 if i % 4 == 0 else 0.5 + (i % 3) / 4
        samples.append({**sample, "json": json.dumps(soft).encode()})
    write_shards(iter(samples), str(root / "train-%06d.tar"), per_shard)
    info = {"classes": [f"c{i}" for i in range(C)], "soft_label": {"k": K, "temperature": 1.0}}
    if weights:
        info["weights"] = {"member": "json", "key": "weight"}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("student")
    pseudo = write_pseudo_labeled(root / "pseudo")
    for name, seed, n in (("labeled", 1, 24), ("test", 2, 16)):
        (root / name).mkdir()
        x, y = separable_images(n, C, 16, seed=seed)
        write_labeled_shards(root / name, name, x, y, per_shard=64)
        info = {"classes": [f"c{i}" for i in range(C)]}
        (root / name / "dataset.json").write_text(json.dumps(info))
    return {"pseudo": pseudo, "labeled": root / "labeled", "test": root / "test"}


def _cfg(data: dict[str, Path], out: Path, **kw: object) -> StudentConfig:
    base = StudentConfig(
        data=str(data["pseudo"]),
        out=str(out),
        val_data=str(data["test"]),
        arch="cnn",
        width=0.5,
        loss="soft",
        temperature=2.0,
        steps=12,
        batch_size=16,
        lr=0.05,
        warmup_steps=2,
        ckpt_every=6,
        log_every=3,
        shuffle_buffer=64,
        executor="local",
        device="cpu",
    )
    return replace(base, **kw)


def test_resume_gives_the_same_weights(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = run_student(_cfg(data, tmp_path / "a"), progress=False)
    assert straight["step"] == 12 and straight["steps_per_rank"] == [12]
    assert straight["val"]["top1"] > 0.5  # learns the separable set from soft labels
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "kd", "lr", "images_per_s"} <= set(lines[0])

    monkeypatch.setenv(FAIL_ONCE_ENV, f"{tmp_path / 'failed'}:8")  # after the step-6 checkpoint
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run_student(_cfg(data, tmp_path / "b"), progress=False)
    resumed = run_student(_cfg(data, tmp_path / "b"), progress=False)
    assert resumed["resumed_at"] == 6 and resumed["step"] == 12
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name
    again = run_student(_cfg(data, tmp_path / "b"), progress=False)  # complete: nothing to do
    assert again["resumed_at"] == again["step"] == 12
    with pytest.raises(UserError, match="different config"):
        run_student(_cfg(data, tmp_path / "b", lr=0.2), progress=False)


def test_finetune_from_pretrained(data: dict[str, Path], tmp_path: Path) -> None:
    run_student(
        _cfg(data, tmp_path / "pre", loss="mixed", randaugment=1, dropout=0.2), progress=False
    )
    ft = FinetuneConfig(
        data=str(data["labeled"]),
        out=str(tmp_path / "ft"),
        init=str(tmp_path / "pre" / "checkpoint.pt"),
        val_data=str(data["test"]),
        steps=6,
        batch_size=16,
        warmup_steps=0,
        executor="local",
        device="cpu",
    )
    s = run_student(ft, progress=False)
    assert s["step"] == 6 and s["arch"] == "cnn" and s["loss"] == "hard"
    meta = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")["meta"]
    assert meta["width"] == 0.5 and meta["dropout"] == 0.2  # the architecture of the init
    fresh = run_student(replace(ft, out=str(tmp_path / "fresh"), fresh_head=True), progress=False)
    assert fresh["step"] == 6


def test_bad_input(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs soft labels"):
        run_student(replace(_cfg(data, tmp_path / "x"), data=str(data["labeled"])), progress=False)
    with pytest.raises(UserError, match="--executor ray"):
        StudentConfig.validate(_cfg(data, tmp_path / "x", workers=2))
    assert main(["finetune", "--data", str(data["labeled"]), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_ray_two_workers_equal_steps_and_restart(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 DDP workers over gloo: equal steps per rank; one failure restarts from the checkpoint."""
    import ray

    monkeypatch.setenv(FAIL_ONCE_ENV, f"{tmp_path / 'failed'}:9")
    ray.shutdown()  # workers must start after the env var is set: no Ray left by other tests
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = _cfg(data, tmp_path / "ray", executor="ray", workers=2, max_failures=1)
        s = run_student(cfg, progress=True)  # rank 0 draws Ray's progress bar
        again = run_student(cfg, progress=False)  # same run name: resumes, nothing left to do
    finally:
        ray.shutdown()
    assert (tmp_path / "failed").exists()  # the failure did happen
    assert s["step"] == 12 and s["resumed_at"] == 6 and s["steps_per_rank"] == [6, 6]
    assert s["workers"] == 2
    ckpt = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")
    assert ckpt["step"] == 12 and len(ckpt["ranks"]) == 2
    assert np.isfinite(s["val"]["top1"])
    assert again["resumed_at"] == again["step"] == 12
    # Rank 0's TensorBoard files, one per attempt: the restart's purge leaves each step once.
    assert len(list((tmp_path / "ray" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(tmp_path / "ray" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [3, 6, 9, 12]
    assert [e.step for e in acc.Scalars("val/top1")] == [12]


def test_joint_training_reads_both_streams_and_resumes_exactly(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cfg(out: Path) -> StudentConfig:
        # 16 per batch: 12 pseudo-labeled, 4 true-labeled
        return _cfg(data, out, labeled_data=str(data["labeled"]), labeled_share=0.25)

    straight = run_student(cfg(tmp_path / "a"), progress=False)
    assert straight["step"] == 12 and straight["labeled_per_batch"] == 4
    assert straight["val"]["top1"] > 0.5
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "pseudo", "true_ce", "kd"} <= set(lines[0])
    # 12 steps took 4 true-labeled images each from the 96 labeled ones (24 batches an epoch).
    stream = rank_states(load_checkpoint(tmp_path / "a" / "checkpoint.pt"))[0]["labeled"]
    assert stream["epoch"] * 96 + stream["seen_in_epoch"] == 12 * 4

    monkeypatch.setenv(FAIL_ONCE_ENV, f"{tmp_path / 'failed'}:8")  # after the step-6 checkpoint
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run_student(cfg(tmp_path / "b"), progress=False)
    resumed = run_student(cfg(tmp_path / "b"), progress=False)
    assert resumed["resumed_at"] == 6 and resumed["step"] == 12
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name
    # Another share is another run.
    with pytest.raises(UserError, match="different config"):
        run_student(replace(cfg(tmp_path / "b"), labeled_share=0.5), progress=False)


def test_joint_training_bad_input(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    x, y = separable_images(4, C, 16, seed=3)
    write_labeled_shards(other, "other", x, y, per_shard=64)
    (other / "dataset.json").write_text(json.dumps({"classes": [f"k{i}" for i in range(C)]}))
    with pytest.raises(UserError, match="same classes in the same order"):
        run_student(_cfg(data, tmp_path / "x", labeled_data=str(other)), progress=False)
    argv = ["pretrain", "--data", str(data["pseudo"]), "--out", str(tmp_path / "y")]
    argv += ["--loss", "soft", "--executor", "local", "--labeled-data", str(data["labeled"])]
    for extra, expected in (
        (["--labeled-share", "0.95"], "labeled_share"),
        (["--batch-size", "2", "--labeled-share", "0.9"], "leaves one part of the batch empty"),
        (["--labeled-share", "0.25", "--labeled-data", str(tmp_path / "none")], "none"),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, err
        assert expected in err, err
    assert not (tmp_path / "y" / "checkpoint.pt").exists()


def test_sample_weights(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weighted = write_pseudo_labeled(tmp_path / "weighted", n_per_class=16, weights=True)
    ds = ShardImageDataset(
        expand_shards(str(weighted)), lambda x: x.float(), 1, num_classes=C, weights=True
    )
    batch = next(stream_batches(ds, 8, StreamState(), 0, False))[1]
    assert batch["weight"].dtype == torch.float32 and batch["weight"].shape == (8,)
    cfg = replace(_cfg(data, tmp_path / "w", loss="hard", sample_weights=True), data=str(weighted))
    cfg = replace(cfg, steps=3)
    assert run_student(cfg, progress=False)["step"] == 3
    run_student(replace(cfg, out=str(tmp_path / "plain"), sample_weights=False), progress=False)
    # The same batches from the same weights: only the weighting differs.
    w, plain = (
        json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])["ce"]
        for d in ("w", "plain")
    )
    assert w != pytest.approx(plain, rel=1e-3)
    argv = ["pretrain", "--data", str(data["pseudo"]), "--out", str(tmp_path / "x")]
    assert main([*argv, "--executor", "local", "--sample-weights"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, err
    assert "--sample-weights needs per-sample weights" in err and "--weights certainty" in err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
