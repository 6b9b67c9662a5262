"""The metrics of one evaluation pass: top-1/top-5, loss, per-class accuracy, calibration and
fidelity to a reference model (the teacher): top-1 agreement, KL and the linear CKA of their
penultimate features (:mod:`ssl_kd.evaluate.cka`).

One pass over the data (:func:`predict`) gives per-image :class:`Predictions`; every metric is a
pure function of them. Training's validation and ``ssl-kd evaluate`` both use :func:`evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_kd.device import autocast
from ssl_kd.evaluate.cka import linear_cka
from ssl_kd.evaluate.reference_cache import ReferenceOutputs
from ssl_kd.models.ensemble import features_and_logits, has_features
from ssl_kd.models.preprocess import Preprocess, fit_size, normalize
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.shards.decode import DEFAULT_MAX_PIXELS

ECE_BINS = 15


class Reference(NamedTuple):
    """A reference model scored on the same images, with its own input normalisation, and its
    outputs on those images where an earlier pass kept them (then it does not run)."""

    model: nn.Module
    pp: Preprocess
    cached: ReferenceOutputs | None = None

    def has_features(self) -> bool:
        """Whether it gives penultimate features (stored ones count)."""
        if self.cached is not None:
            return self.cached.features is not None
        return has_features(self.model)

    def outputs(
        self,
        images: torch.Tensor,
        start: int,
        labels: torch.Tensor,
        device: torch.device,
        precision: str,
        with_features: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Features (``with_features``, else None) and float32 logits of one batch, the
        images from ``start`` on: stored, or computed from ``images``."""
        if self.cached is not None:
            feats, logits = self.cached.take(start, labels)
            feats = feats.to(device) if with_features and feats is not None else None
            return feats, logits.to(device)
        images = images.to(device, non_blocking=True)
        with autocast(device, precision):
            return _forward(self.model, normalize(images, self.pp), with_features)


@dataclass(frozen=True)
class Predictions:
    """Per-image results of one pass, on the CPU (a few numbers per image, not the logits; the
    penultimate features only when both models give them for fidelity)."""

    num_classes: int
    labels: torch.Tensor  # int64
    pred: torch.Tensor  # int64, top-1 class
    confidence: torch.Tensor  # float64, top-1 softmax probability
    top5_hit: torch.Tensor  # bool, label among the top min(5, C)
    loss: torch.Tensor  # float64, cross-entropy
    teacher_pred: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # float64, KL(teacher || student) in nats
    features: torch.Tensor | None = None  # float32 (n, d), the model's penultimate features
    teacher_features: torch.Tensor | None = None  # float32 (n, d_teacher)
    teacher_outputs: ReferenceOutputs | None = None  # with ``keep_teacher_outputs``


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
    teacher: Reference | None = None,
    progress: bool = False,
    *,
    precision: str = "fp32",
    keep_teacher_outputs: bool = False,
) -> Predictions:
    """Run ``model`` (and ``teacher``) over ``loader`` once; uint8 batches normalised per model.

    The models run under autocast at ``precision``; their logits are scored in fp32 or above.
    With a teacher, both models' penultimate features are kept too when both give them; a
    teacher with ``cached`` outputs does not run. ``keep_teacher_outputs`` returns the
    teacher's logits and features (when it gives them) for a later pass to reuse.
    """
    model.eval()
    record = teacher is not None and teacher.cached is None and keep_teacher_outputs
    if teacher is not None:
        teacher.model.eval()
    # Features cost n x (d + d_teacher) float32 on the CPU (10k images x 512 + 512 dims: 40 MB);
    # CKA needs them all at once, so they are kept only when CKA can be computed.
    with_features = teacher is not None and teacher.has_features() and has_features(model)
    # Kept outputs hold the teacher's features whenever it gives them, for any later student.
    t_with_features = with_features or (record and teacher is not None and teacher.has_features())
    parts: dict[str, list[torch.Tensor]] = {}
    seen = num_classes = 0

    def keep(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.cpu())

    for batch, labels in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        # A teacher with another input geometry gets its own copy of each image (eval_loader).
        images, t_images = batch if isinstance(batch, (list, tuple)) else (batch, batch)
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device)
        with autocast(device, precision):
            feats, logits = _forward(model, normalize(images, pp), with_features)
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
            t_feats, t_logits = teacher.outputs(
                t_images, seen, labels, device, precision, t_with_features
            )
            if record:
                keep("teacher_logits", t_logits)
                if t_feats is not None:
                    keep("teacher_all_features", t_feats)
            keep("teacher_pred", t_logits.argmax(dim=1))
            keep("kl", kl_divergence(t_logits, logits))
            if with_features:
                assert feats is not None and t_feats is not None
                keep("features", feats)
                keep("teacher_features", t_feats)
        seen += len(labels)
    empty = {
        "labels": torch.long,
        "pred": torch.long,
        "confidence": torch.float64,
        "top5_hit": torch.bool,
        "loss": torch.float64,
    }
    if teacher is not None:
        empty |= {"teacher_pred": torch.long, "kl": torch.float64}
    cols: dict[str, Any] = {
        k: torch.cat(parts[k]) if k in parts else torch.zeros(0, dtype=dt)
        for k, dt in empty.items()
    }
    if with_features:
        for k in ("features", "teacher_features"):
            cols[k] = torch.cat(parts[k]) if k in parts else torch.zeros(0, 0)
    if record:
        logits = parts.get("teacher_logits", [torch.zeros(0, num_classes)])
        t_feats = parts.get("teacher_all_features")
        cols["teacher_outputs"] = ReferenceOutputs(
            cols["labels"], torch.cat(logits), torch.cat(t_feats) if t_feats else None
        )
    return Predictions(num_classes=num_classes, **cols)


