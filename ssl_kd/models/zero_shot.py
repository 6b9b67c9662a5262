"""Zero-shot CLIP teachers (open_clip): a classifier made from class names, with no labeled
training.

``--teacher open_clip:ARCH --weights FILE --class-names FILE [--prompts FILE]`` follows CLIP's
zero-shot recipe (Radford et al. 2021): every class name is put into every prompt template, the
text tower embeds the prompts, the L2-normalised embeddings are averaged per class and
normalised again. The teacher is a :class:`~ssl_kd.models.registry.Classifier`: its backbone is
the image tower followed by L2 normalisation (the stored embedding), its linear head holds the
class embeddings times the model's logit scale ``exp(s)`` with no bias, so its logits are CLIP's,
``exp(s) · f(x)/|f(x)| · t_c``, and the logit scale acts as its temperature. ``--keep-classes``,
embeddings and every later stage work as for a torchvision teacher.

``ARCH`` is one of open_clip's architectures (``open_clip.list_models()``) or the path of a model
config ``.json`` (its file name is the architecture's name); ``--weights`` is the model's
``state_dict`` (open_clip's ``.safetensors`` or torch file, read with ``weights_only=True``);
nothing is downloaded. Preprocessing comes from the model's own config: its image size, resize of
the shorter side to it and centre crop, bicubic, and the mean and std that all of the
architecture's published weights share in open_clip's table (else open_clip's defaults, OpenAI's
statistics); ``--resize``, ``--mean`` and ``--std`` override them.

Imported into a run (a ``teacher:`` section with ``source: open_clip:ARCH``) the teacher becomes
an ssl_kd checkpoint that holds the image tower's weights, its open_clip vision config and the
head: the text tower, the prompts and the weights file are not read again, but open_clip is
needed to rebuild the image tower (:func:`rebuild`).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models.preprocess import INTERPOLATIONS, Preprocess
from ssl_kd.models.registry import Classifier, load_state_dict_file

log = logging.getLogger(__name__)

OPEN_CLIP = "open_clip:"
INSTALL_HINT = "pip install 'ssl_kd[clip]'"

# CLIP's plain prompt, then the 7 templates OpenAI's ImageNet zero-shot notebook selected from its
# 80 as doing as well as all of them (open_clip's SIMPLE_IMAGENET_TEMPLATES).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Keys of OpenAI's TorchScript weights that are not parameters (open_clip drops them too).
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def require_open_clip() -> ModuleType:
    """The ``open_clip`` module; UserError saying how to install it when it is missing."""
    try:
        import open_clip
    except ImportError:
        raise UserError(f"open_clip:ARCH teachers need open_clip: {INSTALL_HINT}") from None
    return open_clip


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's warnings on the root logger while it builds a model: that the towers
    start random, when the weights file is loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "open_clip" not in record.pathname


class ImageTower(nn.Module):
    """open_clip's image tower followed by CLIP's L2 normalisation."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.visual(x), dim=-1)


@dataclass
class ZeroShot:
    """A zero-shot classifier, its input preprocessing, and what rebuilds its image tower."""

    model: Classifier
    name: str  # the open_clip architecture
    preprocess: Preprocess
    tower: dict[str, Any]  # JSON-able: embed_dim, vision_cfg, quick_gelu


def read_templates(path: str | None) -> list[str]:
    """The prompt templates of ``path`` (one per line, ``{}`` where the class name goes), or
    :data:`DEFAULT_TEMPLATES`."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    shown = storage.display(path)
    if not storage.is_file(path):
        raise UserError(f"prompts file {shown} does not exist")
    lines = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    how = "write one template per line with {} where the class name goes, e.g. 'a photo of a {}.'"
    if not lines:
        raise UserError(f"prompts file {shown} holds no template; {how}")
    for line in lines:
        try:
            ok = "{}" in line and line.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"prompts file {shown}: {line!r} is not a template; {how}")
    return lines


def zero_shot_classifier(
    arch: str,
    weights: str,
    classes: Sequence[str],
    templates: Sequence[str],
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ZeroShot:
    """The zero-shot classifier of open_clip's ``arch`` with ``weights`` over ``classes``."""
    oc = require_open_clip()
    name = _model_name(oc, arch)
    quiet = _QuietOpenClip()
    logging.getLogger().addFilter(quiet)
    try:  # no pretrained tag: nothing is downloaded, the towers start random
        model = oc.create_model(
            name, pretrained=None, pretrained_image=False, pretrained_text=False
        )
        tokenizer = oc.get_tokenizer(name)
    except Exception as exc:
        raise UserError(f"open_clip cannot build {name} offline ({_first_line(exc)})") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    _load_weights(model, weights, name)
    model.eval()
    with torch.no_grad():
        text = oc.build_zero_shot_classifier(model, tokenizer, list(classes), list(templates))
        scale = model.logit_scale.exp().reshape(())
        dim = text.shape[0]
        classifier = Classifier(ImageTower(model.visual), dim, len(classes))
        classifier.head.weight.copy_(scale * text.T)
        classifier.head.bias.zero_()
    pp = _preprocess(oc, model, name, resize, mean, std)
    return ZeroShot(classifier.eval(), name, pp, _tower_config(oc, name))


