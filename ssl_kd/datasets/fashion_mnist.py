"""``ssl-kd data fashion-mnist``: the built-in default, as labeled / unlabeled / test shards.

From the 60,000 training images, ``labeled_per_class`` per class become the labeled set D (with
``.cls``); all the others become the unlabeled set U, whose shards carry no label — their true
labels go to ``unlabeled_truth.parquet`` so pseudo-label precision can be measured. The 10,000
test images become the test set. The whole output is built in a temporary directory and renamed
into place, so ``OUT`` is either complete or absent. Deterministic for a seed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ssl_kd import config as cfglib
from ssl_kd import storage
from ssl_kd.config import option
from ssl_kd.datasets.idx import read_idx
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.shards import ShardWriter, array_samples, shard_name

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass(frozen=True)
class FashionMnistConfig:
    """``ssl-kd data fashion-mnist``."""

    out: str = option(help="output directory")
    labeled_per_class: int = option(100, help="labeled images per class", min=1)
    seed: int = option(0, help="seed of the labeled/unlabeled split and shard order")
    source: str | None = option(None, help=f"directory of the four idx files ({DEFAULT_SOURCE})")
    samples_per_shard: int = option(1000, help="samples per shard", min=1)
    image_format: Literal["png", "jpeg"] = option("png", help="image encoding in the shards")
    open_set: list[int] = option(
        [],
        help="an open-set pool: these classes (0-9) are left out of the task (no labeled or test "
        "image, not among the classes) but all their images stay in the unlabeled pool, with "
        "true label -1",
        min=0,
        max=9,
    )

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        if len(set(self.open_set)) != len(self.open_set):
            raise ConfigError("open_set", f"has repeats: {self.open_set}")
        if len(CLASSES) - len(self.open_set) < 2:
            raise ConfigError("open_set", "must leave at least 2 classes in the task")


def locate_source(source: str | None) -> dict[str, Path]:
    """Paths of the four idx files (``.gz`` or not); UserError naming what is missing."""
    root = Path(source or DEFAULT_SOURCE)
    found: dict[str, Path] = {}
    for role, name in FILES.items():
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                found[role] = candidate
                break
    if len(found) < len(FILES):
        names = ", ".join(f"{n}.gz" for n in FILES.values())
        raise UserError(
            f"Fashion-MNIST not found in {root}: install the Debian package {DEBIAN_PACKAGE} "
            f"(files in {DEFAULT_SOURCE}) or pass --source DIR holding {names}"
        )
    return found


def split_indices(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) index arrays: ``per_class`` random images per class, the rest."""
    rng = np.random.default_rng(seed)
    labeled: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise UserError(
                f"--labeled-per-class {per_class} exceeds the {len(idx)} images of class {c}"
            )
        labeled.append(rng.permutation(idx)[:per_class])
    lab = np.concatenate(labeled)
    unl = np.setdiff1d(np.arange(len(labels)), lab)
    return rng.permutation(lab), rng.permutation(unl)


