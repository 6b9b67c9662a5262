"""Where the shards of a label or selection directory are.

Label and selection files name each image's shard by file name (``u-000012.tar``), not by path:
the shards are found through the spec recorded in the label directory's ``config.yaml`` (for a
selection, the label directory named by its own ``config.yaml``), or a spec the user gives.
"""

from __future__ import annotations

import os

import yaml

from ssl_kd import storage
from ssl_kd.errors import ShardSpecError, UserError
from ssl_kd.shards.spec import expand_shards, shard_name


def recorded_shard_spec(directory: str | os.PathLike[str]) -> str:
    """The shard spec that labeled ``directory`` (a label or selection directory)."""
    d = os.fspath(directory)
    for _ in range(2):  # a selection's config names its labels; theirs names the shards
        cfg_path = storage.join(d, "config.yaml")
        if not storage.is_file(cfg_path):
            break
        cfg = yaml.safe_load(storage.read_text(cfg_path)) or {}
        if not isinstance(cfg, dict):
            break
        if cfg.get("shards"):
            return str(cfg["shards"])
        if not cfg.get("labels"):
            break
        d = str(cfg["labels"])
    raise UserError(
        f"cannot tell where the shards of {directory} are (no config.yaml naming them): "
        "pass --shards DIR_OR_SPEC"
    )


def shard_locations(directory: str | os.PathLike[str], spec: str | None = None) -> dict[str, str]:
    """Shard name → local path, from ``spec`` or the spec recorded for ``directory``."""
    given = spec is not None
    spec = spec if given else recorded_shard_spec(directory)
    try:
        urls = expand_shards(spec)
    except ShardSpecError as exc:
        if given:
            raise
        raise UserError(
            f"the shards recorded for {directory} are not here ({exc}): pass --shards DIR_OR_SPEC"
        ) from None
    return {shard_name(u): u for u in urls}
