"""Labeling throughput: the labeling pipeline vs the bare forward pass of the same model.

In one run, on generated shards: images/s of ``run_label`` (Ray actors, and in-process) against
images/s of ``model(x)`` on the same images already decoded in memory, their ratio, the time
split into read+decode / forward / write, and Parquet bytes per image.

    .venv/bin/python bench/label_throughput.py --arch resnet18 --size 32 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import emit

from ssl_kd.datasets.fashion_mnist import DEFAULT_SOURCE
from ssl_kd.datasets.idx import read_idx
from ssl_kd.label.run import SHARD_LOG, LabelConfig, run_label
from ssl_kd.label.teacher import Teacher
from ssl_kd.models.checkpoint import make_meta, save_checkpoint
from ssl_kd.models.preprocess import Preprocess, normalize
from ssl_kd.models.registry import create_model
from ssl_kd.ray_cluster import connect_ray
from ssl_kd.shards import array_samples, write_shards


def make_images(n: int, size: int) -> np.ndarray:
    """Fashion-MNIST training images when installed (resized if needed), else smooth noise."""
    path = Path(DEFAULT_SOURCE) / "train-images-idx3-ubyte.gz"
    if path.is_file() and size == 28:
        return read_idx(path)[:n]
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (n, size // 4, size // 4), dtype=np.uint8)
    return np.kron(coarse, np.ones((4, 4), np.uint8))[:, :size, :size]


def bare_forward(teacher: Teacher, images: torch.Tensor, batch_size: int) -> float:
    """Images/s of ``model(x)`` alone, on already decoded uint8 tensors."""
    model = teacher.model
    with torch.inference_mode():
        model(normalize(images[:batch_size], teacher.pp))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(normalize(images[i : i + batch_size], teacher.pp))
    return len(images) / (time.perf_counter() - t0)


def _forward_one_core(
    ckpt: str, images: np.ndarray, batch_size: int, barrier: Any, out: Any
) -> None:
    torch.set_num_threads(1)
    teacher = Teacher(ckpt, device="cpu")
    tensors = torch.from_numpy(images).unsqueeze(1).contiguous()
    bare_forward(teacher, tensors[:batch_size], batch_size)  # warm-up
    barrier.wait()
    out.put(bare_forward(teacher, tensors, batch_size))


def concurrent_forward(ckpt: str, images: np.ndarray, batch_size: int, procs: int) -> float:
    """Images/s of ``procs`` single-threaded processes running the bare forward at once."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    parts = np.array_split(images, procs)
    workers = [
        ctx.Process(target=_forward_one_core, args=(ckpt, p, batch_size, barrier, out))
        for p in parts
    ]
    for w in workers:
        w.start()
    rates = [out.get() for _ in workers]
    for w in workers:
        w.join()
    return sum(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--teacher", help="a trained checkpoint (default: random weights of --arch)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    try:
        n = args.shards * args.per_shard
        images = make_images(n, args.size)
        keys = [f"img-{i:07d}" for i in range(n)]
        write_shards(
            array_samples(images, None, keys), str(work / "s" / "u-%06d.tar"), args.per_shard
        )
        if args.teacher:
            ckpt = Path(args.teacher)
        else:
            model = create_model(args.arch, 10, 1, args.size)
            pp = Preprocess(1, args.size)
            meta = make_meta(args.arch, 1.0, 0.0, [str(i) for i in range(10)], pp, {})
            ckpt = save_checkpoint(work / "t.pt", {"model": model.state_dict(), "meta": meta})

        teacher = Teacher(str(ckpt), k=args.k, device="cpu")
        tensors = torch.from_numpy(images).unsqueeze(1).contiguous()
        threads = torch.get_num_threads()
        # Baseline: the better of torch using every core in one process, and one single-threaded
        # process per core running concurrently (the layout of the Ray workers).
        forward_all = bare_forward(teacher, tensors, args.batch_size)
        forward_per_core = concurrent_forward(str(ckpt), images, args.batch_size, threads)
        forward = max(forward_all, forward_per_core)

        base = LabelConfig(
            teacher=str(ckpt),
            shards=str(work / "s"),
            out="",
            k=args.k,
            batch_size=args.batch_size,
            device="cpu",
        )
        runs = {
            "ray, 2 workers x 1 CPU": replace(base, executor="ray", cpus_per_worker=1),
            "ray, 1 worker x 2 CPUs": replace(base, executor="ray", cpus_per_worker=2),
            "in-process": replace(base, executor="local"),
        }
        connect_ray()  # Ray start-up is a one-off per job: not counted in throughput
        results = {}
        for name, cfg in runs.items():
            out = work / name.replace(" ", "_").replace(",", "")
            s = run_label(replace(cfg, out=str(out)), progress=False)
            shards = [json.loads(line) for line in (out / SHARD_LOG).read_text().splitlines()]
            split = {
                k: sum(p["seconds"].get(k, 0.0) for p in shards)
                for k in ("read_decode", "forward", "write")
            }
            results[name] = {
                "images_per_s": s["images_per_s"],
                "ratio_to_bare_forward": round(s["images_per_s"] / forward, 3),
                "steady_images_per_s": s["steady_images_per_s"],
                "steady_ratio_to_bare_forward": round(s["steady_images_per_s"] / forward, 3),
                "seconds": {k: round(v, 2) for k, v in split.items()},
                "wall_seconds": s["wall_seconds"],
                "bytes_per_image": s["bytes_per_image"],
            }
        report = {
            "arch": teacher.meta.teacher_arch,
            "teacher": args.teacher or "random weights",
            "image_size": args.size,
            "images": n,
            "shards": args.shards,
            "batch_size": args.batch_size,
            "k": args.k,
            "torch_threads": threads,
            "bare_forward_images_per_s": round(forward, 1),
            "bare_forward_all_threads": round(forward_all, 1),
            "bare_forward_one_process_per_core": round(forward_per_core, 1),
            "pipeline": results,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
