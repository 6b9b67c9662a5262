"""Ablations of the Fashion-MNIST pipeline: K per class, P per image, and the pretraining loss.

Every variant runs in the same run directory, one after the other, so the stage fingerprints
keep the teacher, its labels and the baseline and re-run only the selection and what follows
(the resumable pipeline doing the bookkeeping). One seed per variant unless ``--seeds`` says
otherwise: these runs take time (about 4 minutes each on 2 CPU cores with the defaults).

    .venv/bin/python bench/ablations.py --config configs/fashion_mnist.yaml \
        --out runs/ablations --reuse runs/demo --report runs/ablations/ablations.json

``--reuse`` copies the data, teacher, labels and seed-0 baseline of a finished run (with their
stage markers) into ``--out`` first, so the ablations skip them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _report import emit

from ssl_kd import config as cfglib
from ssl_kd.pipeline.config import PipelineConfig
from ssl_kd.pipeline.run import run_pipeline


def variants(ks: list[int], ps: list[int], losses: list[str]) -> list[dict[str, Any]]:
    """K x P with the config's loss, then each loss at the config's K and P."""
    grid: list[dict[str, Any]] = [{"per_class": k, "top_p": p} for k in ks for p in ps]
    return grid + [{"loss": loss} for loss in losses]


def _apply(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key in ("per_class", "top_p"):
        if key in variant:
            data.setdefault("select", {})[key] = variant[key]
    if "loss" in variant:
        data.setdefault("pretrain", {})["loss"] = variant["loss"]
    return data


def run_variant(data: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """Run one variant; returns its figures (pseudo-label precision, student top-1)."""
    cfg = cfglib.from_dict(PipelineConfig, data)
    t0 = time.perf_counter()
    run_pipeline(cfg, progress=False, title=f"Ablation {variant}")
    doc = json.loads((Path(cfg.out) / "results" / "results.json").read_text())
    row = {m["model"]: m for m in doc["models"] if m["round"] in (0, 1)}
    precision = (
        doc["selection_precision"][0]["precision"]["mean"] if doc["selection_precision"] else None
    )
    return {
        **variant,
        "K": cfg.select.get("per_class"),
        "P": cfg.select.get("top_p", 10),
        "loss_used": cfg.pretrain.get("loss", "hard"),
        "selected": doc["selection_precision"][0]["images"] if precision is not None else None,
        "precision": precision,
        "pretrained_top1": row["pretrained"]["top1"]["mean"],
        "finetuned_top1": row["finetuned"]["top1"]["mean"],
        "baseline_top1": row["baseline"]["top1"]["mean"],
        "teacher_top1": row["teacher"]["top1"]["mean"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the variants."""
    lines = [
        "| K | P | loss | selected | precision | pretrained | fine-tuned | vs baseline |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gain = 100 * (r["finetuned_top1"] - r["baseline_top1"])
        lines.append(
            f"| {r['K']} | {r['P']} | {r['loss_used']} | {r['selected']:,} | "
            f"{100 * r['precision']:.2f} | {100 * r['pretrained_top1']:.2f} | "
            f"{100 * r['finetuned_top1']:.2f} | {gain:+.2f} |"
        )
    return "\n".join(lines)


REUSED = (
    "data",
    "teacher",
    "teacher_adapted",  # with an adapt section: the teacher that labels
    "round1/labels",
    "baseline/seed0",
    "eval/teacher",
    "eval/baseline-seed0",
)


def reuse(src: Path, out: Path) -> None:
    """Copy the stages every variant shares, and their markers, from a finished run."""
    from ssl_kd.pipeline.stages import marker_path

    for name in REUSED:
        if not (src / name).is_dir() or (out / name).exists():
            continue
        shutil.copytree(src / name, out / name)
        marker = Path(marker_path(str(out), name))
        marker.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(marker_path(str(src), name), marker)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--k", default="1000,2000,4000", help="K values (comma-separated)")
    ap.add_argument("--p", default="1,3,10", help="P values (comma-separated)")
    ap.add_argument("--losses", default="hard,soft,mixed")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override pretrain.steps")
    ap.add_argument("--report", default=None, help="also write the JSON report here")
    ap.add_argument("--reuse", default=None, help="a finished run of the same config to copy from")
    args = ap.parse_args(argv)
    if args.reuse:
        reuse(Path(args.reuse), Path(args.out))

    base = cfglib.read_yaml(args.config)
    base |= {"out": args.out, "seeds": [int(s) for s in args.seeds.split(",")]}
    if args.pretrain_steps:
        base["pretrain"] = {**base.get("pretrain", {}), "steps": args.pretrain_steps}
    rows = []
    ks = [int(k) for k in args.k.split(",")]
    ps = [int(p) for p in args.p.split(",")]
    losses = [loss for loss in args.losses.split(",") if loss]  # "" runs the K x P grid only
    for variant in variants(ks, ps, losses):
        rows.append(run_variant(_apply(base, variant), variant))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows), file=sys.stderr)
    emit(
        {"config": args.config, "seeds": base["seeds"], "variants": rows, "markdown": table(rows)},
        args.report,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
