"""Labels checked by their neighbours: label propagation, the neighbour vote and the distance to
a class by hand and on planted data; ``ssl-kd select --rank-by/--weights/--far-floor`` on tiny
label files; the weights through ``materialize`` to the reader; bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ssl_kd import config as cfglib
from ssl_kd.cli import main
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.label.files import LabelMeta, build_table, write_labels
from ssl_kd.materialize.run import MaterializeConfig, run_materialize
from ssl_kd.select import propagate as lp
from ssl_kd.select.run import SelectConfig, run_select
from ssl_kd.shards import array_samples, expand_shards, write_shards
from ssl_kd.shards.dataset import ShardImageDataset

C, K_STORED, DIM = 4, 3, 16


def _blobs(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float) -> np.ndarray:
    return np.repeat(centres, n, axis=0) + noise * rng.standard_normal((len(centres) * n, DIM))


# --- the pure core ---


def test_propagation_recovers_two_blobs_and_doubts_the_middle() -> None:
    rng = np.random.default_rng(0)
    a, b = np.eye(DIM)[:1], np.eye(DIM)[1:2]
    labeled = np.concatenate([_blobs(rng, a, 3, 0.05), _blobs(rng, b, 3, 0.05)])
    labeled_cls = np.array([0, 0, 0, 1, 1, 1])
    middle = _blobs(rng, (a + b) / 2, 4, 0.01)  # halfway: as near to one blob as to the other
    pool = np.concatenate([_blobs(rng, a, 40, 0.05), _blobs(rng, b, 40, 0.05), middle])
    result = lp.propagate(labeled, labeled_cls, pool, 2, k=10)
    assert result.probs.shape == (84, 2) and np.allclose(result.probs.sum(axis=1), 1)
    assert np.array_equal(result.classes[:80], np.repeat([0, 1], 40))
    assert result.certainty.max() == 1 and result.certainty[:80].min() > 0.5
    assert result.certainty[80:].max() < 0.1
    assert np.all(np.abs(result.probs[80:, 0] - 0.5) < 0.1)


def _dense_propagation(x: np.ndarray, labeled_cls: np.ndarray, c: int, k: int) -> np.ndarray:
    """The propagated distributions of the unlabeled rows of ``x`` (the first rows are the
    labeled ones), the graph built and the system solved densely, straight from the paper."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    sims = x @ x.T
    a = np.zeros((n, n))
    for i in range(n):
        others = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:k]
        a[i, others] = np.maximum(sims[i, others], 0) ** 3
    w = a + a.T
    d = w.sum(axis=1)
    wn = w / np.sqrt(np.outer(d, d))
    y = np.zeros((n, c))
    counts = np.bincount(labeled_cls, minlength=c)
    y[np.arange(len(labeled_cls)), labeled_cls] = 1 / counts[labeled_cls]
    z = np.maximum(np.linalg.solve(np.eye(n) - 0.99 * wn, y), 0)[len(labeled_cls) :]
    return z / z.sum(axis=1, keepdims=True)


def test_graph_and_conjugate_gradient_match_a_dense_solve() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 5)) + np.array([2.0, 0, 0, 0, 0])  # mostly positive cosines
    graph = lp.knn_graph(x, 4)
    dense = graph.dense()
    assert np.allclose(dense, dense.T) and np.all(np.diag(dense) == 0)
    # Every row links to its 4 nearest others at least (more where others chose it).
    assert np.all((dense > 0).sum(axis=1) >= 4)
    b = rng.standard_normal((30, 3))
    system = np.eye(30) - 0.99 * dense
    solved = lp.conjugate_gradient(lambda v: v - 0.99 * graph.matmul(v), b, 300, 1e-12)
    assert np.allclose(solved, np.linalg.solve(system, b), atol=1e-8)
    assert np.allclose(graph.matmul(b), dense @ b)

    labeled_cls = np.array([0, 1, 2, 0, 1, 2])
    got = lp.propagate(x[:6], labeled_cls, x[6:], 3, k=4, max_iter=300)
    assert np.allclose(got.probs, _dense_propagation(x, labeled_cls, 3, 4), atol=1e-5)


