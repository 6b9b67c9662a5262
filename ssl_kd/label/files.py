"""Pseudo-label Parquet files: schema, metadata, atomic writing, validated streaming reads.

One file per input shard, ``<shard stem>.parquet``. Columns: ``key`` string, ``shard``
dictionary<string>, ``topk_class`` fixed_size_list<uint8|uint16|int32>[k] and ``topk_prob``
fixed_size_list<float16>[k] (sorted by probability, descending), optional ``embedding``
fixed_size_list<float16>[d] (L2-normalised penultimate features). zstd-compressed. Key-value
metadata ``ssl_kd.*`` records the teacher and labeling settings; every file in a directory must
agree on them, so labels of two different teachers are never mixed silently. ``extra["shards"]``
records the shard spec the labels were made from (provenance, not identity: files labeled from
two specs may share a directory); the directory's ``sources.txt`` lists every spec labeled into
it. Labels of older versions name theirs in the directory's ``config.yaml`` instead.

:class:`LabelSet` is the one reader: every file's metadata and schema are checked on open.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ssl_kd import atomic, storage
from ssl_kd.atomic import atomic_path
from ssl_kd.errors import ShardSpecError, UserError
from ssl_kd.shards.locate import locate_shards
from ssl_kd.shards.spec import shard_stem

SCHEMA_VERSION = 1
_PREFIX = "ssl_kd."
SHARDS = "shards"  # the key of the shard spec in LabelMeta.extra
SOURCES = "sources.txt"  # every shard spec labeled into a directory, one per line


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

    def with_shard_spec(self, spec: str) -> LabelMeta:
        """This metadata recording ``spec`` as the shards the labels were made from."""
        return replace(self, extra={**self.extra, SHARDS: spec})

    def identity(self) -> dict[str, Any]:
        """The fields that must agree across a directory (all but the shard provenance)."""
        fields = asdict(self)
        fields["extra"] = {k: v for k, v in self.extra.items() if k != SHARDS}
        return fields


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


def _to_fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
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
        _to_fixed_list(
            topk_class.astype(class_type(meta.num_classes).to_pandas_dtype()),
            schema.field("topk_class").type.value_type,
        ),
        _to_fixed_list(topk_prob.astype(np.float16), pa.float16()),
    ]
    if meta.embedding_dim:
        if embedding is None:
            raise ValueError("embedding expected by the metadata")
        emb = embedding.reshape(n, meta.embedding_dim).astype(np.float16)
        columns.append(_to_fixed_list(emb, pa.float16()))
    return pa.Table.from_arrays(columns, schema=schema)


def label_file_name(shard_url: str) -> str:
    """``…/u-000012.tar`` → ``u-000012.parquet`` (deterministic from the shard)."""
    return f"{shard_stem(shard_url)}.parquet"


def write_labels(table: pa.Table, path: str | os.PathLike[str]) -> str:
    """Write atomically (temp + rename, or one put): the file's presence means the shard is
    complete; returns the path."""
    with atomic_path(path) as tmp:
        pq.write_table(
            table, tmp, compression="zstd", compression_level=9, use_dictionary=["shard"]
        )
    return os.fspath(path)


def read_schema(path: str | os.PathLike[str]) -> pa.Schema:
    """The Arrow schema of a Parquet file (footer only); UserError if it is not one."""
    try:
        return pq.read_schema(os.fspath(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({exc})") from None


def read_meta(path: str | os.PathLike[str]) -> LabelMeta:
    """The metadata of one label file (footer only)."""
    return LabelMeta.from_kv(read_schema(path).metadata, str(path))


def _fixed_list_of(t: pa.DataType, k: int, is_value: Any) -> bool:
    return pa.types.is_fixed_size_list(t) and t.list_size == k and is_value(t.value_type)


def _stringy(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_label_schema(schema: pa.Schema, k: int, where: str) -> None:
    """UserError naming the first column of a label file that is missing or mistyped."""
    is_int, is_float = pa.types.is_integer, pa.types.is_floating
    expected = {
        "key": ("string", _stringy),
        "shard": ("string", _stringy),
        "topk_class": (f"fixed_size_list<int>[{k}]", lambda t: _fixed_list_of(t, k, is_int)),
        "topk_prob": (f"fixed_size_list<float>[{k}]", lambda t: _fixed_list_of(t, k, is_float)),
    }
    for name, (wanted, ok) in expected.items():
        if name not in schema.names:
            raise UserError(
                f"{where} has no '{name}' column, so it is not a label file "
                f"(columns: {', '.join(schema.names)})"
            )
        if not ok(schema.field(name).type):
            raise UserError(
                f"{where}: column '{name}' is {schema.field(name).type}, expected {wanted}"
            )


def fixed_list(column: pa.Array | pa.ChunkedArray, rows: int) -> np.ndarray:
    """A fixed-size-list column as a (rows, list size) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    size = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(rows, size)


