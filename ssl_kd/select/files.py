"""The selection directory that ``ssl-kd select`` writes and ``ssl-kd materialize`` reads.

``selection.parquet`` holds one row per selected (image, class), class-major and best first:
``key`` string, ``shard`` dictionary<string>, ``class`` int32, ``score`` float32 (what a class's
rows are ranked by: the teacher's probability of ``class``, or with ``select --rank-by
propagation|vote`` the labeled neighbours' probability of it), ``rank`` int32 (0 = best of its
class), ``repeat`` int32 (copies to write; > 1 only when short classes are upsampled),
``weight`` float32 (only with ``select --weights``: the row's weight in the student's loss; a
selection without the column weighs every row 1), and the image's soft label ``topk_class`` /
``topk_prob`` as in the label files, and its ``embedding`` when the labels stored one (so that
``ssl-kd materialize`` can carry it to the student). zstd-compressed; its key-value metadata is
the labels' (:class:`~ssl_kd.label.files.LabelMeta`, which records the shard spec they came from).
``report.json`` and ``config.yaml`` sit beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError
from ssl_kd.label.files import SHARDS, LabelMeta, find_shards, read_schema, recorded_shard_spec

SELECTION_FILE = "selection.parquet"
_IS_SOFT = pa.types.is_fixed_size_list
# Column → check of its type (None: any); the file's columns in this order.
SELECTION_SCHEMA: dict[str, Callable[[pa.DataType], bool] | None] = {
    "key": pa.types.is_string,
    "shard": None,
    "class": pa.types.is_integer,
    "score": pa.types.is_floating,
    "rank": pa.types.is_integer,
    "repeat": pa.types.is_integer,
    "weight": pa.types.is_floating,
    "topk_class": _IS_SOFT,
    "topk_prob": _IS_SOFT,
    "embedding": _IS_SOFT,
}
SELECTION_COLUMNS = list(SELECTION_SCHEMA)
# Columns a selection must have to be read (older files are checked no further).
_REQUIRED = ("key", "shard", "class", "score", "rank", "repeat")


def build_selection(
    rows: pa.Table,
    cls: np.ndarray,
    score: np.ndarray,
    rank: np.ndarray,
    repeat: np.ndarray,
    weight: np.ndarray | None = None,
) -> pa.Table:
    """The selection table: ``rows`` (``key``, ``shard``, ``topk_class``, ``topk_prob`` and
    optionally ``embedding`` of the selected label rows) with each row's class, score, rank,
    repeat and, when given, weight."""
    extra = {"embedding": rows.column("embedding")} if "embedding" in rows.column_names else {}
    weights = {"weight": pa.array(weight, pa.float32())} if weight is not None else {}
    return pa.table(
        {
            "key": rows.column("key"),
            "shard": rows.column("shard"),
            "class": pa.array(cls, pa.int32()),
            "score": pa.array(score, pa.float32()),
            "rank": pa.array(rank, pa.int32()),
            "repeat": pa.array(repeat, pa.int32()),
            **weights,
            "topk_class": rows.column("topk_class"),
            "topk_prob": rows.column("topk_prob"),
            **extra,
        }
    )


def write_selection(table: pa.Table, meta: LabelMeta, directory: str | os.PathLike[str]) -> str:
    """Write ``selection.parquet`` of ``directory`` atomically, carrying ``meta``; its path."""
    path = storage.join(directory, SELECTION_FILE)
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta.to_kv()), tmp, compression="zstd")
    return path


def _check_columns(schema: pa.Schema, path: str) -> None:
    for name in SELECTION_COLUMNS:
        if name not in schema.names:
            if name not in _REQUIRED:
                continue
            raise UserError(
                f"{path} has no '{name}' column, so it is not a selection "
                f"(columns: {', '.join(schema.names)})"
            )
        is_type = SELECTION_SCHEMA[name]
        if is_type is not None and not is_type(schema.field(name).type):
            raise UserError(f"{path}: column '{name}' has type {schema.field(name).type}")


def open_selection(directory: str | os.PathLike[str]) -> tuple[str, LabelMeta]:
    """``selection.parquet`` of ``directory`` and the labeling metadata it carries, checked."""
    d = storage.display(directory)
    if storage.is_file(directory):
        raise UserError(f"{d} is a file; give the directory written by ssl-kd select")
    if not storage.is_dir(directory):
        raise UserError(f"selection directory {d} does not exist")
    path = storage.join(directory, SELECTION_FILE)
    if not storage.is_file(path):
        raise UserError(f"{d} holds no selection.parquet (written by ssl-kd select)")
    schema = read_schema(path)
    meta = LabelMeta.from_kv(schema.metadata, str(path))
    _check_columns(schema, path)
    return path, meta


def _config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = storage.join(directory, "config.yaml")
    cfg = yaml.safe_load(storage.read_text(path)) if storage.is_file(path) else None
    return cfg if isinstance(cfg, dict) else {}


def shard_locations(directory: str | os.PathLike[str], spec: str | None = None) -> dict[str, str]:
    """Shard name → URL of the source shards of a selection: ``spec``, or the recorded one."""

    def recorded() -> str:
        _, meta = open_selection(directory)
        if meta.extra.get(SHARDS):
            return str(meta.extra[SHARDS])
        # Selections of older versions: the labels named by the selection's config know.
        labels = _config(directory).get("labels")
        if not labels:
            raise UserError(
                f"cannot tell where the shards of {directory} are (neither its metadata nor a "
                "config.yaml names them): pass --shards DIR_OR_SPEC"
            )
        return recorded_shard_spec(str(labels))

    return find_shards(spec, recorded, os.fspath(directory))
