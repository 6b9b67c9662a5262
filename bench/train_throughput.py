"""Student training throughput: images/s reading pseudo-labeled shards vs the same loop on
tensors already in memory, with 1 and 2 Ray Train (DDP) workers.

The shards are written once (28x28 grayscale PNGs with a ``.cls`` and a ``.json`` top-3 soft
label, as ``ssl-kd materialize`` writes them). Each run is the student step (augment, normalise,
forward, soft+hard loss, backward, SGD) that ``ssl-kd pretrain`` runs; only where the batches come
from differs. Steady state: the first ``--warmup`` steps are not timed.

    .venv/bin/python bench/train_throughput.py --images 20000 --steps 80
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import emit

from ssl_kd.models.preprocess import Preprocess, augment, normalize
from ssl_kd.models.registry import create_model
from ssl_kd.shards import array_samples, expand_shards, write_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.loop import StreamState, stream_batches, train_step
from ssl_kd.train.losses import student_loss
from ssl_kd.train.optim import build_optimizer

C, K = 10, 3
PP = Preprocess(1, 28)


def write_data(root: Path, n: int, per_shard: int = 1000) -> list[str]:
    """``n`` random 28x28 images with hard and soft pseudo-labels, in shards."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, C, n)
    samples = []
    for sample, label in zip(
        array_samples(images, labels, [f"k{i:07d}" for i in range(n)]), labels, strict=True
    ):
        soft = {
            "topk_class": [int(label), (int(label) + 1) % C, (int(label) + 2) % C],
            "topk_prob": [0.8, 0.15, 0.05],
        }
        samples.append({**sample, "json": json.dumps(soft).encode()})
    return write_shards(iter(samples), str(root / "train-%06d.tar"), per_shard)


def _memory_batches(urls: list[str], batch: int, rank: int, world: int):  # type: ignore[no-untyped-def]
    """Decode this rank's shards once, then cycle over the tensors (no I/O, no decoding)."""
    ds = ShardImageDataset(urls[rank::world], lambda x: x, 1, num_classes=C, soft_k=K)
    items = list(ds)
    x = torch.stack([i[0] for i in items])
    y = torch.tensor([i[1]["label"] for i in items])
    tc = torch.as_tensor(np.stack([i[1]["topk_class"] for i in items]))
    tp = torch.as_tensor(np.stack([i[1]["topk_prob"] for i in items]))
    g = torch.Generator().manual_seed(rank)
    while True:
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(order) - batch + 1, batch):
            idx = order[s : s + batch]
            yield x[idx], {"label": y[idx], "topk_class": tc[idx], "topk_prob": tp[idx]}


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: time ``steps`` student steps fed from shards or from memory."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = create_model("cnn", C, 1, 28, 1.0)
    model = ray.train.torch.prepare_model(model)
    opt = build_optimizer(model, "sgd", 0.05, 5e-4, 0.9)
    loss_fn = student_loss("mixed", temperature=2.0)
    urls = config["urls"]
    batch = config["batch"]
    if config["source"] == "memory":
        batches = _memory_batches(urls, batch, rank, world)
    else:
        ds = ShardImageDataset(
            urls[rank::world],
            lambda x: x,
            1,
            num_classes=C,
            soft_k=K,
            shuffle_buffer=2000,
            seed=rank,
        )
        batches = stream_batches(ds, batch, StreamState(), config["loader_workers"])
    t0 = 0.0
    for step in range(config["warmup"] + config["steps"]):
        if step == config["warmup"]:
            t0 = time.perf_counter()
        images, targets = next(batches)
        train_step(model, normalize(augment(images, 2, True), PP), targets, opt, 0.05, loss_fn)
    seconds = time.perf_counter() - t0
    if rank == 0:  # Result.metrics keeps only checkpointed reports: hand the figure over a file
        Path(config["result"]).write_text(str(config["steps"] * batch * world / seconds))


def run(urls: list[str], source: str, workers: int, args: argparse.Namespace) -> float:
    """Images/s of one configuration (all workers together)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = tempfile.mkdtemp(prefix="train-bench-")
    config = {
        "urls": urls,
        "source": source,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": max(1, 2 // workers),
        "loader_workers": args.loader_workers,
        "result": str(Path(storage) / "images_per_s"),
    }
    TorchTrainer(
        worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=f"{source}-{workers}", storage_path=storage),
    ).fit()
    return float((Path(storage) / "images_per_s").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per rank")
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    report: dict[str, Any] = {
        "images": args.images,
        "batch_per_worker": args.batch,
        "steps": args.steps,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as d:
        write_data(Path(d), args.images)
        urls = expand_shards(d)
        for workers in args.workers:
            shards = run(urls, "shards", workers, args)
            memory = run(urls, "memory", workers, args)
            report["runs"][str(workers)] = {
                "shards_images_per_s": round(shards, 1),
                "memory_images_per_s": round(memory, 1),
                "ratio": round(shards / memory, 3),
            }
            print(workers, report["runs"][str(workers)], flush=True)
    ray.shutdown()
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
