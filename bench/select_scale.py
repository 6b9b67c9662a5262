"""Selection at scale: images/s and peak memory for 1M and 10M images, against pandas.

Synthetic label files (1000 classes, k=10, 100,000 images per file) are selected with P=10,
K=1000 by ``run_select`` in a fresh process per size and k-selection method (faiss heaps, numpy
merges), so peak RSS is that run's alone; at the sizes given with ``--pandas`` a pandas sort +
groupby + head computes the same selection, which must be identical. "selection" is reading the
labels and the per-class top-K; "end to end" adds fetching the selected rows and writing
``selection.parquet``, which the pandas baseline does not do.

    .venv/bin/python bench/select_scale.py --sizes 1000000 10000000 --pandas 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from _report import emit

from ssl_kd.label.files import LabelMeta, build_table, write_labels
from ssl_kd.select.dedup import near_duplicates
from ssl_kd.select.run import SelectConfig, run_select

C, K_STORED, PER_FILE = 1000, 10, 100_000
META = LabelMeta(
    num_classes=C,
    classes=[str(i) for i in range(C)],
    k=K_STORED,
    temperature=1.0,
    teacher_arch="synthetic",
    teacher_sha256="0" * 64,
    preprocess={},
)


def make_labels(root: Path, n: int) -> None:
    """``n`` images of random distinct top-10 classes with sorted random probabilities."""
    rng = np.random.default_rng(n)
    for f, start in enumerate(range(0, n, PER_FILE)):
        m = min(PER_FILE, n - start)
        base = rng.integers(0, C, m)
        classes = (base[:, None] + rng.integers(1, C // K_STORED, (m, K_STORED)).cumsum(1)) % C
        raw = rng.dirichlet(np.full(K_STORED, 0.3), m).astype(np.float32)
        probs = -np.sort(-raw, axis=1)
        keys = [f"{start + i:010d}" for i in rng.permutation(m)]
        table = build_table(META, f"u-{f:06d}.tar", keys, classes, probs)
        write_labels(table, root / f"u-{f:06d}.parquet")


def pandas_select(labels: Path, per_class: int, p: int) -> pd.DataFrame:
    """The same selection with pandas: explode top-P, sort, group, head.

    The lists are flattened by pyarrow (not per-row Python objects), so the baseline is the
    fastest straightforward pandas version, not a strawman.
    """
    frames = []
    for path in sorted(labels.glob("*.parquet")):
        t = pq.read_table(path)
        n = t.num_rows
        cls = t["topk_class"].combine_chunks().flatten().to_numpy().reshape(n, -1)[:, :p]
        prob = t["topk_prob"].combine_chunks().flatten().to_numpy().reshape(n, -1)[:, :p]
        frames.append(
            pd.DataFrame(
                {
                    "shard": np.repeat(t["shard"].to_pandas().astype(str).to_numpy(), p),
                    "key": np.repeat(t["key"].to_numpy(zero_copy_only=False), p),
                    "class": cls.ravel(),
                    "score": prob.astype(np.float32).ravel(),
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["class", "score", "shard", "key"], ascending=[True, False, True, True])
    return df.groupby("class", sort=True).head(per_class)


def dedup_speed(n: int, d: int = 128, planted: int = 1000) -> dict:
    """Seconds to find planted near-duplicates among ``n`` random unit embeddings at 0.95."""
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    src = rng.choice(n - planted, planted, replace=False)
    emb[n - planted :] = emb[src] + 0.05 * rng.standard_normal((planted, d)).astype(np.float32)
    t0 = time.perf_counter()
    drop = near_duplicates(emb, np.zeros(n, np.float32), 0.95)
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 1),
        "images_per_s": round(n / seconds, 1),
        "planted": planted,
        "found": int(drop.sum()),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: after fork + exec that
    also counts the parent's peak, which would hide whether the selector's own memory is flat."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(labels: Path, out: Path, per_class: int, p: int, method: str) -> dict:
    """Run the selector once in this process; report time and peak RSS."""
    t0 = time.perf_counter()
    report = run_select(
        SelectConfig(
            labels=str(labels),
            out=str(out),
            per_class=per_class,
            top_p=p,
            executor="local",
            kselect=method,
        )
    )
    seconds = time.perf_counter() - t0
    peak_mb = peak_rss_mb()
    return {
        "seconds": round(seconds, 2),
        "parts": report["seconds"],
        "peak_rss_mb": round(peak_mb, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--pandas", type=int, nargs="*", default=[1_000_000])
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--p", type=int, default=10)
    ap.add_argument(
        "--dedup",
        type=int,
        nargs="*",
        default=[],
        help="also time near-duplicate search on this many 128-d embeddings",
    )
    ap.add_argument("--methods", nargs="*", default=["faiss", "numpy"])
    ap.add_argument("--out")
    ap.add_argument(
        "--one-size", nargs=3, metavar=("LABELS", "OUT", "METHOD"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.one_size:
        labels, out, method = args.one_size
        print(json.dumps(one_size(Path(labels), Path(out), args.k, args.p, method)))
        return 0

    report = {
        "classes": C,
        "stored_k": K_STORED,
        "per_class_k": args.k,
        "top_p": args.p,
        "sizes": {},
    }
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix="select-bench-"))
        try:
            make_labels(work / "labels", n)
            entry: dict = {}
            for method in args.methods:
                cmd = [
                    sys.executable,
                    __file__,
                    "--k",
                    str(args.k),
                    "--p",
                    str(args.p),
                    "--one-size",
                    str(work / "labels"),
                    str(work / method),
                    method,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                run = json.loads(out.strip().splitlines()[-1])
                entry[method] = {**run, "images_per_s": round(n / run["seconds"], 1)}
            first = args.methods[0]
            ours = pq.read_table(work / first / "selection.parquet").to_pandas()
            for method in args.methods[1:]:
                other = pq.read_table(work / method / "selection.parquet").to_pandas()
                entry[method]["identical_to_" + first] = bool(ours.equals(other))
            if n in args.pandas:
                t0 = time.perf_counter()
                ref = pandas_select(work / "labels", args.k, args.p)
                pandas_s = time.perf_counter() - t0
                same = (
                    ours["key"].tolist() == ref["key"].tolist()
                    and ours["shard"].astype(str).tolist() == ref["shard"].tolist()
                    and ours["class"].tolist() == ref["class"].tolist()
                )
                entry["pandas"] = {"seconds": round(pandas_s, 2), "identical": same}
                for method in args.methods:
                    run = entry[method]
                    run["speedup_vs_pandas"] = {
                        "selection": round(pandas_s / run["parts"]["select"], 1),
                        "end_to_end": round(pandas_s / run["seconds"], 1),
                    }
            report["sizes"][str(n)] = entry
            print(n, json.dumps(entry), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for n in args.dedup:
        report.setdefault("dedup", {})[str(n)] = dedup_speed(n)
        print("dedup", n, report["dedup"][str(n)], flush=True)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
