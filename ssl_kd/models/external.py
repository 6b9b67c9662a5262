"""Teachers from outside ssl_kd: a torchvision or timm classifier with a local weights file, a
TorchScript archive, an exported program or a zero-shot CLIP model — loaded with their own
classes and preprocessing, never downloaded.

:class:`TeacherSpec` is what a user names (``--teacher``, ``--weights``, ``--class-names``,
``--keep-classes`` and the preprocessing flags); :func:`load_teacher` turns it into a model and
the checkpoint-style metadata every later stage reads (arch, classes, preprocessing) plus where
the teacher came from (``source``, ``name``, the weights' sha256, the kept classes).

- ``torchvision:NAME`` + ``--weights FILE``: the architecture as torchvision builds it, the file a
  ``state_dict`` as torchvision distributes them (safetensors, or read with
  ``weights_only=True``); its final linear layer is the head, its input the embedding;
  torchvision's ImageNet evaluation transform unless the flags say otherwise.
- ``timm:NAME[.TAG]`` + ``--weights FILE``: the same for a timm model and its own state dict
  (``model.safetensors``, ``pytorch_model.bin``); the preprocessing is timm's data config of
  the model (input size, crop_pct and crop mode, interpolation, mean, std), each part
  overridable by the flags, and the config is recorded with the teacher's provenance.
- a TorchScript archive (``torch.jit.save``): a module mapping a float image batch to logits; it
  gives no embeddings.
- an exported program (``torch.export.save``, :mod:`ssl_kd.models.exported`): the same, and
  what PyTorch now recommends over TorchScript. Both kinds of archive are told apart by content.
- ``open_clip:ARCH`` + ``--weights FILE`` + ``--class-names FILE`` (``--prompts FILE``): a
  zero-shot CLIP classifier (:mod:`ssl_kd.models.zero_shot`); it gives embeddings.
- an ssl_kd checkpoint: as always; the preprocessing flags do not apply (it carries its own).

``--keep-classes`` keeps a subset of the teacher's classes: their logits only, so the softmax
renormalises over them (an ImageNet teacher labels for a 100-class task).
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import load_checkpoint, make_meta, model_from_checkpoint
from ssl_kd.models.class_lists import class_names, keep_rows, kept_indices
from ssl_kd.models.ensemble import Ensemble, has_features
from ssl_kd.models.exported import ExportedTeacher, is_exported_program, load_program
from ssl_kd.models.preprocess import Preprocess, imagenet_preprocess
from ssl_kd.models.registry import (
    TORCHVISION,
    Classifier,
    check_model_name,
    split_head,
    torchvision_net,
)
from ssl_kd.models.timm_models import TIMM, timm_classifier, timm_preprocess
from ssl_kd.models.zero_shot import OPEN_CLIP, read_templates, rebuild, zero_shot_classifier

SOURCES = ("ssl_kd", "torchvision", "timm", "torchscript", "exported", "open_clip")
# The sources named by an architecture, whose weights come from --weights.
_NAMED = {"torchvision": TORCHVISION, "timm": TIMM}
# Archives hold code, which a weights_only checkpoint cannot: an import references them by path
# and sha256 (``archive``, ``archive_sha256``; ``script``, ``script_sha256`` before exported
# programs).
REFERENCED = ("torchscript", "exported")


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher as named on the command line or in a run config's ``teacher:`` section."""

    teacher: str
    weights: str | None = None
    class_names: str | None = None
    keep_classes: str | None = None
    image_size: int | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    prompts: str | None = None

    @property
    def preprocess_flags(self) -> dict[str, Any]:
        """The preprocessing flags that were given."""
        names = ("image_size", "resize", "mean", "std")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class LoadedTeacher:
    """A teacher ready for inference: the model, its checkpoint-style metadata, and provenance."""

    model: nn.Module
    meta: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # provenance: no paths, digests only
    digest: str = ""  # sha256 of the file that holds the weights (checkpoint, weights, archive)
    step: int | None = None  # the training step of an ssl_kd checkpoint

    @property
    def has_features(self) -> bool:
        """Whether the model gives penultimate embeddings (``features`` and ``head``)."""
        return has_features(self.model)


