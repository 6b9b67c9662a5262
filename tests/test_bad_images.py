"""Bad images against whole commands: label, evaluate and train finish, every good image is used
exactly once, every bad one is used or recorded; a fuzz run over a few hundred damaged images."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import bomb_png, flip_byte, idat_span, make_teacher, run_cli, write_plain_tar
from PIL import Image

from ssl_kd.label.files import LabelSet

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _label(teacher: object, shards: object, out: Path, capsys: pytest.CaptureFixture[str]) -> list:
    """``ssl-kd label`` in this process (exit 0 required); the keys it labeled."""
    code, _, err = run_cli(
        f"label --teacher {teacher} --shards {shards} --out {out} --k 2 --executor local".split(),
        capsys,
    )
    assert code == 0, err
    return _keys(out)


def _keys(labels: Path) -> list[str]:
    return [
        k for b in LabelSet(labels).iter_batches(columns=["key"]) for k in b.column(0).to_pylist()
    ]


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _bad_members() -> dict[str, tuple[str, bytes]]:
    """One of each failure the reliability probe found: key → (extension, bytes)."""
    rng = np.random.default_rng(0)
    png = _encode(rng.integers(0, 256, (28, 28), dtype=np.uint8), "PNG")
    start, end = idat_span(png)
    frames = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(2)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "bitflip": ("png", flip_byte(png, start + (end - start) * 8 // 10)),
        "bomb": ("png", bomb_png(50_000)),
        "gray16": ("png", _encode(np.full((28, 28), 40000, np.uint16), "PNG")),
        "rgbwebp": ("webp", _encode(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), "WEBP")),
        "gifaspng": ("png", gif.getvalue()),
        "truncjpg": ("jpg", _encode(rng.integers(0, 256, (28, 28), dtype=np.uint8), "JPEG")[:200]),
    }


def _sample(key: str, ext: str, data: bytes, label: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())]


@pytest.fixture
def bad_shard(tmp_path: Path) -> dict[str, Path]:
    """A labeled shard: 12 good PNGs with bad images between them, and a matching teacher."""
    rng = np.random.default_rng(1)
    samples = [
        _sample(
            f"good{i:02d}", "png", _encode(rng.integers(0, 256, (28, 28), np.uint8), "PNG"), i % 4
        )
        for i in range(12)
    ]
    for n, (key, (ext, data)) in enumerate(_bad_members().items()):
        samples.insert(2 * n + 1, _sample(key, ext, data, 1))
    members = [member for sample in samples for member in sample]
    (tmp_path / "shards").mkdir()
    write_plain_tar(tmp_path / "shards" / "bad-000000.tar", members)
    return {
        "shards": tmp_path / "shards",
        "teacher": make_teacher(tmp_path / "t.pt", size=28, num_classes=4),
    }


@pytest.mark.slow
def test_label_evaluate_and_train_finish_on_bad_images(
    bad_shard: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, teacher = str(bad_shard["shards"]), str(bad_shard["teacher"])
    out = tmp_path / "labels"
    labeled = _label(teacher, shards, out, capsys)
    good = [f"good{i:02d}" for i in range(12)]
    # Normalised, these decode fine: 16-bit, RGB WebP for a 1-channel model, a GIF named .png.
    assert sorted(labeled) == sorted([*good, "gray16", "rgbwebp", "gifaspng"])
    errors = [
        json.loads(line) for line in (out / "bad-000000.errors.jsonl").read_text().splitlines()
    ]
    assert {e["key"]: e["reason"] for e in errors} == {
        "bitflip": "corrupt image",
        "bomb": "image too large",
        "truncjpg": "corrupt image",
    }
    code, stdout, err = run_cli(["evaluate", "--checkpoint", teacher, "--data", shards], capsys)
    assert code == 0, err
    assert "on 15 images" in stdout
    code, _, err = run_cli(
        f"train --data {shards} --out {tmp_path / 'train'} --steps 2 --batch-size 4 "
        "--num-classes 4 --executor local --warmup-steps 0".split(),
        capsys,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["skipped_reasons"]["image too large"] >= 1


def _base_images(n: int) -> list[np.ndarray]:
    """Real photos of clothing (Fashion-MNIST's test set) when installed, else textured noise."""
    if FMNIST.exists():
        from ssl_kd.datasets.idx import read_idx

        return list(read_idx(FMNIST)[:n])
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 28 * 28).reshape(28, 28)
    return [np.clip(base + rng.normal(0, 40, (28, 28)), 0, 255).astype(np.uint8) for _ in range(n)]


def _variants(arr: np.ndarray, i: int) -> tuple[str, bytes]:
    """The image in one of several encodings: gray or colour PNG, JPEG, WebP, upscaled."""
    kind = i % 5
    if kind == 0:
        return "png", _encode(arr, "PNG")
    if kind == 1:
        return "jpg", _encode(np.stack([arr] * 3, -1), "JPEG", quality=90)
    if kind == 2:
        return "webp", _encode(arr, "WEBP")
    if kind == 3:
        return "png", _encode(np.stack([arr, arr[::-1], arr.T], -1), "PNG")
    return "jpg", _encode(np.kron(arr, np.ones((3, 3), np.uint8)), "JPEG", progressive=True)


def _mutate(data: bytes, ext: str, rng: np.random.Generator) -> bytes:
    """Flipped bytes, a truncation, or a changed header field."""
    how = rng.integers(0, 4)
    if how == 0:
        for _ in range(rng.integers(1, 4)):
            data = flip_byte(data, int(rng.integers(0, len(data))))
        return data
    if how == 1:
        return data[: int(rng.integers(0, len(data)))]
    if how == 2 and ext == "png":  # IHDR width or height, CRC fixed so the header is believed
        ihdr = bytearray(data[12:29])
        field = 4 + 4 * int(rng.integers(0, 2))
        ihdr[field : field + 4] = struct.pack(">I", int(rng.choice([0, 1, 29, 1000, 60_000])))
        crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
        return data[:12] + bytes(ihdr) + crc + data[33:]
    # a byte of the first 64 (header, markers, chunk lengths) set at random
    out = bytearray(data)
    out[int(rng.integers(0, min(64, len(out))))] = int(rng.integers(0, 256))
    return bytes(out)


@pytest.mark.slow
def test_fuzz_every_good_image_labeled_once_every_bad_one_labeled_or_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2026)
    images = _base_images(400)
    shards = tmp_path / "fuzz"
    shards.mkdir()
    good, mutated = set(), set()
    for s in range(4):
        members = []
        for j in range(100):
            i = s * 100 + j
            ext, data = _variants(images[i], i)
            key = f"s{s}-{i:04d}"
            if j % 4 == 0:  # a quarter stay intact
                good.add(key)
            else:
                data = _mutate(data, ext, rng)
                mutated.add(key)
            members.append((f"{key}.{ext}", data))
        write_plain_tar(shards / f"fuzz-{s:06d}.tar", members)
    teacher = make_teacher(tmp_path / "t.pt", size=28, num_classes=4)
    out = tmp_path / "labels"
    labeled = _label(teacher, shards, out, capsys)
    recorded = [
        json.loads(line)["key"]
        for path in out.glob("*.errors.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(labeled) == len(set(labeled)), "an image was labeled twice"
    assert good <= set(labeled), "an intact image was not labeled"
    assert not set(labeled) & set(recorded), "an image was both labeled and recorded as bad"
    assert set(labeled) | set(recorded) == good | mutated, (
        "an image was neither labeled nor recorded"
    )
    print(f"fuzz: {len(mutated)} mutated, {len(recorded)} recorded, {len(labeled)} labeled")
