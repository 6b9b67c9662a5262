"""A resumable run of stages: each stage's outputs are reused while its fingerprint holds.

A stage's fingerprint hashes its parameters (the config keys that change what it computes, not
paths or executors) together with the fingerprints of the stages it reads from, so a changed key
re-runs that stage and everything downstream of it, and nothing else. A marker file per stage
(``<run>/stages/<name>.json``) records the fingerprint before the stage starts and ``done`` after
it ends: an interrupted stage with the same fingerprint continues in place (the stage commands
resume from their own partial outputs); one with another fingerprint is cleared and run afresh.
Markers live apart from the outputs, so a stage's directory holds only what its command wrote.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError

MARKERS = "stages"


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``run()`` writes into ``dir`` and returns its key figures."""

    name: str
    dir: str
    params: dict[str, Any]
    run: Callable[[], dict[str, Any]]
    deps: tuple[str, ...] = ()


@dataclass
class StageResult:
    """What happened to one stage in this invocation."""

    name: str
    status: str  # "ran", "resumed" or "skipped"
    seconds: float  # of this invocation; a skipped stage's is the run that made its outputs
    figures: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def fingerprint(params: dict[str, Any], upstream: Sequence[str]) -> str:
    """A short hash of the parameters and the upstream fingerprints."""
    blob = json.dumps({"params": params, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def marker_path(root: str, name: str) -> str:
    """Where the marker of stage ``name`` lives under the run directory ``root``."""
    return storage.join(root, MARKERS, name.replace("/", "__") + ".json")


def read_marker(path: str) -> dict[str, Any] | None:
    """A stage marker, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None


def _prepare(stage: Stage, marker: dict[str, Any] | None, fp: str) -> str:
    """Clear stale outputs; returns "ran" or "resumed"."""
    if marker is not None and marker.get("fingerprint") == fp:
        return "resumed"
    if marker is None and storage.holds_files(stage.dir):
        raise UserError(
            f"{stage.dir} holds files that ssl-kd run did not write; move them away or choose "
            "another --out"
        )
    storage.delete_tree(stage.dir)
    return "ran"


def run_stages(
    stages: Sequence[Stage], root: str, announce: Callable[[str], None] = print
) -> list[StageResult]:
    """Run the stages in order, skipping those whose outputs match their fingerprint."""
    fps: dict[str, str] = {}
    results: list[StageResult] = []
    for i, stage in enumerate(stages, 1):
        missing = [d for d in stage.deps if d not in fps]
        if missing:
            raise ValueError(f"stage {stage.name} runs before its inputs {missing}")
        fp = fingerprint(stage.params, [fps[d] for d in stage.deps])
        fps[stage.name] = fp
        path = marker_path(root, stage.name)
        marker = read_marker(path)
        if marker is not None and marker.get("fingerprint") == fp and marker.get("done"):
            seconds = float(marker.get("seconds", 0.0))
            results.append(
                StageResult(stage.name, "skipped", seconds, marker.get("figures", {}), fp)
            )
            announce(f"[{i}/{len(stages)}] {stage.name}: up to date")
            continue
        status = _prepare(stage, marker, fp)
        announce(
            f"[{i}/{len(stages)}] {stage.name}: {'resuming' if status == 'resumed' else 'running'}"
        )
        storage.makedirs(stage.dir)
        record = {"name": stage.name, "fingerprint": fp, "params": stage.params, "done": False}
        atomic.write_text(path, json.dumps(record, indent=2, default=str) + "\n")
        t0 = time.perf_counter()
        figures = stage.run()
        seconds = round(time.perf_counter() - t0, 2)
        record |= {"done": True, "seconds": seconds, "figures": figures}
        atomic.write_text(path, json.dumps(record, indent=2, default=str) + "\n")
        results.append(StageResult(stage.name, status, seconds, figures, fp))
    return results


def format_stage_table(results: Sequence[StageResult]) -> str:
    """A table of stages: status, seconds (of the run that made the outputs), key figures."""
    width = max((len(r.name) for r in results), default=5)
    lines = [f"{'stage':<{width}}  {'status':<8} {'seconds':>8}  figures"]
    for r in results:
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.figures.items())
        lines.append(f"{r.name:<{width}}  {r.status:<8} {r.seconds:>8.1f}  {figures}")
    ran = sum(r.seconds for r in results if r.status != "skipped")
    total = sum(r.seconds for r in results)
    lines.append(f"{'total':<{width}}  {'':<8} {total:>8.1f}  ({ran:.1f} s in this invocation)")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
