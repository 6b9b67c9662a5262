"""timm models as teachers, students and baselines: ``timm:NAME``, or ``timm:NAME.TAG``.

Built with ``pretrained=False``, always: weights come from a local file only (timm's own
``.safetensors``, ``.bin`` or ``.pth`` state dicts, read by :mod:`ssl_kd.models.weights_file`).
The model's classifier becomes the ssl_kd head; the rest is the backbone, which timm makes return
the pre-logits features (what ``forward_head(..., pre_logits=True)`` gives) once the classifier
is reset — so embeddings, kept classes, channels-last and DDP work as for torchvision models.

The tag picks timm's pretrained config, as ``timm.create_model`` does: ``timm:resnet50.tv_in1k``
has torchvision's preprocessing, ``timm:resnet50`` that of timm's default ``a1_in1k`` weights.
A teacher's preprocessing comes from that config (:func:`timm_preprocess`).

timm is optional (``pip install 'ssl_kd[timm]'``); it is imported when a ``timm:`` name is used.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models.preprocess import Preprocess
from ssl_kd.models.weights_file import load_state_dict_file, mismatch_message

TIMM = "timm:"


def import_timm() -> ModuleType:
    """The timm package; UserError saying how to install it when it is missing."""
    try:
        import timm
    except ImportError:
        raise UserError("timm:NAME models need timm: pip install 'ssl_kd[timm]'") from None
    return timm


def installed() -> bool:
    """Whether timm can be imported (without importing it)."""
    return importlib.util.find_spec("timm") is not None


@functools.cache
def timm_names() -> tuple[str, ...]:
    """Every architecture timm builds (``timm.list_models()``; tags not listed)."""
    return tuple(import_timm().list_models())


def check_timm_name(name: str) -> None:
    """UserError naming close architectures unless ``name`` is ``timm:ARCH`` or
    ``timm:ARCH.TAG`` of a known architecture and pretrained tag."""
    timm = import_timm()
    bare = name.removeprefix(TIMM)
    if bare.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise UserError(
            f"{name}: name the architecture (timm:ARCH.TAG) and pass the downloaded weights "
            "file as --weights; nothing is downloaded"
        )
    arch, _, tag = bare.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm_names(), n=4)
        hint = f"; did you mean {', '.join(TIMM + c for c in close)}?" if close else ""
        raise UserError(f"timm has no model {arch!r}{hint} (`ssl-kd models` lists them)")
    if tag and not timm.list_pretrained(bare):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(arch + ".*")]
        known = f"its tags: {', '.join(tags[:8])}" if tags else "it has none"
        raise UserError(f"timm has no pretrained tag {tag!r} for {arch} ({known})")


def _pretrained_cfg(bare: str) -> Any:
    """timm's pretrained config of ``arch[.tag]`` (None for architectures without one)."""
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(bare)


def _classifier_key(name: str, cfg: Any) -> str | None:
    """The classifier's module name in timm's state dicts (``fc``, ``head``, ``head.fc``)."""
    key = getattr(cfg, "classifier", None)
    if isinstance(key, (tuple, list)):
        raise UserError(
            f"{name} has two classifier heads ({', '.join(key)}: a distilled model); use its "
            "single-head variant"
        )
    return key


def timm_classifier(
    name: str,
    num_classes: int | None = None,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    stochastic_depth: float | None = None,
    need_head: bool = False,
) -> tuple[nn.Module, nn.Linear]:
    """``(backbone, head)`` of the timm model ``name``: the backbone maps images to pre-logits
    features, the head is its linear classifier.

    With ``weights`` (a local state dict) the model is built with the file's number of classes
    and loaded strictly; a file without the classifier loads into the backbone alone (UserError
    with ``need_head``, as a teacher must predict classes). Without it the head has
    ``num_classes`` outputs, initialised as timm does. ``image_size`` resizes the position
    embeddings of models with a fixed input size; ``stochastic_depth`` is timm's
    ``drop_path_rate``.
    """
    check_timm_name(name)
    bare = name.removeprefix(TIMM)
    cfg = _pretrained_cfg(bare)
    key = _classifier_key(name, cfg)
    sd = load_state_dict_file(weights) if weights else None
    rows = None
    if sd is not None and key and f"{key}.weight" in sd:
        rows = int(sd[f"{key}.weight"].shape[0])
    net = _build(name, cfg, rows or num_classes or 1, in_channels, image_size, stochastic_depth)
    if sd is not None and rows:
        _load(net, sd, name, weights or "", cfg, in_channels)
    head = _take_head(net, name)
    if sd is not None and not rows:  # a backbone-only file, loaded into the backbone
        _load(net, sd, name, weights or "", cfg, in_channels)
        if need_head:
            raise UserError(
                f"weights {storage.display(weights or '')} hold no classifier ({key}.weight): "
                "a teacher must predict classes"
            )
    return net, head


