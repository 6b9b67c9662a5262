"""timm models: a teacher from a local safetensors file labels photos of every size and mode as
timm's own evaluation transform and model do; students and baselines train and fine-tune; the
preprocessing comes from the model's timm config; bad input is one line."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY, run_cli, write_mixed_shards, write_plain_tar
from PIL import Image

from ssl_kd import config as cfglib
from ssl_kd.errors import UserError
from ssl_kd.label.files import label_files, read_meta
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ssl_kd.models.external import TeacherSpec, load_teacher, teacher_checkpoint
from ssl_kd.models.preprocess import Preprocess, fit_size
from ssl_kd.models.registry import check_model_name, create_model, list_models

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402

# Tiny timm models whose config differs from torchvision's evaluation transform in every part:
# 160 px at crop_pct 0.95 (resize 168, not 182), bicubic, mean and std 0.5.
TEACHER = "test_vit"
STUDENT = "test_resnet"
NUM_CLASSES = 5
MODES = ("RGB", "L", "RGBA", "CMYK", "RGB.png", "P")


def _photos(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` photo-like images (waves, blocks and noise) of 60-520 px sides, any aspect
    ratio, cycling through JPEG RGB, L and CMYK, and PNG RGBA (uneven alpha), RGB and P."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(60, 520, 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        c = rng.uniform(-1, 1, (3, 3))
        img = np.stack([np.sin(6 * (a * xx + b * yy) + 3 * p) for a, b, p in c], -1) * 127 + 128
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            dy, dx = int(rng.integers(10, h // 2 + 11)), int(rng.integers(10, w // 2 + 11))
            img[y0 : y0 + dy, x0 : x0 + dx] = rng.integers(0, 256, 3)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        pil, mode, buf = Image.fromarray(img, "RGB"), MODES[i % len(MODES)], io.BytesIO()
        if mode == "RGBA":
            pil.putalpha(Image.fromarray(rng.integers(80, 256, (h, w), dtype=np.uint8)))
            pil.save(buf, "PNG")
        elif mode in ("RGB.png", "P"):
            pil.convert(mode.removesuffix(".png")).save(buf, "PNG")
        else:
            pil.convert(mode).save(buf, "JPEG", quality=90)
        out.append((f"p{i:04d}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}", buf.getvalue()))
    return out


def _timm_input(data: bytes, transform) -> torch.Tensor:
    """What a timm user feeds the model: the image as RGB through timm's eval transform."""
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))


def _decisive_teacher(photos: list[tuple[str, bytes]], path: Path) -> torch.nn.Module:
    """A random ``TEACHER`` whose head splits the photos' pre-logits features along random
    directions (centred, scaled to logits of spread 8), saved to ``path``: its predictions vary
    from photo to photo and are confident, so agreement measures the inputs, not ties."""
    torch.manual_seed(0)
    net = timm.create_model(TEACHER, pretrained=False, num_classes=NUM_CLASSES).eval()
    transform = create_transform(**resolve_data_config({}, model=net), is_training=False)
    x = torch.stack([_timm_input(data, transform) for _, data in photos])
    with torch.no_grad():
        feats = net.forward_head(net.forward_features(x), pre_logits=True)
        mean = feats.mean(0)
        w = torch.randn(NUM_CLASSES, feats.shape[1], generator=torch.Generator().manual_seed(1))
        w *= 8 / ((feats - mean) @ w.T).std()
        net.get_classifier().weight.copy_(w)
        net.get_classifier().bias.copy_(-w @ mean)
    save_file(net.state_dict(), str(path))
    return net


def _label_rows(out: Path) -> dict[str, tuple[list[int], list[float], list[float] | None]]:
    rows = {}
    for path in label_files(out):
        t = pq.read_table(path).to_pydict()
        embs = t.get("embedding") or [None] * len(t["key"])
        for key, cls, prob, emb in zip(
            t["key"], t["topk_class"], t["topk_prob"], embs, strict=True
        ):
            rows[key] = (cls, prob, emb)
    return rows


