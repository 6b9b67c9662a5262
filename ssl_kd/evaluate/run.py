"""Evaluation of a classifier checkpoint on labeled shards.

One pass over the data gives top-1/top-5, loss, per-class accuracy, calibration and, with a
teacher, the student's fidelity to it; :mod:`ssl_kd.models.stats` adds size and CPU speed.
Every metric is a pure function of the per-image :class:`Predictions` of that pass.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_kd import atomic
from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.device import resolve_device
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint
from ssl_kd.models.preprocess import Preprocess, fit_size, normalize
from ssl_kd.models.stats import cpu_speed, model_size
from ssl_kd.shards import expand_shards
from ssl_kd.shards.dataset import ShardImageDataset

log = logging.getLogger(__name__)

ECE_BINS = 15
# Above this many classes the per-class table is left to the JSON file.
MAX_PRINTED_CLASSES = 20


@dataclass(frozen=True)
class EvalConfig:
    """``ssl-kd evaluate``."""

    checkpoint: str = option(help="checkpoint to evaluate")
    data: str = option(help="labeled shards (dir, brace pattern, glob or list file)")
    teacher: str | None = option(
        None, help="teacher checkpoint: adds top-1 agreement, KL(teacher||student), teacher top-1"
    )
    out: str | None = option(None, help="write the metrics as JSON to this file")
    batch_size: int = option(256, help="images per forward pass", min=1)
    num_workers: int = option(0, help="DataLoader worker processes", min=0)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    latency: bool = option(True, help="time CPU latency (batch 1) and throughput (batch 256)")
    latency_budget_s: float = option(1.0, help="seconds spent on each CPU timing", gt=0)


class Teacher(NamedTuple):
    """A reference model scored on the same images, with its own input normalisation."""

    model: nn.Module
    pp: Preprocess


@dataclass(frozen=True)
class Predictions:
    """Per-image results of one pass, on the CPU (a few numbers per image, not the logits)."""

    num_classes: int
    labels: torch.Tensor  # int64
    pred: torch.Tensor  # int64, top-1 class
    confidence: torch.Tensor  # float64, top-1 softmax probability
    top5_hit: torch.Tensor  # bool, label among the top min(5, C)
    loss: torch.Tensor  # float64, cross-entropy
    teacher_pred: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # float64, KL(teacher || student) in nats


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(teacher) || softmax(student)) in nats, in float64, at temperature 1."""
    log_t = teacher_logits.double().log_softmax(dim=1)
    log_s = student_logits.double().log_softmax(dim=1)
    p_t = log_t.exp()
    # 0 * log 0 = 0: a class the teacher rules out contributes nothing, even where log_s = -inf.
    terms = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t))
    return terms.sum(dim=1)


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    pp: Preprocess,
    teacher: Teacher | None = None,
    progress: bool = False,
) -> Predictions:
    """Run ``model`` (and ``teacher``) over ``loader`` once; uint8 batches normalised per model."""
    model.eval()
    if teacher is not None:
        teacher.model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    num_classes = 0

    def keep(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.cpu())

    for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device)
        logits = model(normalize(images, pp))
        num_classes = logits.shape[1]
        probs = logits.double().softmax(dim=1)
        confidence, pred = probs.max(dim=1)
        top = logits.topk(min(5, num_classes), dim=1).indices
        keep("labels", labels)
        keep("pred", pred)
        keep("confidence", confidence)
        keep("top5_hit", top.eq(labels[:, None]).any(dim=1))
        keep("loss", nn.functional.cross_entropy(logits.double(), labels, reduction="none"))
        if teacher is not None:
            t_logits = teacher.model(normalize(images, teacher.pp))
            keep("teacher_pred", t_logits.argmax(dim=1))
            keep("kl", kl_divergence(t_logits, logits))
    empty = {
        "labels": torch.long,
        "pred": torch.long,
        "confidence": torch.float64,
        "top5_hit": torch.bool,
        "loss": torch.float64,
    }
    if teacher is not None:
        empty |= {"teacher_pred": torch.long, "kl": torch.float64}
    cols = {
        k: torch.cat(parts[k]) if k in parts else torch.zeros(0, dtype=dt)
        for k, dt in empty.items()
    }
    return Predictions(num_classes=num_classes, **cols)


def accuracy(p: Predictions) -> dict[str, Any]:
    """``n``, ``top1``, ``top5`` (top-k for fewer classes) and mean cross-entropy ``loss``."""
    n = len(p.labels)
    if n == 0:
        return {"n": 0, "top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    return {
        "n": n,
        "top1": p.pred.eq(p.labels).sum().item() / n,
        "top5": p.top5_hit.sum().item() / n,
        "loss": p.loss.sum().item() / n,
    }


