"""``ssl-kd run`` from your own teacher: an external torchvision teacher (weights file, class
names, kept classes) labels web-like RGB images of mixed sizes and modes for a torchvision
student; the teacher is imported, never trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, write_mixed_shards
from torchvision import models as tvm

from ssl_kd import config as cfglib
from ssl_kd.errors import UserError
from ssl_kd.label.files import label_files, read_meta
from ssl_kd.models.checkpoint import load_checkpoint
from ssl_kd.pipeline.config import PipelineConfig

CLASSES = ["cat", "dog", "car", "tree"]
TEACHER_CLASSES = ["plane", "cat", "ship", "dog", "car", "tree"]  # the teacher knows more


def _own_data(tmp_path: Path) -> dict[str, str]:
    splits = {}
    for split, n, labeled in (("labeled", 16, True), ("unlabeled", 40, False), ("test", 12, True)):
        root = tmp_path / split
        root.mkdir()
        seed = {"labeled": 0, "unlabeled": 1, "test": 2}[split]
        write_mixed_shards(root, split, n, 10, len(CLASSES) if labeled else None, seed=seed)
        splits[split] = str(root)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return splits


def _teacher_files(tmp_path: Path) -> dict[str, str]:
    torch.manual_seed(0)
    net = tvm.resnet18(num_classes=len(TEACHER_CLASSES))
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    (tmp_path / "teacher_classes.txt").write_text("\n".join(TEACHER_CLASSES) + "\n")
    (tmp_path / "keep.txt").write_text("\n".join(CLASSES) + "\n")
    return {
        "source": "torchvision:resnet18",
        "weights": str(tmp_path / "resnet18.pth"),
        "class_names": str(tmp_path / "teacher_classes.txt"),
        "keep_classes": str(tmp_path / "keep.txt"),
        "image_size": 64,
        "resize": 72,
    }


def _config(tmp_path: Path, teacher: dict) -> PipelineConfig:
    student = {"arch": "torchvision:mobilenet_v3_small", "image_size": 32}
    data = {
        **TINY,
        **_own_data(tmp_path),
        "out": str(tmp_path / "run"),
        "seeds": [0],
        "class_names": str(tmp_path / "classes.txt"),
        "teacher": teacher,
        "label": {"k": 3, "batch_size": 16},
        "select": {"per_class": 5, "top_p": 2},
        "pretrain": {**TINY["pretrain"], **student},
        "baseline": {**TINY["baseline"], "image_size": 32},
    }
    return cfglib.from_dict(PipelineConfig, data)


def test_run_from_an_external_teacher_with_a_torchvision_student(tmp_path: Path) -> None:
    from ssl_kd.pipeline.run import run_pipeline

    cfg = _config(tmp_path, _teacher_files(tmp_path))
    summary = run_pipeline(cfg, progress=False)
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses["teacher"] == "ran" and all(v == "ran" for v in statuses.values())

    run = tmp_path / "run"
    teacher = load_checkpoint(run / "teacher" / "checkpoint.pt")["meta"]
    assert teacher["classes"] == CLASSES and teacher["arch"] == "torchvision:resnet18"
    assert teacher["preprocess"]["image_size"] == 64 and teacher["preprocess"]["resize"] == 72
    assert not (run / "teacher" / "metrics.jsonl").exists()  # imported, not trained

    meta = read_meta(label_files(run / "round1" / "labels")[0])
    assert meta.classes == CLASSES
    assert meta.extra["teacher"]["source"] == "torchvision"
    assert meta.extra["teacher"]["kept_classes"] == [1, 3, 4, 5]

    student = load_checkpoint(run / "round1/seed0/finetune/checkpoint.pt")["meta"]
    assert student["arch"] == "torchvision:mobilenet_v3_small"
    assert student["preprocess"]["channels"] == 3 and student["preprocess"]["image_size"] == 32
    doc = json.loads((run / "results" / "results.json").read_text())
    assert {m["model"] for m in doc["models"]} == {"teacher", "baseline", "pretrained", "finetuned"}
    # The teacher (64 px) and the students (32 px) are compared on the same test images.
    metrics = json.loads((run / "eval/round1-seed0-finetuned/metrics.json").read_text())
    assert 0.0 <= metrics["fidelity"]["agreement"] <= 1.0 and metrics["n"] == 12


def test_external_teacher_of_other_classes_is_refused(tmp_path: Path) -> None:
    from ssl_kd.pipeline.run import run_pipeline

    teacher = {k: v for k, v in _teacher_files(tmp_path).items() if k != "keep_classes"}
    with pytest.raises(UserError, match="predicts 6 classes and the labeled data has 4"):
        run_pipeline(_config(tmp_path, teacher), progress=False)


def test_external_teacher_section_keys_are_checked(tmp_path: Path) -> None:
    from ssl_kd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"teacher\.wieghts"):
        _config(tmp_path, {"source": "torchvision:resnet18", "wieghts": "w.pth"})
