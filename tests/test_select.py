"""Selector: exact per-class top-K (ties by shard, key), P semantics, upsampling, errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ssl_kd.cli import main
from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelMeta, build_table, write_labels
from ssl_kd.select.report import format_report, format_summary
from ssl_kd.select.run import SelectConfig, run_select
from ssl_kd.select.topk import SCORE_BINS, SELECTORS, HeapSelector, MergeSelector, TopK, otsu_floor

C, K_STORED = 6, 4
META = LabelMeta(
    num_classes=C,
    classes=[f"c{i}" for i in range(C)],
    k=K_STORED,
    temperature=1.0,
    teacher_arch="cnn",
    teacher_sha256="0" * 64,
    preprocess={},
)


def _write_labels(root: Path, files: int, rows: int, seed: int = 0, levels: int = 5) -> list:
    """Random labels with many ties (probabilities on a coarse grid); returns all rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    everything = []
    for f in range(files):
        shard = f"u-{f:03d}.tar"
        keys = [f"k{rng.integers(0, 10**6):07d}-{i}" for i in range(rows)]
        classes = np.stack([rng.permutation(C)[:K_STORED] for _ in range(rows)])
        probs = np.sort(rng.integers(1, levels + 1, (rows, K_STORED)) / levels, axis=1)[:, ::-1]
        write_labels(build_table(META, shard, keys, classes, probs), root / f"u-{f:03d}.parquet")
        for key, cl, pr in zip(keys, classes, probs.astype(np.float16), strict=True):
            everything.append((shard, key, cl, pr))
    return everything


def _brute_force(rows: list, k: int, p: int, min_score: float | None = None) -> dict:
    per_class: dict[int, list] = {c: [] for c in range(C)}
    for shard, key, cl, pr in rows:
        for j in range(p):
            if min_score is None or pr[j] >= min_score:
                per_class[int(cl[j])].append((-float(pr[j]), shard, key))
    return {c: [(s, k_) for _, s, k_ in sorted(v)[:k]] for c, v in per_class.items()}


def _selected(out: Path) -> dict:
    t = pq.read_table(out / "selection.parquet").to_pylist()
    got: dict[int, list] = {c: [] for c in range(C)}
    for r in sorted(t, key=lambda r: (r["class"], r["rank"])):
        got[r["class"]].append((r["shard"], r["key"]))
    return got


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize(("k", "p"), [(5, 1), (12, 2), (40, 4), (500, 3)])
def test_exact_against_brute_force_with_ties(tmp_path: Path, k: int, p: int, method: str) -> None:
    rows = _write_labels(tmp_path / "labels", files=4, rows=60)
    cfg = SelectConfig(
        labels=str(tmp_path / "labels"),
        out=str(tmp_path / "sel"),
        per_class=k,
        top_p=p,
        executor="local",
        kselect=method,
    )
    report = run_select(cfg)
    assert _selected(tmp_path / "sel") == _brute_force(rows, k, p)
    expected_candidates = [
        sum(1 for *_, cl, _ in rows for j in range(p) if cl[j] == c) for c in range(C)
    ]
    assert [r["candidates"] for r in report["per_class"]] == expected_candidates
    if k == 500:  # K > candidates: every class short, all candidates kept
        assert report["short_classes"] == list(range(C))
    assert "c0" in format_report(report)


def test_min_score_and_upsample(tmp_path: Path) -> None:
    rows = _write_labels(tmp_path / "labels", files=2, rows=30)
    cfg = SelectConfig(
        labels=str(tmp_path / "labels"),
        out=str(tmp_path / "sel"),
        per_class=50,
        top_p=2,
        min_score=0.6,
        upsample=True,
        executor="local",
    )
    report = run_select(cfg)
    assert _selected(tmp_path / "sel") == _brute_force(rows, 50, 2, min_score=0.6)
    t = pq.read_table(tmp_path / "sel" / "selection.parquet").to_pylist()
    for c in range(C):
        mine = [r for r in t if r["class"] == c]
        if mine:
            assert sum(r["repeat"] for r in mine) == 50
            assert max(r["repeat"] for r in mine) - min(r["repeat"] for r in mine) <= 1
    assert report["with_repeats"] == sum(r["repeat"] for r in t)
    assert all(r["score"] >= 0.6 - 1e-3 for r in t)
    saved = json.loads((tmp_path / "sel" / "report.json").read_text())
    assert saved["per_class"] == report["per_class"]