def teacher_spec(teacher: str, options: Any) -> TeacherSpec:
    """The spec of ``teacher`` with the other fields read from ``options`` (a label config or a
    run config's ``teacher:`` section: the same names)."""
    names = [f.name for f in fields(TeacherSpec) if f.name != "teacher"]
    return TeacherSpec(teacher, **{n: getattr(options, n, None) for n in names})


def source_kind(teacher: str) -> str:
    """One of :data:`SOURCES`: by prefix for names, by content for files."""
    for kind, prefix in _NAMED.items():
        if teacher.startswith(prefix):
            return kind
    if teacher.startswith(OPEN_CLIP):
        return "open_clip"
    if storage.is_file(teacher):
        return _archive_kind(teacher) or "ssl_kd"
    return "ssl_kd"


def _archive_kind(path: str) -> str | None:
    """TorchScript archives are zip files with a ``code/`` directory, exported programs have
    their own layout (:func:`is_exported_program`); torch.save's zip files have neither."""
    try:
        source = storage.loadable(path)
        with zipfile.ZipFile(source) as z:
            if any("/code/" in n for n in z.namelist()):
                return "torchscript"
            return "exported" if is_exported_program(z) else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def load_teacher(spec: TeacherSpec) -> LoadedTeacher:
    """Load the teacher ``spec`` names; every kind of bad input is one UserError."""
    kind = source_kind(spec.teacher)
    if spec.prompts and kind != "open_clip":
        raise UserError("--prompts applies to open_clip:ARCH teachers (zero-shot CLIP)")
    if kind == "ssl_kd":
        loaded = _from_checkpoint(spec)
    elif kind == "open_clip":
        loaded = _open_clip(spec)
    else:
        if kind in _NAMED:
            check_model_name(spec.teacher)
        if kind in _NAMED and not spec.weights:
            raise UserError(
                f"--teacher {spec.teacher} needs --weights FILE (a state_dict as {kind} "
                "distributes them, safetensors or torch; nothing is downloaded)"
            )
        if kind in REFERENCED and spec.weights:
            what = "a TorchScript archive" if kind == "torchscript" else "an exported program"
            raise UserError(
                f"--weights applies to torchvision:NAME, timm:NAME and open_clip:ARCH "
                f"teachers; {what} holds its own weights"
            )
        if kind == "timm":
            loaded = _timm(spec)
        elif kind == "exported":
            loaded = _exported(spec)
        else:
            pp = imagenet_preprocess(spec.image_size, spec.resize, spec.mean, spec.std)
            loaded = (_torchvision if kind == "torchvision" else _torchscript)(spec, pp)
    if spec.keep_classes:
        loaded = _keep(loaded, spec.keep_classes)
    return loaded


