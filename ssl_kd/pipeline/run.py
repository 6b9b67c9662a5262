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
from ssl_kd.pipeline.results import write_results
from ssl_kd.pipeline.stages import format_summary, run_stages

log = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig, progress: bool = True, title: str = "") -> dict[str, Any]:
    """Run every out-of-date stage of ``cfg``; returns the summary written to pipeline.json."""
    root = cfg.out
    plan = build_plan(cfg, progress)  # every stage config is built (and checked) before any runs
    storage.makedirs(root)
    cfglib.save(cfg, storage.join(root, "config.yaml"))
    t0 = time.perf_counter()
    results = run_stages(plan.stages, root, announce=lambda line: log.info("%s", line))
    table = format_summary(results)
    doc = write_results(root, plan.models, cfg.rounds, title or f"Results: {root}", table)
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
