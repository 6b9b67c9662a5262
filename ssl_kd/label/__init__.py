"""Labeling: a teacher's top-k soft pseudo-labels of every image, one Parquet file per shard."""
