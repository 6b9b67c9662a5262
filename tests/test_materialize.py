"""Materialise: the selection (with repeats) copied byte for byte into shuffled, labeled shards."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_teacher, write_plain_tar, write_unlabeled_shards

from ssl_kd.cli import main
from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelMeta
from ssl_kd.label.run import LabelConfig, run_label
from ssl_kd.materialize.run import MaterializeConfig, format_summary, run_materialize
from ssl_kd.materialize.shuffle import sample_key
from ssl_kd.select.run import SelectConfig, run_select
from ssl_kd.shards import ReadStats, expand_shards, iter_samples
from ssl_kd.shards.classes import resolve_classes
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.shards.skips import SampleError
from ssl_kd.shards.soft_label import decode_weight, encode

PER_SHARD = 64


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3 shards x 40 images labeled by a random teacher, then K=150 of top-2 with upsampling.

    This teacher's top-2 are always the same two classes (120 candidates each), so every image
    is selected for two classes and 30 rows of each are repeated twice: 300 samples.
    """
    root = tmp_path_factory.mktemp("pipeline")
    (root / "shards").mkdir()
    write_unlabeled_shards(root / "shards", n_shards=3, per_shard=40)
    teacher = make_teacher(root / "teacher.pt")
    labels = LabelConfig(
        teacher=str(teacher),
        shards=str(root / "shards"),
        out=str(root / "labels"),
        k=3,
        executor="local",
        device="cpu",
    )
    run_label(labels, progress=False)
    run_select(
        SelectConfig(
            labels=str(root / "labels"),
            out=str(root / "sel"),
            per_class=150,
            top_p=2,
            upsample=True,
            executor="local",
        )
    )
    return {"root": root, "shards": root / "shards", "sel": root / "sel"}


def _cfg(pipeline: dict[str, Path], out: Path, **kw: object) -> MaterializeConfig:
    base = MaterializeConfig(
        selection=str(pipeline["sel"]), out=str(out), samples_per_shard=PER_SHARD, executor="local"
    )
    return replace(base, **kw)


def _samples(out: Path) -> list[dict]:
    """Every output sample in file order, with its json parsed."""
    stats = ReadStats()
    found = list(iter_samples(sorted(str(p) for p in out.glob("train-*.tar")), stats))
    assert stats.skipped == 0
    for s in found:
        s["meta"] = json.loads(s["json"])
    return found


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


def test_shards_hold_exactly_the_selection(pipeline: dict[str, Path], tmp_path: Path) -> None:
    rows = pq.read_table(pipeline["sel"] / "selection.parquet").to_pylist()
    assert any(r["repeat"] > 1 for r in rows)
    assert Counter((r["shard"], r["key"]) for r in rows).most_common(1)[0][1] == 2
    out = tmp_path / "out"
    m = run_materialize(_cfg(pipeline, out), progress=False)

    total = sum(r["repeat"] for r in rows)
    got = _samples(out)
    assert len(got) == m["samples"] == total == 300 and not m["already_done"]
    assert m["shards"] == [f"train-{i:06d}.tar" for i in range(5)]
    assert m["per_shard"] == [64, 64, 64, 64, 44]
    assert len({s["__key__"] for s in got}) == total
    expected = Counter()
    for r in rows:
        expected[(r["shard"], r["key"], r["class"])] += r["repeat"]
    assert (
        Counter(
            (s["meta"]["source_shard"], s["meta"]["source_key"], s["meta"]["class"]) for s in got
        )
        == expected
    )

    urls = expand_shards(str(pipeline["shards"]))
    source = {
        (Path(s["__url__"]).name, s["__key__"]): s["png"] for s in iter_samples(urls, ReadStats())
    }
    by_row = {(r["shard"], r["key"], r["class"]): r for r in rows}
    for s in got:
        meta = s["meta"]
        row = by_row[(meta["source_shard"], meta["source_key"], meta["class"])]
        assert s["png"] == source[(meta["source_shard"], meta["source_key"])]
        assert int(s["cls"]) == row["class"]
        assert meta["topk_class"] == row["topk_class"] and meta["topk_prob"] == row["topk_prob"]
        assert meta["score"] == pytest.approx(row["score"]) and meta["rank"] == row["rank"]
        assert s["__key__"].startswith(meta["source_shard"].removesuffix(".tar") + "/")
        assert s["__key__"].endswith("_r1") or s["__key__"].endswith("_r2") or row["repeat"] == 1

    for path in sorted(out.glob("train-*.tar")):  # a standard tar reader agrees
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 3 * m["per_shard"][int(path.stem[-6:])]
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["c0", "c1", "c2", "c3"] and info["counts"]["train"] == total
    assert resolve_classes(expand_shards(str(out)), None, None) == info["classes"]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "dataset.json",
        "materialize.json",
        *m["shards"],
    ]


