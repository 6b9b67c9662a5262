"""Weights files as practitioners bring them, read without running any code they hold.

Two formats, told apart by content and never by the file's name (hubs ship ``model.safetensors``,
``pytorch_model.bin`` and ``.pth`` files; people rename them):

- safetensors: an 8-byte little-endian header length, then a JSON header starting with ``{``;
  read with ``safetensors.torch`` (tensors only, by construction);
- anything else is taken for a ``torch.save`` file (zip or legacy pickle) and read with
  ``torch.load(weights_only=True)``, which refuses pickled code.

Remote files (``s3://…``) are read into memory first, as every other loader here does.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from ssl_kd import storage
from ssl_kd.errors import UserError

# safetensors refuses headers above 100 MB; a larger "length" is not a safetensors file.
_MAX_HEADER = 100_000_000


def is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes starting with ``head`` (9 bytes or more) is a
    safetensors file: a plausible header length, then the JSON header's ``{``."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= length <= min(size - 8, _MAX_HEADER)


def _local_head(path: str) -> tuple[bytes, int]:
    with open(path, "rb") as fh:
        return fh.read(9), os.fstat(fh.fileno()).st_size


def read_weights(path: str, what: str) -> tuple[Any, str]:
    """``(content, format)``: the tensors of a safetensors file (``"safetensors"``), or what a
    ``torch.save`` file holds, loaded onto the CPU with ``weights_only=True`` (``"torch"``);
    a file that is neither is one UserError calling it not a readable ``what``."""
    shown = storage.display(path)
    data = storage.read_bytes(path) if storage.is_remote(path) else None
    local = storage.local_path(path)
    head, size = (data[:9], len(data)) if data is not None else _local_head(local)
    kind = "safetensors" if is_safetensors(head, size) else "torch"
    try:
        if kind == "safetensors":
            from safetensors.torch import load, load_file

            return (load(data) if data is not None else load_file(local, device="cpu")), kind
        source = io.BytesIO(data) if data is not None else local
        return torch.load(source, map_location="cpu", weights_only=True), kind
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = (
            "a damaged safetensors file"
            if kind == "safetensors"
            else "neither safetensors nor a torch.save file that loads with weights_only=True"
        )
        raise UserError(f"{shown} is not a readable {what} ({why}: {first[:200]})") from None


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` (parameter name → tensor) from a safetensors or torch file; UserError
    for anything else."""
    shown = storage.display(path)
    if not storage.is_file(path):
        raise UserError(f"weights file {shown} does not exist")
    sd, _ = read_weights(path, "state_dict file")
    if isinstance(sd, dict) and "model" in sd and "meta" in sd:
        raise UserError(
            f"{shown} is an ssl_kd checkpoint, not a state_dict: pass it as the teacher or "
            "--init instead"
        )
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{shown} is not a state_dict (a mapping of parameter names to tensors)")
    return sd


def mismatch_message(message: str) -> str:
    """The first lines of torch's ``load_state_dict`` error, on one line."""
    lines = [ln.strip() for ln in message.splitlines()[1:] if ln.strip()]
    text = " ".join(lines[:2]) or message.strip().splitlines()[0]
    return text[:300] + ("..." if len(text) > 300 else "")
