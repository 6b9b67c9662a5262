"""Recall of the approximate (IVF) near-duplicate and leak search against exact (flat) search,
on real embeddings from a label directory written with ``ssl-kd label --embeddings``.

    .venv/bin/python bench/dedup_recall.py --labels runs/demo/labels_emb \
        --eval runs/demo/test_labels_emb --thresholds 0.95 0.98

Above ``ssl_kd.dedup.FLAT_LIMIT`` vectors the selector switches to IVF; here both are forced on
the same vectors: recall = images dropped by IVF that flat also drops / images flat drops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ssl_kd.label.files import LabelSet
from ssl_kd.select.dedup import leaked, near_duplicates


def embeddings(directory: str) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, top-1 probability) of every row of a label directory."""
    embs, scores = [], []
    for batch in LabelSet(directory).iter_batches(columns=["embedding", "topk_prob"]):
        n = batch.num_rows
        embs.append(batch.column("embedding").flatten().to_numpy().reshape(n, -1))
        scores.append(batch.column("topk_prob").flatten().to_numpy().reshape(n, -1)[:, 0])
    return np.concatenate(embs).astype(np.float32), np.concatenate(scores).astype(np.float32)


def compare(name: str, exact_fn, approx_fn) -> dict:  # type: ignore[no-untyped-def]
    """Run both searches; recall and precision of the approximate drop mask."""
    t0 = time.perf_counter()
    exact = exact_fn()
    t1 = time.perf_counter()
    approx = approx_fn()
    t2 = time.perf_counter()
    both = int((exact & approx).sum())
    return {
        "search": name,
        "flat_dropped": int(exact.sum()),
        "ivf_dropped": int(approx.sum()),
        "recall": round(both / max(1, int(exact.sum())), 4),
        "precision": round(both / max(1, int(approx.sum())), 4),
        "flat_seconds": round(t1 - t0, 2),
        "ivf_seconds": round(t2 - t1, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", required=True, help="label dir with embeddings")
    ap.add_argument("--eval", help="evaluation label dir with embeddings (leak search)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.95])
    args = ap.parse_args()
    emb, score = embeddings(args.labels)
    ref = embeddings(args.eval)[0] if args.eval else None
    rows = []
    for t in args.thresholds:
        rows.append(
            {
                "threshold": t,
                "images": len(emb),
                **compare(
                    "near-duplicates",
                    lambda t=t: near_duplicates(emb, score, t, flat_limit=len(emb)),
                    lambda t=t: near_duplicates(emb, score, t, flat_limit=0),
                ),
            }
        )
        if ref is not None:
            rows.append(
                {
                    "threshold": t,
                    "images": len(emb),
                    "reference": len(ref),
                    **compare(
                        "leaks",
                        lambda t=t: leaked(emb, ref, t, flat_limit=len(ref)),
                        lambda t=t: leaked(emb, ref, t, flat_limit=0),
                    ),
                }
            )
        print(json.dumps(rows[-2:] if ref is not None else rows[-1:]), flush=True)
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