def _build(
    name: str,
    cfg: Any,
    num_classes: int,
    in_channels: int,
    image_size: int | None,
    stochastic_depth: float | None,
) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels}
    fixed = cfg is not None and cfg.fixed_input_size  # position embeddings sized to the input
    if image_size and fixed and image_size != cfg.input_size[-1]:
        kwargs["img_size"] = image_size
    if stochastic_depth is not None:
        kwargs["drop_path_rate"] = stochastic_depth
    try:
        return import_timm().create_model(name.removeprefix(TIMM), pretrained=False, **kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise UserError(f"timm cannot build {name} with {shown} ({first[:200]})") from None


def _load(
    net: nn.Module,
    sd: dict[str, torch.Tensor],
    name: str,
    path: str,
    cfg: Any,
    in_channels: int,
) -> None:
    """Load ``sd`` strictly; a 3-channel stem is summed to fewer channels as timm does."""
    first = getattr(cfg, "first_conv", None)
    stem = f"{first}.weight" if isinstance(first, str) else None
    if in_channels != 3 and stem in sd and sd[stem].ndim == 4 and sd[stem].shape[1] == 3:
        from timm.models import adapt_input_conv

        sd = {**sd, stem: adapt_input_conv(in_channels, sd[stem])}
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:
        hint = ""
        if cfg is not None and cfg.fixed_input_size:
            hint = f" (its input size is fixed at {cfg.input_size[-1]} px: keep the image size)"
        why = mismatch_message(str(exc))
        raise UserError(f"weights {storage.display(path)} do not fit {name}: {why}{hint}") from None


def _take_head(net: nn.Module, name: str) -> nn.Linear:
    """The model's classifier as a linear layer; the model then returns pre-logits features."""
    head = net.get_classifier()
    if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):  # BiT-style 1x1 conv head
        linear = nn.Linear(head.in_channels, head.out_channels, bias=head.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(head.weight.flatten(1))
            if head.bias is not None:
                linear.bias.copy_(head.bias)
        head = linear
    if not isinstance(head, nn.Linear):
        raise UserError(
            f"{name} has no single linear classifier head (timm gives {type(head).__name__})"
        )
    net.reset_classifier(0)
    return head


def has_stochastic_depth(name: str) -> bool:
    """Whether timm builds ``name`` with a ``drop_path_rate``."""
    check_timm_name(name)
    timm = import_timm()
    with torch.device("meta"):  # the architecture only: no memory, no init
        try:
            timm.create_model(name.removeprefix(TIMM), pretrained=False, drop_path_rate=0.1)
        except TypeError:
            return False
        except Exception:  # a model that does not build on the meta device: the real build says
            return True
    return True


def timm_preprocess(
    name: str,
    backbone: nn.Module,
    image_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[Preprocess, dict[str, Any]]:
    """The evaluation transform of timm's data config for ``backbone`` (input size, crop_pct,
    crop mode, interpolation, mean, std), each part overridable, and that config as JSON-able
    provenance."""
    data = import_timm().data.resolve_data_config({}, model=backbone)
    _, h, w = data["input_size"]
    if h != w and image_size is None:
        raise UserError(f"{name} takes {w}x{h} inputs and ssl_kd square ones: set --image-size")
    size = image_size or h
    crop_pct = float(data.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    if resize is None:
        resize = math.floor(size / crop_pct)  # as timm's transforms_imagenet_eval
        if resize < size:
            raise UserError(
                f"{name}'s config crops {crop_pct} of the image, which pads it: pass --resize "
                f"N (at least {size}) to resize and centre-crop instead"
            )
    pp = Preprocess(
        channels=3,
        image_size=size,
        mean=tuple(mean or data["mean"]),
        std=tuple(std or data["std"]),
        resize=resize,
        interpolation=data.get("interpolation", "bilinear"),
        crop_mode=data.get("crop_mode", "center"),
    )
    provenance = {
        "input_size": list(data["input_size"]),
        "crop_pct": crop_pct,
        "crop_mode": pp.crop_mode,
        "interpolation": pp.interpolation,
        "mean": list(data["mean"]),
        "std": list(data["std"]),
    }
    return pp, provenance