def rebuild(tower: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Classifier:
    """The classifier an imported checkpoint holds (``tower``: :attr:`ZeroShot.tower`)."""
    require_open_clip()
    # open_clip's own builder of the image tower alone: its public constructors also build the
    # text tower, which an imported teacher no longer has (and for Hugging Face text towers
    # would fetch their config).
    try:  # a private function: fail with the fix, not an ImportError, where it moved
        from open_clip.model import _build_vision_tower
    except ImportError:
        import open_clip

        raise UserError(
            f"open_clip {open_clip.__version__} lacks open_clip.model._build_vision_tower, which "
            "rebuilds an imported CLIP teacher; install a 3.x release (pip install "
            "'open_clip_torch>=3.0,<4')"
        ) from None

    visual = _build_vision_tower(tower["embed_dim"], tower["vision_cfg"], tower["quick_gelu"])
    num_classes = int(state_dict["head.weight"].shape[0])
    model = Classifier(ImageTower(visual), tower["embed_dim"], num_classes)
    model.load_state_dict(state_dict)
    return model.eval()


def _model_name(oc: ModuleType, arch: str) -> str:
    """open_clip's name of ``arch``; a config ``.json`` is registered under its file name."""
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise UserError(f"open_clip model config {arch} does not exist")
        oc.add_model_config(path)
        if oc.get_model_config(path.stem) is None:
            raise UserError(
                f"{arch} is not an open_clip model config (it needs embed_dim, vision_cfg and "
                "text_cfg)"
            )
        return path.stem
    if ":" in arch:  # hf-hub:, local-dir: fetch or find weights by themselves
        raise UserError(
            f"open_clip:{arch}: name an architecture of open_clip or a model config .json, and "
            "give the weights with --weights FILE (nothing is downloaded)"
        )
    if oc.get_model_config(arch) is None:
        close = difflib.get_close_matches(arch, oc.list_models(), n=4)
        hint = f"did you mean {', '.join(OPEN_CLIP + c for c in close)}? " if close else ""
        raise UserError(
            f"open_clip has no architecture {arch!r}; {hint}(open_clip.list_models() lists them; "
            "a model config .json works too)"
        )
    return arch


def _load_weights(model: nn.Module, path: str, name: str) -> None:
    """Load ``path`` into the whole model, strictly, after the format fixes open_clip's own
    loader makes (DDP prefixes, the older text-tower layout, a scalar or 1-d logit scale)."""
    sd = load_state_dict_file(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items() if k not in _NOT_WEIGHTS}
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        from open_clip.model import convert_to_custom_text_state_dict

        sd = convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    bias = getattr(model, "logit_bias", None)
    if bias is not None and "logit_bias" not in sd:  # SigLIP's bias: a shift softmax ignores
        sd["logit_bias"] = bias.detach().clone()
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        why = " ".join(lines[:2])[:300] or _first_line(exc)
        raise UserError(
            f"weights {storage.display(path)} do not fit open_clip:{name}: {why}"
        ) from None


def _preprocess(
    oc: ModuleType,
    model: nn.Module,
    name: str,
    resize: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Preprocess:
    """The model's input transform as a :class:`Preprocess`."""
    cfg = {**oc.get_model_preprocess_cfg(model), **_published_preprocess(oc, name)}
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise UserError(f"open_clip:{name} takes {width}x{height} images; ssl_kd feeds squares")
    mode = cfg.get("resize_mode", "shortest")
    if mode != "shortest":
        log.warning(
            "open_clip:%s's weights were trained on images resized with resize_mode %r; ssl_kd "
            "resizes the shorter side and centre-crops (the same for square images)",
            name,
            mode,
        )
    interpolation = cfg.get("interpolation")
    return Preprocess(
        channels=3,
        image_size=int(height),
        mean=tuple(mean or cfg["mean"]),
        std=tuple(std or cfg["std"]),
        resize=resize or 0,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
    )


def _published_preprocess(oc: ModuleType, name: str) -> dict[str, Any]:
    """What every published weight of ``name`` in open_clip's table (read offline) was trained
    with, key by key where they all agree: mean and std differ between families (SigLIP's are
    0.5) while the model configs do not say."""
    cfgs = [oc.get_pretrained_cfg(name, tag) for tag in oc.list_pretrained_tags_by_model(name)]
    agreed: dict[str, Any] = {}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        values = {_hashable(c[key]) for c in cfgs if c.get(key) is not None}
        if len(values) == 1:
            agreed[key] = values.pop()
    return agreed


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _tower_config(oc: ModuleType, name: str) -> dict[str, Any]:
    cfg = oc.get_model_config(name)
    vision = dict(cfg["vision_cfg"])
    if "timm_model_name" in vision:  # rebuilt from the checkpoint's weights, never fetched
        vision["timm_model_pretrained"] = False
    return {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": vision,
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
