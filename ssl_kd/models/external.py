"""Teachers from outside ssl_kd: a torchvision or timm classifier with a local weights file, or
a TorchScript archive — loaded with their own classes and preprocessing, never downloaded.

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
- an ssl_kd checkpoint: as always; the preprocessing flags do not apply (it carries its own).

``--keep-classes`` keeps a subset of the teacher's classes: their logits only, so the softmax
renormalises over them (an ImageNet teacher labels for a 100-class task).
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import load_checkpoint, make_meta, model_from_checkpoint
from ssl_kd.models.ensemble import Ensemble, has_features
from ssl_kd.models.preprocess import Preprocess, imagenet_preprocess
from ssl_kd.models.registry import (
    TORCHVISION,
    Classifier,
    check_model_name,
    split_head,
    torchvision_net,
)
from ssl_kd.models.timm_models import TIMM, timm_classifier, timm_preprocess

SOURCES = ("ssl_kd", "torchvision", "timm", "torchscript")
# The sources named by an architecture, whose weights come from --weights.
_NAMED = {"torchvision": TORCHVISION, "timm": TIMM}


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


def source_kind(teacher: str) -> str:
    """``torchvision``, ``timm``, ``torchscript`` or ``ssl_kd`` (a checkpoint)."""
    for kind, prefix in _NAMED.items():
        if teacher.startswith(prefix):
            return kind
    if storage.is_file(teacher) and _is_torchscript(teacher):
        return "torchscript"
    return "ssl_kd"


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with a ``code/`` directory (torch.save's have none)."""
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
        with zipfile.ZipFile(source) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def load_teacher(spec: TeacherSpec) -> LoadedTeacher:
    """Load the teacher ``spec`` names; every kind of bad input is one UserError."""
    kind = source_kind(spec.teacher)
    if kind == "ssl_kd":
        loaded = _from_checkpoint(spec)
    else:
        if kind in _NAMED:
            check_model_name(spec.teacher)
        if kind in _NAMED and not spec.weights:
            raise UserError(
                f"--teacher {spec.teacher} needs --weights FILE (a state_dict as {kind} "
                "distributes them, safetensors or torch; nothing is downloaded)"
            )
        if kind == "torchscript" and spec.weights:
            raise UserError(
                "--weights applies to torchvision:NAME and timm:NAME teachers; a TorchScript "
                "archive holds its own weights"
            )
        if kind == "timm":
            loaded = _timm(spec)
        else:
            pp = imagenet_preprocess(spec.image_size, spec.resize, spec.mean, spec.std)
            build = _torchvision if kind == "torchvision" else _torchscript
            loaded = build(spec, pp)
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
    if ckpt["meta"].get("source") == "torchscript":  # an imported archive: load it from there
        meta = ckpt["meta"]
        pp = Preprocess.from_dict(meta["preprocess"])
        loaded = _torchscript(TeacherSpec(meta["script"]), pp)
        if loaded.digest != meta["script_sha256"]:
            raise UserError(
                f"{meta['script']} changed since {spec.teacher} was written; import it again"
            )
        keep = meta.get("kept_classes")
        assert isinstance(loaded.model, ScriptedTeacher)
        loaded.model.keep = keep
        return LoadedTeacher(loaded.model, meta, meta["teacher_source"], loaded.digest)
    try:
        model, meta = model_from_checkpoint(ckpt)
    except (KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{spec.teacher}: weights do not fit its architecture ({first})") from None
    if spec.class_names:
        meta = {**meta, "classes": _class_names(spec.class_names, meta["num_classes"])}
    source = meta.get("teacher_source") or {"source": "ssl_kd", "name": meta["arch"]}
    digest = storage.sha256(spec.teacher)
    return LoadedTeacher(model, meta, source, digest, ckpt.get("step"))


def teacher_checkpoint(
    loaded: LoadedTeacher, config: dict[str, Any], script: str | None = None
) -> dict[str, Any]:
    """An external teacher as an ssl_kd checkpoint, so every stage loads it like its own.

    A torchvision or timm teacher's weights are copied in (its head already cut to the kept
    classes); a TorchScript teacher is referenced by path and sha256 (its code cannot live in a
    ``weights_only`` file).
    """
    meta = {**loaded.meta, "config": config, "teacher_source": loaded.source}
    if isinstance(loaded.model, ScriptedTeacher):
        assert script is not None, "a TorchScript teacher is referenced by its path"
        meta |= {"script": script, "script_sha256": loaded.digest}
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
    classes = _class_names(spec.class_names, head.out_features)
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
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; archives are still what many teams ship.
            warnings.simplefilter("ignore", FutureWarning)
            script = torch.jit.load(source, map_location="cpu")
        script.eval()
        with torch.inference_mode():
            probe = script(torch.zeros(1, pp.channels, pp.image_size, pp.image_size))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"TorchScript teacher {storage.display(path)} does not run on a 1x{pp.channels}x"
            f"{pp.image_size}x{pp.image_size} batch ({first[:200]})"
        ) from None
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2:
        raise UserError(
            f"TorchScript teacher {storage.display(path)} must return a (batch, classes) tensor "
            "of logits"
        )
    classes = _class_names(spec.class_names, int(probe.shape[1]))
    digest = storage.sha256(path)
    source = {"source": "torchscript", "name": storage.name(path), "sha256": digest}
    model = ScriptedTeacher(script)
    return LoadedTeacher(model, _meta("torchscript", classes, pp, source), source, digest)


