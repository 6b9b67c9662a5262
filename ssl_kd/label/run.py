"""``ssl-kd label`` / ``jobs/label.py``: label many shards, exactly once each, locally or on Ray.

The driver expands the shard spec, checks the teacher and the output directory, skips shards
whose label file exists, and hands the rest to a pool of workers — Ray actors that each load the
teacher once (one per GPU when the cluster has GPUs, else one per ``cpus_per_worker`` CPUs), or
the driver itself with ``executor: local``. A shard that fails is retried ``max_retries`` times
(on a fresh actor if its actor died). ``run_shards.jsonl`` records every shard as it finishes,
``run_summary.json`` the totals.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.dir_lock import dir_lock
from ssl_kd.errors import UserError
from ssl_kd.executor import Failure, map_actors
from ssl_kd.label.config import LabelConfig
from ssl_kd.label.files import (
    check_same_labeling,
    label_file_name,
    label_files,
    read_meta,
    record_source,
)
from ssl_kd.label.teacher import Teacher
from ssl_kd.label.workers import LabelWorker, check_room, make_teacher, pool_size
from ssl_kd.ray_resources import check_shared_dir
from ssl_kd.shards import expand_shards, shard_name

log = logging.getLogger(__name__)

RETRYABLE = (OSError, MemoryError, RuntimeError)
SHARD_LOG = "run_shards.jsonl"  # one JSON line per shard of the last run, as each finished

Progress = Callable[[dict[str, Any]], None]  # told of every shard as it finishes


def _existing(cfg: LabelConfig, teacher: Teacher) -> list[str]:
    """The label files already in ``cfg.out`` (checked to be this labeling's); writes nothing."""
    out = cfg.out
    existing = label_files(out) if storage.is_dir(out) else []
    if existing:
        check_same_labeling(read_meta(existing[0]), teacher.meta, existing[0], "this run")
    return existing


def _remove_stale(out: str) -> None:
    """Temp files left by a killed run (never a finished file)."""
    if storage.is_remote(out):
        return  # uploads are staged locally: an object store holds no temp objects
    for stale in storage.list_dir(out, ".*.tmp"):
        storage.delete(stale)


def _plan(urls: list[str], existing: list[str]) -> list[str]:
    names: dict[str, str] = {}
    for url in urls:
        name = label_file_name(url)
        if name in names:
            raise UserError(
                f"shards {names[name]} and {url} would share the label file {name}; "
                "label them into separate --out directories"
            )
        names[name] = url
    done = set(map(storage.name, existing))
    return [u for u in urls if label_file_name(u) not in done]


def _label_all(
    cfg: LabelConfig, todo: list[str], on_shard: Progress, worker_cls: type[LabelWorker]
) -> None:
    """Label ``todo`` with a pool of workers; ``on_shard`` gets each shard's status as it ends."""

    def done(i: int, result: Any, attempts: int) -> None:
        if isinstance(result, Failure):
            on_shard({"shard": shard_name(todo[i]), **result.record()})
        else:
            on_shard({**result, "attempts": attempts})

    if cfg.executor == "local":
        args, actors, options = (cfg,), 1, None
    else:
        args, (actors, options) = (cfg, cfg.cpus_per_worker), pool_size(cfg)
        check_room(cfg, min(actors, len(todo)), options)
        if not storage.is_remote(cfg.out):
            check_shared_dir(cfg.out, "labeling workers write their Parquet files there")
    map_actors(
        worker_cls,
        args,
        "label",
        todo,
        executor=cfg.executor,
        on_done=done,
        max_retries=cfg.max_retries,
        # What can pass on a retry: I/O, memory and device errors. A bad image is never the
        # shard's failure (it is one sample's skip); anything else would fail the same way again.
        retry_on=RETRYABLE,
        actors=actors,
        actor_options=options,
    )


def run_label(
    cfg: LabelConfig, progress: bool = True, worker_cls: type[LabelWorker] = LabelWorker
) -> dict[str, Any]:
    """Label every shard of ``cfg.shards`` not yet labeled; returns (and writes) the summary.

    One labeler at a time per directory (a lock file); a refused run writes nothing.
    ``worker_cls`` is what runs a shard (a test swaps in a failing one).
    """
    urls = expand_shards(cfg.shards)
    teacher = make_teacher(cfg, "cpu")
    if storage.is_file(cfg.out):
        raise UserError(f"--out {storage.display(cfg.out)} exists and is not a directory")
    _plan(urls, [])  # clashing shard names: refused before anything is written
    storage.makedirs(cfg.out)
    with dir_lock(cfg.out, "label"):
        # Listed once, under the lock; a refusal here leaves the directory as it was.
        todo = _plan(urls, _existing(cfg, teacher))
        _remove_stale(cfg.out)  # under the lock: only a dead run's temp files
        # Provenance: the files of this run record every spec labeled into the directory.
        sources = record_source(cfg.out, cfg.shards)
        cfglib.save(cfg, storage.join(cfg.out, "config.yaml"))
        log.info(
            "%d shards: %d to label, %d already done", len(urls), len(todo), len(urls) - len(todo)
        )
        start = time.perf_counter()
        tally = _label_streamed(replace(cfg, shards=sources), todo, worker_cls, progress)
        _remove_stale(cfg.out)  # a dead actor's temp files
        summary = tally.summary(cfg, urls, todo, time.perf_counter() - start)
        atomic.write_text(
            storage.join(cfg.out, "run_summary.json"), json.dumps(summary, indent=2) + "\n"
        )
    return summary


def _label_streamed(
    cfg: LabelConfig, todo: list[str], worker_cls: type[LabelWorker], progress: bool
) -> _Tally:
    """Label ``todo``; each shard's status streams to the shard log as it finishes (a list of
    a million statuses is never held), and into the returned totals."""
    tally, start = _Tally(), time.perf_counter()
    bar = tqdm(total=len(todo), unit="shard", desc="label", disable=not progress or not todo)
    with bar, atomic.atomic_path(storage.join(cfg.out, SHARD_LOG)) as tmp, open(tmp, "w") as fh:

        def on_shard(status: dict[str, Any]) -> None:  # one finished (or finally failed) shard
            fh.write(json.dumps(status) + "\n")
            tally.add(status)
            bar.update(1)
            bar.set_postfix(img_s=f"{tally.rows / max(1e-9, time.perf_counter() - start):.0f}")

        if todo:
            _label_all(cfg, todo, on_shard, worker_cls)
    return tally


class _Tally:
    """The totals of a label run, added up shard by shard as the statuses stream past."""

    def __init__(self) -> None:
        self.rows = self.labeled = self.skipped = self.bytes = 0
        self.failed: list[dict[str, Any]] = []
        self.truncated: list[str] = []
        self.empty: list[str] = []
        # Per worker: rows and busy seconds (throughput while working, start-up excluded).
        self.busy: dict[int, list[float]] = {}

    def add(self, s: dict[str, Any]) -> None:
        """Count one shard's status."""
        if s.get("failed"):
            self.failed.append(s)
            return
        self.labeled += 1
        self.rows += s["rows"]
        self.skipped += s["skipped"]
        self.bytes += s["bytes"]
        if s["truncated"]:
            self.truncated.append(s["shard"])
        if s["empty"]:
            self.empty.append(s["shard"])
        acc = self.busy.setdefault(s["worker"], [0.0, 0.0])
        acc[0] += s["rows"]
        acc[1] += s["seconds"]["total"] + s["seconds"]["write"]

    def summary(
        self, cfg: LabelConfig, urls: list[str], todo: list[str], wall: float
    ) -> dict[str, Any]:
        """The run's ``run_summary.json``; every shard's own record is in :data:`SHARD_LOG`."""
        rows, busy = self.rows, self.busy
        steady = round(sum(r / t for r, t in busy.values() if t > 0), 1) if busy else None
        return {
            "shards": len(urls),
            "already_done": len(urls) - len(todo),
            "labeled": self.labeled,
            "failed": sorted(self.failed, key=lambda s: s["shard"]),
            "rows": rows,
            "skipped_samples": self.skipped,
            "truncated_shards": sorted(self.truncated),
            "empty_shards": sorted(self.empty),
            "bytes": self.bytes,
            "bytes_per_image": round(self.bytes / rows, 2) if rows else None,
            "wall_seconds": round(wall, 3),
            "images_per_s": round(rows / wall, 1) if wall > 0 and rows else None,
            "steady_images_per_s": steady,
            "workers": len(busy),
            "shard_log": SHARD_LOG,
            "config": cfglib.to_dict(cfg),
        }


def format_summary(cfg: LabelConfig, summary: dict[str, Any]) -> str:
    """The line ``ssl-kd label`` prints on stdout."""
    s = summary
    if s["labeled"] == 0 and not s["failed"]:
        return f"nothing to label: all {s['shards']} shards already labeled in {cfg.out}"
    return (
        f"labeled {s['labeled']} shards ({s['already_done']} already done): {s['rows']} images, "
        f"{s['skipped_samples']} skipped, {s['bytes_per_image']} bytes/image, "
        f"{s['images_per_s']} img/s -> {cfg.out}"
    )


def format_problems(cfg: LabelConfig, summary: dict[str, Any]) -> list[str]:
    """The lines ``ssl-kd label`` prints on stderr: truncated and failed shards."""
    s = summary
    if s["labeled"] == 0 and not s["failed"]:
        return []
    lines = []
    if s["truncated_shards"]:
        lines.append(f"truncated shards: {', '.join(s['truncated_shards'])}")
    if s["failed"]:
        lines.append(
            f"ssl-kd: {len(s['failed'])} shard(s) failed after retries (see "
            f"{cfg.out}/run_summary.json); rerun the same command to retry them"
        )
    return lines
