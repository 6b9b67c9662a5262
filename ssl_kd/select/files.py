"""Reading a selection directory (written by ``ssl-kd select``): its file, checked."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelMeta

_COLUMNS = {
    "key": pa.types.is_string,
    "shard": None,
    "class": pa.types.is_integer,
    "score": pa.types.is_floating,
    "rank": pa.types.is_integer,
    "repeat": pa.types.is_integer,
}


def open_selection(directory: str | os.PathLike[str]) -> tuple[str, LabelMeta]:
    """``selection.parquet`` of ``directory`` and the labeling metadata it carries."""
    d = storage.display(directory)
    if storage.is_file(directory):
        raise UserError(f"{d} is a file; give the directory written by ssl-kd select")
    if not storage.is_dir(directory):
        raise UserError(f"selection directory {d} does not exist")
    path = storage.join(directory, "selection.parquet")
    if not storage.is_file(path):
        raise UserError(f"{d} holds no selection.parquet (written by ssl-kd select)")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({exc})") from None
    meta = LabelMeta.from_kv(schema.metadata, str(path))
    for name, is_type in _COLUMNS.items():
        if name not in schema.names:
            raise UserError(
                f"{path} has no '{name}' column, so it is not a selection "
                f"(columns: {', '.join(schema.names)})"
            )
        if is_type is not None and not is_type(schema.field(name).type):
            raise UserError(f"{path}: column '{name}' has type {schema.field(name).type}")
    return path, meta
