"""Learning-rate schedules as precomputed arrays (one value per step): easy to test and plot."""

from __future__ import annotations

import numpy as np

SCHEDULES = ("cosine", "onecycle", "constant")


def lr_schedule(
    kind: str, base_lr: float, steps: int, warmup_steps: int = 0, final_frac: float = 0.0
) -> np.ndarray:
    """Per-step learning rates of length ``steps``.

    ``cosine``: linear warm-up to ``base_lr`` then cosine decay to ``base_lr * final_frac``.
    ``onecycle``: as torch's OneCycleLR (30% cosine rise from base/25, cosine fall to base/25e4).
    ``constant``: linear warm-up then flat.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    t = np.arange(steps, dtype=np.float64)
    if kind == "onecycle":
        peak = max(1, int(0.3 * steps))
        start, end = base_lr / 25.0, base_lr / 25.0 / 1e4
        rise = start + (base_lr - start) * (1 - np.cos(np.pi * t[:peak] / peak)) / 2
        fall_t = (t[peak:] - peak) / max(1, steps - peak - 1)
        fall = end + (base_lr - end) * (1 + np.cos(np.pi * fall_t)) / 2
        return np.concatenate([rise, fall])
    warm = min(warmup_steps, steps)
    lr = np.full(steps, base_lr, dtype=np.float64)
    if warm > 0:
        lr[:warm] = base_lr * (t[:warm] + 1) / warm
    if kind == "cosine":
        decay_t = (t[warm:] - warm) / max(1, steps - warm - 1)
        low = base_lr * final_frac
        lr[warm:] = low + (base_lr - low) * (1 + np.cos(np.pi * decay_t)) / 2
    elif kind != "constant":
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    return lr
