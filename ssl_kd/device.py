"""Device selection: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from ssl_kd.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; an unavailable CUDA request is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but CUDA is not available; use --device cpu")
    return device