def per_class_accuracy(
    pred: torch.Tensor, labels: torch.Tensor, names: Sequence[str]
) -> list[dict[str, Any]]:
    """``{class, name, n, top1}`` for each class in ``names`` (top1 is None when n is 0)."""
    c = len(names)
    n = torch.bincount(labels, minlength=c)
    hits = torch.bincount(labels[pred.eq(labels)], minlength=c)
    return [
        {
            "class": i,
            "name": name,
            "n": int(n[i]),
            "top1": hits[i].item() / n[i].item() if n[i] else None,
        }
        for i, name in enumerate(names)
    ]


def _bins(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bin edges and per-bin (count, sum of confidence, sum of correct) over (lo, hi] bins."""
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    conf = confidence.double()
    # bucketize(right=False) puts x in bin i when edges[i] < x <= edges[i+1] (0 in the first).
    idx = torch.bucketize(conf, edges[1:-1])
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct.double(), minlength=n_bins)
    return edges, count, conf_sum, acc_sum


def ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width bins of |acc - conf| * n_bin / n."""
    if len(confidence) == 0:
        return float("nan")
    _, _, conf_sum, acc_sum = _bins(confidence, correct, n_bins)
    # |acc_b - conf_b| * n_b / n == |sum of correct_b - sum of confidence_b| / n
    return ((acc_sum - conf_sum).abs().sum() / len(confidence)).item()


def calibration(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """``ece``, ``confidence_mean`` and the reliability ``bins`` (lo, hi, n, acc, conf)."""
    edges, count, conf_sum, acc_sum = _bins(confidence, correct, n_bins)
    bins = [
        {
            "lo": round(edges[i].item(), 6),
            "hi": round(edges[i + 1].item(), 6),
            "n": int(count[i]),
            "acc": acc_sum[i].item() / count[i].item() if count[i] else None,
            "conf": conf_sum[i].item() / count[i].item() if count[i] else None,
        }
        for i in range(n_bins)
    ]
    mean = confidence.double().mean().item() if len(confidence) else float("nan")
    return {
        "ece": ece(confidence, correct, n_bins),
        "confidence_mean": mean,
        "n_bins": n_bins,
        "bins": bins,
    }


def fidelity(
    pred: torch.Tensor, teacher_pred: torch.Tensor, kl: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Top-1 ``agreement`` with the teacher, mean ``kl`` (teacher || student), ``teacher_top1``."""
    n = len(labels)
    if n == 0:
        return {"agreement": float("nan"), "kl": float("nan"), "teacher_top1": float("nan")}
    return {
        "agreement": pred.eq(teacher_pred).sum().item() / n,
        "kl": kl.double().mean().item(),
        "teacher_top1": teacher_pred.eq(labels).sum().item() / n,
    }


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    pp: Preprocess,
    progress: bool = False,
    *,
    teacher: Teacher | None = None,  # adds ``fidelity``
    detailed: bool = False,
    classes: Sequence[str] | None = None,  # names in ``per_class`` (else the class ids)
) -> dict[str, Any]:
    """``n``, ``top1``, ``top5``, ``loss``; ``detailed`` adds per-class and calibration."""
    # The trainers pass only the first four arguments and log every key: keep those lean.
    p = predict(model, loader, device, pp, teacher, progress)
    result = accuracy(p)
    if detailed:
        names = list(classes) if classes is not None else [str(i) for i in range(p.num_classes)]
        result["per_class"] = per_class_accuracy(p.pred, p.labels, names)
        result["calibration"] = calibration(p.confidence, p.pred.eq(p.labels))
    if teacher is not None:
        assert p.teacher_pred is not None and p.kl is not None
        result["fidelity"] = fidelity(p.pred, p.teacher_pred, p.kl, p.labels)
    return result


def eval_loader(
    urls: list[str], pp: Preprocess, num_classes: int, batch_size: int, num_workers: int = 0
) -> DataLoader:
    """A deterministic loader over labeled shards prepared as ``pp`` says."""
    ds = ShardImageDataset(urls, fit_size(pp), pp.channels, num_classes=num_classes)
    # A private generator keeps evaluation from consuming the global RNG of a training run.
    return DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator()
    )


def check_teacher(meta: dict[str, Any], teacher_meta: dict[str, Any], teacher_path: str) -> None:
    """UserError unless the teacher reads the same images and predicts the same classes."""
    pp = Preprocess.from_dict(meta["preprocess"])
    tpp = Preprocess.from_dict(teacher_meta["preprocess"])
    if (pp.channels, pp.image_size) != (tpp.channels, tpp.image_size):
        raise UserError(
            f"teacher {teacher_path} takes {tpp.channels}x{tpp.image_size}x{tpp.image_size} "
            f"images but the evaluated model takes {pp.channels}x{pp.image_size}x{pp.image_size}; "
            "fidelity needs both models on the same images"
        )
    if teacher_meta["num_classes"] != meta["num_classes"]:
        raise UserError(
            f"teacher {teacher_path} has {teacher_meta['num_classes']} classes but the evaluated "
            f"model has {meta['num_classes']}"
        )
    if list(teacher_meta["classes"]) != list(meta["classes"]):
        # Names may come from different sources (ids vs dataset.json) for the same label order.
        log.warning("teacher class names differ from the model's; comparing by class index")


def run_evaluate(cfg: EvalConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``; writes ``cfg.out`` (JSON) when set."""
    ckpt = load_checkpoint(cfg.checkpoint)
    urls = expand_shards(cfg.data)
    model, meta = model_from_checkpoint(ckpt)
    pp = Preprocess.from_dict(meta["preprocess"])
    teacher: Teacher | None = None
    teacher_info: dict[str, Any] = {}
    if cfg.teacher:
        t_model, t_meta = model_from_checkpoint(load_checkpoint(cfg.teacher))
        check_teacher(meta, t_meta, cfg.teacher)
        teacher = Teacher(t_model, Preprocess.from_dict(t_meta["preprocess"]))
        shape = (teacher.pp.channels, teacher.pp.image_size, teacher.pp.image_size)
        teacher_info = {"teacher": cfg.teacher, "teacher_arch": t_meta["arch"]}
        teacher_info |= {f"teacher_{k}": v for k, v in model_size(t_model, shape).items()}
    device = resolve_device(cfg.device)
    shape = (pp.channels, pp.image_size, pp.image_size)
    size = model_size(model, shape)
    # Timed while the model is still on the CPU, whatever device evaluates it.
    speed = cpu_speed(model, shape, cfg.latency_budget_s) if cfg.latency else None
    model.to(device)
    if teacher is not None:
        teacher.model.to(device)
    loader = eval_loader(urls, pp, meta["num_classes"], cfg.batch_size, cfg.num_workers)
    t0 = time.perf_counter()
    metrics = evaluate(
        model, loader, device, pp, progress, teacher=teacher, detailed=True, classes=meta["classes"]
    )
    seconds = time.perf_counter() - t0
    if "fidelity" in metrics:
        metrics["fidelity"] = {**teacher_info, **metrics["fidelity"]}
    stats = loader.dataset.stats.as_dict() if cfg.num_workers == 0 else None
    result = {
        **metrics,
        "fidelity": metrics.get("fidelity"),
        "model": size,
        "cpu": speed,
        "seconds": round(seconds, 3),
        "images_per_s": round(metrics["n"] / seconds, 1) if seconds > 0 else None,
        "arch": meta["arch"],
        "checkpoint_step": ckpt.get("step"),
        "shards": len(urls),
        "read_stats": stats,
        "config": cfglib.to_dict(cfg),
    }
    if cfg.out:
        atomic.write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    return result


def _si(x: float) -> str:
    """1234567 → '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:g}"


def format_report(r: dict[str, Any]) -> str:
    """The printable summary of :func:`run_evaluate`'s result."""
    out = r["config"].get("out")
    lines = [
        f"{r['arch']} on {r['n']} images: top-1 {100 * r['top1']:.2f}%  "
        f"top-5 {100 * r['top5']:.2f}%  ({r['seconds']:.1f} s, {r['images_per_s']} img/s)"
        + (f" -> {out}" if out else "")
    ]
    cal = r["calibration"]
    lines.append(
        f"calibration: ECE {100 * cal['ece']:.2f}% ({cal['n_bins']} bins)  "
        f"mean confidence {100 * cal['confidence_mean']:.2f}%"
    )
    m = r["model"]
    lines.append(
        f"size: {_si(m['params'])} params  {_si(m['macs'])} MACs/image  {m['size_mb']:.2f} MB"
    )
    if r["cpu"]:
        cpu = r["cpu"]
        lines.append(
            f"CPU ({cpu['threads']} threads): {cpu['latency_ms']:.2f} ms/image at batch 1, "
            f"{cpu['images_per_s']:.0f} img/s at batch {cpu['throughput_batch']}"
        )
    if r["fidelity"]:
        f = r["fidelity"]
        lines.append(
            f"teacher {f['teacher_arch']} ({_si(f['teacher_params'])} params, "
            f"{_si(f['teacher_macs'])} MACs): agreement {100 * f['agreement']:.2f}%  "
            f"KL(teacher||student) {f['kl']:.4f} nats  teacher top-1 {100 * f['teacher_top1']:.2f}%"
        )
    if len(r["per_class"]) <= MAX_PRINTED_CLASSES:
        lines.append(f"{'class':>5} {'name':<20} {'n':>7} {'top-1':>8}")
        for row in r["per_class"]:
            acc = f"{100 * row['top1']:.2f}%" if row["top1"] is not None else "-"
            lines.append(f"{row['class']:>5} {row['name'][:20]:<20} {row['n']:>7} {acc:>8}")
    return "\n".join(lines)
