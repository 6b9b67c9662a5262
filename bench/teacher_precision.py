"""Teacher precision: a ResNet-50 at 224 px, bare forward vs the labeling pipeline in fp32 and
bf16; and the top-1 agreement of bf16 labels with fp32 labels of a given teacher.

``speed`` builds JPEG shards of web-sized photos (400×300, quality 90) and a torchvision
ResNet-50 with random weights saved as a ``state_dict`` (an external teacher, as a user's
would be), then measures, for each precision:

- *bare*: ``Teacher.predict`` on images already decoded, resized and cropped in memory;
- *pipeline*: ``ssl-kd label --executor local`` on the shards (read, decode, resize, forward,
  Parquet): images/s while labeling shards (``steady_images_per_s``: the teacher's loading
  excluded, its first batch included), and over the whole run's wall time.

``agreement`` labels the same shards with one teacher in fp32 and in bf16 and compares them.

    .venv/bin/python bench/teacher_precision.py speed --images 256 --out r50.json
    .venv/bin/python bench/teacher_precision.py agreement \\
        --teacher runs/demo/teacher/checkpoint.pt --shards runs/demo/data/unlabeled
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from _report import emit
from PIL import Image

from ssl_kd.label.files import label_files
from ssl_kd.label.run import LabelConfig, run_label
from ssl_kd.label.teacher import Teacher
from ssl_kd.models.external import TeacherSpec
from ssl_kd.models.preprocess import fit_size
from ssl_kd.shards.decode import decode_image
from ssl_kd.shards.writer import ShardWriter

PRECISIONS = ("fp32", "bf16")


def photo(rng: np.random.Generator, width: int = 400, height: int = 300) -> bytes:
    """A JPEG (quality 90) of smooth colour fields with edges: about a photo's entropy."""
    coarse = rng.integers(0, 255, (height // 20 + 1, width // 20 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_photo_shards(root: Path, n: int, per_shard: int, seed: int = 0) -> list[bytes]:
    """``root/p-%06d.tar`` shards of ``n`` photos; returns their bytes."""
    rng = np.random.default_rng(seed)
    photos = [photo(rng) for _ in range(n)]
    with ShardWriter(str(root / "p-%06d.tar"), per_shard) as sink:
        for i, data in enumerate(photos):
            sink.write({"__key__": f"p{i:06d}", "jpg": data})
    return photos


def bare_rate(teacher: Teacher, photos: list[bytes], batch_size: int) -> float:
    """Images/s of ``Teacher.predict`` on images decoded and cropped beforehand."""
    fit = fit_size(teacher.pp)
    images = torch.stack([fit(decode_image(p, 3, size=teacher.pp.resize_to)) for p in photos])
    teacher.predict(images[:batch_size])  # warm-up: oneDNN picks its kernels on the first call
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        teacher.predict(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - t0)


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """ResNet-50 at 224 px: bare vs pipeline, per precision."""
    tmp = Path(tempfile.mkdtemp(prefix="r50-"))
    shards = tmp / "shards"
    shards.mkdir()
    photos = write_photo_shards(shards, args.images, args.per_shard)
    torch.manual_seed(0)
    from torchvision import models as tvm

    weights = tmp / "resnet50.pth"
    torch.save(tvm.resnet50().state_dict(), weights)
    rows = {}
    for precision in PRECISIONS:
        spec = TeacherSpec("torchvision:resnet50", weights=str(weights))
        teacher = Teacher(spec, k=5, device="cpu", precision=precision)
        bare = bare_rate(teacher, photos, args.batch_size)
        cfg = LabelConfig(
            teacher=spec.teacher,
            weights=str(weights),
            shards=str(shards),
            out=str(tmp / f"labels-{precision}"),
            k=5,
            batch_size=args.batch_size,
            executor="local",
            precision=precision,
        )
        summary = run_label(cfg, progress=False)
        # Steady: while labeling shards (the teacher's loading excluded); wall: all of it.
        steady = summary["steady_images_per_s"]
        rows[precision] = {
            "bare_images_per_s": round(bare, 1),
            "pipeline_images_per_s": steady,
            "pipeline_wall_images_per_s": summary["images_per_s"],
            "pipeline_over_bare": round(steady / bare, 3),
            "channels_last": teacher.channels_last,
        }
        print(f"{precision}: bare {bare:.1f} img/s, pipeline {steady:.1f} img/s", flush=True)
    return {
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "precisions": rows,
        "bf16_over_fp32_bare": round(
            rows["bf16"]["bare_images_per_s"] / rows["fp32"]["bare_images_per_s"], 3
        ),
    }


def _top(directory: Path) -> dict[str, tuple[int, float]]:
    out = {}
    for path in label_files(directory):
        t = pq.read_table(path, columns=["shard", "key", "topk_class", "topk_prob"]).to_pydict()
        for shard, key, cls, prob in zip(
            t["shard"], t["key"], t["topk_class"], t["topk_prob"], strict=True
        ):
            out[f"{shard}/{key}"] = (cls[0], prob[0])
    return out


def agreement(args: argparse.Namespace) -> dict[str, Any]:
    """Top-1 agreement of bf16 labels with fp32 labels of one teacher on ``args.shards``."""
    tmp = Path(tempfile.mkdtemp(prefix="agree-"))
    tops, rates = {}, {}
    for precision in PRECISIONS:
        cfg = LabelConfig(
            teacher=args.teacher,
            shards=args.shards,
            out=str(tmp / precision),
            k=1,
            executor="local",
            precision=precision,
        )
        summary = run_label(cfg, progress=False)
        rates[precision] = summary["images_per_s"]
        tops[precision] = _top(tmp / precision)
    fp32, bf16 = tops["fp32"], tops["bf16"]
    same = [fp32[k][0] == bf16[k][0] for k in fp32]
    diff = np.array([abs(fp32[k][1] - bf16[k][1]) for k in fp32])
    return {
        "teacher": args.teacher,
        "images": len(fp32),
        "top1_agreement": round(float(np.mean(same)), 5),
        "disagreements": int(len(same) - sum(same)),
        "top1_prob_abs_diff_mean": round(float(diff.mean()), 5),
        "top1_prob_abs_diff_max": round(float(diff.max()), 5),
        "images_per_s": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed", help="ResNet-50 at 224 px: bare vs pipeline, fp32 and bf16")
    s.add_argument("--images", type=int, default=256)
    s.add_argument("--per-shard", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=32)
    a = sub.add_parser("agreement", help="bf16 vs fp32 labels of one teacher")
    a.add_argument("--teacher", required=True)
    a.add_argument("--shards", required=True)
    for p in (s, a):
        p.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    report = speed(args) if args.what == "speed" else agreement(args)
    emit(report, args.out)


if __name__ == "__main__":
    main()
