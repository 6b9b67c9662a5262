"""Class names of a labeled set: from a names file, a ``dataset.json`` beside the shards, or ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.shards.tario import is_gopen_url


def dataset_info_near(urls: list[str]) -> dict | None:
    """The ``dataset.json`` in the first shard's directory or its parent, if there is one."""
    if not urls or is_gopen_url(urls[0]):
        return None  # http(s) and pipe: shards have no directory to look in
    first = urls[0]
    if not storage.is_remote(first):
        first = str(Path(storage.local_path(first)).resolve())
    shard_dir = storage.parent(first)
    for d in (shard_dir, storage.parent(shard_dir)):
        path = storage.join(d, "dataset.json")
        if storage.is_file(path):
            return _read_dataset_json(path)
    return None


def _read_dataset_json(path: str) -> dict[str, Any]:
    """``dataset.json``, checked: an object whose ``classes`` (if any) is a list of names."""
    shown = storage.display(path)
    try:
        info = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{shown} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(info, dict):
        raise UserError(f"{shown} must hold a JSON object, not {type(info).__name__}")
    classes = info.get("classes")
    if classes is not None and (
        not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
    ):
        raise UserError(f'{shown}: "classes" must be a list of class names (strings)')
    soft = info.get("soft_label")
    if soft is not None and not isinstance(soft, dict):
        raise UserError(f'{shown}: "soft_label" must be a JSON object')
    return info


def resolve_classes(
    urls: list[str], class_names_file: str | None, num_classes: int | None
) -> list[str]:
    """Class names, in label order; UserError when they cannot be told or disagree."""
    names: list[str] | None = None
    if class_names_file:
        if not storage.is_file(class_names_file):
            raise UserError(f"class names file {class_names_file} does not exist")
        text = storage.read_text(class_names_file)
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    elif (info := dataset_info_near(urls)) is not None and "classes" in info:
        names = list(info["classes"])
    elif num_classes is not None:
        names = [str(i) for i in range(num_classes)]
    if not names:
        raise UserError(
            "cannot tell the classes: pass --num-classes N or --class-names FILE (one per line)"
        )
    if num_classes is not None and num_classes != len(names):
        raise UserError(f"--num-classes is {num_classes} but {len(names)} class names were found")
    return names