def test_certainty_and_balance_weights() -> None:
    probs = np.array([[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0]])
    assert np.allclose(lp.certainty(probs), [1, 0, 1 - math.log(2) / math.log(3)], atol=1e-6)
    assert np.array_equal(lp.certainty(np.ones((2, 1))), [1, 1])
    # ζ_c = (N / C) / N_c: 4 images, 3 classes, one class empty.
    zeta = lp.balance_weights(np.array([0, 0, 0, 1]), 3)
    assert np.allclose(zeta, [4 / 3 / 3, 4 / 3, 0])
    rng = np.random.default_rng(2)
    a, b = np.eye(DIM)[:1], np.eye(DIM)[1:2]
    labeled = np.concatenate([_blobs(rng, a, 2, 0.05), _blobs(rng, b, 2, 0.05)])
    pool = np.concatenate([_blobs(rng, a, 30, 0.05), _blobs(rng, b, 10, 0.05)])
    result = lp.propagate(labeled, [0, 0, 1, 1], pool, 2, k=5)
    assert np.allclose(result.balance, [40 / 2 / 30, 40 / 2 / 10])


def test_neighbour_vote_by_hand() -> None:
    labeled = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    query = np.array([[0.6, 0.8]])
    # cosines: 0.6 (class 0), 0.96 (class 1), 0.8 (class 0); the two nearest: 0.96 and 0.8
    votes = lp.neighbour_vote(labeled, [0, 1, 0], query, 2, k=2)
    w1, w0 = 0.96**3, 0.8**3
    assert np.allclose(votes, [[w0 / (w0 + w1), w1 / (w0 + w1)]], atol=1e-6)
    everyone = lp.neighbour_vote(labeled, [0, 1, 0], query, 2, k=50)  # k above the labeled
    w_all = 0.6**3 + w0
    assert np.allclose(everyone, [[w_all / (w_all + w1), w1 / (w_all + w1)]], atol=1e-6)


def test_far_floor_drops_planted_strangers() -> None:
    rng = np.random.default_rng(3)
    centres = np.eye(DIM)[:2]
    labeled = _blobs(rng, centres, 6, 0.2)
    labeled_cls = np.repeat([0, 1], 6)
    members = _blobs(rng, centres, 50, 0.2)
    strangers = _blobs(rng, np.eye(DIM)[5:7], 5, 0.2)  # of no class, given one anyway
    pool = np.concatenate([members, strangers])
    pool_cls = np.concatenate([np.repeat([0, 1], 50), np.tile([0, 1], 5)])
    floors = lp.class_floors(labeled, labeled_cls, 2, 0.05)
    sims = lp.class_similarity(pool, pool_cls, labeled, labeled_cls, 2)
    kept = sims >= floors[pool_cls]
    assert not kept[100:].any()
    assert kept[:100].mean() >= 0.85  # about the quantile: the labeled are only 6 a class


def test_edge_cases_give_no_nans() -> None:
    rng = np.random.default_rng(4)
    labeled = _blobs(rng, np.eye(DIM)[:2], 2, 0.05)
    pool = np.concatenate(
        [
            _blobs(rng, np.eye(DIM)[:2], 3, 0.05),
            np.zeros((1, DIM)),  # a zero embedding: no similarity to anything
            -np.eye(DIM)[:1],  # opposite to a class: zero-weight edges to it
        ]
    )
    # Class 2 has no labeled image; k is larger than the number of points.
    result = lp.propagate(labeled, [0, 0, 1, 1], pool, 3, k=100)
    for array in (result.probs, result.certainty, result.balance):
        assert np.all(np.isfinite(array))
    assert np.allclose(result.probs[:6, 2], 0)  # no labeled image of class 2: no mass
    assert np.allclose(result.probs[6], 1 / 3) and result.certainty[6] == 0  # unreached
    assert np.array_equal(result.classes[:6], [0, 0, 0, 1, 1, 1])
    votes = lp.neighbour_vote(labeled, [0, 0, 1, 1], pool, 3, k=3)
    assert np.all(np.isfinite(votes)) and np.allclose(votes[6], 1 / 3)
    sims = lp.class_similarity(pool, [0, 2, 0, 1, 1, 0, 0, 1], labeled, [0, 0, 1, 1], 3)
    assert sims[1] == -np.inf and np.all(np.isfinite(np.delete(sims, 1)))
    floors = lp.class_floors(labeled[:3], [0, 0, 1], 3, 0.5)  # class 1: one image; 2: none
    assert np.isfinite(floors[0]) and floors[1] == floors[2] == -np.inf
    empty = lp.propagate(labeled, [0, 0, 1, 1], np.zeros((0, DIM)), 3)
    assert empty.probs.shape == (0, 3) and empty.classes.shape == (0,)
    alone = lp.knn_graph(np.ones((1, DIM)))
    assert alone.n == 1 and len(alone.data) == 0
    assert np.array_equal(alone.matmul(np.ones((1, 2))), np.zeros((1, 2)))


# --- ssl-kd select ---

