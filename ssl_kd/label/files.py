"""Pseudo-label Parquet files: schema, metadata, atomic writing, validated streaming reads.

One file per input shard, ``<shard stem>.parquet``. Columns: ``key`` string, ``shard``
dictionary<string>, ``topk_class`` fixed_size_list<uint8|uint16|int32>[k] and ``topk_prob``
fixed_size_list<float16>[k] (sorted by probability, descending), optional ``embedding``
fixed_size_list<float16>[d] (L2-normalised penultimate features). zstd-compressed. Key-value
metadata ``ssl_kd.*`` records the teacher and labeling settings; every file in a directory must
agree on them, so labels of two different teachers are never mixed silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssl_kd import storage
from ssl_kd.atomic import atomic_path
from ssl_kd.errors import UserError

SCHEMA_VERSION = 1
_PREFIX = "ssl_kd."
_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class LabelMeta:
    """What produced a label file; identical across the files of one label directory."""

    num_classes: int
    classes: list[str]
    k: int
    temperature: float
    teacher_arch: str
    teacher_sha256: str
    preprocess: dict[str, Any]
    embedding_dim: int = 0
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_kv(self) -> dict[bytes, bytes]:
        """Parquet key-value metadata: one ``ssl_kd.<field>`` key per field, JSON values."""
        return {f"{_PREFIX}{k}".encode(): json.dumps(v).encode() for k, v in asdict(self).items()}

    @classmethod
    def from_kv(cls, kv: dict[bytes, bytes] | None, source: str) -> LabelMeta:
        """Inverse of :meth:`to_kv`; UserError if the file is not an ssl_kd label file."""
        fields = {
            k.decode()[len(_PREFIX) :]: json.loads(v)
            for k, v in (kv or {}).items()
            if k.decode(errors="replace").startswith(_PREFIX)
        }
        try:
            return cls(**fields)
        except TypeError:
            raise UserError(
                f"{source} is not an ssl_kd label file (no ssl_kd.* metadata)"
            ) from None


def class_type(num_classes: int) -> pa.DataType:
    """The smallest unsigned integer type holding every class id."""
    if num_classes <= 1 << 8:
        return pa.uint8()
    if num_classes <= 1 << 16:
        return pa.uint16()
    return pa.int32()


def label_schema(meta: LabelMeta) -> pa.Schema:
    """The Arrow schema of label files for ``meta`` (metadata attached)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("topk_class", pa.list_(class_type(meta.num_classes), meta.k), nullable=False),
        pa.field("topk_prob", pa.list_(pa.float16(), meta.k), nullable=False),
    ]
    if meta.embedding_dim:
        fields.append(
            pa.field("embedding", pa.list_(pa.float16(), meta.embedding_dim), nullable=False)
        )
    return pa.schema(fields, metadata=meta.to_kv())


def _fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def build_table(
    meta: LabelMeta,
    shard: str,
    keys: list[str],
    topk_class: np.ndarray,
    topk_prob: np.ndarray,
    embedding: np.ndarray | None = None,
) -> pa.Table:
    """Assemble one shard's labels; arrays are (n, k) and (n, d)."""
    schema = label_schema(meta)
    n = len(keys)
    k = meta.k
    topk_class = topk_class.reshape(n, k)
    topk_prob = topk_prob.reshape(n, k)
    columns = [
        pa.array(keys, pa.string()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([shard])),
        _fixed_list(topk_class.astype(class_type(meta.num_classes).to_pandas_dtype()),
                    schema.field("topk_class").type.value_type),
        _fixed_list(topk_prob.astype(np.float16), pa.float16()),
    ]  # fmt: skip
    if meta.embedding_dim:
        if embedding is None:
            raise ValueError("embedding expected by the metadata")
        emb = embedding.reshape(n, meta.embedding_dim).astype(np.float16)
        columns.append(_fixed_list(emb, pa.float16()))
    return pa.Table.from_arrays(columns, schema=schema)


def label_file_name(shard_url: str) -> str:
    """``…/u-000012.tar`` → ``u-000012.parquet`` (deterministic from the shard)."""
    name = shard_url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _SHARD_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}.parquet"


def write_labels(table: pa.Table, path: str | os.PathLike[str]) -> str:
    """Write atomically (temp + rename, or one put): the file's presence means the shard is
    complete; returns the path."""
    with atomic_path(path) as tmp:
        pq.write_table(
            table, tmp, compression="zstd", compression_level=9, use_dictionary=["shard"]
        )
    return os.fspath(path)


def read_meta(path: str | os.PathLike[str]) -> LabelMeta:
    """The metadata of one label file (footer only)."""
    try:
        kv = pq.read_schema(os.fspath(path)).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({exc})") from None
    return LabelMeta.from_kv(kv, str(path))


def label_files(directory: str | os.PathLike[str]) -> list[str]:
    """The label files of a directory (or prefix), sorted (temp files and other names
    excluded)."""
    if not storage.is_dir(directory):
        raise UserError(f"label directory {storage.display(directory)} does not exist")
    files = storage.list_dir(directory, "*.parquet")
    return [p for p in files if not storage.name(p).startswith(".")]


def check_same_labeling(a: LabelMeta, b: LabelMeta, where_a: str, where_b: str) -> None:
    """UserError naming the first field in which two label files disagree."""
    for name, va in asdict(a).items():
        vb = getattr(b, name)
        if va != vb:
            raise UserError(
                f"{where_a} and {where_b} come from different labelings ({name}: {va!r} vs "
                f"{vb!r}); keep one teacher's labels per directory"
            )


class LabelSet:
    """A validated directory of label files, read as a stream of record batches."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self.files = label_files(directory)
        if not self.files:
            raise UserError(f"no label files (*.parquet) in {self.directory}")
        self.meta = read_meta(self.files[0])
        for path in self.files[1:]:
            check_same_labeling(self.meta, read_meta(path), str(self.files[0]), str(path))

    @property
    def num_rows(self) -> int:
        """Total rows, from the footers."""
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)

    def iter_batches(
        self, columns: list[str] | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of every file in order; memory bounded by ``batch_size``."""
        for path in self.files:
            with pq.ParquetFile(path) as pf:
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)
