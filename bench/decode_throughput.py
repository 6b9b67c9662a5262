"""Decoding for labeling: does a labeling worker turn its CPUs into decoded images?

On JPEG shards like a web crawl's (400x300 px, quality 90, ~48 kB; ``--images`` distinct ones
cycled through ``--samples`` samples), one run measures:

- **decoders flat out**: ``--cpus`` processes, one thread each, decoding and resizing the same
  images from memory with the labeling decode (guarded PIL decode, JPEG draft, antialiased
  resize, centre crop), summed: the ceiling for that many CPUs; and the rate per core. Measured
  before and after the label runs; the better of the two is the baseline;
- **forward**: the stand-in teacher's ``predict`` alone, one thread: the CPU a forward pass
  takes beside decoding (an accelerator would take it off the CPUs);
- **ssl-kd label** on Ray, steady rate (rows over busy seconds, summed over workers, each
  worker's first shard left out: Ray, model and decode-process start-up, and the other workers'
  start-up that the first shard overlaps, are not counted), for one worker with ``--cpus`` CPUs
  (decode processes: the worker's CPUs, the default), the same with one decode thread (the
  layout before decode processes), one worker per CPU, and the first and third with the forward
  pass made free (what a GPU leaves the CPUs: everything else runs as in labeling);

and each labeling rate as a ratio of the decoders' rate. The images are Fashion-MNIST items,
upscaled and tinted, over multi-octave colour noise (the noise only when Fashion-MNIST is not
installed). The teacher is a random-weight ``cnn`` (speed does not depend on the weights). The
1-minute load average is printed beside each figure: other work on the cores depresses them.

    .venv/bin/python bench/decode_throughput.py                # 32 px, cnn width 0.25
    .venv/bin/python bench/decode_throughput.py --size 224 --images 1000 --samples 4000 \
        --batch-size 64 --free-only
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ssl_kd.datasets.fashion_mnist import DEFAULT_SOURCE
from ssl_kd.datasets.idx import read_idx
from ssl_kd.label.run import SHARD_LOG, LabelConfig, LabelWorker, run_label
from ssl_kd.label.teacher import Teacher, decode_spec
from ssl_kd.models.checkpoint import make_meta, save_checkpoint
from ssl_kd.models.preprocess import Preprocess, imagenet_preprocess
from ssl_kd.models.registry import create_model
from ssl_kd.ray_cluster import connect_ray
from ssl_kd.shards import write_shards
from ssl_kd.shards.reader import ReadStats, decoded_samples, iter_samples

H, W = 300, 400
OCTAVES = ((4, 1.0), (16, 0.6), (64, 0.5), (200, 0.5), (400, 0.45))  # (cells across, weight)
TEXTURES = 16  # noise fields, each image a random roll of one (JPEG size depends on texture)


def _texture(rng: np.random.Generator, amplitude: float = 22.0) -> np.ndarray:
    """Colour noise summed over octaves (coarse blobs to pixel grain), float (H, W, 3)."""
    out = np.zeros((H, W, 3), np.float32)
    for cells, weight in OCTAVES:
        coarse = rng.normal(0, 1, (max(1, cells * H // W), cells, 3)).astype(np.float32)
        up = [Image.fromarray(coarse[..., c]).resize((W, H), Image.BICUBIC) for c in range(3)]
        out += weight * np.stack([np.asarray(u) for u in up], -1)
    return out * amplitude


def natural_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 400x300 quality-90 JPEGs: a tinted Fashion-MNIST item (when installed)
    over a rolled colour texture."""
    rng = np.random.default_rng(seed)
    textures = [_texture(rng) for _ in range(TEXTURES)]
    path = Path(DEFAULT_SOURCE) / "train-images-idx3-ubyte.gz"
    items = read_idx(path) if path.is_file() else None
    out = []
    for i in range(n):
        img = 128 + np.roll(textures[i % TEXTURES], rng.integers(0, W), axis=1)
        if items is not None:
            item = Image.fromarray(items[i % len(items)]).resize((260, 260), Image.BICUBIC)
            mask = np.asarray(item, np.float32)[..., None] / 255
            region = img[20:280, 70:330]
            tint = rng.uniform(0.3, 1.0, 3) * 255
            img[20:280, 70:330] = region * (1 - mask) + mask * (tint + 0.3 * (region - 128))
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_jpeg_shards(root: Path, jpegs: list[bytes], samples: int, per_shard: int) -> list[str]:
    """``samples`` samples with unique keys, cycling through ``jpegs`` (decoding costs the same
    the second time round; generating images costs more than reading them)."""
    items = ({"__key__": f"img-{i:07d}", "jpg": jpegs[i % len(jpegs)]} for i in range(samples))
    return write_shards(items, str(root / "u-%06d.tar"), per_shard)


def stand_in_teacher(path: Path, pp: Preprocess, width: float) -> str:
    """A random-weight ``cnn`` checkpoint at ``pp``'s input size."""
    torch.manual_seed(0)
    model = create_model("cnn", 10, 3, pp.image_size, width=width)
    meta = make_meta("cnn", width, 0.0, [str(i) for i in range(10)], pp, {})
    return save_checkpoint(path, {"model": model.state_dict(), "step": 0, "meta": meta})


