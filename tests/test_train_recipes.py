"""Training on real images and accelerators: the real-image recipe with torchvision
architectures (and a local weights file), mixed precision, channels-last, and exact resume with
DataLoader worker processes."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import (
    crash_after,
    run_cli,
    separable_images,
    write_labeled_shards,
    write_mixed_shards,
)

from ssl_kd.config import from_dict
from ssl_kd.device import grad_scaler
from ssl_kd.errors import ConfigError
from ssl_kd.models.checkpoint import load_checkpoint, save_checkpoint
from ssl_kd.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop
from ssl_kd.models.registry import create_model
from ssl_kd.shards import expand_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train import recipes, worker
from ssl_kd.train.context import LocalContext
from ssl_kd.train.inputs import read_inputs
from ssl_kd.train.loop import StreamState, stream_batches, train_step
from ssl_kd.train.losses import student_loss
from ssl_kd.train.options import StudentConfig, TrainConfig
from ssl_kd.train.run import run_student, run_train


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """32 JPEG and PNG images of mixed sizes (40-160 px) and modes, 4 classes, in 4 shards."""
    root = tmp_path / "photos"
    root.mkdir()
    write_mixed_shards(root, "photo", 32, per_shard=8, num_classes=4)
    return root


@pytest.fixture
def bands(tmp_path: Path) -> Path:
    """64-px grayscale band images, 4 classes, in shards of uneven size (10, 10, 10, 18)."""
    root = tmp_path / "bands"
    root.mkdir()
    x, y = separable_images(12, 4, 64, seed=3)
    for i, (lo, hi) in enumerate([(0, 10), (10, 20), (20, 30), (30, 48)]):
        write_labeled_shards(root, f"b{i}", x[lo:hi], y[lo:hi], per_shard=hi - lo)
    return root


# 64-px inputs: the real-image recipe unless a test says otherwise.
BASE = {
    "num_classes": 4,
    "image_size": 64,
    "arch": "cnn",
    "width": 0.25,
    "steps": 3,
    "batch_size": 8,
    "lr": 0.01,
    "warmup_steps": 0,
    "log_every": 1,
    "ckpt_every": 100,
    "shuffle_buffer": 16,
    "device": "cpu",
}


def _real(data: Path, out: Path, **kw: object) -> TrainConfig:
    return TrainConfig(**{**BASE, "data": str(data), "out": str(out), **kw})  # type: ignore[arg-type]


def _losses(out: Path) -> list[dict[str, float]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in lines]


def _tiny_batch() -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model("cnn", 4, 1, 16, width=0.25)
    return model, torch.randn(8, 1, 16, 16), {"label": torch.arange(8) % 4}


def test_bf16_train_step_on_cpu() -> None:
    model, images, targets = _tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    dtypes: list[torch.dtype] = []
    model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = train_step(model, images, targets, opt, 0.1, student_loss("hard"), precision="bf16")
    assert dtypes == [torch.bfloat16]  # the forward pass ran under autocast
    assert torch.isfinite(torch.tensor(parts["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="this torch has no fp16 autocast on CPU")
def test_fp16_steps_through_a_grad_scaler(bands: Path, tmp_path: Path) -> None:
    model, images, targets = _tiny_batch()
    scaler = grad_scaler(torch.device("cpu"), "fp16")
    assert isinstance(scaler, torch.amp.GradScaler) and grad_scaler(images.device, "bf16") is None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = train_step(model, images, targets, opt, 0.1, student_loss("hard"), precision="fp16")
    assert torch.isfinite(torch.tensor(step["loss"]))
    train_step(
        model, images, targets, opt, 0.1, student_loss("hard"), precision="fp16", scaler=scaler
    )
    assert scaler.get_scale() > 0

    summary = run_train(_real(bands, tmp_path / "run", precision="fp16"), progress=False)
    assert summary["precision"] == "fp16"
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 0  # resumed runs continue with the scale reached


def test_real_recipe_trains_a_torchvision_arch_on_mixed_photos(
    photos: Path, tmp_path: Path
) -> None:
    cfg = _real(
        photos,
        tmp_path / "run",
        arch="torchvision:mobilenet_v3_small",
        width=1.0,
        val_data=str(photos),
        channels=3,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        precision="bf16",
    )
    summary = run_train(cfg, progress=False)
    assert summary["augment"] == "real" and summary["precision"] == "bf16"
    assert summary["loader_workers"] >= 1  # auto: decoding in worker processes
    assert summary["val"]["n"] == 32 and summary["skipped_samples"] == 0
    meta = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["meta"]
    assert meta["arch"] == "torchvision:mobilenet_v3_small"
    assert meta["preprocess"] == {
        "channels": 3,
        "image_size": 64,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resize": 73,  # 64 / 0.875: torchvision's evaluation ratio
    }
    assert [r["step"] for r in _losses(tmp_path / "run") if "loss" in r] == [1, 2, 3]


def test_weights_initialise_a_torchvision_student(photos: Path, tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    cfg = _real(
        photos,
        tmp_path / "run",
        arch="torchvision:resnet18",
        width=1.0,
        weights=str(tmp_path / "resnet18.pth"),
        steps=1,
        lr=1e-9,  # one step that leaves the weights as loaded
        weight_decay=0.0,
        num_workers=0,
    )
    run_train(cfg, progress=False)
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert trained["head.weight"].shape == (4, 512)  # a new head for the task's classes
    for name, param in imagenet.named_parameters():
        if not name.startswith("fc."):
            torch.testing.assert_close(trained[f"backbone.{name}"], param, rtol=0, atol=1e-6)


def test_weights_need_a_torchvision_arch_and_no_init(tmp_path: Path) -> None:
    base = {"data": "d", "out": "o"}
    with pytest.raises(ConfigError, match=r"weights.*torchvision:NAME"):
        from_dict(TrainConfig, {**base, "weights": "w.pth"})
    student = {**base, "arch": "torchvision:resnet18", "weights": "w.pth", "init": "c.pt"}
    with pytest.raises(ConfigError, match=r"weights.*init"):
        from_dict(StudentConfig, student)
    with pytest.raises(ConfigError, match="crop_scale"):
        from_dict(TrainConfig, {**base, "crop_scale": [0.5, 0.1]})
    with pytest.raises(ConfigError, match="crop_ratio"):
        from_dict(TrainConfig, {**base, "crop_ratio": [0.75]})
    cfg = from_dict(TrainConfig, {**base, "mean": 0.4, "crop_scale": "0.2,1"})
    assert cfg.mean == [0.4] and cfg.crop_scale == [0.2, 1.0] and cfg.num_workers == "auto"
    assert cfg.recipe(28) == "small" and cfg.recipe(64) == "real"
    assert replace(cfg, augment="small").recipe(224) == "small"


def test_rgb_models_take_rgb_whatever_the_first_image(bands: Path, tmp_path: Path) -> None:
    def channels(**kw: object) -> int:
        return read_inputs(_real(bands, tmp_path, **kw)).pp.channels

    assert channels() == 1  # the shards' grayscale images
    assert channels(arch="torchvision:resnet18", width=1.0) == 3
    assert channels(mean=[0.5, 0.5, 0.5]) == 3
    assert channels(channels=1, arch="torchvision:resnet18", width=1.0) == 1


def test_unknown_torchvision_arch_is_a_one_line_error(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data", str(photos), "--out", str(tmp_path / "o")]
    code, _, err = run_cli([*argv, "--arch", "torchvision:resnet19"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ssl-kd: error:")
    assert "torchvision:resnet18" in lines[0]  # the close names
    assert not (tmp_path / "o").exists()


def test_per_channel_normalisation_from_the_command_line(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data", str(photos), "--out", str(tmp_path / "o"), "--image-size", "64"]
    argv += ["--num-classes", "4", "--steps", "1", "--batch-size", "4", "--width", "0.25"]
    argv += ["--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2", "0.2", "--device", "cpu"]
    code, _, err = run_cli([*argv, "--resize", "80", "--crop-scale", "0.5", "1"], capsys)
    assert code == 0, err
    pp = load_checkpoint(tmp_path / "o" / "checkpoint.pt")["meta"]["preprocess"]
    assert pp["mean"] == [0.5, 0.4, 0.3] and pp["std"] == [0.2, 0.2, 0.2] and pp["resize"] == 80


def test_auto_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert recipes.loader_workers("auto", "small", shards=100, local_ranks=1) == 0
    assert recipes.loader_workers("auto", "real", shards=100, local_ranks=1) == 8  # the cap
    assert recipes.loader_workers("auto", "real", shards=100, local_ranks=4) == 3  # 16/4 - 1
    assert recipes.loader_workers("auto", "real", shards=2, local_ranks=1) == 2  # one per shard
    assert recipes.loader_workers(3, "small", shards=1, local_ranks=1) == 3  # as asked
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert recipes.loader_workers("auto", "real", shards=100, local_ranks=1) == 1


def _stream(data: Path, state: StreamState, n: int) -> list[torch.Tensor]:
    ds = ShardImageDataset(
        expand_shards(str(data)),
        random_resized_crop(32, (0.1, 1.0), (0.75, 1.33)),
        1,
        num_classes=4,
        shuffle_buffer=8,
        seed=5,
        sample_seed=9,
    )
    batches = stream_batches(ds, 8, state, num_workers=2)
    out = [next(batches)[0] for _ in range(n)]
    batches.close()
    return out


def test_worker_stream_resumes_at_the_same_batch(bands: Path) -> None:
    """Two workers over uneven shards: one runs dry first, epochs roll over, and a stream
    restarted from any saved state yields the batches the unbroken one did, crops included."""
    straight = _stream(bands, StreamState(), 12)
    for at in (3, 5):
        state = StreamState()
        _stream(bands, state, at)
        saved = StreamState(state.epoch, state.seen_in_epoch, list(state.worker_seen), state.turn)
        resumed = _stream(bands, saved, 12 - at)
        assert all(torch.equal(a, b) for a, b in zip(straight[at:], resumed, strict=True))
    assert len({tuple(b.shape) for b in straight}) == 1


def test_resume_with_loader_workers_matches_an_uninterrupted_run(
    bands: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = StudentConfig(
        **{**BASE, "steps": 12, "ckpt_every": 5},  # type: ignore[arg-type]
        data=str(bands),
        out=str(tmp_path / "straight"),
        executor="local",
        randaugment=1,
        num_workers=2,
    )
    run_student(straight, progress=False)
    resumed = replace(straight, out=str(tmp_path / "resumed"))
    with monkeypatch.context() as m:
        crash_after(m, 7)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_student(resumed, progress=False)
    ranks = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["ranks"]
    assert len(ranks[0]["worker_seen"]) == 2
    summary = run_student(resumed, progress=False)
    assert summary["resumed_at"] == 5 and summary["loader_workers"] == 2
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumes_a_run_saved_before_per_channel_options(
    bands: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose config holds one mean and std, and no loader-worker counts."""
    cfg = _real(bands, tmp_path / "run", steps=4, ckpt_every=2, augment="small")
    with monkeypatch.context() as m:
        crash_after(m, 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(cfg, progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["meta"]["config"] |= {"mean": 0.5, "std": 0.5, "num_workers": 0}
    for rank in ckpt["ranks"]:
        del rank["worker_seen"], rank["turn"]
    save_checkpoint(path, ckpt)
    summary = run_train(cfg, progress=False)
    assert summary["resumed_at"] == 2 and summary["step"] == 4 and summary["loader_workers"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pins_memory_and_runs_channels_last(photos: Path, tmp_path: Path) -> None:
    cfg = _real(photos, tmp_path / "run", device="cuda", precision="bf16", channels=3)
    run = worker._setup(cfg, LocalContext(cfg.out))
    assert run.pin_memory and run.channels_last
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    summary = run_train(cfg, progress=False)
    assert summary["step"] == 3 and summary["precision"] == "bf16"
