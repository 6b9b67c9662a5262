"""Exported programs (``torch.export.save``) as teachers: found by content, they label as the
eager module they were exported from, with any batch size; an import references them by path
and sha256; bad programs are one-line errors."""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import run_cli, write_mixed_shards
from torch import nn
from torchvision.transforms import v2

from ssl_kd.errors import UserError
from ssl_kd.label.files import label_files, read_meta
from ssl_kd.label.teacher import Teacher
from ssl_kd.models.checkpoint import load_checkpoint, save_checkpoint
from ssl_kd.models.external import TeacherSpec, load_teacher, source_kind, teacher_checkpoint
from ssl_kd.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ssl_kd.shards.decode import decode_image

NUM_CLASSES = 6
SIZE = 40
RESIZE = round(SIZE / 0.875)  # torchvision's ratio, the default for sizes other than 224


def _net(seed: int = 0) -> nn.Module:
    """A small classifier with batch norm and dropout, whose eval mode differs from training's."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(32, NUM_CLASSES),
    )
    with torch.no_grad():  # running statistics unlike any batch's
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _export(net: nn.Module, path: Path, batch: int = 2, dynamic: bool = True) -> Path:
    x = torch.randn(batch, 3, SIZE, SIZE)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=shapes), str(path))
    return path


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> str:
    root = tmp_path / "u"
    root.mkdir()
    write_mixed_shards(root, "u", 10, 5)
    return str(root)


def _images(shard_dir: str) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                out[m.name.rsplit(".", 1)[0]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


def _eager_probs(net: nn.Module, data: bytes, keep: list[int]) -> np.ndarray:
    """The eager module's softmax over the kept classes, on the image prepared by torchvision's
    own transforms (the same decode: a large JPEG is read at a reduced scale)."""
    prepare = v2.Compose(
        [
            v2.Resize(RESIZE, antialias=True),
            v2.CenterCrop(SIZE),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    x = prepare(decode_image(data, 3, size=RESIZE))[None]
    with torch.inference_mode():
        logits = net(x)[0, keep]
    return torch.softmax(logits.double(), 0).numpy()


def test_exported_program_labels_as_its_eager_module(
    tmp_path: Path, mixed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    net = _net()
    program = _export(net, tmp_path / "teacher.bin")  # found by content, not by extension
    names = [f"kind{i}" for i in range(NUM_CLASSES)]
    classes = _lines(tmp_path / "classes.txt", names)
    keep = _lines(tmp_path / "keep.txt", ["kind4", "1", "kind2"])
    out = tmp_path / "labels"
    argv = ["label", "--teacher", str(program), "--class-names", str(classes)]
    argv += ["--keep-classes", str(keep), "--shards", mixed, "--out", str(out)]
    code, _, err = run_cli([*argv, "--executor", "local", "--k", "2", "--batch-size", "3"], capsys)
    assert code == 0, err

    images = _images(mixed)
    rows = {}
    for path in label_files(out):
        t = pq.read_table(path).to_pydict()
        for key, cls, prob in zip(t["key"], t["topk_class"], t["topk_prob"], strict=True):
            rows[key] = (np.array(cls), np.array(prob))
    assert set(rows) == set(images)
    for key, (cls, prob) in rows.items():
        direct = _eager_probs(net, images[key], [4, 1, 2])
        np.testing.assert_allclose(prob, direct[cls], atol=2e-3)
        assert cls[0] == int(np.argmax(direct)) or direct.max() - prob[0] < 2e-3

    meta = read_meta(label_files(out)[0])
    assert meta.classes == ["kind4", "kind1", "kind2"] and meta.teacher_arch == "exported"
    digest = hashlib.sha256(program.read_bytes()).hexdigest()
    assert meta.teacher_sha256 == digest
    assert meta.extra["teacher"] == {
        "source": "exported",
        "name": "teacher.bin",
        "sha256": digest,
        "kept_classes": [4, 1, 2],
    }
    # The program's static height and width set the image size; the resize follows from it.
    assert meta.preprocess["image_size"] == SIZE and meta.preprocess["resize"] == RESIZE


@pytest.mark.parametrize("batch", [1, 4])
def test_a_static_batch_runs_in_chunks(tmp_path: Path, batch: int) -> None:
    net = _net(seed=1)
    program = _export(net, tmp_path / "static.pt2", batch=batch, dynamic=False)
    teacher = Teacher(str(program), k=NUM_CLASSES, device="cpu")
    images = torch.randint(0, 256, (7, 3, SIZE, SIZE), dtype=torch.uint8)  # 4 + 3: one padded
    classes, probs, _ = teacher.predict(images)
    x = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    with torch.inference_mode():
        want = torch.softmax(net(x), 1).numpy()
    got = np.zeros_like(want)
    np.put_along_axis(got, classes.astype(np.int64), probs, axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_import_references_the_program_by_path_and_digest(tmp_path: Path) -> None:
    net = _net(seed=2)
    program = _export(net, tmp_path / "model.pt2")
    keep = _lines(tmp_path / "keep.txt", ["5", "0"])
    loaded = load_teacher(TeacherSpec(str(program), keep_classes=str(keep)))
    path = tmp_path / "imported.pt"
    save_checkpoint(path, teacher_checkpoint(loaded, {}, str(program)))
    ckpt = load_checkpoint(path)
    assert ckpt["model"] == {} and ckpt["meta"]["archive"] == str(program)
    again = load_teacher(TeacherSpec(str(path)))
    assert again.meta["classes"] == ["5", "0"] and again.source == loaded.source
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(again.model(x), net(x)[:, [5, 0]])

    # Checkpoints imported before exported programs name the archive "script".
    meta = dict(ckpt["meta"])
    meta["script"], meta["script_sha256"] = meta.pop("archive"), meta.pop("archive_sha256")
    save_checkpoint(path, {"model": {}, "meta": meta})
    assert load_teacher(TeacherSpec(str(path))).meta["classes"] == ["5", "0"]

    program.write_bytes(program.read_bytes() + b"\0")  # the program changed since the import
    with pytest.raises(UserError, match="changed since"):
        load_teacher(TeacherSpec(str(path)))


def test_found_by_content(tmp_path: Path) -> None:
    net = _net()
    assert source_kind(str(_export(net, tmp_path / "a.pt"))) == "exported"
    torch.save(net.state_dict(), tmp_path / "weights.pt2")
    assert source_kind(str(tmp_path / "weights.pt2")) == "ssl_kd"  # torch.save's zip: not one


def _bad_programs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    ok = str(_export(_net(), tmp_path / "ok.pt2"))
    train = str(_export(_net().train(), tmp_path / "train.pt2"))
    broken = tmp_path / "broken.pt2"  # the layout of one, but its program is not readable
    with zipfile.ZipFile(ok) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"{}" if name.endswith("models/model.json") else src.read(name))
    return {
        "training mode": (["--teacher", train], "call model.eval() before torch.export.export"),
        "other size": (["--teacher", ok, "--image-size", "64"], "takes 40x40 images"),
        "embeddings": (["--teacher", ok, "--embeddings"], "exported program gives logits only"),
        "weights": (["--teacher", ok, "--weights", ok], "holds its own weights"),
        "prompts": (["--teacher", ok, "--prompts", ok], "--prompts applies to open_clip"),
        "broken": (["--teacher", str(broken)], "broken.pt2 does not load"),
    }


def test_bad_exported_programs_are_one_line_errors(
    tmp_path: Path, mixed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for case, (teacher_args, expected) in _bad_programs(tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        argv = ["label", *teacher_args, "--shards", mixed, "--out", str(out), "--k", "2"]
        code, _, err = run_cli([*argv, "--executor", "local"], capsys)
        assert code == 2, (case, err)
        assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, (case, err)
        assert expected in err, (case, err)
