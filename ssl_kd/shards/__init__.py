"""WebDataset shards: spec expansion, atomic writing, reading and decoding."""

from ssl_kd.shards.reader import ReadStats, SampleError, iter_samples, iter_shard
from ssl_kd.shards.spec import expand_shards, shard_name
from ssl_kd.shards.writer import ShardWriter, array_samples, encode_image, write_shards

__all__ = [
    "ReadStats",
    "SampleError",
    "ShardWriter",
    "array_samples",
    "encode_image",
    "expand_shards",
    "iter_samples",
    "iter_shard",
    "shard_name",
    "write_shards",
]