META = LabelMeta(
    num_classes=C,
    classes=[f"c{i}" for i in range(C)],
    k=K_STORED,
    temperature=1.0,
    teacher_arch="cnn",
    teacher_sha256="0" * 64,
    preprocess={},
    embedding_dim=DIM,
)
MEMBERS = (20, 20, 20, 12)  # pool images of each class (the last class smaller)
WRONG = 5  # of each class's members, labeled by the teacher as the next class
STRANGERS = 3  # per class: images of no class that the teacher gives that class


def _write_set(
    root: Path, name: str, emb: np.ndarray, top1: np.ndarray, prob: np.ndarray, meta: LabelMeta
) -> list[str]:
    """Shards of tiny images (``.cls`` = top-1) and their label file; returns the keys."""
    keys = [f"{name}-{i:04d}" for i in range(len(emb))]
    shards = root / f"{name}_shards"
    shards.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 255, (len(emb), 4, 4), dtype=np.uint8)
    write_shards(array_samples(images, top1, keys), str(shards / f"{name}-%06d.tar"), 10_000)
    classes = np.stack([(top1 + j) % C for j in range(K_STORED)], axis=1)
    probs = np.column_stack([prob] + [(1 - prob) / (K_STORED - 1)] * (K_STORED - 1))
    table = build_table(
        meta.with_shard_spec(str(shards)), f"{name}-000000.tar", keys, classes, probs, emb
    )
    (root / f"{name}_labels").mkdir()
    write_labels(table, root / f"{name}_labels" / f"{name}-000000.parquet")
    return keys


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """Labeled images (4 per class) near their class's direction; a pool of members (some
    labeled by the teacher as the next class, confidently), and strangers of no class."""
    rng = np.random.default_rng(5)
    centres = np.eye(DIM)[:C]
    labeled = _blobs(rng, centres, 4, 0.15)
    _write_set(tmp_path, "lab", labeled, np.repeat(np.arange(C), 4), np.full(4 * C, 0.9), META)
    emb, top1, prob, truth = [], [], [], []
    for c, n in enumerate(MEMBERS):
        emb.append(_blobs(rng, centres[c : c + 1], n, 0.15))
        wrong = np.arange(n) < WRONG
        top1 += list(np.where(wrong, (c + 1) % C, c))
        prob += list(np.where(wrong, 0.9, rng.uniform(0.5, 0.8, n)))
        truth += [c] * n
    emb.append(_blobs(rng, np.eye(DIM)[8 : 8 + C], STRANGERS, 0.15))
    top1 += list(np.repeat(np.arange(C), STRANGERS))
    prob += [0.95] * (C * STRANGERS)
    truth += [-1] * (C * STRANGERS)
    keys = _write_set(tmp_path, "pool", np.concatenate(emb), np.array(top1), np.array(prob), META)
    base = SelectConfig(
        labels=str(tmp_path / "pool_labels"),
        out=str(tmp_path / "sel"),
        per_class=15,
        top_p=1,
        executor="local",
        labeled_labels=str(tmp_path / "lab_labels"),
    )
    return {"root": tmp_path, "cfg": base, "truth": dict(zip(keys, truth, strict=True))}


def _rows(out: str) -> list[dict]:
    return pq.read_table(Path(out) / "selection.parquet").to_pylist()


def _precision(rows: list[dict], truth: dict) -> float:
    return float(np.mean([truth[r["key"]] == r["class"] for r in rows]))


@pytest.mark.parametrize("rank_by", ["propagation", "vote"])
def test_rank_by_the_neighbours_keeps_each_class_its_own(world: dict, rank_by: str) -> None:
    cfg = replace(world["cfg"], per_class=7)  # as many as the smallest class has right
    run_select(replace(cfg, out=cfg.out + "-conf"))
    # The teacher's top scores are its mistakes and the strangers.
    assert _precision(_rows(cfg.out + "-conf"), world["truth"]) == 0.0
    # The default shortlist (2K by the teacher's score) holds too few of a class's own images.
    short = run_select(replace(cfg, out=cfg.out + "-short", rank_by=rank_by, neighbours=8))
    assert 0.5 < _precision(_rows(cfg.out + "-short"), world["truth"]) < 1.0
    assert short["neighbours"]["images_checked"] == 2 * 7 * C
    report = run_select(replace(cfg, rank_by=rank_by, neighbours=8, shortlist=30))
    rows = _rows(cfg.out)
    assert _precision(rows, world["truth"]) == 1.0
    assert [sum(r["class"] == c for r in rows) for c in range(C)] == [7] * C
    for c in range(C):  # ranked by the neighbours' probability, best first
        scores = [r["score"] for r in sorted(rows, key=lambda r: r["rank"]) if r["class"] == c]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.5
    assert "weight" not in pq.read_schema(Path(cfg.out) / "selection.parquet").names
    nb = report["neighbours"]
    assert nb["rank_by"] == nb["distribution"] == rank_by and nb["labeled_images"] == 4 * C
    assert nb["agreement"] == 1.0 and nb["images_checked"] == len(world["truth"])