def decode_rate(samples: list[dict[str, Any]], pp: Preprocess, draft: bool = True) -> float:
    """Images/s of the labeling decode (guarded decode, JPEG draft unless ``draft`` is off,
    resize, crop), this thread."""
    spec, stats = decode_spec(pp, jpeg_draft=draft), ReadStats()
    t0 = time.perf_counter()
    decoded = decoded_samples(
        samples,
        stats,
        spec.channels,
        False,
        transform=spec.transform,
        max_pixels=spec.max_pixels,
        size=spec.size,
    )
    n = sum(1 for _ in decoded)
    return n / (time.perf_counter() - t0)


def _decoder(urls: list[str], n: int, pp: Preprocess, draft: bool, barrier: Any, out: Any) -> None:
    torch.set_num_threads(1)
    samples = list(itertools.islice(iter_samples(urls, ReadStats()), n))
    decode_rate(samples[:100], pp, draft)  # warm-up
    barrier.wait()
    out.put(decode_rate(samples * 2, pp, draft))


def decoders_flat_out(
    urls: list[str], n: int, pp: Preprocess, procs: int, draft: bool = True
) -> list[float]:
    """Images/s of each of ``procs`` single-threaded processes decoding the first ``n`` images
    (twice) at once."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    args = (urls, n, pp, draft, barrier, out)
    workers = [ctx.Process(target=_decoder, args=args) for _ in range(procs)]
    for w in workers:
        w.start()
    rates = [out.get() for _ in workers]
    for w in workers:
        w.join()
    return rates


def forward_rate(ckpt: str, batch_size: int, n: int = 4096) -> float:
    """Images/s of the teacher's ``predict`` (normalise, model, top-k) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = Teacher(ckpt, device="cpu")
        side = teacher.pp.image_size
        x = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8)
        teacher.predict(x)  # warm-up
        steps = max(1, n // batch_size)
        t0 = time.perf_counter()
        for _ in range(steps):
            teacher.predict(x)
        return steps * batch_size / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


class FreeForwardWorker(LabelWorker):
    """A label worker whose forward pass costs no CPU, as on an accelerator: it reads, decodes,
    batches and writes like any other, and labels every image with the same classes."""

    def __init__(self, cfg: LabelConfig, threads: int | None = None) -> None:
        super().__init__(cfg, threads)
        self.teacher.predict = _free_predict(self.teacher.k)  # type: ignore[method-assign]


def _free_predict(k: int) -> Any:
    def predict(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, None]:
        n = len(images)
        return np.zeros((n, k), np.int64), np.full((n, k), 1 / k, np.float32), None

    return predict


def label_run(cfg: LabelConfig, worker_cls: type[LabelWorker]) -> dict[str, Any]:
    """One ``run_label``: steady images/s (each worker's first shard left out: it overlaps the
    start-up of the others), the summary's own figures, and where the busy time went."""
    load = _load()
    s = run_label(cfg, progress=False, worker_cls=worker_cls)
    lines = Path(cfg.out, SHARD_LOG).read_text().splitlines()
    shards = [json.loads(line) for line in lines]  # in the order they finished
    by_worker: dict[int, list[dict[str, Any]]] = {}
    for shard in shards:
        by_worker.setdefault(shard["worker"], []).append(shard)
    rate = 0.0
    for done in by_worker.values():
        later = done[1:] or done
        busy = sum(p["seconds"]["total"] + p["seconds"]["write"] for p in later)
        rate += sum(p["rows"] for p in later) / busy
    split = {
        k: round(sum(p["seconds"].get(k, 0.0) for p in shards), 2)
        for k in ("read_decode", "forward", "write")
    }
    return {
        "steady_images_per_s": round(rate, 1),
        "summary_steady_images_per_s": s["steady_images_per_s"],
        "images_per_s": s["images_per_s"],
        "wall_seconds": s["wall_seconds"],
        "shards_per_worker": sorted(len(v) for v in by_worker.values()),
        "seconds": split,
        "load": load,
    }


def label_layouts(
    base: LabelConfig, cpus: int, model: bool = True
) -> dict[str, tuple[LabelConfig, type]]:
    """The worker layouts compared: name -> (config, worker class); with ``model`` False, only
    those with a free forward pass."""
    # The stand-in teacher plays an accelerator's part: its worker decodes on every CPU, as a
    # GPU worker does by default (a CPU teacher would decode in one thread by default).
    one = replace(base, workers=1, cpus_per_worker=cpus, decode_workers=cpus)
    many = replace(base, workers=cpus, cpus_per_worker=1)
    free = {
        f"1 worker x {cpus} CPUs, free forward": (one, FreeForwardWorker),
        f"{cpus} workers x 1 CPU, free forward": (many, FreeForwardWorker),
    }
    if not model:
        return free
    return {
        f"1 worker x {cpus} CPUs": (one, LabelWorker),
        f"1 worker x {cpus} CPUs, 1 decode thread": (replace(one, decode_workers=1), LabelWorker),
        f"{cpus} workers x 1 CPU": (many, LabelWorker),
        **free,
    }


def _load() -> float:
    """The 1-minute load average (it lags: read before a measurement, it shows others' work)."""
    return round(os.getloadavg()[0], 2)


def _table(report: dict[str, Any]) -> str:
    rows = [
        (
            "decoders flat out, summed (better of 2)",
            report["decoders_images_per_s"],
            1.0,
            report["load"],
        ),
        ("  per core", report["decode_images_per_s_per_core"], None, None),
        ("forward alone (predict), one thread", report["forward_images_per_s"], None, None),
    ]
    for name, run in report["label"].items():
        rate = run["steady_images_per_s"]
        rows.append((f"ssl-kd label, {name}", rate, run["ratio"], run["load"]))
    lines = [
        f"{report['images']} JPEGs {W}x{H} q90 ({report['jpeg_bytes_mean'] / 1000:.0f} kB mean) "
        f"in {report['samples']} samples, {report['per_shard']} per shard, decoded to "
        f"{report['image_size']} px ({'JPEG draft' if report['jpeg_draft'] else 'full decode'}); "
        f"teacher {report['teacher']}",
        f"{'':52} {'images/s':>9} {'ratio':>6} {'load':>5}",
    ]
    for name, rate, ratio, load in rows:
        r = f"{ratio:.2f}" if ratio is not None else ""
        ld = f"{load:.2f}" if load is not None else ""
        lines.append(f"{name:52} {rate:9.0f} {r:>6} {ld:>5}")
    before, after = report["decoders_before_after"]
    lines.append(f"decoders flat out before / after the label runs: {before:.0f} / {after:.0f}")
    lines.append(
        f"forward / decode CPU per image: {report['forward_over_decode']:.3f}, so the ratio "
        f"can reach at most {report['ceiling']:.2f} with the model's forward on these CPUs"
    )
    return "\n".join(lines)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every figure of the report, on shards written under ``work``."""
    pp = imagenet_preprocess(args.size) if args.size >= 64 else Preprocess(3, args.size)
    jpegs = natural_jpegs(args.images)
    urls = write_jpeg_shards(work / "s", jpegs, args.samples, args.per_shard)
    ckpt = stand_in_teacher(work / "t.pt", pp, args.width)
    load = _load()
    draft = args.jpeg_draft
    before = sum(decoders_flat_out(urls, args.images, pp, args.cpus, draft))
    forward = forward_rate(ckpt, args.batch_size)
    base = LabelConfig(
        teacher=ckpt,
        shards=str(work / "s"),
        out="",
        batch_size=args.batch_size,
        device="cpu",
        jpeg_draft=draft,
    )
    connect_ray()  # Ray start-up is a one-off per job: not counted
    label = {}
    for name, (cfg, worker_cls) in label_layouts(base, args.cpus, not args.free_only).items():
        label[name] = label_run(replace(cfg, out=str(work / name.replace(" ", "_"))), worker_cls)
    # Measured again after the runs; the better of the two is the baseline (others' work on
    # the cores only ever lowers a figure, and a lower baseline would flatter the ratios).
    after = sum(decoders_flat_out(urls, args.images, pp, args.cpus, draft))
    decoders = max(before, after)
    per_core = decoders / args.cpus
    for run in label.values():
        run["ratio"] = round(run["steady_images_per_s"] / decoders, 3)
    return {
        "images": args.images,
        "samples": args.samples,
        "per_shard": args.per_shard,
        "jpeg_bytes_mean": round(float(np.mean([len(j) for j in jpegs]))),
        "image_size": args.size,
        "resize": pp.resize_to,
        "jpeg_draft": draft,
        "teacher": f"cnn width {args.width}, random weights",
        "cpus": args.cpus,
        "decoders_images_per_s": round(decoders, 1),
        "decoders_before_after": [round(before, 1), round(after, 1)],
        "decode_images_per_s_per_core": round(per_core, 1),
        "forward_images_per_s": round(forward, 1),
        "forward_over_decode": round(per_core / forward, 3),
        # With every CPU busy, each image costs a decode plus a forward pass of CPU time.
        "ceiling": round(1 / (1 + per_core / forward), 3),
        "load": load,
        "label": label,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="distinct JPEGs")
    ap.add_argument("--samples", type=int, default=8000, help="samples labeled (images cycled)")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32, help="teacher input side (>= 64: ImageNet's)")
    ap.add_argument("--width", type=float, default=0.25, help="width of the stand-in cnn")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the one-worker layout")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--no-jpeg-draft",
        dest="jpeg_draft",
        action="store_false",
        help="decode every JPEG in full, in the decoders and in labeling alike (ssl-kd label "
        "--jpeg-draft false): the decode cost of torchvision's decode_jpeg path",
    )
    ap.add_argument(
        "--free-only",
        action="store_true",
        help="only the runs with a free forward pass (when the stand-in's forward pass is not "
        "small against decoding, as at 224 px)",
    )
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    try:
        report = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