def label_files(directory: str | os.PathLike[str]) -> list[str]:
    """The label files of a directory (or prefix), sorted (temp files and other names
    excluded)."""
    if not storage.is_dir(directory):
        raise UserError(f"label directory {storage.display(directory)} does not exist")
    files = storage.list_dir(directory, "*.parquet")
    return [p for p in files if not storage.name(p).startswith(".")]


def check_same_labeling(a: LabelMeta, b: LabelMeta, where_a: str, where_b: str) -> None:
    """UserError naming the first field in which two label files disagree (the shard
    provenance aside)."""
    fields_b = b.identity()
    for name, va in a.identity().items():
        vb = fields_b[name]
        if va != vb:
            raise UserError(
                f"{where_a} and {where_b} come from different labelings ({name}: {va!r} vs "
                f"{vb!r}); keep one teacher's labels per directory"
            )


class LabelSet:
    """A validated directory of label files, read as a stream of record batches.

    Every file must carry the same labeling metadata and the label schema for its ``k``.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self.files = label_files(directory)
        if not self.files:
            raise UserError(f"no label files (*.parquet) in {self.directory}")
        for path in self.files:
            schema = read_schema(path)
            meta = LabelMeta.from_kv(schema.metadata, str(path))
            if path == self.files[0]:
                self.meta = meta
            else:
                check_same_labeling(self.meta, meta, str(self.files[0]), str(path))
            check_label_schema(schema, meta.k, str(path))

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


def recorded_sources(directory: str | os.PathLike[str]) -> list[str]:
    """The shard specs labeled into ``directory``, in the order they were first labeled."""
    path = storage.join(directory, SOURCES)
    if not storage.is_file(path):
        return []
    return [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]


def record_source(directory: str | os.PathLike[str], spec: str) -> str:
    """Add ``spec`` to the directory's sources (a rerun that adds shards extends the list,
    never replaces it); returns every source as one comma-separated spec."""
    specs = recorded_sources(directory)
    if not specs and label_files(directory):  # labeled by a version without a sources file
        with contextlib.suppress(UserError):
            specs = [recorded_shard_spec(directory)]
    if spec not in specs:
        specs.append(spec)
        atomic.write_text(storage.join(directory, SOURCES), "".join(f"{s}\n" for s in specs))
    return ",".join(specs)


def recorded_shard_spec(directory: str | os.PathLike[str]) -> str:
    """The shard spec that the labels of ``directory`` were made from.

    The directory's sources file lists every spec labeled into it; labels of older versions
    record one in their metadata, or only in the ``config.yaml`` written beside them.
    """
    if specs := recorded_sources(directory):
        return ",".join(specs)
    files = label_files(directory) if storage.is_dir(directory) else []
    meta = read_meta(files[0]) if files else None
    if meta is not None and meta.extra.get(SHARDS):
        return str(meta.extra[SHARDS])
    cfg_path = storage.join(directory, "config.yaml")
    if storage.is_file(cfg_path):
        cfg = yaml.safe_load(storage.read_text(cfg_path)) or {}
        if isinstance(cfg, dict) and cfg.get(SHARDS):
            return str(cfg[SHARDS])
    raise UserError(
        f"cannot tell where the shards of {directory} are (neither their metadata nor a "
        "config.yaml names them): pass --shards DIR_OR_SPEC"
    )


def find_shards(spec: str | None, recorded: Callable[[], str], directory: str) -> dict[str, str]:
    """Shard name → URL from ``spec``, else from ``recorded()`` (the spec the labels were made
    from); UserError asking for ``--shards`` when the recorded shards are not here."""
    if spec is not None:
        return locate_shards(spec)
    try:
        return locate_shards(recorded())
    except ShardSpecError as exc:
        raise UserError(
            f"the shards recorded for {directory} are not here ({exc}): pass --shards DIR_OR_SPEC"
        ) from None


def shard_locations(directory: str | os.PathLike[str], spec: str | None = None) -> dict[str, str]:
    """Shard name → URL of the shards of a label directory: ``spec``, or the recorded one."""
    return find_shards(spec, lambda: recorded_shard_spec(directory), os.fspath(directory))