def _write_split(
    root: Path,
    split: str,
    samples: Iterator[dict[str, Any]],
    cfg: FashionMnistConfig,
    total: int,
    progress: bool,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Write one split's shards; returns relative shard paths and (shard, key) per sample."""
    pattern = str(root / split / f"{split}-%06d.tar")
    placed: list[tuple[str, str]] = []
    with ShardWriter(pattern, cfg.samples_per_shard) as writer:
        bar = tqdm(samples, total=total, desc=split, unit="img", leave=False, disable=not progress)
        for sample in bar:
            # The sample lands in shard ``writer.index`` (the index moves on once it is full).
            placed.append((shard_name(pattern % writer.index), sample["__key__"]))
            writer.write(sample)
    return [str(Path(p).relative_to(root)) for p in writer.written], placed


def _existing_import(cfg: FashionMnistConfig) -> dict[str, Any] | None:
    """dataset.json of the same import already in ``out``; None when ``out`` is empty."""
    out = cfg.out
    info_path = storage.join(out, "dataset.json")
    if storage.is_file(info_path):
        info = json.loads(storage.read_text(info_path))
        if info.get("config") == cfglib.to_dict(cfg):
            log.info("%s already holds this import; nothing to do", out)
            return info
        raise UserError(f"{out} holds a different import; remove it or choose another --out")
    if storage.is_file(out) or storage.holds_files(out):
        raise UserError(f"{out} exists and is not empty; remove it or choose another --out")
    return None


@dataclass(frozen=True)
class _Source:
    """The four idx files, read, and the labeled / unlabeled split of the training images."""

    dir: Path
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labeled: np.ndarray
    unlabeled: np.ndarray


def _read_source(cfg: FashionMnistConfig) -> _Source:
    """Read and check the idx files and split them, before anything is written."""
    files = locate_source(cfg.source)
    train_x, train_y = read_idx(files["train_images"]), read_idx(files["train_labels"])
    test_x, test_y = read_idx(files["test_images"]), read_idx(files["test_labels"])
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise UserError(f"image and label files in {files['train_images'].parent} disagree in size")
    labeled, unlabeled = split_indices(train_y, cfg.labeled_per_class, cfg.seed)
    if cfg.open_set:  # the left-out classes' labeled picks go back to the pool
        out_of_task = np.isin(train_y[labeled], cfg.open_set)
        unlabeled = np.sort(np.concatenate([unlabeled, labeled[out_of_task]]))
        unlabeled = np.random.default_rng(cfg.seed + 1).permutation(unlabeled)
        labeled = labeled[~out_of_task]
        task = ~np.isin(test_y, cfg.open_set)
        test_x, test_y = test_x[task], test_y[task]
    parent = files["train_images"].parent
    return _Source(parent, train_x, train_y, test_x, test_y, labeled, unlabeled)


def task_labels(labels: np.ndarray, open_set: list[int]) -> tuple[np.ndarray, list[str]]:
    """Labels renumbered over the task's classes (-1: a left-out class) and the task's names."""
    task = [c for c in range(len(CLASSES)) if c not in open_set]
    remap = np.full(len(CLASSES), -1, np.int64)
    remap[task] = np.arange(len(task))
    return remap[labels], [CLASSES[c] for c in task]


def _build(tmp: Path, cfg: FashionMnistConfig, src: _Source, progress: bool) -> dict[str, Any]:
    """Write every file of the import into ``tmp``; returns the dataset.json content."""
    train_x, test_x = src.train_x, src.test_x
    train_y, classes = task_labels(src.train_y, cfg.open_set)
    test_y, _ = task_labels(src.test_y, cfg.open_set)
    labeled, unlabeled = src.labeled, src.unlabeled
    fmt = cfg.image_format
    train_keys = [f"train-{i:05d}" for i in range(len(train_x))]
    test_keys = [f"test-{i:05d}" for i in range(len(test_x))]
    splits = {
        "labeled": (array_samples(train_x, train_y, train_keys, fmt, labeled), len(labeled)),
        "unlabeled": (array_samples(train_x, None, train_keys, fmt, unlabeled), len(unlabeled)),
        "test": (array_samples(test_x, test_y, test_keys, fmt), len(test_x)),
    }
    shards: dict[str, list[str]] = {}
    placed: dict[str, list[tuple[str, str]]] = {}
    for split, (samples, total) in splits.items():
        shards[split], placed[split] = _write_split(tmp, split, samples, cfg, total, progress)
    unlabeled_placed = placed["unlabeled"]
    truth = pa.table(
        {
            "shard": pa.array([s for s, _ in unlabeled_placed]).dictionary_encode(),
            "key": pa.array([k for _, k in unlabeled_placed], pa.string()),
            "label": pa.array(train_y[unlabeled], pa.int16()),
        }
    )
    pq.write_table(truth, tmp / "unlabeled_truth.parquet", compression="zstd")
    info = {
        "name": "fashion-mnist",
        "classes": classes,
        "counts": {"labeled": len(labeled), "unlabeled": len(unlabeled), "test": len(test_x)},
        "labeled_per_class": {c: int((train_y[labeled] == i).sum()) for i, c in enumerate(classes)},
        "shards": shards,
        "seed": cfg.seed,
        "image": {"format": fmt, "channels": 1, "size": int(train_x.shape[1])},
        "source": str(src.dir),
        "config": cfglib.to_dict(cfg),
    }
    if cfg.open_set:
        info["open_set"] = {
            "classes": [CLASSES[c] for c in cfg.open_set],
            "unlabeled": int((train_y[unlabeled] < 0).sum()),  # images of no task class
        }
    (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    cfglib.save(cfg, tmp / "config.yaml")
    return info


def import_fashion_mnist(cfg: FashionMnistConfig, progress: bool = True) -> dict[str, Any]:
    """Write the shards, truth file and ``dataset.json``; returns the dataset.json content."""
    existing = _existing_import(cfg)
    if existing is not None:
        return existing
    src = _read_source(cfg)
    out = cfg.out
    remote = storage.is_remote(out)
    if remote:  # built here, then uploaded with dataset.json last (it marks the import done)
        tmp = Path(tempfile.mkdtemp(prefix="ssl_kd-import-"))
    else:  # built beside ``out``, then renamed into place
        tmp = Path(out).parent / f".{Path(out).name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        info = _build(tmp, cfg, src, progress)
        if remote:
            storage.upload_tree(tmp, out, last=("dataset.json",))
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if os.path.exists(out):
                os.rmdir(out)  # empty, checked above
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def format_summary(cfg: FashionMnistConfig, info: dict[str, Any]) -> str:
    """The line ``ssl-kd data fashion-mnist`` prints: images per split and the shard count."""
    counts = info["counts"]
    return (
        f"Fashion-MNIST in {cfg.out}: {counts['labeled']} labeled, {counts['unlabeled']} "
        f"unlabeled, {counts['test']} test images "
        f"({sum(len(v) for v in info['shards'].values())} shards)"
    )