def test_timm_teacher_labels_photos_as_timm_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = _photos(48)
    shards = tmp_path / "u"
    shards.mkdir()
    write_plain_tar(shards / "u-000000.tar", photos[:24])
    write_plain_tar(shards / "u-000001.tar", photos[24:])
    weights = tmp_path / "model.safetensors"
    net = _decisive_teacher(photos, weights)
    transform = create_transform(**resolve_data_config({}, model=net), is_training=False)
    x = torch.stack([_timm_input(data, transform) for _, data in photos])
    with torch.no_grad():
        want = torch.softmax(net(x), 1).numpy()
        feats = net.forward_head(net.forward_features(x), pre_logits=True)
    assert len(set(want.argmax(1))) == NUM_CLASSES and want.max(1).mean() > 0.8  # decisive

    base = ["label", "--teacher", f"timm:{TEACHER}", "--weights", str(weights)]
    base += ["--shards", str(shards), "--executor", "local", "--k", "3"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "l"), "--embeddings"], capsys)
    assert code == 0, err
    rows = _label_rows(tmp_path / "l")
    keys = [name.rsplit(".", 1)[0] for name, _ in photos]
    assert set(rows) == set(keys)
    top1 = np.array([rows[k][0][0] for k in keys])
    assert np.mean(top1 == want.argmax(1)) >= 0.98
    # The stored top-k probabilities are timm's: JPEGs twice the size needed are decoded at a
    # reduced scale (--jpeg-draft, the default), which moves a few by up to a few hundredths.
    gaps = [np.abs(np.array(rows[k][1]) - want[i, rows[k][0]]).max() for i, k in enumerate(keys)]
    assert max(gaps) < 0.05 and np.median(gaps) < 0.005
    embs = torch.tensor(np.array([rows[k][2] for k in keys], dtype=np.float32))
    cosine = torch.nn.functional.cosine_similarity(embs, feats, dim=1)
    assert cosine.min() > 0.99  # the embedding is timm's pre-logits feature vector
    meta = read_meta(label_files(tmp_path / "l")[0])
    assert meta.preprocess == {
        "channels": 3,
        "image_size": 160,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "resize": 168,  # floor(160 / 0.95)
        "interpolation": "bicubic",
    }
    source = meta.extra["teacher"]
    assert source["source"] == "timm" and source["name"] == f"timm:{TEACHER}"
    assert source["data_config"]["crop_pct"] == 0.95 and meta.embedding_dim == feats.shape[1]

    # torchvision's transform (resize 182, ImageNet mean and std) through the override flags:
    # recorded, and far from timm's labels, so the agreement above is timm's config at work.
    other = ["--resize", "182", "--mean", "0.485", "0.456", "0.406"]
    other += ["--std", "0.229", "0.224", "0.225"]
    code, _, err = run_cli([*base, *other, "--out", str(tmp_path / "tv")], capsys)
    assert code == 0, err
    meta = read_meta(label_files(tmp_path / "tv")[0])
    assert meta.preprocess["resize"] == 182 and meta.preprocess["mean"] == [0.485, 0.456, 0.406]
    wrong = _label_rows(tmp_path / "tv")
    assert np.mean([wrong[k][0][0] for k in keys] == want.argmax(1)) < 0.9


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_crop_modes_resize_as_timm(crop_mode: str) -> None:
    pp = Preprocess(3, 64, (0.5, 0.4, 0.3), (0.2,) * 3, 72, "bicubic", crop_mode)
    transform = create_transform(
        input_size=(3, 64, 64),
        crop_pct=64 / 72,
        crop_mode=crop_mode,
        interpolation="bicubic",
        mean=pp.mean,
        std=pp.std,
        is_training=False,
    )
    for _, data in _photos(6, seed=3):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        ours = fit_size(pp)(tensor).float() / 255
        theirs = (
            transform(img) * torch.tensor(pp.std).view(3, 1, 1)
            + torch.tensor(pp.mean)[:, None, None]
        )
        assert ours.shape == theirs.shape == (3, 64, 64)
        assert (ours - theirs).abs().mean() < 0.01  # PIL's and torch's bicubic differ slightly


