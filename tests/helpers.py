"""Plain test helpers (no fixtures): tiny synthetic images and shards, random teachers, an
in-process CLI runner and the tiny pipeline config. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ssl_kd.shards import array_samples, write_shards


def separable_images(n_per_class: int, num_classes: int, size: int, seed: int) -> tuple:
    """Grayscale images whose class is a bright horizontal band (flip-invariant), plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    band = size // num_classes
    for c in range(num_classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            img[c * band : (c + 1) * band, :] = 230
            images.append(img)
            labels.append(c)
    order = rng.permutation(len(labels))
    return np.stack(images)[order], np.array(labels)[order]


def write_labeled_shards(
    root: Path, name: str, images: np.ndarray, labels: np.ndarray, per_shard: int
) -> list[str]:
    """Write images with ``.cls`` labels as ``root/name-%06d.tar``."""
    keys = [f"{name}-{i:05d}" for i in range(len(images))]
    samples = array_samples(images, labels, keys)
    return write_shards(samples, str(root / f"{name}-%06d.tar"), per_shard)


def make_teacher(
    path: Path,
    arch: str = "cnn",
    channels: int = 1,
    size: int = 16,
    num_classes: int = 4,
    seed: int = 0,
) -> Path:
    """A randomly initialised checkpoint in the format ``ssl-kd train`` writes."""
    import torch

    from ssl_kd.models.checkpoint import make_meta, save_checkpoint
    from ssl_kd.models.preprocess import Preprocess
    from ssl_kd.models.registry import create_model

    torch.manual_seed(seed)
    width = 0.5 if arch == "cnn" else 1.0
    model = create_model(arch, num_classes, channels, size, width=width)
    classes = [f"c{i}" for i in range(num_classes)]
    meta = make_meta(arch, width, 0.0, classes, Preprocess(channels, size), {})
    save_checkpoint(path, {"model": model.state_dict(), "step": 0, "meta": meta})
    return path


def write_unlabeled_shards(
    root: Path, n_shards: int, per_shard: int, size: int = 16, seed: int = 0
) -> list[str]:
    """``root/u-%06d.tar`` shards of random grayscale PNGs without labels."""
    rng = np.random.default_rng(seed)
    n = n_shards * per_shard
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    keys = [f"img-{i:06d}" for i in range(n)]
    return write_shards(array_samples(images, None, keys), str(root / "u-%06d.tar"), per_shard)


def write_plain_tar(path: Path, members: dict[str, bytes] | list[tuple[str, bytes]]) -> None:
    """A tar written by Python's tarfile (not our writer), members in the given order (a list
    may repeat a name)."""
    items = members.items() if isinstance(members, dict) else members
    with tarfile.open(path, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ssl-kd argv`` in-process: (exit status, stdout, stderr); argparse exits included."""
    from ssl_kd.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# A throwaway credential: tests assert that it never reaches a log line or a written file.
S3_SECRET = "ssl-kd-test-secret-5f2c9a"

# The smallest pipeline that still runs every stage: seconds, not minutes.
TINY: dict[str, Any] = {
    "labeled_per_class": 2,
    "seeds": [0, 1],
    "executor": "local",
    "teacher": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "shuffle_buffer": 0},
    "label": {"batch_size": 32},
    "select": {"per_class": 6, "top_p": 2},
    "materialize": {"samples_per_shard": 25},
    "pretrain": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "loss": "soft"},
    "finetune": {"steps": 2, "batch_size": 8, "warmup_steps": 0},
    "baseline": {"batch_size": 8, "warmup_steps": 0},
    "evaluate": {"latency": False},
}


def png_chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def raw_png(
    width: int,
    height: int,
    idat: bytes,
    bit_depth: int = 8,
    color_type: int = 0,
    interlace: int = 0,
) -> bytes:
    """A PNG assembled by hand: any header, whatever (compressed) pixel data is given."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def bomb_png(side: int = 50_000) -> bytes:
    """A valid 1-bit ``side`` x ``side`` PNG of zeros: a few hundred KB that decode to GBs."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts = [z.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(z.compress(row * (side % 1000)))
    parts.append(z.flush())
    return raw_png(side, side, b"".join(parts), bit_depth=1)


def flip_byte(data: bytes, position: int) -> bytes:
    """``data`` with the byte at ``position`` inverted."""
    out = bytearray(data)
    out[position] ^= 0xFF
    return bytes(out)


def idat_span(png: bytes) -> tuple[int, int]:
    """``(start, end)`` of the first IDAT chunk's data in a PNG."""
    tag = png.index(b"IDAT")
    length = struct.unpack(">I", png[tag - 4 : tag])[0]
    return tag + 4, tag + 4 + length


def mixed_images(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` web-like images as (extension, bytes): JPEG and PNG of mixed sizes and modes (RGB,
    L, CMYK, RGBA, P, 16-bit, EXIF-rotated), each a colour gradient with a bright square."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    kinds = ["rgb_jpg", "l_jpg", "cmyk_jpg", "rgba_png", "p_png", "i16_png", "exif_jpg"]
    for i in range(n):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), (i * 37) % 256)], -1)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        rgb[y0 : y0 + h // 3, x0 : x0 + w // 3] = 250
        img = Image.fromarray(rgb.astype(np.uint8), "RGB")
        kind = kinds[i % len(kinds)]
        buf = io.BytesIO()
        if kind == "rgb_jpg":
            img.save(buf, "JPEG", quality=90)
        elif kind == "l_jpg":
            img.convert("L").save(buf, "JPEG", quality=90)
        elif kind == "cmyk_jpg":
            img.convert("CMYK").save(buf, "JPEG", quality=90)
        elif kind == "rgba_png":
            img.convert("RGBA").save(buf, "PNG")
        elif kind == "p_png":
            img.convert("P").save(buf, "PNG")
        elif kind == "i16_png":
            gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
            Image.fromarray(gray).save(buf, "PNG")  # uint16: mode I;16
        else:  # stored sideways, EXIF says rotate
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif)
        out.append(("png" if kind.endswith("png") else "jpg", buf.getvalue()))
    return out


def write_mixed_shards(
    root: Path,
    name: str,
    n: int,
    per_shard: int,
    num_classes: int | None = None,
    seed: int = 0,
) -> list[str]:
    """``root/name-%06d.tar`` shards of :func:`mixed_images`, with ``.cls`` labels (image i
    has class i mod num_classes) when ``num_classes`` is given."""
    paths = []
    images = mixed_images(n, seed)
    for s in range(0, n, per_shard):
        path = root / f"{name}-{s // per_shard:06d}.tar"
        members = []
        for i in range(s, min(n, s + per_shard)):
            ext, data = images[i]
            members.append((f"{name}{i:05d}.{ext}", data))
            if num_classes:
                members.append((f"{name}{i:05d}.cls", str(i % num_classes).encode()))
        write_plain_tar(path, members)
        paths.append(str(path))
    return paths


def crash_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Make the next training run fail on its step ``steps + 1``."""
    from ssl_kd.train import worker

    real_step = worker.train_step
    calls = {"n": 0}

    def crashing_step(*args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        if calls["n"] == steps + 1:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(worker, "train_step", crashing_step)


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one for every image the shard readers decode from now on."""
    from ssl_kd.shards import reader

    decodes: list[int] = []
    real = reader.decode_image

    def counting(*args: object, **kwargs: object) -> object:
        decodes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reader, "decode_image", counting)
    return decodes
