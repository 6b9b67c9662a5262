"""Fuzz the guarded decode path: damaged copies of real images, every one decoded in this
process, so a crash of a native decoder ends the run (a non-zero exit) instead of being counted.

    .venv/bin/python bench/decode_fuzz.py --images 3000 --seed 1

Sources: Fashion-MNIST test images (from ``--fmnist``) as gray PNG, colour JPEG, gray WebP,
a 4x upscaled colour JPEG and a GIF; mutations: 1-3 flipped bytes, a truncation, or one of the
first 64 bytes (headers, markers, chunk lengths) set at random. Every image must either decode
to uint8 (C, H, W) with the channels asked for or raise SampleError.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_kd.datasets.idx import read_idx
from ssl_kd.shards.decode import decode_image
from ssl_kd.shards.skips import SampleError


def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def sources(fmnist: Path, n: int) -> list[bytes]:
    """Five encodings of each of the first ``n`` Fashion-MNIST test images."""
    out = []
    for a in read_idx(fmnist / "t10k-images-idx3-ubyte.gz")[:n]:
        rgb = np.stack([a, a[::-1], a.T], -1)
        big = np.kron(rgb, np.ones((4, 4, 1), np.uint8))
        out += [
            _encode(a, "PNG"),
            _encode(rgb, "JPEG", quality=90),
            _encode(a, "WEBP"),
            _encode(big, "JPEG"),
            _encode(rgb, "GIF"),
        ]
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Flipped bytes, a truncation, or a header byte set at random."""
    out = bytearray(data)
    how = rng.integers(0, 3)
    if how == 0:
        for _ in range(rng.integers(1, 4)):
            out[rng.integers(0, len(out))] ^= int(rng.integers(1, 256))
    elif how == 1:
        out = out[: rng.integers(0, len(out))]
    else:
        out[rng.integers(0, min(64, len(out)))] = int(rng.integers(0, 256))
    return bytes(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000, help="mutated images to decode")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fmnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    base = sources(args.fmnist, 200)
    decoded = skipped = 0
    reasons: dict[str, int] = {}
    for i in range(args.images):
        channels = 1 if i % 2 else 3
        data = mutate(base[int(rng.integers(0, len(base)))], rng)
        try:
            img = decode_image(data, channels, size=28)
        except SampleError as exc:
            skipped += 1
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            continue
        assert str(img.dtype) == "torch.uint8" and img.ndim == 3 and img.shape[0] == channels
        decoded += 1
    report = {"mutated": args.images, "decoded": decoded, "skipped": skipped, "reasons": reasons}
    print(json.dumps(report | {"crashes": 0}))  # reaching this line is the crash count


if __name__ == "__main__":
    main()
