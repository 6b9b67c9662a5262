"""``ssl-kd data fashion-mnist``: split sizes, no labels in unlabeled shards, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ssl_kd.config import from_dict
from ssl_kd.datasets.fashion_mnist import (
    CLASSES,
    DEFAULT_SOURCE,
    FashionMnistConfig,
    import_fashion_mnist,
    split_indices,
)
from ssl_kd.datasets.idx import read_idx
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.shards import ReadStats, expand_shards, iter_samples


def _import(src: Path, out: Path, seed: int = 0, per_class: int = 3) -> dict:
    cfg = FashionMnistConfig(
        out=str(out), labeled_per_class=per_class, seed=seed, source=str(src), samples_per_shard=25
    )
    return import_fashion_mnist(cfg)


def _samples(spec: Path) -> list[dict]:
    return list(iter_samples(expand_shards(str(spec)), ReadStats()))


def test_split_sizes_and_contents(fake_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    info = _import(fake_fmnist, out)
    assert info["counts"] == {"labeled": 30, "unlabeled": 90, "test": 30}
    assert set(info["labeled_per_class"].values()) == {3}
    labeled, unlabeled, test = (_samples(out / s) for s in ("labeled", "unlabeled", "test"))
    assert (len(labeled), len(unlabeled), len(test)) == (30, 90, 30)
    assert all("cls" in s for s in labeled + test)
    assert not any(set(s) - {"__key__", "__url__", "png"} for s in unlabeled)
    train_keys = {s["__key__"] for s in labeled} | {s["__key__"] for s in unlabeled}
    assert len(train_keys) == 120  # a partition of the training set

    truth = pq.read_table(out / "unlabeled_truth.parquet").to_pylist()
    labels = read_idx(fake_fmnist / "train-labels-idx1-ubyte.gz")
    assert len(truth) == 90
    shard_of = {s["__key__"]: Path(s["__url__"]).name for s in unlabeled}
    for row in truth:
        assert row["shard"] == shard_of[row["key"]]
        assert row["label"] == labels[int(row["key"].split("-")[1])]
    written = json.loads((out / "dataset.json").read_text())
    assert written["shards"]["unlabeled"] == [f"unlabeled/unlabeled-00000{i}.tar" for i in range(4)]
    assert (out / "config.yaml").is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def test_same_seed_same_bytes_other_seed_other_split(fake_fmnist: Path, tmp_path: Path) -> None:
    _import(fake_fmnist, tmp_path / "a", seed=7)
    _import(fake_fmnist, tmp_path / "b", seed=7)
    _import(fake_fmnist, tmp_path / "c", seed=8)
    for split in ("labeled", "unlabeled", "test"):
        for pa, pb in zip(
            sorted((tmp_path / "a" / split).iterdir()),
            sorted((tmp_path / "b" / split).iterdir()),
            strict=True,
        ):
            assert pa.read_bytes() == pb.read_bytes()
    keys_a = [s["__key__"] for s in _samples(tmp_path / "a" / "labeled")]
    keys_c = [s["__key__"] for s in _samples(tmp_path / "c" / "labeled")]
    assert sorted(keys_a) != sorted(keys_c)


def test_rerun_is_a_no_op_and_a_different_import_is_refused(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    _import(fake_fmnist, out)
    mtime = (out / "dataset.json").stat().st_mtime_ns
    _import(fake_fmnist, out)
    assert (out / "dataset.json").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="different import"):
        _import(fake_fmnist, out, seed=1)


def test_missing_source_names_package_and_files(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        _import(tmp_path / "nowhere", tmp_path / "out")
    message = str(info.value)
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "--source"):
        assert name in message
    assert not (tmp_path / "out").exists()


def test_too_many_labels_per_class(fake_fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="exceeds"):
        _import(fake_fmnist, tmp_path / "out", per_class=13)
    assert not (tmp_path / "out").exists()


def test_split_indices_balanced() -> None:
    labels = np.repeat(np.arange(4), 10)
    lab, unl = split_indices(labels, 2, seed=0)
    assert np.bincount(labels[lab]).tolist() == [2, 2, 2, 2]
    assert sorted(np.concatenate([lab, unl]).tolist()) == list(range(40))


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not Path(DEFAULT_SOURCE).is_dir(), reason="dataset-fashion-mnist missing")
def test_real_fashion_mnist_import(tmp_path: Path) -> None:
    info = import_fashion_mnist(
        FashionMnistConfig(out=str(tmp_path / "fm"), labeled_per_class=100, seed=0)
    )
    assert info["counts"] == {"labeled": 1000, "unlabeled": 59000, "test": 10000}
    assert set(info["labeled_per_class"].values()) == {100}
    assert len(info["shards"]["unlabeled"]) == 59
    assert pq.read_metadata(tmp_path / "fm" / "unlabeled_truth.parquet").num_rows == 59000


def test_open_set_pool_keeps_the_left_out_classes_unlabeled(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "open"
    cfg = FashionMnistConfig(
        out=str(out),
        labeled_per_class=3,
        source=str(fake_fmnist),
        samples_per_shard=25,
        open_set=[1, 8],
    )
    info = import_fashion_mnist(cfg)
    task = [c for c in range(10) if c not in (1, 8)]
    assert info["classes"] == [CLASSES[c] for c in task]
    assert info["open_set"] == {"classes": ["Trouser", "Bag"], "unlabeled": 24}
    # 8 task classes x 3 labeled; the pool keeps every other training image, 24 of no class.
    assert info["counts"] == {"labeled": 24, "unlabeled": 96, "test": 24}
    labels = read_idx(fake_fmnist / "train-labels-idx1-ubyte.gz")
    renumber = {c: i for i, c in enumerate(task)}
    for s in _samples(out / "labeled"):
        original = labels[int(s["__key__"].split("-")[1])]
        assert int(s["cls"]) == renumber[original]
    test = _samples(out / "test")
    assert all(0 <= int(s["cls"]) < 8 for s in test) and len(test) == 24
    truth = pq.read_table(out / "unlabeled_truth.parquet").to_pylist()
    for row in truth:
        original = labels[int(row["key"].split("-")[1])]
        assert row["label"] == renumber.get(int(original), -1)
    with pytest.raises(ConfigError, match="repeats"):
        from_dict(FashionMnistConfig, {"out": "x", "open_set": [1, 1]})
    with pytest.raises(ConfigError, match="at least 2 classes"):
        from_dict(FashionMnistConfig, {"out": "x", "open_set": list(range(9))})
