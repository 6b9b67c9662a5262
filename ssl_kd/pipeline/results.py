"""The results table of a pipeline run: ``results.json``, ``results.md`` and ``results.png``.

Every figure is read from the files the stages wrote (``eval/*/metrics.json`` and the selections'
``precision.json``); seeds are summarised as mean, sample standard deviation, min and max.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from typing import Any

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError
from ssl_kd.pipeline.builder import Model, Selection

GOAL_POINTS = 3.0  # default: the fine-tuned student's top-1 over the baseline's, in points
ROLES = ("teacher", "baseline", "pretrained", "finetuned", "joint", "oracle")


def _metrics(m: dict[str, Any]) -> dict[str, float | None]:
    fid = m.get("fidelity") or {}
    cpu = m.get("cpu") or {}
    return {
        "top1": m["top1"],
        "top5": m["top5"],
        "ece": m["calibration"]["ece"],
        "agreement": fid.get("agreement"),
        "kl": fid.get("kl"),
        "cka": fid.get("cka"),  # None: a teacher without features, or metrics from before CKA
        "params": m["model"]["params"],
        "macs": m["model"]["macs"],
        "latency_ms": cpu.get("latency_ms"),
        "images_per_s": cpu.get("images_per_s"),
    }


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
    }


def collect(
    root: str,
    models: Sequence[Model],
    selections: Sequence[Selection] = (),
    goal_points: float = GOAL_POINTS,
) -> dict[str, Any]:
    """Gather every model's test metrics and the selections' precision into one document; the
    goal lines ask for ``goal_points`` over the baseline."""
    rows: dict[tuple[str, int, str], list[tuple[Model, dict[str, Any]]]] = {}
    archs: dict[tuple[str, int, str], str] = {}
    for model in models:
        path = storage.join(root, "eval", model.slug, "metrics.json")
        metrics = json.loads(storage.read_text(path))
        row = (model.role, model.round, model.variant)
        rows.setdefault(row, []).append((model, _metrics(metrics)))
        archs[row] = str(metrics["arch"])
    table = []
    # A variant's rows (e.g. feature distillation at some weight) follow the plain ones, in the
    # order the plan made them (the weights as configured, not as strings).
    order = {v: i for i, v in enumerate(dict.fromkeys(m.variant for m in models))}
    order[""] = -1
    for (role, rnd, variant), entries in sorted(
        rows.items(), key=lambda kv: (kv[0][1], order[kv[0][2]], ROLES.index(kv[0][0]))
    ):
        keys = entries[0][1].keys()
        table.append(
            {
                "model": role,
                "variant": variant,
                "round": rnd,
                "arch": archs[role, rnd, variant],
                "seeds": [m.seed for m, _ in entries],
                "per_seed": [{"seed": m.seed, **x} for m, x in entries],
                **{k: _spread([x[k] for _, x in entries]) for k in keys},
            }
        )
    return {
        "models": table,
        "selection_precision": _precision(selections),
        "goals": _goals(table, goal_points),
    }


def _precision(selections: Sequence[Selection]) -> list[dict[str, Any]]:
    """Per round, the spread of the selections' precision (every precision.json must exist)."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for sel in sorted(selections, key=lambda s: (s.round, -1 if s.seed is None else s.seed)):
        path = storage.join(sel.dir, "precision.json")
        if not storage.is_file(path):
            raise UserError(f"{path} is missing: the selection stage writes it; rerun ssl-kd run")
        by_round.setdefault(sel.round, []).append(json.loads(storage.read_text(path)))
    return [
        {
            "round": r,
            "images": values[0]["images"],
            "precision": _spread([v["precision"] for v in values]),
            "no_class": _spread([v.get("no_class", 0) for v in values]),
        }
        for r, values in sorted(by_round.items())
    ]


def _row(table: list[dict[str, Any]], role: str, rnd: int) -> dict[str, Any] | None:
    """The plain row (no variant) of ``role`` in round ``rnd``."""
    return next(
        (t for t in table if t["model"] == role and t["round"] == rnd and not t.get("variant")),
        None,
    )


def _goals(table: list[dict[str, Any]], goal_points: float) -> list[dict[str, Any]]:
    baseline = _row(table, "baseline", 0)
    teacher = _row(table, "teacher", 0)
    goals = []
    for student in (t for t in table if t["model"] == "finetuned" and not t.get("variant")):
        rnd = student["round"]
        prev = teacher if rnd == 1 else _row(table, "finetuned", rnd - 1)
        gain = 100 * (student["top1"]["mean"] - baseline["top1"]["mean"]) if baseline else None
        over_teacher = 100 * (student["top1"]["mean"] - prev["top1"]["mean"]) if prev else None
        oracle = _row(table, "oracle", rnd)
        lost = 100 * (oracle["top1"]["mean"] - student["top1"]["mean"]) if oracle else None
        goals.append(
            {
                "lost_to_label_errors_points": lost,
                "round": rnd,
                "gain_over_baseline_points": gain,
                "goal_points": goal_points,
                "goal_met": gain is not None and gain >= goal_points,
                "gain_over_teacher_points": over_teacher,
                "above_teacher": over_teacher is not None and over_teacher > 0,
            }
        )
    return goals


def _pct(s: dict[str, float | None], spread: bool = True) -> str:
    if s["mean"] is None:
        return "–"
    text = f"{100 * s['mean']:.2f}"
    if spread and s["std"]:
        text += f" ± {100 * s['std']:.2f}"
    return text


def _num(s: dict[str, float | None], fmt: str) -> str:
    return "–" if s["mean"] is None else format(s["mean"], fmt)


