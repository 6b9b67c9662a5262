"""Where shards are: a shard spec → each shard's URL, keyed by shard name.

Label and selection files name each image's shard by file name (``u-000012.tar``), not by path;
the stage that wrote them knows which spec they came from (see :mod:`ssl_kd.label.files`).
"""

from __future__ import annotations

from ssl_kd.shards.spec import expand_shards, shard_name


def locate_shards(spec: str) -> dict[str, str]:
    """Shard name → URL of every shard of ``spec``; ShardSpecError if it matches nothing."""
    return {shard_name(u): u for u in expand_shards(spec)}