def test_shuffled_and_deterministic(pipeline: dict[str, Path], tmp_path: Path) -> None:
    run_materialize(_cfg(pipeline, tmp_path / "a"), progress=False)
    run_materialize(_cfg(pipeline, tmp_path / "b"), progress=False)
    run_materialize(_cfg(pipeline, tmp_path / "c", seed=1), progress=False)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    order = [s["__key__"] for s in _samples(tmp_path / "a")]
    assert order != [s["__key__"] for s in _samples(tmp_path / "c")]
    assert sorted(order) == sorted(s["__key__"] for s in _samples(tmp_path / "c"))
    rows = pq.read_table(pipeline["sel"] / "selection.parquet").to_pylist()
    sources = [
        (s["meta"]["source_shard"], s["meta"]["source_key"]) for s in _samples(tmp_path / "a")
    ]
    assert sources != sorted(sources)  # not in source order
    in_selection_order = [(r["shard"], r["key"]) for r in rows for _ in range(r["repeat"])]
    assert sources != in_selection_order
    first = _samples(tmp_path / "a")[:PER_SHARD]  # one output shard mixes sources and classes
    assert len({s["meta"]["source_shard"] for s in first}) == 3
    assert len({s["meta"]["class"] for s in first}) == 2


def test_readable_by_shard_image_dataset(pipeline: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_materialize(_cfg(pipeline, out), progress=False)
    ds = ShardImageDataset(
        expand_shards(str(out)),
        lambda x: x.float() / 255,
        channels=1,
        labeled=True,
        num_classes=4,
        with_keys=True,
    )
    items = list(ds)
    assert len(items) == 300 and ds.stats.skipped == 0
    for key, x, label in items:
        assert x.shape == (1, 16, 16)
        assert f"_c{label}" in key


def test_rerun_is_a_noop_and_other_runs_are_refused(
    pipeline: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = _cfg(pipeline, out)
    run_materialize(cfg, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_materialize(replace(cfg, executor="ray", max_retries=0), progress=False)
    assert again["already_done"] and again["samples"] == 300
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    first = _shard_bytes(out)
    with pytest.raises(UserError, match=r"another materialization .*seed"):
        run_materialize(replace(cfg, seed=5), progress=False)

    (out / "materialize.json").unlink()  # killed before the manifest: the run is redone
    with pytest.raises(UserError, match="unfinished materialization with another config"):
        run_materialize(replace(cfg, samples_per_shard=10), progress=False)
    assert not run_materialize(cfg, progress=False)["already_done"]
    assert _shard_bytes(out) == first
    (out / "train-000002.tar").unlink()  # a lost shard: the run is redone
    assert not run_materialize(cfg, progress=False)["already_done"]
    assert _shard_bytes(out) == first

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_materialize(_cfg(pipeline, tmp_path / "other"), progress=False)


def test_bad_inputs(pipeline: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no selection at"):
        run_materialize(_cfg(pipeline, out, selection=str(tmp_path)), progress=False)

    # A selection of an older version (no shard spec in its metadata) without the labels'
    # config: the source shards must be named.
    (tmp_path / "sel").mkdir()
    selection = pq.read_table(pipeline["sel"] / "selection.parquet")
    meta = LabelMeta.from_kv(selection.schema.metadata, "selection")
    assert meta.extra["shards"] == str(pipeline["shards"])
    old = selection.replace_schema_metadata(replace(meta, extra={}).to_kv())
    pq.write_table(old, tmp_path / "sel" / "selection.parquet")
    lone = _cfg(pipeline, out, selection=str(tmp_path / "sel"))
    with pytest.raises(UserError, match="pass --shards"):
        run_materialize(lone, progress=False)

    copy = tmp_path / "shards"
    shutil.copytree(pipeline["shards"], copy)
    (copy / "u-000001.tar").unlink()
    with pytest.raises(UserError, match=r"source shard u-000001\.tar of the selection is not"):
        run_materialize(replace(lone, shards=str(copy)), progress=False)
    with pytest.raises(UserError, match="matched no files"):
        run_materialize(replace(lone, shards=str(tmp_path / "none-*.tar")), progress=False)

    # A source shard that lost a selected sample.
    members = {}
    for s in iter_samples([str(pipeline["shards"] / "u-000001.tar")], ReadStats()):
        if s["__key__"] != "img-000045":
            members[f"{s['__key__']}.png"] = s["png"]
    write_plain_tar(copy / "u-000001.tar", members)
    with pytest.raises(UserError, match="'img-000045' of the selection is not in source shard"):
        run_materialize(replace(lone, shards=str(copy)), progress=False)
    assert not list(out.glob("train-*.tar")) and not (out / ".buckets").exists()

    shutil.copy(pipeline["shards"] / "u-000001.tar", copy)  # repaired: the same command works
    assert run_materialize(replace(lone, shards=str(copy)), progress=False)["samples"] == 300

    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        run_materialize(_cfg(pipeline, tmp_path / "file"), progress=False)


def test_weights_travel_into_the_json_member(pipeline: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    run_materialize(_cfg(pipeline, plain), progress=False)
    assert "weights" not in json.loads((plain / "dataset.json").read_text())
    assert all("weight" not in s["meta"] for s in _samples(plain))  # unweighted: as before

    # The same selection with a weight per row (as select --weights writes it).
    table = pq.read_table(pipeline["sel"] / "selection.parquet")
    weight = (np.arange(table.num_rows) % 5 / 4).astype(np.float32)
    at = table.column_names.index("repeat") + 1
    (tmp_path / "sel").mkdir()
    weighted = table.add_column(at, "weight", pa.array(weight))
    pq.write_table(weighted, tmp_path / "sel" / "selection.parquet")
    out = tmp_path / "out"
    run_materialize(_cfg(pipeline, out, selection=str(tmp_path / "sel")), progress=False)
    rows = table.to_pylist()
    by_row = {
        (r["shard"], r["key"], r["class"]): float(w) for r, w in zip(rows, weight, strict=True)
    }
    got = _samples(out)
    assert len(got) == 300
    for s in got:
        m = s["meta"]
        assert m["weight"] == by_row[m["source_shard"], m["source_key"], m["class"]]
    info = json.loads((out / "dataset.json").read_text())
    repeat = table.column("repeat").to_numpy()
    assert info["weights"]["member"] == "json" and info["weights"]["max"] == 1.0
    assert info["weights"]["mean"] == pytest.approx(np.average(weight, weights=repeat))
    # What the reader yields, and what it skips.
    ds = ShardImageDataset(expand_shards(str(out)), lambda x: x, 1, num_classes=4, weights=True)
    assert sorted(float(t["weight"]) for _, t in ds) == sorted(s["meta"]["weight"] for s in got)
    bare = ShardImageDataset(expand_shards(str(plain)), lambda x: x, 1, num_classes=4, weights=True)
    assert list(bare) == [] and bare.stats.reasons["bad soft label"] == 300


def test_weight_member_round_trip_and_bad_values() -> None:
    members = encode(1, [1, 0], [0.7, 0.3], 0.7, 0, "u.tar", "k", weight=0.25)
    assert decode_weight(members) == np.float32(0.25)
    assert "weight" not in json.loads(encode(1, [1], [1.0], 1.0, 0, "u.tar", "k")["json"])
    for soft, message in (
        ({}, "no weight"),
        ({"weight": "x"}, "not a number"),
        ({"weight": -1.0}, "finite number >= 0"),
        ({"weight": float("nan")}, "finite number >= 0"),
    ):
        with pytest.raises(SampleError, match=message):
            decode_weight({"json": json.dumps(soft).encode()})


def test_keys_stay_unique_for_awkward_names() -> None:
    keys = {
        sample_key("a", "b_c1", 2, 0, 1),
        sample_key("a", "b", 1, 0, 1),
        sample_key("a", "b_c1_r1", 2, 0, 1),
        sample_key("a", "b", 1, 0, 2),
        sample_key("a", "b_c1", 2, 0, 2),
        sample_key("a_b", "c", 1, 0, 1),
    }
    assert len(keys) == 6


@pytest.mark.slow  # a subprocess that imports torch
def test_cli_and_job_entrypoint(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    argv = [
        "--selection",
        str(pipeline["sel"]),
        "--out",
        str(tmp_path / "out"),
        "--samples-per-shard",
        "100",
        "--seed",
        "3",
        "--executor",
        "local",
    ]
    rows = pq.read_metadata(pipeline["sel"] / "selection.parquet").num_rows
    assert main(["-q", "materialize", *argv]) == 0
    line = f"materialized 300 samples ({rows} selected rows) from 3 source shards into 3 shards"
    out = capsys.readouterr().out
    assert line in out
    manifest = json.loads((tmp_path / "out" / "materialize.json").read_text())
    cfg = MaterializeConfig(selection=str(pipeline["sel"]), out=str(tmp_path / "out"))
    assert out == format_summary(cfg, {**manifest, "already_done": False}) + "\n"
    job = Path(__file__).parents[1] / "jobs" / "materialize.py"
    done = subprocess.run(
        [sys.executable, str(job), *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "already materialized 300 samples" in done.stdout
    assert main(["materialize", *argv[:4], "--seed", "4"]) == 2
    assert "another materialization" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_equals_local(pipeline: dict[str, Path], tmp_path: Path) -> None:
    run_materialize(_cfg(pipeline, tmp_path / "local"), progress=False)
    m = run_materialize(_cfg(pipeline, tmp_path / "ray", executor="ray"), progress=False)
    assert m["samples"] == 300
    assert _shard_bytes(tmp_path / "ray") == _shard_bytes(tmp_path / "local")