def _from_checkpoint(spec: TeacherSpec) -> LoadedTeacher:
    if spec.weights:
        raise UserError(
            f"--weights applies to torchvision:NAME and timm:NAME teachers; {spec.teacher} is "
            "an ssl_kd checkpoint (or not a file)"
        )
    if spec.preprocess_flags:
        flags = ", ".join("--" + n.replace("_", "-") for n in spec.preprocess_flags)
        raise UserError(
            f"{flags} apply to external teachers; the checkpoint {spec.teacher} carries its own "
            "preprocessing"
        )
    ckpt = load_checkpoint(spec.teacher)
    if ckpt["meta"].get("source") in REFERENCED:  # an imported archive: load it from there
        return _from_archive(spec.teacher, ckpt["meta"])
    try:
        if ckpt["meta"].get("source") == "open_clip":  # an imported zero-shot CLIP teacher
            model, meta = rebuild(ckpt["meta"]["open_clip"], ckpt["model"]), ckpt["meta"]
        else:
            model, meta = model_from_checkpoint(ckpt)
    except (KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{spec.teacher}: weights do not fit its architecture ({first})") from None
    if spec.class_names:
        meta = {**meta, "classes": class_names(spec.class_names, meta["num_classes"])}
    source = meta.get("teacher_source") or {"source": "ssl_kd", "name": meta["arch"]}
    digest = storage.sha256(spec.teacher)
    return LoadedTeacher(model, meta, source, digest, ckpt.get("step"))


def _from_archive(path: str, meta: dict[str, Any]) -> LoadedTeacher:
    """The archive an imported checkpoint at ``path`` references, checked against its sha256."""
    archive = meta.get("archive") or meta["script"]
    pp = Preprocess.from_dict(meta["preprocess"])
    build = _torchscript if meta["source"] == "torchscript" else _exported
    loaded = build(TeacherSpec(archive), pp)
    if loaded.digest != (meta.get("archive_sha256") or meta["script_sha256"]):
        raise UserError(f"{archive} changed since {path} was written; import it again")
    assert isinstance(loaded.model, (ScriptedTeacher, ExportedTeacher))
    loaded.model.keep = meta.get("kept_classes")
    return LoadedTeacher(loaded.model, meta, meta["teacher_source"], loaded.digest)


def teacher_checkpoint(
    loaded: LoadedTeacher, config: dict[str, Any], archive: str | None = None
) -> dict[str, Any]:
    """An external teacher as an ssl_kd checkpoint, so every stage loads it like its own.

    A torchvision, timm or zero-shot CLIP teacher's weights are copied in (its head already
    cut to the kept classes); a TorchScript archive or exported program is referenced by path
    and sha256 (its code cannot live in a ``weights_only`` file).
    """
    meta = {**loaded.meta, "config": config, "teacher_source": loaded.source}
    if isinstance(loaded.model, (ScriptedTeacher, ExportedTeacher)):
        assert archive is not None, "an archive is referenced by its path"
        meta |= {"archive": archive, "archive_sha256": loaded.digest}
        return {"model": {}, "meta": meta}
    return {"model": loaded.model.state_dict(), "meta": meta}


def _torchvision(spec: TeacherSpec, pp: Preprocess) -> LoadedTeacher:
    assert spec.weights is not None
    net = torchvision_net(spec.teacher, pp.channels, pp.image_size, spec.weights)
    backbone, head = split_head(net)
    return _classifier(spec, backbone, head, pp, "torchvision")


def _timm(spec: TeacherSpec) -> LoadedTeacher:
    """A timm teacher, preprocessing as its data config says unless the flags override it."""
    assert spec.weights is not None
    backbone, head = timm_classifier(
        spec.teacher, image_size=spec.image_size, weights=spec.weights, need_head=True
    )
    flags = (spec.image_size, spec.resize, spec.mean, spec.std)
    pp, data_config = timm_preprocess(spec.teacher, backbone, *flags)
    return _classifier(spec, backbone, head, pp, "timm", {"data_config": data_config})


def _classifier(
    spec: TeacherSpec,
    backbone: nn.Module,
    head: nn.Linear,
    pp: Preprocess,
    kind: str,
    extra: dict[str, Any] | None = None,
) -> LoadedTeacher:
    """A teacher of a named architecture: ``head(backbone(x))``, and where it came from."""
    assert spec.weights is not None
    model = Classifier(backbone, head.in_features, head.out_features)
    model.head = head
    classes = class_names(spec.class_names, head.out_features)
    digest = storage.sha256(spec.weights)
    source = {
        "source": kind,
        "name": spec.teacher,
        "weights": storage.name(spec.weights),
        "weights_sha256": digest,
        **(extra or {}),
    }
    meta = _meta(spec.teacher, classes, pp, source)
    return LoadedTeacher(model.eval(), meta, source, digest)


class ScriptedTeacher(nn.Module):
    """A TorchScript classifier, optionally restricted to some of its classes."""

    def __init__(self, script: torch.jit.ScriptModule, keep: list[int] | None = None) -> None:
        super().__init__()
        self.script = script
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.script(x)
        return logits if self.keep is None else logits[:, self.keep]


def _torchscript(spec: TeacherSpec, pp: Preprocess) -> LoadedTeacher:
    path = spec.teacher
    try:
        source = storage.loadable(path)
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; archives are still what many teams ship.
            warnings.simplefilter("ignore", FutureWarning)
            script = torch.jit.load(source, map_location="cpu")
        script.eval()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"TorchScript teacher {storage.display(path)} does not load ({first[:200]})"
        ) from None
    return _archive(ScriptedTeacher(script), "torchscript", spec, pp)


