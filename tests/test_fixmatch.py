"""The semi-supervised teacher (ssl-kd train --ssl fixmatch): strong augmentation, thresholds,
the consistency loss, the weight EMA, and the training loop with the pool: logged parts, the
EMA in the final checkpoint, exact resume, the pipeline's teacher section and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from helpers import count_decodes, crash_after, run_cli, separable_images, write_labeled_shards
from torch import nn
from torch.nn import functional as F

from ssl_kd import config as cfglib
from ssl_kd.errors import ConfigError
from ssl_kd.models.checkpoint import load_checkpoint
from ssl_kd.pipeline.config import PipelineConfig, stage_config
from ssl_kd.shards import array_samples, write_shards
from ssl_kd.train.consistency import WEAK_LOGITS, Thresholds, fixmatch_loss
from ssl_kd.train.ema import WeightEMA
from ssl_kd.train.losses import student_loss
from ssl_kd.train.options import TrainConfig
from ssl_kd.train.run import run_train
from ssl_kd.train.strong_augment import (
    FILL,
    OPS,
    _strong_augment,
    cutout,
    one_cpu_thread,
    strong_augment,
)


def _batch(n: int = 64, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_augment_keeps_the_batch_and_draws_per_image(channels: int) -> None:
    x = _batch(channels=channels)
    torch.manual_seed(3)
    a = strong_augment(x)
    torch.manual_seed(3)
    b = strong_augment(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)  # the global RNG decides everything: a resumed run replays it
    changed = (a != x).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.9  # nearly every image altered (cutout alone does)
    assert torch.equal(strong_augment(x, ops=0, cutout_size=0), x)


def test_strong_augment_runs_on_one_thread_and_gives_the_same_images() -> None:
    # Its small kernels run on one CPU thread (faster on few busy cores); the images are the
    # same as on several, and the caller's thread count comes back, also after an error.
    images = torch.randint(0, 256, (64, 3, 20, 20), dtype=torch.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(3)
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            one = strong_augment(images)
        assert torch.get_num_threads() == 2
        torch.manual_seed(3)
        assert torch.equal(one, _strong_augment(images, 2, 0.5))
        with pytest.raises(ValueError), one_cpu_thread(torch.device("cpu")):
            raise ValueError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_keeps_shape_and_range(name: str) -> None:
    x = _batch(n=16, channels=3).float()
    for m in (torch.zeros(16), torch.rand(16), torch.ones(16)):
        out = OPS[name](x.clone(), m)
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 255


def test_ops_do_what_they_say() -> None:
    x = _batch(n=4, channels=3).float()
    zero, full = torch.zeros(4), torch.ones(4)
    assert torch.equal(OPS["solarize"](x, zero), x)  # threshold 256: nothing inverted
    assert torch.equal(OPS["solarize"](x, full), 255 - x)  # threshold 0: all inverted
    gray = x[:, :1].expand_as(x).clone()
    assert torch.allclose(OPS["color"](gray, full), gray, atol=1e-3)  # no colour to change
    dark = OPS["brightness"](x, zero)
    assert torch.allclose(dark, x * 0.05)
    posterized = OPS["posterize"](x, zero)  # 4 bits kept
    assert torch.equal(posterized % 16, torch.zeros_like(x))
    flat = torch.full((1, 1, 8, 8), 100.0)
    for name in ("rotate", "shear_x", "translate_x"):
        moved = OPS[name](flat, torch.ones(1))
        assert set(moved.unique().tolist()) <= {100.0, float(FILL)}  # nearest pixels, grey fill


def test_cutout_is_one_grey_square_per_image() -> None:
    x = torch.zeros(32, 1, 20, 20, dtype=torch.uint8)
    torch.manual_seed(0)
    out = cutout(x, 0.5)
    for img in out[:, 0]:
        rows, cols = (img == FILL).nonzero(as_tuple=True)
        assert len(rows) > 0
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == h * w and max(h, w) <= 10  # a full rectangle within 10 px


def test_fixed_and_adaptive_thresholds() -> None:
    probs = torch.tensor([[0.97, 0.02, 0.01], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    fixed = Thresholds(3, "fixed", 0.95)
    assert fixed.mask(probs).tolist() == [1.0, 0.0, 0.0]

    adaptive = Thresholds(3, "adaptive", 0.95, momentum=0.5)
    mask = adaptive.mask(probs)
    level = 0.5 / 3 + 0.5 * (0.97 + 0.6 + 0.7) / 3
    class_prob = 0.5 / 3 + 0.5 * probs.mean(0)
    expected = class_prob / class_prob.max() * level
    torch.testing.assert_close(adaptive.per_class(), expected)
    assert mask.tolist() == [
        float(p.max() >= expected[p.argmax()]) for p in probs
    ]  # the thresholds of the updated state
    again = Thresholds(3, "adaptive", 0.95)
    again.load_state_dict(adaptive.state_dict())
    torch.testing.assert_close(again.per_class(), adaptive.per_class())


_hard = student_loss("hard")


def test_fixmatch_loss_by_hand() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 2])
    weak = torch.tensor([[9.0, 0.0, 0.0], [0.5, 0.0, 0.0]])  # confident, then not
    strong = torch.randn(2, 3)
    logits = torch.cat([torch.randn(2, 3), strong])
    targets = {"label": labels, WEAK_LOGITS: weak}
    parts = fixmatch_loss(_hard, Thresholds(3, "fixed", 0.95), weight=2.0)(logits, targets)
    ce = F.cross_entropy(logits[:2], labels)
    unsup = F.cross_entropy(strong[:1], torch.tensor([0])) / 2  # mean over both pool images
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["unsup"], unsup)
    torch.testing.assert_close(parts["loss"], ce + 2 * unsup)
    assert parts["mask"].item() == 0.5 and parts["threshold"].item() == pytest.approx(0.95)

    alone = fixmatch_loss(_hard, Thresholds(3, "fixed", 0.95))(logits[:2], {"label": labels})
    torch.testing.assert_close(alone["loss"], ce)  # a step before the pool joins
    assert alone["mask"].item() == 0 and alone["unsup"].item() == 0

    # The weak views' predictions are targets: no gradient reaches them.
    weak.requires_grad_(True)
    logits.requires_grad_(True)
    fixmatch_loss(_hard, Thresholds(3, "fixed", 0.5))(logits, targets)["loss"].backward()
    assert weak.grad is None and logits.grad is not None and torch.any(logits.grad[2:] != 0)


def test_weight_ema_warms_up_and_copies_integer_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.999)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model)
    d = 2 / 11  # min(0.999, (1 + 1) / (10 + 1)): the first updates follow the model closely
    torch.testing.assert_close(ema.model[0].weight, d * start + (1 - d) * (start + 1))
    assert ema.model[1].num_batches_tracked.item() == 5
    assert not any(p.requires_grad for p in ema.model.parameters())
    other = WeightEMA(model, decay=0.999)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    torch.testing.assert_close(other.model[0].weight, ema.model[0].weight)


@pytest.fixture
def ssl_shards(tmp_path: Path) -> dict[str, Path]:
    """4 labeled images per class, a pool of 160 unlabeled ones and 64 test images."""
    x, y = separable_images(4, 4, 16, seed=1)
    pool, _ = separable_images(40, 4, 16, seed=2)
    test_x, test_y = separable_images(16, 4, 16, seed=3)
    for name in ("train", "pool", "test"):
        (tmp_path / name).mkdir()
    write_labeled_shards(tmp_path / "train", "train", x, y, per_shard=16)
    write_labeled_shards(tmp_path / "test", "test", test_x, test_y, per_shard=64)
    keys = [f"u-{i:05d}" for i in range(len(pool))]
    write_shards(array_samples(pool, None, keys), str(tmp_path / "pool" / "u-%06d.tar"), 64)
    return {"train": tmp_path / "train", "pool": tmp_path / "pool", "test": tmp_path / "test"}


def _ssl_cfg(shards: dict[str, Path], out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(
        data=str(shards["train"]),
        unlabeled=str(shards["pool"]),
        ssl="fixmatch",
        val_data=str(shards["test"]),
        out=str(out),
        num_classes=4,
        steps=24,
        batch_size=8,
        mu=2,
        threshold=0.6,
        lr=0.05,
        warmup_steps=2,
        log_every=4,
        ckpt_every=6,
        shuffle_buffer=32,
        device="cpu",
    )
    return replace(base, **kw)


def test_the_teacher_learns_from_the_pool(ssl_shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = _ssl_cfg(ssl_shards, tmp_path / "run", ssl_start=8, threshold_mode="adaptive")
    summary = run_train(cfg, progress=False)
    assert summary["ssl"] == "fixmatch" and summary["ema_decay"] == 0.999
    assert summary["val"]["top1"] >= 0.9  # chance is 0.25
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert {"ce", "unsup", "mask", "threshold"} <= set(steps[0])
    # Supervised alone for the first 8 steps, then the pool joins with its targets.
    assert steps[0]["mask"] == 0 and steps[1]["mask"] == 0
    assert max(r["mask"] for r in steps[2:]) > 0 and steps[-1]["threshold"] > 0
    # Images counted per step: 8 labeled, then 8 + 16 pool images.
    assert summary["images_per_s"] > 0

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert "ema" not in ckpt and ckpt["thresholds"]["level"] > 0.25
    # The final weights are the average: the evaluation of the summary is that model's.
    from ssl_kd.evaluate.run import EvalConfig, run_evaluate

    result = run_evaluate(
        EvalConfig(
            checkpoint=str(tmp_path / "run" / "checkpoint.pt"),
            data=str(ssl_shards["test"]),
            out=str(tmp_path / "eval.json"),
            device="cpu",
        )
    )
    assert result["top1"] == pytest.approx(summary["val"]["top1"])


def test_ssl_run_resumes_exactly(
    ssl_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _ssl_cfg(ssl_shards, tmp_path / "straight", threshold_mode="adaptive", steps=14)
    run_train(straight, progress=False)
    resumed = replace(straight, out=str(tmp_path / "resumed"))
    with monkeypatch.context() as m:
        crash_after(m, 8)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(resumed, progress=False)
    mid = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert mid["step"] == 6 and "ema" in mid and "pool" in mid["ranks"][0]
    assert run_train(resumed, progress=False)["resumed_at"] == 6
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    assert a["thresholds"]["level"] == pytest.approx(b["thresholds"]["level"])
    assert a["thresholds"]["class_prob"] == pytest.approx(b["thresholds"]["class_prob"])
    assert a["ranks"][0]["pool"] == b["ranks"][0]["pool"]


def test_warm_start_from_a_supervised_checkpoint(
    ssl_shards: dict[str, Path], tmp_path: Path
) -> None:
    run_train(_ssl_cfg(ssl_shards, tmp_path / "sup", ssl="none", unlabeled=None), progress=False)
    init = str(tmp_path / "sup" / "checkpoint.pt")
    cfg = _ssl_cfg(ssl_shards, tmp_path / "adapted", init=init, steps=6, ema_decay=0)
    summary = run_train(cfg, progress=False)
    assert summary["ema_decay"] == 0 and summary["step"] == 6
    # A confident warm start: its pseudo-labels pass the threshold from the first steps.
    first = json.loads((tmp_path / "adapted" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["mask"] > 0.5


def test_bad_ssl_input_is_one_line(
    ssl_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = str(ssl_shards["train"])
    for extra, message in (
        (["--ssl", "fixmatch"], "needs the pool's shards"),
        (["--unlabeled", str(ssl_shards["pool"])], "read only with --ssl fixmatch"),
        (
            ["--ssl", "fixmatch", "--unlabeled", str(ssl_shards["pool"]), "--ssl-start", "9"],
            "leaves none of the 9 steps",
        ),
        (["--ssl", "fixmatch", "--unlabeled", str(tmp_path / "nope")], "matched no files"),
    ):
        code, _, err = run_cli(
            [
                "train",
                "--data",
                train,
                "--out",
                str(tmp_path / "o"),
                "--steps",
                "9",
                "--num-classes",
                "4",
                *extra,
            ],
            capsys,
        )
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err


def test_pipeline_teacher_section_gets_the_pool() -> None:
    cfg = cfglib.from_dict(
        PipelineConfig, {"teacher": {"ssl": "fixmatch", "mu": 3, "ssl_start": 10}}
    )
    from ssl_kd.pipeline.builder import PlanBuilder

    builder = PlanBuilder(cfg, "/r", progress=False)
    builder.add_train("teacher", "teacher", "/r/teacher", None, "data")
    builder.add_train("baseline/seed0", "baseline", "/r/b", 0, "data")
    teacher, baseline = (stage.params for stage in builder.stages)
    assert teacher["ssl"] == "fixmatch" and teacher["mu"] == 3
    assert baseline["ssl"] == "none"
    tc = stage_config(cfg, "teacher", {"data": "d", "out": "o", "unlabeled": "/r/data/u"})
    assert tc.unlabeled == "/r/data/u"
    # A student section learns from the pool the same way (its fine-tuning, say).
    cfg = cfglib.from_dict(PipelineConfig, {"finetune": {"ssl": "fixmatch", "mu": 2}})
    builder = PlanBuilder(cfg, "/r", progress=False)
    builder.add_student("ft", "finetune", "/r/ft", 0, "/r/data/l", "/r/p.pt", ())
    builder.add_student("pre", "pretrain", "/r/pre", 0, "/r/pseudo", None, ())
    finetune, pretrain = (stage.params for stage in builder.stages)
    assert finetune["ssl"] == "fixmatch" and pretrain["ssl"] == "none"
    with pytest.raises(ConfigError, match=r"teacher.unlabeled.*set by the pipeline"):
        cfglib.from_dict(PipelineConfig, {"teacher": {"ssl": "fixmatch", "unlabeled": "x"}})
    with pytest.raises(ConfigError, match=r"teacher\.ssl_start"):
        cfglib.from_dict(
            PipelineConfig, {"teacher": {"ssl": "fixmatch", "steps": 5, "ssl_start": 5}}
        )


def test_student_strong_augment_trains(
    ssl_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _ssl_cfg(ssl_shards, tmp_path / "sup", ssl="none", unlabeled=None, steps=4)
    run_train(cfg, progress=False)
    out = tmp_path / "noisy"
    code, _, err = run_cli(
        [
            "finetune",
            "--data", str(ssl_shards["train"]),
            "--init", str(tmp_path / "sup" / "checkpoint.pt"),
            "--out", str(out),
            "--steps", "3",
            "--batch-size", "8",
            "--strong-augment", "true",
            "--num-classes", "4",
            "--executor", "local",
            "--device", "cpu",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["strong_augment"] is True and saved["strong_ops"] == 2
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"])


def test_pipeline_adapts_the_teacher_on_the_pool_before_it_labels(
    tmp_path: Path, fake_fmnist: Path
) -> None:
    from helpers import TINY

    from ssl_kd.label.files import label_files, read_meta
    from ssl_kd.pipeline.run import run_pipeline

    adapt = {"ssl": "fixmatch", "steps": 3, "batch_size": 4, "mu": 2, "warmup_steps": 0}
    data = {
        **TINY,
        "out": str(tmp_path / "run"),
        "source": str(fake_fmnist),
        "seeds": [0],
        "oracle_seeds": 0,
        "adapt": adapt,
    }
    cfg = cfglib.from_dict(PipelineConfig, data)
    summary = run_pipeline(cfg, progress=False)
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses["teacher"] == statuses["teacher_adapted"] == "ran"
    root = Path(cfg.out)
    adapted = yaml.safe_load((root / "teacher_adapted/config.yaml").read_text())
    assert adapted["init"] == str(root / "teacher/checkpoint.pt")
    assert adapted["unlabeled"] == str(root / "data/unlabeled") and adapted["ssl"] == "fixmatch"
    # The adapted teacher labels round 1, and is the teacher row of the results.
    from ssl_kd.storage import sha256

    meta = read_meta(label_files(root / "round1/labels")[0])
    assert meta.teacher_sha256 == sha256(root / "teacher_adapted/checkpoint.pt")
    teacher_eval = json.loads((root / "eval/teacher/metrics.json").read_text())
    assert teacher_eval["config"]["checkpoint"].endswith("teacher_adapted/checkpoint.pt")

    # The same section on an ensemble, or an adapt key the pipeline sets, is refused.
    with pytest.raises(ConfigError, match=r"adapt.*an ensemble"):
        cfglib.from_dict(PipelineConfig, {**data, "ensemble": {"tta": ["flip"]}})
    with pytest.raises(ConfigError, match=r"adapt\.init.*set by the pipeline"):
        cfglib.from_dict(PipelineConfig, {**data, "adapt": {**adapt, "init": "x.pt"}})


@pytest.mark.slow
def test_ray_two_workers(ssl_shards: dict[str, Path], tmp_path: Path) -> None:
    """FixMatch on Ray Train: 2 DDP ranks (gloo), each with its own pool stream, the adaptive
    thresholds updated from the batches of both (their statistics all-reduced)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = _ssl_cfg(
            ssl_shards,
            tmp_path / "ray",
            steps=8,
            ckpt_every=4,
            threshold_mode="adaptive",
            executor="ray",
            workers=2,
            max_failures=0,
        )
        summary = run_train(cfg, progress=False)
    finally:
        ray.shutdown()
    assert summary["steps_per_rank"] == [8, 8] and summary["ssl"] == "fixmatch"
    ckpt = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")
    pools = [rank["pool"] for rank in ckpt["ranks"]]
    assert all(p["seen_in_epoch"] or p["epoch"] for p in pools)
    assert ckpt["thresholds"]["level"] > 0.25  # moved from 1/C by both ranks' batches
    lines = [json.loads(x) for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("mask", 0) > 0 for r in lines)


def test_kept_decoded_images_train_the_same_weights(
    ssl_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = count_decodes(monkeypatch)
    counts = []
    for name, mb in (("plain", 0), ("kept", 1)):
        decodes.clear()
        run_train(_ssl_cfg(ssl_shards, tmp_path / name, decoded_cache_mb=mb), progress=False)
        counts.append(len(decodes))
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    kept = load_checkpoint(tmp_path / "kept" / "checkpoint.pt")["model"]
    assert plain.keys() == kept.keys()
    assert all(torch.equal(plain[k], kept[k]) for k in plain)
    # 24 steps of 8 labeled and 16 pool images, of 16 and 160 distinct ones; 64 to validate
    # and the few that the input-format check peeks at.
    assert counts[0] >= 24 * (8 + 16) and counts[1] <= 16 + 160 + 64 + 4