def test_weights_and_far_floor(world: dict) -> None:
    truth = world["truth"]
    cfg = replace(world["cfg"], per_class=50, weights="certainty", neighbours=8)
    run_select(cfg)  # every candidate kept (K above them all)
    rows = _rows(cfg.out)
    assert len(rows) == len(truth)
    schema = pq.read_schema(Path(cfg.out) / "selection.parquet")
    assert str(schema.field("weight").type) == "float"
    assert all(0 <= r["weight"] <= 1 for r in rows)
    right = [r["weight"] for r in rows if truth[r["key"]] == r["class"]]
    wrong = [r["weight"] for r in rows if truth[r["key"]] >= 0 and truth[r["key"]] != r["class"]]
    assert min(right) > 0.5 and max(wrong) < 0.1 and len(wrong) == C * WRONG
    # Ranking by confidence keeps the teacher's score.
    assert max(r["score"] for r in rows) == pytest.approx(0.95, abs=1e-3)

    balanced = replace(cfg, out=cfg.out + "-bal", weights="certainty_balance")
    run_select(balanced)
    plain = {(r["key"], r["class"]): r["weight"] for r in rows}
    counts = np.bincount([r["class"] for r in rows], minlength=C)
    zeta = (len(rows) / C) / counts  # ζ_c = (N / C) / N_c, the last class the smallest
    for r in _rows(balanced.out):
        expected = plain[r["key"], r["class"]] * zeta[r["class"]]
        assert r["weight"] == pytest.approx(expected, rel=1e-5)

    # The far floor drops the strangers and the images of another class's cluster.
    floored = replace(cfg, out=cfg.out + "-far", far_floor=0.05)
    report = run_select(floored)
    kept = _rows(floored.out)
    assert _precision(kept, truth) == 1.0
    # Most of the classes' own images stay (the floor of 4 labeled images a class is rough).
    assert len(kept) >= 0.75 * (sum(MEMBERS) - C * WRONG)
    per_class = report["neighbours"]["per_class"]
    assert all(p["far_removed"] >= WRONG + STRANGERS for p in per_class)
    assert report["neighbours"]["far_removed"] == len(truth) - len(kept)
    assert all(0 < p["far_floor"] < 1 for p in per_class)


def test_weights_alone_change_no_row(world: dict) -> None:
    cfg = world["cfg"]
    run_select(replace(cfg, labeled_labels=None))
    plain = pq.read_table(Path(cfg.out) / "selection.parquet")
    assert plain.column_names == [
        *("key", "shard", "class", "score", "rank", "repeat", "topk_class", "topk_prob"),
        "embedding",
    ]
    run_select(replace(cfg, out=cfg.out + "-w", weights="certainty_balance"))
    weighted = pq.read_table(Path(cfg.out + "-w") / "selection.parquet")
    assert weighted.column_names.index("weight") == plain.column_names.index("repeat") + 1
    assert weighted.drop(["weight"]).equals(plain)


def test_weights_travel_to_the_reader(world: dict) -> None:
    cfg = replace(world["cfg"], per_class=20, weights="certainty", upsample=True)
    run_select(cfg)
    rows = _rows(cfg.out)
    out = world["root"] / "pseudo"
    mat = MaterializeConfig(selection=cfg.out, out=str(out), samples_per_shard=16)
    run_materialize(replace(mat, executor="local"), progress=False)
    info = json.loads((out / "dataset.json").read_text())
    repeat = np.array([r["repeat"] for r in rows])
    weight = np.array([r["weight"] for r in rows])
    assert info["weights"]["member"] == "json" and info["weights"]["key"] == "weight"
    assert info["weights"]["mean"] == pytest.approx(np.average(weight, weights=repeat), 1e-6)
    ds = ShardImageDataset(
        expand_shards(str(out)), lambda x: x, 1, num_classes=C, soft_k=K_STORED, weights=True
    )
    by_row = {(r["key"], r["class"]): r["weight"] for r in rows}
    items = list(ds)
    assert len(items) == repeat.sum() == C * 20 and ds.stats.skipped == 0
    assert repeat.max() > 1  # the last class is upsampled, its weights repeated
    for _, target in items:
        assert set(target) == {"label", "topk_class", "topk_prob", "weight"}
        assert target["weight"].dtype == np.float32
    samples = [json.loads(s["json"]) for s in _iter(out)]
    for s in samples:
        assert s["weight"] == pytest.approx(by_row[s["source_key"], s["class"]], 1e-6)


