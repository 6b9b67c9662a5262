"""The labeling worker (the teacher loaded once, then a shard per call) and how many of them a
cluster takes: one per GPU when it has GPUs, else one per ``cpus_per_worker`` CPUs."""

from __future__ import annotations

from typing import Any

import torch

from ssl_kd.device import usable_cpus
from ssl_kd.label.config import LabelConfig
from ssl_kd.label.teacher import Teacher, decode_spec, label_shard_to_dir
from ssl_kd.models.external import teacher_spec
from ssl_kd.ray_cluster import cluster_resources
from ssl_kd.ray_resources import Workers, check_resources
from ssl_kd.shards.decode_pool import start_pool


def make_teacher(cfg: LabelConfig, device: str) -> Teacher:
    """The teacher of ``cfg``, loaded for inference on ``device``."""
    return Teacher(
        teacher_spec(cfg.teacher, cfg),
        cfg.k,
        cfg.temperature,
        cfg.embeddings,
        device,
        cfg.precision,
        cfg.jpeg_draft,
        cfg.tta,
    )


def split_cpus(
    decode_workers: int, cpus: int, device: torch.device, threads: int
) -> tuple[int, int]:
    """``(decode processes or 1 for a thread, torch threads)`` of a worker with ``cpus`` CPUs
    whose teacher runs on ``device`` (``decode_workers`` 0: the default; ``threads``: torch's
    current count, kept when decoding takes no CPU of its own)."""
    # With an accelerator, the worker's CPUs (a Ray actor's share; in-process, the CPUs this
    # process may use) go to decode processes, one per CPU by default, and torch keeps what is
    # left: an op's threads wait for each other, so a thread that a busy decoder pushes off its
    # core stalls the whole forward pass (up to 7x slower with 2 CPUs, BENCHMARKS.md). A
    # teacher on the CPU needs those CPUs itself: by default it decodes in one thread.
    decode = decode_workers or (1 if device.type == "cpu" else cpus)
    return decode, max(1, cpus - decode) if decode > 1 else threads


class LabelWorker:
    """Loads the teacher once; labels one shard per call (wrapped as a Ray actor)."""

    def __init__(self, cfg: LabelConfig, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.teacher = make_teacher(cfg, cfg.device)
        # Provenance: later stages find the images through the spec the labels were made from.
        self.teacher.meta = self.teacher.meta.with_shard_spec(cfg.shards)
        cpus = threads or usable_cpus()
        self.decode_workers, self.forward_threads = split_cpus(
            cfg.decode_workers, cpus, self.teacher.device, torch.get_num_threads()
        )
        # Started with the worker, like the model is loaded: not in the first shard's time.
        spec = decode_spec(self.teacher.pp, cfg.max_pixels, cfg.jpeg_draft)
        start_pool(self.decode_workers, spec)

    def label(self, url: str) -> dict[str, Any]:
        """Label ``url`` into ``cfg.out``; returns the shard's status."""
        cfg = self.cfg
        threads = torch.get_num_threads()
        torch.set_num_threads(self.forward_threads)  # for this call: the process may go on
        try:
            return label_shard_to_dir(
                self.teacher, url, cfg.out, cfg.batch_size, cfg.max_pixels, self.decode_workers
            )
        finally:
            torch.set_num_threads(threads)


def pool_size(cfg: LabelConfig) -> tuple[int, dict[str, Any]]:
    """Ray actors to start and the resources of each: one per GPU, else per cpus_per_worker."""
    resources = cluster_resources()
    gpus = int(resources.get("GPU", 0))
    # An explicit cuda device asks for a GPU even where none is: refused by check_room.
    use_gpu = cfg.device.startswith("cuda") or (gpus > 0 and cfg.device != "cpu")
    if cfg.workers:
        n = cfg.workers
    elif use_gpu:
        n = max(1, gpus)
    else:
        n = max(1, int(resources.get("CPU", 1)) // cfg.cpus_per_worker)
    return n, {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if use_gpu else 0}


def check_room(cfg: LabelConfig, actors: int, options: dict[str, Any]) -> None:
    """Refuse, in one line, a pool the cluster cannot hold at once (its actors would wait for
    resources without end, their shards with them)."""
    gpu = options["num_gpus"] > 0
    lower = "lower --workers" + (" or use --device cpu" if gpu else " or --cpus-per-worker")
    workers = Workers("labeling", actors, options["num_cpus"], options["num_gpus"], lower)
    check_resources(workers)
