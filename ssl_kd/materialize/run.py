"""``ssl-kd materialize``: the selected images, copied into new shuffled, pseudo-labeled shards.

Every selected row is written ``repeat`` times (keys ``STEM/KEY_cCLASS``, plus ``_r1``… for
upsampled copies), as the original image bytes under their original extension, a ``cls`` member
(the selected class), a ``json`` member with the soft label (``topk_class``, ``topk_prob``),
``score``, ``rank``, ``source_shard``, ``source_key`` and, when the selection weighed its rows,
``weight`` (``dataset.json`` then records ``weights``), and, when the labels stored embeddings,
an ``emb`` member with the teacher's embedding (format: :mod:`ssl_kd.shards.soft_label`;
``dataset.json`` names its dimension). The student then reads sequentially.

The shuffle is a two-pass external shuffle (map-side spill, as in MapReduce), so no process ever
holds the images of the whole selection:

1. *Plan* (driver, integers only): a seeded permutation gives every sample (row, copy) its global
   position; output shard ``i`` holds positions ``[i * samples_per_shard, (i + 1) * ...)``.
2. *Map* (one task per source shard, a Ray task or in-process): read the shard once, in order,
   and append each wanted sample as ready-made tar member blocks to one spill file
   ``OUT/.buckets/<source>.bin``; return each sample's offset and size.
3. *Reduce* (one task per output shard): read its samples' byte ranges from the spill files
   and write them in position order, plus the end-of-archive marker, as ``train-NNNNNN.tar``
   (temp name + rename). Memory: one output shard.

The order is a uniform random permutation of the whole selection, deterministic for a seed and
independent of the executor; the spill files take as much disk as the output until the end.
``OUT`` must be on storage every Ray worker sees. ``dataset.json`` (class names for the trainer)
and ``config.yaml`` are written next, ``materialize.json`` last: its presence with the same
selection digest, seed and shard size makes a rerun a no-op. An unfinished run of the same
config is redone from the start; an output directory of another run is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.errors import UserError
from ssl_kd.executor import map_tasks
from ssl_kd.label.files import LabelMeta, read_schema
from ssl_kd.materialize.shuffle import (
    Plan,
    bucket_path,
    make_plan,
    map_source_shard,
    reduce_output_shard,
)
from ssl_kd.ray_resources import check_shared_dir
from ssl_kd.select.files import SELECTION_COLUMNS, SELECTION_FILE, open_selection, shard_locations
from ssl_kd.shards.soft_label import EMBEDDING

log = logging.getLogger(__name__)

SHARD_PATTERN = "train-%06d.tar"
BUCKETS = ".buckets"
# Settings that decide the bytes written; the others (executor, retries, spec) only how.
_IDENTITY = ("seed", "samples_per_shard")


@dataclass(frozen=True)
class MaterializeConfig:
    """``ssl-kd materialize``."""

    selection: str = option(help="selection directory (from ssl-kd select)")
    out: str = option(help="output directory of the new shards")
    samples_per_shard: int = option(1000, help="samples per output shard", min=1)
    seed: int = option(0, help="seed of the shuffle across output shards")
    shards: str | None = option(
        None, help="source shard spec given to ssl-kd label (default: from the labels' config)"
    )
    executor: Literal["ray", "local"] = option(
        "ray", help="Ray tasks per shard, or local", operational=True
    )
    max_retries: int = option(
        2, help="retries of a task that failed on I/O", min=0, operational=True
    )


def _selection_dir(selection: str) -> str:
    """The selection directory, given it or its ``selection.parquet``."""
    return storage.parent(selection) if storage.is_file(selection) else selection


def _read_selection(selection: str) -> tuple[pa.Table, LabelMeta]:
    directory = _selection_dir(selection)
    if not storage.is_file(storage.join(directory, SELECTION_FILE)):
        raise UserError(f"no selection at {storage.display(selection)}: run ssl-kd select first")
    parquet, meta = open_selection(directory)
    present = read_schema(parquet).names  # selections without embeddings lack that column
    table = pq.read_table(parquet, columns=[c for c in SELECTION_COLUMNS if c in present])
    if table.num_rows == 0:
        raise UserError(f"the selection {parquet} is empty")
    return table, meta


def resolve_sources(cfg: MaterializeConfig, names: list[str]) -> list[str]:
    """The URL of every source shard name; UserError naming one that cannot be found."""
    by_name = shard_locations(_selection_dir(cfg.selection), cfg.shards)
    out = []
    for name in names:
        url = by_name.get(name)
        if url is None:
            raise UserError(
                f"source shard {name} of the selection is not among the {len(by_name)} shards "
                f"found; pass --shards SPEC, the spec given to ssl-kd label"
            )
        out.append(url)  # local files were checked by expand_shards; remote ones when read
    return out


def _check_out(cfg: MaterializeConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest when ``out`` already holds this run; clears an unfinished run of it."""
    out = cfg.out
    if storage.is_file(out):
        raise UserError(f"--out {out} exists and is not a directory")
    manifest_path = storage.join(out, "materialize.json")
    if storage.is_file(manifest_path):
        manifest = json.loads(storage.read_text(manifest_path))
        if manifest.get("identity") != identity:
            diff = [k for k in identity if manifest.get("identity", {}).get(k) != identity[k]]
            raise UserError(
                f"{out} holds another materialization (different {', '.join(diff)}); "
                "remove it or choose another --out"
            )
        present = set(map(storage.name, storage.list_dir(out, "train-*.tar")))
        if present.issuperset(manifest["shards"]):
            return manifest
        log.warning("%s lacks some of its shards: materialising again", out)
    elif storage.holds_files(out):
        previous = storage.join(out, "config.yaml")
        if not storage.is_file(previous):
            raise UserError(f"{out} exists and is not empty; remove it or choose another --out")
        old = cfglib.read_yaml(previous)
        same = all(old.get(k) == getattr(cfg, k) for k in _IDENTITY)
        if not same or not _same_place(str(old.get("selection")), cfg.selection):
            raise UserError(
                f"{out} holds an unfinished materialization with another config; remove it or "
                "choose another --out"
            )
        log.warning("%s holds an unfinished run of this config: starting it again", out)
    # Temp files of a killed run and the outputs of an unfinished or incomplete one.
    for stale in [
        *storage.list_dir(out, "train-*.tar"),
        *storage.list_dir(out, ".*.tmp"),
        storage.join(out, "dataset.json"),
        manifest_path,
    ]:
        storage.delete(stale)
    storage.delete_tree(storage.join(out, BUCKETS))
    return None