def test_timm_teacher_keeps_classes_and_imports_as_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = timm.create_model(f"{STUDENT}.r160_in1k", pretrained=False, num_classes=6).eval()
    torch.save(net.state_dict(), tmp_path / "w.bin")  # a torch file: either format loads
    (tmp_path / "keep.txt").write_text("4\n1\n")
    spec = TeacherSpec(
        f"timm:{STUDENT}", str(tmp_path / "w.bin"), keep_classes=str(tmp_path / "keep.txt")
    )
    loaded = load_teacher(spec)
    save_checkpoint(tmp_path / "t.pt", teacher_checkpoint(loaded, {}))
    model, meta = model_from_checkpoint(load_checkpoint(tmp_path / "t.pt"))
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x), net(x)[:, [4, 1]])
        torch.testing.assert_close(
            model.features(x), net.forward_head(net.forward_features(x), pre_logits=True)
        )
    assert meta["arch"] == f"timm:{STUDENT}" and meta["preprocess"]["resize"] == 168
    assert "interpolation" not in meta["preprocess"]  # bilinear, the default, is not written
    assert meta["classes"] == ["4", "1"] and meta["teacher_source"]["kept_classes"] == [4, 1]


def test_timm_students_from_weights_files(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = timm.create_model(STUDENT, pretrained=False, num_classes=1000)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    headless = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "backbone.pth")
    for name in ("w.safetensors", "backbone.pth"):
        model = create_model(f"timm:{STUDENT}", 4, 3, 32, weights=str(tmp_path / name))
        assert torch.equal(model.backbone.conv1[0].weight, net.conv1[0].weight)
        assert model.head.out_features == 4  # a new head for the task
    gray = create_model(f"timm:{STUDENT}", 4, 1, 32, weights=str(tmp_path / "w.safetensors"))
    # timm's own adaptation of an RGB stem: one channel holds the sum of the three
    assert torch.allclose(gray.backbone.conv1[0].weight, net.conv1[0].weight.sum(1, keepdim=True))
    fresh = create_model(f"timm:{TEACHER}", 3, 3, 48, dropout=0.1, stochastic_depth=0.2)
    assert fresh(torch.randn(2, 3, 48, 48)).shape == (2, 3)  # a ViT sized to 48 px
    assert fresh.features(torch.randn(2, 3, 48, 48)).shape == (2, fresh.feature_dim)
    rates = [m.drop_prob for m in fresh.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)  # timm's drop_path_rate
    with pytest.raises(UserError, match="timm:vgg11 has no stochastic depth"):
        create_model("timm:vgg11", 3, stochastic_depth=0.1)


def test_timm_models_are_listed_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["models"], capsys)
    names = out.splitlines()
    assert code == 0 and names == list_models()
    assert f"timm:{TEACHER}" in names and "timm:resnet50" in names and "cnn" in names
    check_model_name("timm:resnet50.tv_in1k")  # a pretrained tag picks its config
    for name, message in (
        ("timm:test_vitt", "did you mean timm:test_vit"),
        ("timm:resnet50.nope", "no pretrained tag 'nope' for resnet50"),
        ("vit_tiny_patch16_224", "did you mean timm:vit_tiny_patch16_224"),
        ("timm:deit_tiny_distilled_patch16_224", "two classifier heads"),
    ):
        with pytest.raises(UserError, match=message):
            create_model(name, 3)


