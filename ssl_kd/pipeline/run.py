"""``ssl-kd run``: build the plan, run the stages that are out of date, write the results."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.pipeline.config import PipelineConfig
from ssl_kd.pipeline.plan import build_plan
from ssl_kd.pipeline.results import signed_points, write_results
from ssl_kd.pipeline.stages import format_stage_table, run_stages

log = logging.getLogger(__name__)


def run_pipeline(
    cfg: PipelineConfig, progress: bool = True, title: str = "", config_path: str | None = None
) -> dict[str, Any]:
    """Run every out-of-date stage of ``cfg``; returns the summary written to pipeline.json.

    The results are titled ``title``, else after ``config_path`` (the YAML file of the run).
    """
    root = cfg.out
    if not title:
        title = f"Results of {config_path}" if config_path else f"Results: {root}"
    plan = build_plan(cfg, progress)  # every stage config is built (and checked) before any runs
    storage.makedirs(root)
    cfglib.save(cfg, storage.join(root, "config.yaml"))
    t0 = time.perf_counter()
    results = run_stages(plan.stages, root, announce=lambda line: log.info("%s", line))
    table = format_stage_table(results)
    doc = write_results(root, plan.models, plan.selections, title, table, cfg.goal_points)
    summary = {
        "out": root,
        "seconds": round(time.perf_counter() - t0, 2),
        "stages": [
            {
                "name": r.name,
                "status": r.status,
                "seconds": r.seconds,
                "figures": r.figures,
                "fingerprint": r.fingerprint,
            }
            for r in results
        ],
        "goals": doc["goals"],
        "results": storage.join(root, "results", "results.md"),
    }
    atomic.write_text(storage.join(root, "pipeline.json"), json.dumps(summary, indent=2) + "\n")
    summary["table"] = table
    return summary


def format_summary(cfg: PipelineConfig, s: dict[str, Any]) -> str:
    """What ``ssl-kd run`` prints: the stage table, each round's gains, where the results are."""
    lines = [s["table"]]
    for g in s["goals"]:
        lines.append(
            f"round {g['round']}: fine-tuned student "
            f"{signed_points(g['gain_over_baseline_points'])} points over the baseline, "
            f"{signed_points(g['gain_over_teacher_points'])} over its teacher"
        )
    lines.append(f"results -> {s['results']}")
    return "\n".join(lines)
