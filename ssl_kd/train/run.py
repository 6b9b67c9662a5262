"""``ssl-kd train``, ``pretrain`` and ``finetune``: run the training loop where the config says.

``executor: local`` runs :func:`~ssl_kd.train.worker.train_worker` in this process;
``executor: ray`` runs it on ``workers`` Ray Train workers (DDP). Either way the outputs in
``out`` are the same: ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json``.
"""

from __future__ import annotations

from typing import Any

from ssl_kd import storage
from ssl_kd.train.context import LocalContext
from ssl_kd.train.inputs import read_inputs
from ssl_kd.train.options import Config, StudentOptions, TrainConfig
from ssl_kd.train.worker import train_worker


def run_train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the teacher or the baseline as ``cfg`` says; returns the summary."""
    return _run(cfg, progress)


def run_student(cfg: StudentOptions, progress: bool = True) -> dict[str, Any]:
    """Pretrain or fine-tune (or resume) the student as ``cfg`` says; returns the summary."""
    return _run(cfg, progress)


def _run(cfg: Config, progress: bool) -> dict[str, Any]:
    read_inputs(cfg)  # bad input fails here, before any worker starts
    storage.makedirs(cfg.out)
    if cfg.executor == "local":
        return train_worker(cfg, LocalContext(cfg.out), progress)
    from ssl_kd.train.ray_trainer import fit

    return fit(train_worker, cfg, progress)


def format_summary(cfg: TrainConfig | StudentOptions, summary: dict[str, Any]) -> str:
    """The line ``ssl-kd train``, ``pretrain`` and ``finetune`` print on stdout."""
    verb = "already trained" if summary["resumed_at"] == summary["step"] else "trained"
    how = ""
    if isinstance(cfg, StudentOptions):
        how = f" ({summary['loss']} loss, {summary['workers']} worker(s))"
    line = f"{verb} {summary['arch']}{how} for {summary['step']} steps -> {summary['checkpoint']}"
    if "val" in summary:
        line += f"; val top-1 {100 * summary['val']['top1']:.2f}%"
    return line
