"""Label propagation and the neighbour checks at selection scale: seconds per step.

Synthetic L2-normalised embeddings shaped like a teacher's: ``--classes`` class centres in
``--dim`` dimensions, each image its centre plus Gaussian noise (``--noise``), a few labeled
images per class and a pool of candidates, a tenth of them given the wrong class as the
teacher's. Times the exact kNN graph (``faiss.IndexFlatIP``), the conjugate-gradient solve,
the neighbour vote and the far-floor distances, and checks the propagated classes against the
truth (a sanity figure, not a result: the data are made easy).

    .venv/bin/python bench/propagate_scale.py --pool 60000 --dim 128 --k 50
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import faiss
import numpy as np
from _report import emit

from ssl_kd.select import propagate as lp


def cpu_model() -> str:
    """``lscpu``'s model name (figures differ between machines of this type)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return names[0] if names else "unknown"


def make_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Labeled and pool embeddings, their true classes and the pool's (noisy) teacher classes."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    labeled_cls = np.repeat(np.arange(args.classes), args.labeled_per_class)
    pool_cls = rng.integers(0, args.classes, args.pool)

    def around(cls: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(cls), args.dim)).astype(np.float32)
        return lp.unit_rows(centres[cls] + args.noise * noise * np.sqrt(args.dim) / 4)

    teacher = pool_cls.copy()
    wrong = rng.random(args.pool) < 0.1
    teacher[wrong] = (pool_cls[wrong] + 1) % args.classes
    return {
        "labeled": around(labeled_cls),
        "labeled_cls": labeled_cls,
        "pool": around(pool_cls),
        "pool_cls": pool_cls,
        "teacher": teacher,
    }


def timed(fn, *args, **kw):  # type: ignore[no-untyped-def]
    """``(fn(*args, **kw), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, round(time.perf_counter() - t0, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--labeled-per-class", type=int, default=100)
    parser.add_argument("--k", type=int, default=lp.NEIGHBOURS)
    parser.add_argument("--iters", type=int, default=lp.MAX_ITER)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    d = make_data(args)
    c = args.classes
    everything = np.concatenate([d["labeled"], d["pool"]])
    n_lab = len(d["labeled"])
    graph, t_graph = timed(lp.knn_graph, everything, args.k)
    y = np.zeros((len(everything), c))
    counts = np.bincount(d["labeled_cls"], minlength=c)
    y[np.arange(n_lab), d["labeled_cls"]] = 1 / counts[d["labeled_cls"]]
    z, t_cg = timed(lp.conjugate_gradient, lambda v: v - lp.ALPHA * graph.matmul(v), y, args.iters)
    probs = lp.normalize_rows(z[n_lab:])
    votes, t_vote = timed(lp.neighbour_vote, d["labeled"], d["labeled_cls"], d["pool"], c, args.k)
    floors, t_floors = timed(lp.class_floors, d["labeled"], d["labeled_cls"], c, 0.05)
    sims, t_sims = timed(
        lp.class_similarity, d["pool"], d["teacher"], d["labeled"], d["labeled_cls"], c
    )
    wrong = d["teacher"] != d["pool_cls"]
    far = sims < floors[d["teacher"]]
    emit(
        {
            "cpu": cpu_model(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "images": len(everything),
            "dim": args.dim,
            "classes": c,
            "k": args.k,
            "cg_iterations": args.iters,
            "graph_edges": len(graph.data),
            "seconds": {
                "knn_graph": t_graph,
                "conjugate_gradient": t_cg,
                "propagation_total": round(t_graph + t_cg, 3),
                "neighbour_vote": t_vote,
                "far_floors": t_floors,
                "far_similarities": t_sims,
            },
            "propagated_class_right": float((probs.argmax(1) == d["pool_cls"]).mean()),
            "vote_class_right": float((votes.argmax(1) == d["pool_cls"]).mean()),
            "teacher_right": float(1 - wrong.mean()),
            "far_floor_drops": {
                "teacher_wrong": float(far[wrong].mean()),
                "teacher_right": float(far[~wrong].mean()),
            },
        },
        args.out,
    )


if __name__ == "__main__":
    main()
