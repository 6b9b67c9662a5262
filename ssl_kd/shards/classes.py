"""Class names of a labeled set: from a names file, a ``dataset.json`` beside the shards, or ids."""

from __future__ import annotations

import json
from pathlib import Path

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
            return json.loads(storage.read_text(path))
    return None


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
