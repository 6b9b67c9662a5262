"""Label Parquet files: compact schema, metadata, validation across files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssl_kd.errors import UserError
from ssl_kd.label.files import (
    LabelMeta,
    LabelSet,
    build_table,
    class_type,
    label_file_name,
    read_meta,
    write_labels,
)

META = LabelMeta(
    num_classes=300,
    classes=[f"c{i}" for i in range(300)],
    k=3,
    temperature=2.0,
    teacher_arch="cnn",
    teacher_sha256="ab" * 32,
    preprocess={"channels": 1},
    embedding_dim=4,
)


def _table(meta: LabelMeta, n: int, shard: str = "u-000000.tar") -> pa.Table:
    rng = np.random.default_rng(0)
    probs = np.sort(rng.random((n, meta.k)), axis=1)[:, ::-1]
    return build_table(
        meta,
        shard,
        [f"k{i}" for i in range(n)],
        rng.integers(0, meta.num_classes, (n, meta.k)),
        probs,
        rng.standard_normal((n, meta.embedding_dim)) if meta.embedding_dim else None,
    )


def test_smallest_class_type() -> None:
    assert class_type(10) == pa.uint8() and class_type(256) == pa.uint8()
    assert class_type(257) == pa.uint16() and class_type(70_000) == pa.int32()


def test_round_trip_schema_and_metadata(tmp_path: Path) -> None:
    path = write_labels(_table(META, 5), tmp_path / "u-000000.parquet")
    assert read_meta(path) == META
    schema = pq.read_schema(path)
    assert schema.field("topk_class").type == pa.list_(pa.uint16(), 3)
    assert schema.field("topk_prob").type == pa.list_(pa.float16(), 3)
    assert schema.field("embedding").type == pa.list_(pa.float16(), 4)
    rows = pq.read_table(path).to_pylist()
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(5)]
    assert {r["shard"] for r in rows} == {"u-000000.tar"}
    assert all(r["topk_prob"] == sorted(r["topk_prob"], reverse=True) for r in rows)
    assert not list(tmp_path.glob(".*"))


def test_label_file_names() -> None:
    assert label_file_name("s3://b/x/u-000001.tar") == "u-000001.parquet"
    assert label_file_name("/d/u-2.tar.gz") == "u-2.parquet"


def test_label_set_streams_and_validates(tmp_path: Path) -> None:
    for i in range(3):
        write_labels(_table(META, 4, f"u-{i}.tar"), tmp_path / f"u-{i}.parquet")
    labels = LabelSet(tmp_path)
    assert labels.num_rows == 12 and labels.meta == META
    batches = list(labels.iter_batches(columns=["key", "shard"], batch_size=3))
    assert sum(b.num_rows for b in batches) == 12 and batches[0].num_columns == 2

    other = replace(META, teacher_sha256="cd" * 32)
    write_labels(_table(other, 2, "u-9.tar"), tmp_path / "u-9.parquet")
    with pytest.raises(UserError, match="teacher_sha256"):
        LabelSet(tmp_path)


def test_bad_label_dirs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        LabelSet(tmp_path / "none")
    with pytest.raises(UserError, match=r"no label files"):
        LabelSet(tmp_path)
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable Parquet"):
        LabelSet(tmp_path)
    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match="not an ssl_kd label file"):
        LabelSet(tmp_path)