_INTRO = (
    "Top-1 and top-5 on the test set, in %: mean ± sample std over the seeds (min–max in "
    "results.json). Agreement, KL(teacher‖student) and the linear CKA of the penultimate "
    "features are measured against the model's own teacher (CKA – for a teacher without "
    "features, e.g. a TorchScript archive); latency is batch 1 on this CPU. The oracle is the "
    "student trained the same way on the true labels of the same selected images: the gap to it "
    "is what label errors cost. The joint student trains on pseudo-labeled and labeled images "
    "together, without fine-tuning. A row with a feature loss and weight β (cosine β=1) is the "
    "student that also learned the teacher's stored embeddings."
)
_HEADER = (
    "| model | round | arch | seeds | top-1 | top-5 | agreement | KL | CKA | ECE | params | MACs | "
    "latency ms | img/s |"
)
_COLORS = {
    "teacher": "tab:gray",
    "baseline": "tab:orange",
    "pretrained": "tab:cyan",
    "finetuned": "tab:blue",
    "joint": "tab:purple",
    "oracle": "tab:green",
}


def format_markdown(doc: dict[str, Any], title: str, stage_table: str = "") -> str:
    """``results.md``: the model table, selection precision and the goals."""
    lines = [f"# {title}", "", _INTRO, "", _HEADER, "|---|---:|---|---:" + "|---:" * 10 + "|"]
    for t in doc["models"]:
        lines.append(
            f"| {_name(t)} | {t['round'] or '–'} | {t['arch']} | {len(t['seeds'])} | "
            f"{_pct(t['top1'])} | {_pct(t['top5'])} | {_pct(t['agreement'])} | "
            f"{_num(t['kl'], '.3f')} | {_num(t['cka'], '.3f')} | {_num(t['ece'], '.3f')} | "
            f"{_num(t['params'], ',.0f')} | "
            f"{_num(t['macs'], ',.0f')} | {_num(t['latency_ms'], '.2f')} | "
            f"{_num(t['images_per_s'], ',.0f')} |"
        )
    if doc["selection_precision"]:
        lines += [
            "",
            "Pseudo-label precision of the selection (selected class = true label; of no class: "
            "selected images whose true class is none of the task's, in an open-set pool):",
            "",
            "| round | selected images | precision | of no class |",
            "|---:|---:|---:|---:|",
        ]
        for p in doc["selection_precision"]:
            lines.append(
                f"| {p['round']} | {p['images']:,} | {_pct(p['precision'])} | "
                f"{_num(p['no_class'], ',.0f')} |"
            )
    lines += ["", "Goals:", ""]
    for g in doc["goals"]:
        gain, over = (
            signed_points(g["gain_over_baseline_points"]),
            signed_points(g["gain_over_teacher_points"]),
        )
        lines.append(
            f"- round {g['round']}: fine-tuned student {gain} points over the baseline "
            f"(goal +{g['goal_points']:.1f}: {'met' if g['goal_met'] else 'not met'}); "
            f"{over} points over its teacher "
            f"({'above' if g['above_teacher'] else 'not above'})"
            + (
                f"; the oracle, on the true labels of the same images, is "
                f"{g['lost_to_label_errors_points']:+.2f} points above it"
                if g.get("lost_to_label_errors_points") is not None
                else ""
            )
        )
    if stage_table:
        lines += ["", "Stages of this invocation:", "", "```", stage_table, "```"]
    return "\n".join(lines) + "\n"


def signed_points(x: float | None) -> str:
    """Signed points, or ``n/a`` where a row to compare with is missing."""
    return "n/a" if x is None else f"{x:+.2f}"


def _name(row: dict[str, Any]) -> str:
    """The row's model, with its variant (e.g. ``finetuned (cosine β=1)``)."""
    return row["model"] + (f" ({row['variant']})" if row.get("variant") else "")


def plot(doc: dict[str, Any], path: str) -> str:
    """``results.png``: top-1 of every model (mean, min–max bars) and the goal line."""
    from ssl_kd.figures import new_figure, save_png  # imports matplotlib

    table = doc["models"]
    names = [_name(t) + (f" r{t['round']}" if t["round"] else "") for t in table]
    means = [100 * t["top1"]["mean"] for t in table]
    lo = [m - 100 * t["top1"]["min"] for m, t in zip(means, table, strict=True)]
    hi = [100 * t["top1"]["max"] - m for m, t in zip(means, table, strict=True)]
    fig = new_figure(max(6.0, 1.1 * len(table)), 4)
    ax = fig.add_subplot()
    ax.bar(
        range(len(table)),
        means,
        yerr=[lo, hi],
        capsize=4,
        color=[_COLORS[t["model"]] for t in table],
    )
    for i, m in enumerate(means):  # above the error bar
        ax.text(i, m + hi[i] + 0.1, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
    base = next((t for t in table if t["model"] == "baseline"), None)
    if base:
        points = doc["goals"][0]["goal_points"] if doc["goals"] else GOAL_POINTS
        goal = 100 * base["top1"]["mean"] + points
        ax.axhline(
            goal,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"baseline + {points:g} points",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(table)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(max(0.0, min(means) - 5), min(100.0, max(means) + 3))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Teacher, baseline and student (mean over seeds, min–max)")
    return save_png(fig, path)


def write_results(
    root: str,
    models: Sequence[Model],
    selections: Sequence[Selection],
    title: str,
    stage_table: str = "",
    goal_points: float = GOAL_POINTS,
) -> dict[str, Any]:
    """Write results.json, results.md and results.png under ``root/results``; returns the doc."""
    doc = collect(root, models, selections, goal_points)
    out = storage.join(root, "results")
    atomic.write_text(storage.join(out, "results.json"), json.dumps(doc, indent=2) + "\n")
    atomic.write_text(storage.join(out, "results.md"), format_markdown(doc, title, stage_table))
    plot(doc, storage.join(out, "results.png"))
    return doc