def _same_place(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _run_tasks(
    cfg: MaterializeConfig,
    fn: Callable[..., dict[str, Any]],
    n_jobs: int,
    job: Callable[[int], tuple],
    on_done: Callable[[int, dict[str, Any]], None],
) -> None:
    """Run ``fn(*job(i))`` for ``i < n_jobs``, then ``on_done(i, result)``. I/O errors are
    retried ``max_retries`` times; any other error, or one retried in vain, stops the run."""
    if cfg.executor == "ray" and not storage.is_remote(cfg.out):
        check_shared_dir(cfg.out, "materialize tasks write their shards there")
    map_tasks(
        fn,
        n_jobs,
        job,
        executor=cfg.executor,
        on_done=lambda i, r, _: on_done(i, r),
        max_retries=cfg.max_retries,
        retry_on=(OSError,),
    )


def run_materialize(cfg: MaterializeConfig, progress: bool = True) -> dict[str, Any]:
    """Write the selection as shuffled shards in ``cfg.out``; returns (and writes) the manifest."""
    start = time.perf_counter()
    table, meta = _read_selection(cfg.selection)
    selection_path = storage.join(_selection_dir(cfg.selection), SELECTION_FILE)
    identity = {
        "selection_sha256": storage.sha256(selection_path),
        **{k: getattr(cfg, k) for k in _IDENTITY},
    }
    done = _check_out(cfg, identity)
    if done is not None:
        log.info("%s already holds this materialization; nothing to do", cfg.out)
        return {**done, "already_done": True}
    repeat = table.column("repeat").to_numpy().astype(np.int64)
    plan = make_plan(table.column("shard"), repeat, cfg.seed)
    urls = resolve_sources(cfg, plan.sources)
    out = cfg.out
    storage.makedirs(out)
    cfglib.save(cfg, storage.join(out, "config.yaml"))  # first: marks the directory as this run's
    # Spill files sit beside the output, where every node of a cluster can reach them.
    buckets = storage.join(out, BUCKETS)
    seconds = {"plan": time.perf_counter() - start}

    try:
        written = _map_reduce(cfg, table, plan, urls, progress, seconds)
    finally:
        storage.delete_tree(buckets)  # spill files are never reused
    for stale in storage.list_dir(out, ".*.tmp"):  # half-written by a worker that was lost
        storage.delete(stale)
    seconds["total"] = time.perf_counter() - start
    return _finish(cfg, meta, table, repeat, identity, written, urls, seconds)


def _map_reduce(
    cfg: MaterializeConfig,
    table: pa.Table,
    plan: Plan,
    urls: list[str],
    progress: bool,
    seconds: dict[str, float],
) -> list[dict[str, Any]]:
    """Spill every source shard, then write every output shard; returns their summaries."""
    buckets = storage.join(cfg.out, BUCKETS)
    n = len(plan.position)
    offset = np.zeros(n, np.int64)
    size = np.zeros(n, np.int64)
    source_of = np.zeros(n, np.int64)
    t0 = time.perf_counter()

    def map_job(s: int) -> tuple:
        rows = table.take(pa.array(plan.source_rows[s])).drop(["shard"])
        return urls[s], rows, bucket_path(buckets, s)

    def mapped(s: int, result: dict[str, Any]) -> None:
        entries = plan.source_entries[s]
        offset[entries], size[entries], source_of[entries] = result["offset"], result["size"], s
        bar.update(1)

    with tqdm(total=len(urls), unit="shard", desc="read", disable=not progress) as bar:
        _run_tasks(cfg, map_source_shard, len(urls), map_job, mapped)
    seconds["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    at = np.argsort(plan.position)  # the entry at each output position
    n_out = math.ceil(n / cfg.samples_per_shard)

    def reduce_job(j: int) -> tuple:
        e = at[j * cfg.samples_per_shard : (j + 1) * cfg.samples_per_shard]
        return (storage.join(cfg.out, SHARD_PATTERN % j), buckets, source_of[e], offset[e], size[e])

    written: list[dict[str, Any]] = [{}] * n_out

    def reduced(j: int, result: dict[str, Any]) -> None:
        written[j] = result
        bar.update(1)

    with tqdm(total=n_out, unit="shard", desc="write", disable=not progress) as bar:
        _run_tasks(cfg, reduce_output_shard, n_out, reduce_job, reduced)
    seconds["write"] = time.perf_counter() - t0
    total = sum(w["samples"] for w in written)
    if total != n:  # every entry has a position, so this is a bug, never bad input
        raise RuntimeError(f"wrote {total} samples, expected {n}")
    return written


def _finish(
    cfg: MaterializeConfig,
    meta: LabelMeta,
    table: pa.Table,
    repeat: np.ndarray,
    identity: dict[str, Any],
    written: list[dict[str, Any]],
    urls: list[str],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Write ``dataset.json`` and, last, ``materialize.json``; returns the manifest."""
    out = cfg.out
    cls = table.column("class").to_numpy()
    per_class = np.bincount(cls, weights=repeat, minlength=meta.num_classes).astype(np.int64)
    shards = [w["shard"] for w in written]
    info = {
        "name": "pseudo-labeled selection",
        "classes": meta.classes,
        "counts": {"train": int(repeat.sum())},
        "per_class": {c: int(k) for c, k in zip(meta.classes, per_class, strict=True)},
        "shards": {"train": shards},
        "soft_label": {
            "k": meta.k,
            "temperature": meta.temperature,
            "teacher_arch": meta.teacher_arch,
            "teacher_sha256": meta.teacher_sha256,
        },
        "seed": cfg.seed,
        "config": cfglib.to_dict(cfg),
    }
    if "embedding" in table.column_names:
        info["embedding"] = {
            "dim": meta.embedding_dim,
            "member": EMBEDDING,
            "dtype": "float16",
            "normalized": True,
            "teacher_sha256": meta.teacher_sha256,
        }
    if "weight" in table.column_names:  # the trainer's --sample-weights looks for this
        info["weights"] = _weight_summary(table.column("weight").to_numpy(), repeat)
    atomic.write_text(storage.join(out, "dataset.json"), json.dumps(info, indent=2) + "\n")
    manifest = {
        "identity": identity,
        "samples": int(repeat.sum()),
        "selected_rows": table.num_rows,
        "source_shards": len(urls),
        "shards": shards,
        "per_shard": [w["samples"] for w in written],
        "bytes": sum(w["bytes"] for w in written),
        "per_class": info["per_class"],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "config": cfglib.to_dict(cfg),
    }
    atomic.write_text(storage.join(out, "materialize.json"), json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "already_done": False}


def _weight_summary(weight: np.ndarray, repeat: np.ndarray) -> dict[str, Any]:
    """Where the samples' weights are, and their spread over the samples written."""
    return {
        "member": "json",
        "key": "weight",
        "mean": float(np.average(weight, weights=repeat)),
        "min": float(weight.min()),
        "max": float(weight.max()),
    }


def format_summary(cfg: MaterializeConfig, manifest: dict[str, Any]) -> str:
    """The line ``ssl-kd materialize`` prints."""
    m = manifest
    verb = "already materialized" if m["already_done"] else "materialized"
    return (
        f"{verb} {m['samples']} samples ({m['selected_rows']} selected rows) from "
        f"{m['source_shards']} source shards into {len(m['shards'])} shards -> {cfg.out}"
    )
