"""External teachers: torchvision classifiers with local weights and TorchScript archives label
exactly as a direct computation with the same transform and model does; bad input is one line."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import make_teacher, run_cli, write_mixed_shards
from safetensors.torch import save_file
from torchvision import models as tvm
from torchvision.transforms import v2

from ssl_kd.errors import UserError
from ssl_kd.label.files import label_files, read_meta
from ssl_kd.label.teacher import Teacher
from ssl_kd.models.checkpoint import save_checkpoint
from ssl_kd.models.external import TeacherSpec, load_teacher, teacher_checkpoint
from ssl_kd.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ssl_kd.shards.decode import decode_image

NUM_CLASSES = 6
K = 3


@pytest.fixture
def mixed(tmp_path: Path) -> str:
    """Two shards of 14 web-like images of mixed sizes and modes."""
    root = tmp_path / "u"
    root.mkdir()
    write_mixed_shards(root, "u", 14, 7)
    return str(root)


def _weights(tmp_path: Path, name: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = tvm.get_model(name, weights=None, num_classes=num_classes).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    return path


def _class_file(tmp_path: Path, names: list[str], name: str = "classes.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(n + "\n" for n in names))
    return path


def _images(shard_dir: str) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                out[m.name.rsplit(".", 1)[0]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


def _direct_probs(
    model: torch.nn.Module,
    data: bytes,
    size: int,
    resize: int,
    keep: list[int] | None = None,
    draft: bool = True,
) -> np.ndarray:
    """The teacher's softmax on one image, prepared by torchvision's own transforms."""
    prepare = v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    # The same decode (with ``draft``, a large JPEG is read at a reduced scale, never below
    # ``resize``); the rest is torchvision's own transforms.
    x = prepare(decode_image(data, 3, size=resize if draft else 0))[None]
    with torch.inference_mode():
        logits = model.eval()(x)[0]
    if keep is not None:
        logits = logits[keep]
    return torch.softmax(logits.double(), 0).numpy()


def _read(out: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], object]:
    rows = {}
    files = label_files(out)
    for path in files:
        t = pq.read_table(path).to_pydict()
        for key, cls, prob in zip(t["key"], t["topk_class"], t["topk_prob"], strict=True):
            rows[key] = (np.array(cls), np.array(prob, dtype=np.float64))
    return rows, read_meta(files[0])


def _assert_match(rows: dict, images: dict[str, bytes], direct) -> None:
    """Stored top-k equals the direct top-k to float16 precision (ties may swap places)."""
    assert set(rows) == set(images)
    for key, (cls, prob) in rows.items():
        p = direct(images[key])
        np.testing.assert_allclose(prob, p[cls], atol=2e-3)
        assert prob.min() >= np.sort(p)[::-1][len(cls)] - 2e-3  # nothing better was left out
        assert np.all(np.diff(prob) <= 1e-6)  # sorted, descending


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_teacher_labels_as_a_direct_computation(
    name: str, mixed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _weights(tmp_path, name)
    names = [f"kind{i}" for i in range(NUM_CLASSES)]
    classes = _class_file(tmp_path, names)
    out = tmp_path / "labels"
    argv = ["label", "--teacher", f"torchvision:{name}", "--weights", str(weights)]
    argv += ["--class-names", str(classes), "--shards", mixed, "--out", str(out)]
    argv += ["--executor", "local", "--k", str(K), "--image-size", "64", "--resize", "72"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err

    model = tvm.get_model(name, weights=None, num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    rows, meta = _read(out)
    _assert_match(rows, _images(mixed), lambda data: _direct_probs(model, data, 64, 72))

    assert meta.classes == names and meta.teacher_arch == f"torchvision:{name}"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta.teacher_sha256 == digest
    assert meta.extra["teacher"] == {
        "source": "torchvision",
        "name": f"torchvision:{name}",
        "weights": weights.name,
        "weights_sha256": digest,
    }
    assert meta.preprocess == {
        "channels": 3,
        "image_size": 64,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resize": 72,
    }


def test_torchscript_teacher_with_kept_classes(
    mixed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(1)
    net = tvm.resnet18(num_classes=NUM_CLASSES).eval()
    archive = tmp_path / "teacher.torchscript.pt"
    torch.jit.save(torch.jit.script(net), str(archive))
    names = [f"kind{i}" for i in range(NUM_CLASSES)]
    classes = _class_file(tmp_path, names)
    keep = _class_file(tmp_path, ["kind4", "1", "kind2", "kind5"], "keep.txt")  # names or ids
    out = tmp_path / "labels"
    argv = ["label", "--teacher", str(archive), "--class-names", str(classes)]
    argv += ["--keep-classes", str(keep), "--shards", mixed, "--out", str(out)]
    argv += ["--executor", "local", "--k", str(K), "--image-size", "48", "--resize", "56"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err

    kept = [4, 1, 2, 5]
    rows, meta = _read(out)
    _assert_match(rows, _images(mixed), lambda data: _direct_probs(net, data, 48, 56, kept))
    assert meta.classes == ["kind4", "kind1", "kind2", "kind5"] and meta.num_classes == 4
    assert meta.extra["teacher"]["source"] == "torchscript"
    assert meta.extra["teacher"]["kept_classes"] == kept

    # A TorchScript archive gives logits only: no embeddings.
    argv = ["label", "--teacher", str(archive), "--shards", mixed, "--k", "2"]
    code, _, err = run_cli([*argv, "--embeddings", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and err.count("\n") == 1 and "TorchScript" in err


def test_kept_classes_of_a_torchvision_teacher_renormalise(tmp_path: Path, mixed: str) -> None:
    weights = _weights(tmp_path, "resnet18", seed=3)
    keep = _class_file(tmp_path, ["5", "0"], "keep.txt")
    spec = TeacherSpec("torchvision:resnet18", weights=str(weights), keep_classes=str(keep))
    teacher = Teacher(spec, k=2, device="cpu")
    model = tvm.resnet18(num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    data = next(iter(_images(mixed).values()))
    img = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(decode_image(data, 3, size=256)))
    classes, probs, _ = teacher.predict(img[None])
    direct = _direct_probs(model, data, 224, 256, [5, 0])
    np.testing.assert_allclose(probs[0], direct[classes[0]], atol=1e-5)
    assert probs[0].sum() == pytest.approx(1.0, abs=1e-5)
    assert teacher.meta.classes == ["5", "0"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    weights = str(_weights(tmp_path, "resnet18"))
    text = tmp_path / "notes.txt"
    text.write_text("not a tensor file\n")
    short = str(_class_file(tmp_path, ["a", "b"], "short.txt"))
    keep = str(_class_file(tmp_path, ["kind9"], "keep.txt"))
    ckpt = str(make_teacher(tmp_path / "own.pt", channels=3))
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "bare.safetensors"))
    tv = ["--teacher", "torchvision:resnet18"]
    return {
        "missing weights": ([*tv, "--weights", str(tmp_path / "nope.pth")], "does not exist"),
        "no weights": (tv, "needs --weights"),
        "other arch": (
            ["--teacher", "torchvision:mobilenet_v3_small", "--weights", weights],
            "do not fit torchvision:mobilenet_v3_small",
        ),
        "not a state_dict": ([*tv, "--weights", str(text)], "not a readable state_dict"),
        "class file length": (
            [*tv, "--weights", weights, "--class-names", short],
            "has 2 names but the teacher predicts 6 classes",
        ),
        "unknown name": (
            ["--teacher", "torchvision:resnet51", "--weights", weights],
            "did you mean torchvision:resnet50",
        ),
        "kept class": ([*tv, "--weights", weights, "--keep-classes", keep], "'kind9'"),
        "flags on own checkpoint": (["--teacher", ckpt, "--resize", "40"], "--resize apply"),
        "bare safetensors": (
            ["--teacher", str(tmp_path / "bare.safetensors")],
            "safetensors state_dict, not an ssl_kd checkpoint",
        ),
        "mean length": ([*tv, "--weights", weights, "--mean", "0.5", "0.5"], "--mean has 2"),
    }


def test_bad_external_teachers_are_one_line_errors(
    tmp_path: Path, mixed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for case, (teacher_args, expected) in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        argv = ["label", *teacher_args, "--shards", mixed, "--out", str(out), "--k", "2"]
        code, _, err = run_cli([*argv, "--executor", "local"], capsys)
        assert code == 2, (case, err)
        assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, (case, err)
        assert expected in err, (case, err)
        assert not out.exists() or not any(out.iterdir()), case


def test_bf16_labels_agree_with_fp32_and_are_kept_apart(
    tmp_path: Path, mixed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _weights(tmp_path, "resnet18", seed=5)
    base = ["label", "--teacher", "torchvision:resnet18", "--weights", str(weights)]
    base += ["--shards", mixed, "--executor", "local", "--image-size", "64", "--k", "3"]
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        code, _, err = run_cli([*base, "--out", str(out), "--precision", precision], capsys)
        assert code == 0, err
        runs[precision] = _read(out)
    (fp32, meta32), (bf16, meta16) = runs["fp32"], runs["bf16"]
    assert meta16.extra["precision"] == "bf16" and meta32.extra["precision"] == "fp32"
    # Random weights give near-flat logits, the hardest case for agreement; a trained teacher
    # is measured in BENCHMARKS.md.
    agree = np.mean([fp32[k][0][0] == bf16[k][0][0] for k in fp32])
    assert agree >= 0.7
    np.testing.assert_allclose(
        np.stack([bf16[k][1] for k in fp32]).sum(1),
        np.stack([fp32[k][1] for k in fp32]).sum(1),
        atol=0.05,
    )
    # Labels of another precision are another labeling: not mixed into one directory.
    code, _, err = run_cli([*base, "--out", str(tmp_path / "fp32"), "--precision", "bf16"], capsys)
    assert code == 2 and "different labelings" in err


def test_full_jpeg_decode_labels_as_torchvision_does_and_is_recorded(
    tmp_path: Path, mixed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(mixed)
    # The case the option exists for: JPEGs at least twice the resize target, which draft mode
    # would read at a reduced scale.
    jpegs = [d for d in images.values() if d[:2] == b"\xff\xd8"]
    assert sum(1 for d in jpegs if min(decode_image(d, 3).shape[1:]) >= 2 * 32) >= 3
    weights = _weights(tmp_path, "resnet18", seed=3)
    base = ["label", "--teacher", "torchvision:resnet18", "--weights", str(weights)]
    base += ["--shards", mixed, "--executor", "local", "--image-size", "28", "--resize", "32"]
    base += ["--k", str(K)]
    out = tmp_path / "full"
    code, _, err = run_cli([*base, "--out", str(out), "--jpeg-draft", "false"], capsys)
    assert code == 0, err
    model = tvm.get_model("resnet18", weights=None, num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    rows, meta = _read(out)
    _assert_match(rows, images, lambda data: _direct_probs(model, data, 28, 32, draft=False))
    assert meta.extra["jpeg_draft"] is False
    # Draft-mode labels are another labeling: not mixed into the same directory.
    code, _, err = run_cli([*base, "--out", str(out)], capsys)
    assert code == 2 and "different labelings" in err


class _RunsOutOfMemory(torch.nn.Module):
    """Wraps a model; raises CUDA's out-of-memory error on batches over ``limit``."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model = model
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_keeps_it(tmp_path: Path) -> None:
    ckpt = make_teacher(tmp_path / "t.pt", channels=1, size=16, num_classes=5)
    teacher = Teacher(str(ckpt), k=3, device="cpu")
    images = torch.randint(0, 255, (20, 1, 16, 16), dtype=torch.uint8)
    want = teacher.predict(images)
    flaky = _RunsOutOfMemory(teacher.model, limit=6)
    teacher.model = flaky  # type: ignore[assignment]
    got = teacher.predict(images)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)
    assert teacher.max_batch == 5  # 20 → 10 → 5
    assert flaky.sizes[:3] == [20, 10, 5] and max(flaky.sizes[3:]) == 5
    flaky.sizes.clear()
    teacher.predict(images[:12])  # the next batch starts at the size that fitted
    assert flaky.sizes == [5, 5, 2]

    flaky.limit = 0  # nothing fits: the error surfaces once the batch is a single image
    with pytest.raises(torch.OutOfMemoryError):
        teacher.predict(images[:4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_labels(tmp_path: Path, mixed: str, capsys: pytest.CaptureFixture[str]) -> None:
    weights = _weights(tmp_path, "resnet18")
    argv = ["label", "--teacher", "torchvision:resnet18", "--weights", str(weights)]
    argv += ["--shards", mixed, "--out", str(tmp_path / "l"), "--executor", "local"]
    code, _, err = run_cli([*argv, "--device", "cuda", "--precision", "bf16"], capsys)
    assert code == 0, err
    rows, _ = _read(tmp_path / "l")
    assert len(rows) == 14


def test_imported_teachers_load_like_their_source(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = tvm.resnet18(num_classes=NUM_CLASSES).eval()
    archive = tmp_path / "t.pt"
    torch.jit.save(torch.jit.script(net), str(archive))
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    safetensors = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(safetensors))
    keep = _class_file(tmp_path, ["3", "0"], "keep.txt")
    x = torch.randn(2, 3, 64, 64)
    for spec, script in (
        (TeacherSpec(str(archive), keep_classes=str(keep), image_size=64), str(archive)),
        (TeacherSpec("torchvision:resnet18", str(weights), keep_classes=str(keep)), None),
        (TeacherSpec("torchvision:resnet18", str(safetensors), keep_classes=str(keep)), None),
    ):
        loaded = load_teacher(spec)
        path = tmp_path / "imported.pt"
        save_checkpoint(path, teacher_checkpoint(loaded, {}, script))
        again = load_teacher(TeacherSpec(str(path)))
        assert again.meta["classes"] == ["3", "0"] and again.source == loaded.source
        with torch.inference_mode():
            torch.testing.assert_close(again.model.eval()(x), net(x)[:, [3, 0]])

    save_checkpoint(
        path, teacher_checkpoint(load_teacher(TeacherSpec(str(archive))), {}, str(archive))
    )
    archive.write_bytes(archive.read_bytes() + b"\0")  # the archive changed since the import
    with pytest.raises(UserError, match="changed since"):
        load_teacher(TeacherSpec(str(path)))
