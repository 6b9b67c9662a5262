"""Size and speed of a model: parameters, multiply-accumulates, state_dict bytes, CPU timing."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ssl_kd.models.registry import count_parameters

THROUGHPUT_BATCH = 256


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one image of ``input_shape`` (C, H, W).

    Counts ``nn.Conv2d`` (output elements x in_channels/groups x kernel area) and ``nn.Linear``
    (output elements x in_features) via forward hooks; biases, BatchNorm, pooling and
    activations are not counted, nor layers called functionally rather than as modules.
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def state_dict_mb(model: nn.Module) -> float:
    """Bytes of the model's ``state_dict`` tensors (weights and buffers), in MB (10^6 bytes)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def model_size(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``params``, ``macs`` per image and ``size_mb`` of ``model`` on inputs of ``input_shape``."""
    return {
        "params": count_parameters(model),
        "macs": count_macs(model, input_shape),
        "size_mb": round(state_dict_mb(model), 3),
    }


def _timed_runs(
    model: nn.Module, x: torch.Tensor, budget_s: float, min_runs: int, max_runs: int
) -> list[float]:
    """Seconds of each forward pass: at least ``min_runs``, more while within ``budget_s``."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (
        len(times) < max_runs and time.perf_counter() - start < budget_s
    ):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return times


def cpu_speed(
    model: nn.Module,
    input_shape: tuple[int, ...],
    budget_s: float = 1.0,
    batch: int = THROUGHPUT_BATCH,
) -> dict[str, Any]:
    """Median batch-1 latency (ms) and throughput (img/s) at ``batch`` of a CPU model.

    Each measurement gets about ``budget_s`` seconds after a warm-up, but always at least one
    timed pass (so a large model at batch 256 may take longer). Inputs are zeros: the timing of
    dense convolutions does not depend on the values.
    """
    was_training = model.training
    model.eval()
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            one = torch.zeros(1, *input_shape)
            for _ in range(3):  # first calls pay for allocator growth and kernel selection
                model(one)
            lat = _timed_runs(model, one, budget_s, min_runs=5, max_runs=1000)
            many = torch.zeros(batch, *input_shape)
            model(many)
            thr = _timed_runs(model, many, budget_s, min_runs=1, max_runs=100)
    finally:
        model.train(was_training)
    return {
        "threads": threads,
        "latency_ms": round(1000 * statistics.median(lat), 4),
        "latency_runs": len(lat),
        "throughput_batch": batch,
        "images_per_s": round(batch / statistics.median(thr), 1),
        "throughput_runs": len(thr),
    }