def _forward(
    model: nn.Module, x: torch.Tensor, with_features: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Penultimate features (``with_features``, else None) and logits, float32, of one pass."""
    if not with_features:
        return None, model(x).float()
    feats, logits = features_and_logits(model, x)
    return feats.float(), logits.float()


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
    pred: torch.Tensor,
    teacher_pred: torch.Tensor,
    kl: torch.Tensor,
    labels: torch.Tensor,
    cka: float | None = None,
) -> dict[str, float | None]:
    """Top-1 ``agreement`` with the teacher, mean ``kl`` (teacher || student), ``teacher_top1``
    and the features' ``cka`` as given (None when a model gives no features)."""
    n = len(labels)
    if n == 0:
        nan = float("nan")
        return {"agreement": nan, "kl": nan, "teacher_top1": nan, "cka": cka}
    return {
        "agreement": pred.eq(teacher_pred).sum().item() / n,
        "kl": kl.double().mean().item(),
        "teacher_top1": teacher_pred.eq(labels).sum().item() / n,
        "cka": cka,
    }


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    pp: Preprocess,
    progress: bool = False,
    *,
    teacher: Reference | None = None,  # adds ``fidelity``
    detailed: bool = False,
    classes: Sequence[str] | None = None,  # names in ``per_class`` (else the class ids)
    precision: str = "fp32",  # autocast of the forward passes
) -> dict[str, Any]:
    """``n``, ``top1``, ``top5``, ``loss``; ``detailed`` adds per-class and calibration."""
    p = predict(model, loader, device, pp, teacher, progress, precision=precision)
    return score(p, detailed=detailed, classes=classes)


def score(
    p: Predictions, *, detailed: bool = False, classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """The metrics of :func:`evaluate` from one pass's predictions (``fidelity`` when they
    hold the teacher's)."""
    # The trainers call it without ``detailed`` and log every key: keep those lean.
    result = accuracy(p)
    if detailed:
        names = list(classes) if classes is not None else [str(i) for i in range(p.num_classes)]
        result["per_class"] = per_class_accuracy(p.pred, p.labels, names)
        result["calibration"] = calibration(p.confidence, p.pred.eq(p.labels))
    if p.teacher_pred is not None:
        assert p.kl is not None
        cka = None
        if p.features is not None and p.teacher_features is not None:
            cka = linear_cka(p.features, p.teacher_features)
        result["fidelity"] = fidelity(p.pred, p.teacher_pred, p.kl, p.labels, cka)
    return result


def eval_loader(
    urls: list[str],
    pp: Preprocess,
    num_classes: int,
    batch_size: int,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    teacher_pp: Preprocess | None = None,
    *,
    pin_memory: bool = False,  # on CUDA: page-locked batches copy to the GPU asynchronously
) -> DataLoader:
    """A deterministic loader over labeled shards prepared as ``pp`` says; with a
    ``teacher_pp`` of another geometry, each batch is a pair (model's images, teacher's)."""
    transform = fit_size(pp)
    channels, size = pp.channels, pp.resize_to
    if teacher_pp is not None and _geometry(teacher_pp) != _geometry(pp):
        transform = _pair(pp, teacher_pp)
        channels = max(pp.channels, teacher_pp.channels)
        size = max(size, teacher_pp.resize_to)
    ds = ShardImageDataset(
        urls,
        transform,
        channels,
        num_classes=num_classes,
        max_pixels=max_pixels,
        decode_size=size,
    )
    # A private generator keeps evaluation from consuming the global RNG of a training run.
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


def _geometry(pp: Preprocess) -> tuple[int, int, int]:
    return pp.channels, pp.image_size, pp.resize_to


def _pair(pp: Preprocess, teacher_pp: Preprocess) -> Any:
    """Per-image transform giving the model's and the teacher's input from one decoded image."""
    fits = (fit_size(pp), fit_size(teacher_pp))
    wanted = (pp.channels, teacher_pp.channels)

    def transform(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (fit(_to_channels(img, c)) for fit, c in zip(fits, wanted, strict=True))
        return a, b

    return transform


def _to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) with ``channels``: gray repeated, or RGB to luma (PIL's weights)."""
    if img.shape[0] == channels:
        return img
    if channels == 3:
        return img.expand(3, -1, -1)
    w = torch.tensor([299, 587, 114], dtype=torch.int32).view(3, 1, 1)
    return ((img.int() * w).sum(0, keepdim=True) // 1000).to(torch.uint8)