def _exported(spec: TeacherSpec, pp: Preprocess | None = None) -> LoadedTeacher:
    """An exported program; its static input height and width are the default image size."""
    program, shape = load_program(spec.teacher)
    side = shape.height if shape.height == shape.width else None
    if pp is None:
        pp = imagenet_preprocess(spec.image_size or side, spec.resize, spec.mean, spec.std)
    if side is not None and pp.image_size != side:
        raise UserError(
            f"exported program {storage.display(spec.teacher)} takes {side}x{side} images, not "
            f"--image-size {pp.image_size}: leave the flag out, or export with a dynamic size"
        )
    return _archive(ExportedTeacher(program, shape), "exported", spec, pp)


def _archive(model: nn.Module, kind: str, spec: TeacherSpec, pp: Preprocess) -> LoadedTeacher:
    """A TorchScript or exported teacher, once it maps a probe batch to a row of logits."""
    path, what = spec.teacher, f"{'TorchScript' if kind == 'torchscript' else 'exported'} teacher"
    try:
        with torch.inference_mode():
            probe = model(torch.zeros(1, pp.channels, pp.image_size, pp.image_size))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{what} {storage.display(path)} does not run on a 1x{pp.channels}x"
            f"{pp.image_size}x{pp.image_size} batch ({first[:200]})"
        ) from None
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2:
        raise UserError(
            f"{what} {storage.display(path)} must return a (batch, classes) tensor of logits"
        )
    classes = class_names(spec.class_names, int(probe.shape[1]))
    digest = storage.sha256(path)
    source = {"source": kind, "name": storage.name(path), "sha256": digest}
    return LoadedTeacher(model, _meta(kind, classes, pp, source), source, digest)


def _open_clip(spec: TeacherSpec) -> LoadedTeacher:
    """A zero-shot CLIP teacher; its weights file's sha256 is its digest."""
    arch = spec.teacher.removeprefix(OPEN_CLIP)
    if not spec.weights or not spec.class_names:
        raise UserError(
            f"--teacher {spec.teacher} needs --weights FILE (the model's open_clip state_dict; "
            "nothing is downloaded) and --class-names FILE (the names its prompts are made of)"
        )
    if spec.image_size:
        raise UserError(
            f"--image-size does not apply to {spec.teacher}: its image tower's config sets it"
        )
    templates = read_templates(spec.prompts)
    classes = class_names(spec.class_names, None)
    zs = zero_shot_classifier(
        arch, spec.weights, classes, templates, spec.resize, spec.mean, spec.std
    )
    digest = storage.sha256(spec.weights)
    name = OPEN_CLIP + zs.name
    source = {"source": "open_clip", "name": name, "weights": storage.name(spec.weights)}
    source |= {"weights_sha256": digest, "templates": templates}
    meta = _meta(name, classes, zs.preprocess, source) | {"open_clip": zs.tower}
    return LoadedTeacher(zs.model, meta, source, digest)


def _meta(arch: str, classes: list[str], pp: Preprocess, source: dict[str, Any]) -> dict[str, Any]:
    meta = make_meta(arch, 1.0, 0.0, classes, pp, {})
    meta["source"] = source["source"]
    return meta


def _keep(loaded: LoadedTeacher, path: str) -> LoadedTeacher:
    """The teacher restricted to the classes listed in ``path`` (names or indices)."""
    classes = loaded.meta["classes"]
    keep = kept_indices(path, classes)
    model = loaded.model
    if isinstance(model, Ensemble):  # each member is restricted, then averaged
        for member in model.members:
            keep_rows(member, keep)
    elif isinstance(model, Classifier):
        keep_rows(model, keep)
    elif isinstance(model, (ScriptedTeacher, ExportedTeacher)):
        model.keep = keep
    else:  # pragma: no cover - every loader above returns one of the two
        raise TypeError(type(model))
    kept = [classes[i] for i in keep]
    meta = {**loaded.meta, "classes": kept, "num_classes": len(kept), "kept_classes": keep}
    return LoadedTeacher(model, meta, {**loaded.source, "kept_classes": keep}, loaded.digest)