def _iter(out: Path) -> list[dict]:
    from ssl_kd.shards import ReadStats, iter_samples

    return list(iter_samples(expand_shards(str(out)), ReadStats()))


def test_bad_input_is_one_error_line(
    world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = world["cfg"]
    with pytest.raises(ConfigError, match="labeled_labels"):
        cfglib.from_dict(
            SelectConfig, {"labels": "x", "out": "y", "per_class": 1, "weights": "certainty"}
        )
    root = world["root"]
    rng = np.random.default_rng(6)
    emb = _blobs(rng, np.eye(DIM)[:C], 1, 0.1)
    cases = {
        "other teacher": replace(META, teacher_sha256="1" * 64),
        "no embeddings": replace(META, embedding_dim=0),
        "other dim": replace(META, embedding_dim=8),
    }
    for name, meta in cases.items():
        vectors = emb[:, : meta.embedding_dim or DIM]  # ignored without embeddings
        _write_set(
            root / name.replace(" ", "_"), "lab", vectors, np.arange(C), np.full(C, 0.9), meta
        )
    expected = {
        "other teacher": "different teachers",
        "no embeddings": "has no embeddings",
        "other dim": "8-d embeddings",
    }
    for name, message in expected.items():
        bad = replace(cfg, labeled_labels=str(root / name.replace(" ", "_") / "lab_labels"))
        with pytest.raises(UserError, match=message):
            run_select(replace(bad, rank_by="vote"))
    # A labeled set without class 3, and one with a class the teacher does not have.
    _write_set(root / "short", "lab", emb[:3], np.arange(3), np.full(3, 0.9), META)
    _write_set(root / "odd", "lab", emb, np.array([0, 1, 2, 7]), np.full(C, 0.9), META)
    for d, message in (("short", "no image of class c3"), ("odd", "has class 7")):
        argv = ["select", "--labels", cfg.labels, "--out", str(tmp_path / "out")]
        argv += ["--per-class", "5", "--top-p", "1", "--executor", "local", "--rank-by", "vote"]
        assert main([*argv, "--labeled-labels", str(root / d / "lab_labels")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, err
        assert message in err, err
    # The pool's labels without embeddings.
    plain = root / "plain"
    _write_set(plain, "pool", emb, np.arange(C), np.full(C, 0.9), replace(META, embedding_dim=0))
    with pytest.raises(UserError, match="relabel with ssl-kd label --embeddings"):
        run_select(replace(cfg, labels=str(plain / "pool_labels"), far_floor=0.1))
    assert not (tmp_path / "out").exists()


def test_pipeline_labels_the_labeled_split_when_the_selection_asks_neighbours(
    tmp_path: Path, fake_fmnist: Path
) -> None:
    from helpers import TINY

    from ssl_kd.pipeline.config import PipelineConfig
    from ssl_kd.pipeline.run import run_pipeline

    data = {
        **TINY,
        "out": str(tmp_path / "run"),
        "source": str(fake_fmnist),
        "seeds": [0],
        "oracle_seeds": 0,
        "select": {**TINY["select"], "rank_by": "vote", "weights": "certainty", "neighbours": 3},
        "pretrain": {**TINY["pretrain"], "sample_weights": True},
    }
    cfg = cfglib.from_dict(PipelineConfig, data)
    summary = run_pipeline(cfg, progress=False)
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses["round1/labeled_labels"] == "ran"
    root = Path(cfg.out)
    labeled = pq.read_table(next((root / "round1/labeled_labels").glob("*.parquet")))
    assert "embedding" in labeled.column_names
    pool = pq.read_table(next((root / "round1/labels").glob("*.parquet")))
    assert "embedding" in pool.column_names
    selection = pq.read_table(root / "round1/selection/selection.parquet")
    weights = selection.column("weight").to_numpy()
    assert len(weights) and np.all((weights >= 0) & (weights <= 1))
    info = json.loads((root / "round1/pseudo/dataset.json").read_text())
    assert info["weights"]
    # Without neighbours, no labeled split is labeled and no embedding is stored.
    plain = cfglib.from_dict(
        PipelineConfig, {**TINY, "source": str(fake_fmnist), "out": str(tmp_path / "plain")}
    )
    from ssl_kd.pipeline.plan import build_plan

    names = [s.name for s in build_plan(plain, progress=False).stages]
    assert "round1/labeled_labels" not in names