def _meta(arch: str, classes: list[str], pp: Preprocess, source: dict[str, Any]) -> dict[str, Any]:
    meta = make_meta(arch, 1.0, 0.0, classes, pp, {})
    meta["source"] = source["source"]
    return meta


def _class_names(path: str | None, n: int) -> list[str]:
    """The names in ``path`` (one per line, exactly ``n``), or ``0``..``n-1``."""
    if path is None:
        return [str(i) for i in range(n)]
    if not storage.is_file(path):
        raise UserError(f"class-names file {storage.display(path)} does not exist")
    names = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    if len(names) != n:
        raise UserError(
            f"class-names file {storage.display(path)} has {len(names)} names but the teacher "
            f"predicts {n} classes; give one name per line, in the teacher's class order"
        )
    return names


def _keep(loaded: LoadedTeacher, path: str) -> LoadedTeacher:
    """The teacher restricted to the classes listed in ``path`` (names or indices)."""
    classes = loaded.meta["classes"]
    keep = _kept_indices(path, classes)
    model = loaded.model
    if isinstance(model, Ensemble):  # each member is restricted, then averaged
        for member in model.members:
            _keep_rows(member, keep)
    elif isinstance(model, Classifier):
        _keep_rows(model, keep)
    elif isinstance(model, ScriptedTeacher):
        model.keep = keep
    else:  # pragma: no cover - every loader above returns one of the two
        raise TypeError(type(model))
    kept = [classes[i] for i in keep]
    meta = {**loaded.meta, "classes": kept, "num_classes": len(kept), "kept_classes": keep}
    return LoadedTeacher(model, meta, {**loaded.source, "kept_classes": keep}, loaded.digest)


def _keep_rows(model: nn.Module, keep: list[int]) -> None:
    """Replace the classifier's head by the rows of the ``keep`` classes."""
    head = nn.Linear(model.head.in_features, len(keep))
    with torch.no_grad():
        head.weight.copy_(model.head.weight[keep])
        head.bias.copy_(model.head.bias[keep])
    model.head = head


def _kept_indices(path: str, classes: list[str]) -> list[int]:
    if not storage.is_file(path):
        raise UserError(f"keep-classes file {storage.display(path)} does not exist")
    wanted = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    if not wanted:
        raise UserError(f"keep-classes file {storage.display(path)} lists no class")
    index = {name: i for i, name in enumerate(classes)}
    keep = []
    for item in wanted:
        if item in index:
            keep.append(index[item])
        elif item.isdigit() and int(item) < len(classes):
            keep.append(int(item))
        else:
            raise UserError(
                f"keep-classes file {storage.display(path)}: {item!r} is neither a class name "
                f"of the teacher nor an index below {len(classes)}"
            )
    if len(set(keep)) != len(keep):
        raise UserError(f"keep-classes file {storage.display(path)} lists a class twice")
    return keep
