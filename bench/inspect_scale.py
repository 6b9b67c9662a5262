"""Inspection at scale: wall time and peak RSS of ``ssl-kd inspect labels`` on 1M labels.

Synthetic label files (1000 classes, k=10, 100,000 images per file; the generator of
``bench/select_scale.py``) are inspected in a fresh process per view, so each peak RSS
(``ru_maxrss``) is that view's alone; ``baseline_rss_mb`` is the peak after imports, before any
work. The parent stays small and generates in a child too: Linux carries the RSS high-water
mark of a process across fork and exec into its children's ``ru_maxrss``.

Views: ``summary`` (the core function), ``cli`` (the whole ``ssl-kd inspect labels DIR --json``
command, torch import included), ``class`` (top 16 of one class), ``key`` (one key
looked up across all files) and ``compare`` (the directory against itself).

    .venv/bin/python bench/inspect_scale.py --size 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import emit

VIEWS = ["summary", "cli", "class", "key", "compare"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_view(view: str, labels: str) -> dict:
    """Run one view in this process; report its seconds and this process's peak RSS."""
    import pyarrow.parquet as pq

    from ssl_kd.cli import main as cli_main
    from ssl_kd.inspect.compare import compare_labels
    from ssl_kd.inspect.labels import class_top, find_key, open_labels, summarize_labels

    def work() -> object:
        if view == "cli":
            return cli_main(["-q", "inspect", "labels", labels, "--json"])
        ls = open_labels(labels)
        if view == "summary":
            return summarize_labels(ls)
        if view == "class":
            return class_top(ls, 7, 16)
        if view == "key":
            return find_key(ls, "0000123456")
        return compare_labels(ls, open_labels(labels))

    baseline = _peak_mb()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        work()
    seconds = time.perf_counter() - t0
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Path(labels).glob("*.parquet"))
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(_peak_mb(), 1),
        "baseline_rss_mb": round(baseline, 1),
        "rows_per_s": round(rows / seconds),
    }


def _child(*args: str) -> str:
    cmd = [sys.executable, __file__, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000, help="images (rows) to generate")
    ap.add_argument("--views", nargs="*", default=VIEWS, choices=VIEWS)
    ap.add_argument("--labels", help="inspect this directory instead of generating one")
    ap.add_argument("--out", help="also write the report here (JSON)")
    ap.add_argument("--one", nargs=2, metavar=("VIEW", "LABELS"), help=argparse.SUPPRESS)
    ap.add_argument("--generate", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_view(*args.one)))
        return 0
    if args.generate:
        from select_scale import make_labels  # bench/ is this script's folder

        make_labels(Path(args.generate), args.size)
        return 0

    work = Path(tempfile.mkdtemp(prefix="inspect-bench-"))
    try:
        labels = Path(args.labels) if args.labels else work / "labels"
        if not args.labels:
            t0 = time.perf_counter()
            _child("--size", str(args.size), "--generate", str(labels))
            print(f"generated {args.size:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        size = sum(p.stat().st_size for p in labels.glob("*.parquet"))
        report = {
            "classes": 1000,
            "stored_k": 10,
            "parquet_mb": round(size / 2**20, 1),
            "views": {},
        }
        for view in args.views:
            entry = json.loads(_child("--one", view, str(labels)).strip().splitlines()[-1])
            report["views"][view] = entry
            print(view, entry, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