def _core_brute_force(cls_ids, score, image, c: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    best = TopK.empty(c, k)
    for cl in range(c):
        mine = np.flatnonzero(cls_ids == cl)
        order = mine[np.lexsort((image[mine], -score[mine]))][:k]
        best.score[cl, : len(order)] = score[order]
        best.image[cl, : len(order)] = image[order]
    return best.score, best.image


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize("seed", range(6))
def test_selectors_match_brute_force(method: str, seed: int) -> None:
    """Many ties, skewed classes (long class-major blocks), K above and below class sizes."""
    rng = np.random.default_rng(seed)
    c, k, n = int(rng.integers(1, 12)), int(rng.integers(1, 40)), int(rng.integers(0, 3000))
    cls_ids = rng.integers(0, c, n)
    cls_ids[: n // 3] = 0
    score = (rng.integers(0, 6, n) / 5).astype(np.float32)
    image = np.sort(rng.choice(10**9, n, replace=False)).astype(np.int64)
    image[:1] = 0  # the first image of the first file
    cls_ids, score = cls_ids[rng.permutation(n)], score[rng.permutation(n)]
    selector = SELECTORS[method](c, k)
    for chunk in np.array_split(np.arange(n), int(rng.integers(1, 7))):
        selector.add(cls_ids[chunk], score[chunk], image[chunk])
    got = selector.result()
    want_score, want_image = _core_brute_force(cls_ids, score, image, c, k)
    assert np.array_equal(got.score, want_score) and np.array_equal(got.image, want_image)
    assert np.array_equal(got.candidates, np.bincount(cls_ids, minlength=c))


def test_merging_partials_is_order_independent() -> None:
    rng = np.random.default_rng(3)
    n = 400
    cls_ids = rng.integers(0, 5, n)
    score = rng.integers(0, 4, n).astype(np.float32)
    image = rng.permutation(n).astype(np.int64)
    whole = MergeSelector.create(5, 7)
    whole.add(cls_ids, score, image)
    merged = TopK.empty(5, 7)
    for chunk in np.array_split(rng.permutation(n), 9):
        part = HeapSelector(5, 7)
        chunk = chunk[np.argsort(image[chunk])]
        part.add(cls_ids[chunk], score[chunk], image[chunk])
        merged.merge(part.result())
    best = whole.result()
    assert np.array_equal(best.image, merged.image) and np.array_equal(best.score, merged.score)
    assert np.array_equal(best.candidates, merged.candidates)


def test_heap_selector_needs_ascending_ids() -> None:
    selector = HeapSelector(2, 2)
    selector.add(np.array([0, 1]), np.array([0.5, 0.5]), np.array([3, 4]))
    with pytest.raises(ValueError, match="ascending"):
        selector.add(np.array([0]), np.array([0.9]), np.array([2]))


def test_errors(tmp_path: Path) -> None:
    _write_labels(tmp_path / "labels", files=1, rows=5)
    base = SelectConfig(
        labels=str(tmp_path / "labels"),
        out=str(tmp_path / "sel"),
        per_class=3,
        top_p=2,
        executor="local",
    )
    with pytest.raises(UserError, match="--top-p 5 exceeds the 4"):
        run_select(replace(base, top_p=5))
    with pytest.raises(UserError, match="no label files"):
        run_select(replace(base, labels=str(tmp_path)))
    other = replace(META, teacher_sha256="1" * 64)
    write_labels(
        build_table(other, "x.tar", ["a"], np.zeros((1, 4)), np.ones((1, 4))),
        tmp_path / "labels" / "x.parquet",
    )
    with pytest.raises(UserError, match="different labelings"):
        run_select(base)
    assert not (tmp_path / "sel").exists()


def test_cli_prints_the_stage_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_labels(tmp_path / "labels", files=2, rows=20)
    cfg = SelectConfig(
        labels=str(tmp_path / "labels"),
        out=str(tmp_path / "sel"),
        per_class=5,
        top_p=2,
        executor="local",
    )
    argv = [
        "select",
        "--labels",
        cfg.labels,
        "--out",
        cfg.out,
        "--per-class",
        "5",
        "--top-p",
        "2",
        "--executor",
        "local",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "sel" / "report.json").read_text())
    summary = format_summary(cfg, report)
    assert capsys.readouterr().out == summary + "\n"
    assert summary.startswith(format_report(report) + "\nselected 30 images")


@pytest.mark.slow
def test_ray_equals_local(tmp_path: Path) -> None:
    _write_labels(tmp_path / "labels", files=5, rows=50, seed=4)
    base = SelectConfig(
        labels=str(tmp_path / "labels"),
        out=str(tmp_path / "a"),
        per_class=20,
        top_p=3,
        executor="local",
    )
    run_select(base)
    run_select(replace(base, out=str(tmp_path / "b"), executor="ray"))
    a = pq.read_table(tmp_path / "a" / "selection.parquet")
    b = pq.read_table(tmp_path / "b" / "selection.parquet")
    assert a.equals(b)


@pytest.mark.slow  # a subprocess that imports torch
def test_select_job_entrypoint(tmp_path: Path) -> None:
    import subprocess
    import sys

    _write_labels(tmp_path / "labels", files=2, rows=20)
    job = Path(__file__).parents[1] / "jobs" / "select.py"
    done = subprocess.run(
        [
            sys.executable,
            str(job),
            "--labels",
            str(tmp_path / "labels"),
            "--out",
            str(tmp_path / "sel"),
            "--per-class",
            "5",
            "--top-p",
            "2",
            "--executor",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "selected 30 images" in done.stdout


EMB_META = replace(META, embedding_dim=32)


def _labels_with_embeddings(
    root: Path, emb: np.ndarray, scores: np.ndarray, meta=EMB_META, name: str = "u"
) -> list[tuple[str, str]]:
    """One file, one row per embedding; top-1 class = row % C with the given score."""
    n = len(emb)
    root.mkdir(parents=True, exist_ok=True)
    classes = np.stack([(np.arange(K_STORED) + i) % C for i in range(n)])
    probs = np.column_stack([scores] + [np.full(n, 0.01)] * (K_STORED - 1))
    keys = [f"{name}{i:03d}" for i in range(n)]
    table = build_table(meta, f"{name}.tar", keys, classes, probs, emb)
    write_labels(table, root / f"{name}.parquet")
    return [(f"{name}.tar", k) for k in keys]


def test_planted_duplicates_and_leaks_are_removed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 32)).astype(np.float32)
    dup_of = {30: 3, 31: 4, 32: 5}  # rows 30-32 copy rows 3-5 (plus a little noise)
    emb = base.copy()
    for i, j in dup_of.items():
        emb[i] = base[j] + 0.01 * rng.standard_normal(32)
    scores = np.linspace(0.5, 0.9, 40)  # later rows score higher: 30-32 beat 3-5
    keys = _labels_with_embeddings(tmp_path / "labels", emb, scores)
    leak_rows = [10, 11]
    _labels_with_embeddings(tmp_path / "eval", base[leak_rows] + 0.01, np.full(2, 0.9), name="test")
    cfg = SelectConfig(
        labels=str(tmp_path / "labels"),
        out=str(tmp_path / "sel"),
        per_class=100,
        top_p=1,
        dedup=0.95,
        decontaminate=str(tmp_path / "eval"),
        executor="local",
    )
    report = run_select(cfg)
    got = {k for c in _selected(tmp_path / "sel").values() for _, k in c}
    removed = {keys[i][1] for i in [3, 4, 5, *leak_rows]}
    assert got == {k for _, k in keys} - removed
    assert report["duplicates_removed"] == 3 and report["leaked_removed"] == 2
    per_class = {p["class"]: p for p in report["per_class"]}
    assert sum(p["duplicates_removed"] for p in per_class.values()) == 3
    assert per_class[3 % C]["duplicates_removed"] >= 1

    dedup_only = replace(cfg, out=str(tmp_path / "sel2"), decontaminate=None, dedup=1.0)
    assert run_select(dedup_only)["duplicates_removed"] == 0  # noisy copies sit below 1.0


def test_dedup_needs_embeddings_and_the_same_teacher(tmp_path: Path) -> None:
    _write_labels(tmp_path / "plain", files=1, rows=5)
    base = SelectConfig(
        labels=str(tmp_path / "plain"),
        out=str(tmp_path / "sel"),
        per_class=3,
        top_p=1,
        executor="local",
    )
    with pytest.raises(UserError, match="--embeddings"):
        run_select(replace(base, dedup=0.9))
    emb = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    _labels_with_embeddings(tmp_path / "labels", emb, np.full(5, 0.5))
    other = replace(EMB_META, teacher_sha256="2" * 64)
    _labels_with_embeddings(tmp_path / "eval", emb, np.full(5, 0.5), meta=other)
    with pytest.raises(UserError, match="same teacher"):
        run_select(
            replace(base, labels=str(tmp_path / "labels"), decontaminate=str(tmp_path / "eval"))
        )
    assert not (tmp_path / "sel").exists()


def test_otsu_floor_splits_a_bimodal_histogram() -> None:
    hist = np.zeros(SCORE_BINS, np.int64)
    hist[50:60] = 10  # a low mode near 0.21
    hist[230:240] = 30  # a high mode near 0.92
    assert 60 / SCORE_BINS <= otsu_floor(hist) <= 230 / SCORE_BINS
    assert otsu_floor(np.zeros(SCORE_BINS, np.int64)) == 0.0
    single = np.zeros(SCORE_BINS, np.int64)
    single[100] = 5
    assert otsu_floor(single) == 0.0


def test_score_floor_drops_an_open_set_pools_unsure_images(tmp_path: Path) -> None:
    """Images of the task's classes with confident top-1s, and images of no task class whose
    top-1 is unsure: the per-class floor keeps the first and drops the second."""
    rng = np.random.default_rng(1)
    n_in, n_out = 300, 150
    top1 = np.concatenate([rng.uniform(0.8, 0.99, n_in), rng.uniform(0.25, 0.45, n_out)])
    classes = np.stack([rng.permutation(C)[:K_STORED] for _ in range(n_in + n_out)])
    probs = np.column_stack([top1] + [(1 - top1) / (K_STORED - 1)] * (K_STORED - 1))
    keys = [f"in-{i:04d}" for i in range(n_in)] + [f"out-{i:04d}" for i in range(n_out)]
    (tmp_path / "l").mkdir()
    write_labels(build_table(META, "u-000.tar", keys, classes, probs), tmp_path / "l/u-000.parquet")
    cfg = SelectConfig(
        labels=str(tmp_path / "l"),
        out=str(tmp_path / "all"),
        per_class=1000,
        top_p=1,
        executor="local",
    )
    assert run_select(cfg)["selected"] == n_in + n_out
    report = run_select(replace(cfg, out=str(tmp_path / "floor"), score_floor="otsu"))
    kept = pq.read_table(tmp_path / "floor/selection.parquet")["key"].to_pylist()
    assert sorted(kept) == sorted(keys[:n_in])
    assert report["below_floor_removed"] == n_out
    floors = [p["score_floor"] for p in report["per_class"]]
    assert all(0.45 <= f <= 0.8 for f in floors), floors
