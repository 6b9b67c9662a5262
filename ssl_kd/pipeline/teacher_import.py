"""A teacher to start from: ``ssl-kd run``'s ``teacher:`` section naming a ``source`` (a
torchvision or timm classifier and its weights, a TorchScript archive, an exported program, a
zero-shot CLIP model, an ssl_kd checkpoint) is written as the run's ``teacher/checkpoint.pt``
instead of trained, once it is checked against the labeled data's classes.
"""

from __future__ import annotations

from typing import Any

from ssl_kd import config as cfglib
from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import save_checkpoint
from ssl_kd.models.external import REFERENCED, load_teacher, teacher_checkpoint, teacher_spec
from ssl_kd.pipeline.config import ExternalTeacher
from ssl_kd.shards import expand_shards
from ssl_kd.shards.classes import resolve_classes


def import_params(ext: ExternalTeacher) -> dict[str, Any]:
    """The section's keys and its files' sha256: new weights re-import the teacher."""
    files = {"source": ext.source, "weights": ext.weights}
    files |= {"class_names": ext.class_names, "keep_classes": ext.keep_classes}
    files |= {"prompts": ext.prompts}
    digests = {k: storage.sha256(v) for k, v in files.items() if v and storage.is_file(v)}
    return {**cfglib.to_dict(ext), "digests": digests}


def import_teacher(
    ext: ExternalTeacher,
    params: dict[str, Any],
    labeled: str,
    class_names: str | None,
    directory: str,
) -> dict[str, Any]:
    """Load the teacher, check its classes, write ``directory/checkpoint.pt``; its figures."""
    loaded = load_teacher(teacher_spec(ext.source, ext))
    data = resolve_classes(expand_shards(labeled), class_names, None)
    _check_classes(loaded.meta["classes"], data, ext)
    archive = ext.source if loaded.source.get("source") in REFERENCED else None
    ckpt = teacher_checkpoint(loaded, {"teacher": params}, archive)
    save_checkpoint(storage.join(directory, "checkpoint.pt"), ckpt)
    return {"source": loaded.source["source"], "classes": loaded.meta["num_classes"]}


def _check_classes(teacher: list[str], data: list[str], ext: ExternalTeacher) -> None:
    """UserError unless the teacher predicts the labeled data's classes, in the same order."""
    if len(teacher) != len(data):
        raise UserError(
            f"the teacher {ext.source} predicts {len(teacher)} classes and the labeled data has "
            f"{len(data)}: list the task's classes, in the data's order, in teacher.keep_classes"
        )
    numbered = [str(i) for i in range(len(teacher))]
    if teacher != data and numbered not in (teacher, data):
        raise UserError(
            f"the teacher's classes ({', '.join(teacher[:4])}, ...) are not the labeled data's "
            f"({', '.join(data[:4])}, ...): list the task's classes, in the data's order, in "
            "teacher.keep_classes"
        )