def test_timm_missing_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mixed_shards(tmp_path, "u", 2, 2)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    argv = ["label", "--teacher", f"timm:{TEACHER}", "--weights", str(tmp_path / "w.pth")]
    argv += ["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--executor", "local"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install 'ssl_kd[timm]'" in err
    assert not any(name.startswith("timm:") for name in list_models())  # nothing to list
    code, _, err = run_cli(
        [
            "train",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "t"),
            "--arch",
            f"timm:{STUDENT}",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and "pip install 'ssl_kd[timm]'" in err


def test_bad_timm_teachers_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_mixed_shards(tmp_path, "u", 4, 4)
    resnet = timm.create_model(STUDENT, pretrained=False, num_classes=3)
    save_file(resnet.state_dict(), str(tmp_path / "resnet.safetensors"))
    headless = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    save_file(headless, str(tmp_path / "headless.safetensors"))
    (tmp_path / "garbage.pth").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" * 3)
    cases = {
        "unknown": ([f"timm:{TEACHER}x", "resnet.safetensors"], "did you mean timm:test_vit"),
        "other arch": ([f"timm:{TEACHER}", "resnet.safetensors"], f"do not fit timm:{TEACHER}"),
        "no head": ([f"timm:{STUDENT}", "headless.safetensors"], "hold no classifier (fc.weight)"),
        "garbage": ([f"timm:{STUDENT}", "garbage.pth"], "a damaged safetensors file"),
        "no weights": ([f"timm:{STUDENT}", None], "needs --weights FILE"),
    }
    for case, ((teacher, weights), expected) in cases.items():
        argv = ["label", "--teacher", teacher, "--shards", str(tmp_path), "--executor", "local"]
        argv += ["--out", str(tmp_path / case)]
        if weights:
            argv += ["--weights", str(tmp_path / weights)]
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err.startswith("ssl-kd: error:"), (case, err)
        assert err.count("\n") == 1 and expected in err, (case, err)


@pytest.mark.slow
def test_run_with_a_timm_teacher_and_timm_students(tmp_path: Path) -> None:
    from ssl_kd.pipeline.config import PipelineConfig
    from ssl_kd.pipeline.run import run_pipeline

    classes = ["cat", "dog", "car", "tree"]
    data = {}
    for split, n, labeled, seed in (
        ("labeled", 16, True, 0),
        ("unlabeled", 30, False, 1),
        ("test", 8, True, 2),
    ):
        (tmp_path / split).mkdir()
        write_mixed_shards(
            tmp_path / split, split, n, 10, len(classes) if labeled else None, seed=seed
        )
        data[split] = str(tmp_path / split)
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    torch.manual_seed(0)
    teacher = timm.create_model(STUDENT, pretrained=False, num_classes=6)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    (tmp_path / "teacher.txt").write_text("plane\ncat\nship\ndog\ncar\ntree\n")
    (tmp_path / "keep.txt").write_text("\n".join(classes) + "\n")
    student = {"arch": f"timm:{STUDENT}", "image_size": 32}
    cfg = cfglib.from_dict(
        PipelineConfig,
        {
            **TINY,
            **data,
            "out": str(tmp_path / "run"),
            "seeds": [0],
            "class_names": str(tmp_path / "classes.txt"),
            "teacher": {
                "source": f"timm:{STUDENT}",
                "weights": str(tmp_path / "teacher.safetensors"),
                "class_names": str(tmp_path / "teacher.txt"),
                "keep_classes": str(tmp_path / "keep.txt"),
                "image_size": 64,
            },
            "label": {"k": 3, "batch_size": 16},
            "select": {"per_class": 4, "top_p": 2},
            "pretrain": {**TINY["pretrain"], **student},
            "baseline": {**TINY["baseline"], "image_size": 32},
        },
    )
    summary = run_pipeline(cfg, progress=False)
    assert all(s["status"] == "ran" for s in summary["stages"])
    run = tmp_path / "run"
    meta = load_checkpoint(run / "teacher" / "checkpoint.pt")["meta"]
    assert meta["arch"] == f"timm:{STUDENT}" and meta["preprocess"]["resize"] == 67  # 64 / 0.95
    labels = read_meta(label_files(run / "round1" / "labels")[0])
    assert labels.extra["teacher"]["source"] == "timm" and labels.classes == classes
    assert labels.extra["teacher"]["kept_classes"] == [1, 3, 4, 5]
    for stage in ("round1/seed0/pretrain", "round1/seed0/finetune", "baseline/seed0"):
        ckpt = load_checkpoint(run / stage / "checkpoint.pt")
        assert ckpt["meta"]["arch"] == f"timm:{STUDENT}", stage
        assert ckpt["meta"]["preprocess"]["image_size"] == 32
    doc = json.loads((run / "results" / "results.json").read_text())
    assert {m["model"] for m in doc["models"]} == {"teacher", "baseline", "pretrained", "finetuned"}
