"""Model registry: architecture name → classifier adapted to the input (channels, image size).

Every model is a :class:`Classifier`: a ``backbone`` mapping images to a feature vector and a
linear ``head``. Labeling takes embeddings from ``features``; fine-tuning may swap the head.

Three families of names:

- our own, registered with :func:`register_model`: the small ``cnn`` nets and ResNets whose stem
  is adapted to 28-32 px images;
- ``torchvision:NAME`` for every classification model of ``torchvision.models``, built as
  torchvision defines it (no download, ever): its final linear layer becomes the head, and an
  optional local weights file (a torchvision ``state_dict``) initialises it first;
- ``timm:NAME`` (or ``timm:NAME.TAG``) for every timm model with a linear classifier, when timm
  is installed (:mod:`ssl_kd.models.timm_models`), the same way.

Weights files are safetensors or ``torch.save`` files (:mod:`ssl_kd.models.weights_file`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tvm

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models import timm_models
from ssl_kd.models.timm_models import TIMM
from ssl_kd.models.weights_file import load_state_dict_file, mismatch_message

ModelFactory = Callable[[int, int, float], tuple[nn.Module, int]]
_REGISTRY: dict[str, ModelFactory] = {}

# Below this side an ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 28-32 px image
# to 7-8 px before the first residual block; CIFAR-style ResNets use a 3x3 stride-1 stem instead.
SMALL_IMAGE = 64

TORCHVISION = "torchvision:"
# torchvision classifiers without a final linear layer to use as the head.
_NO_LINEAR_HEAD = frozenset({"squeezenet1_0", "squeezenet1_1"})
# Built without their auxiliary classifiers: they only add training-mode outputs.
_AUX_LOGITS = frozenset({"googlenet", "inception_v3"})


class Classifier(nn.Module):
    """``head(dropout(backbone(x)))``; ``features(x)`` gives the penultimate embedding."""

    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, feature_dim)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a ``(in_channels, image_size, width) -> (backbone, dim)`` factory."""

    def deco(fn: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Every architecture name: our own, then ``torchvision:NAME`` for each torchvision
    classifier, then ``timm:NAME`` for each timm model when timm is installed."""
    timm = [TIMM + n for n in timm_models.timm_names()] if timm_models.installed() else []
    return sorted(_REGISTRY) + [TORCHVISION + n for n in torchvision_names()] + timm


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """The classification models of ``torchvision.models`` that have a linear head."""
    return tuple(n for n in tvm.list_models(module=tvm) if n not in _NO_LINEAR_HEAD)


def check_model_name(name: str) -> None:
    """UserError naming the closest known names unless ``name`` is an architecture."""
    if name in _REGISTRY:
        return
    if name.startswith(TIMM):
        timm_models.check_timm_name(name)
        return
    if name.startswith(TORCHVISION):
        bare = name.removeprefix(TORCHVISION)
        if bare in torchvision_names():
            return
        close = difflib.get_close_matches(bare, torchvision_names(), n=4)
        hint = f"; did you mean {', '.join(TORCHVISION + c for c in close)}?" if close else ""
        why = " (it has no linear classifier head)" if bare in _NO_LINEAR_HEAD else ""
        raise UserError(
            f"torchvision has no classification model {bare!r}{why}{hint} "
            "(`ssl-kd models` lists them)"
        )
    close = difflib.get_close_matches(name, list_models(), n=4)
    exact = [p + name for p, names in _families() if name in names]
    hint = f"did you mean {', '.join(exact or close)}? " if exact or close else ""
    raise UserError(
        f"unknown model '{name}'; {hint}choose one of: {', '.join(sorted(_REGISTRY))}, "
        "torchvision:NAME or timm:NAME (`ssl-kd models` lists them)"
    )


def _families() -> list[tuple[str, tuple[str, ...]]]:
    """``(prefix, names)`` of the model families from other libraries that are installed."""
    found = [(TORCHVISION, torchvision_names())]
    if timm_models.installed():
        found.append((TIMM, timm_models.timm_names()))
    return found


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    width: float = 1.0,
    dropout: float = 0.0,
    weights: str | None = None,
    stochastic_depth: float | None = None,
) -> Classifier:
    """Build a classifier: randomly initialised, or for ``torchvision:NAME`` and ``timm:NAME``
    with ``weights`` (a local ``state_dict`` file) loaded before its head is replaced by a new
    one of ``num_classes``; ``stochastic_depth`` sets the rate of architectures that have it
    (None: their default). Unknown names raise UserError with the choices."""
    check_model_name(name)
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith((TORCHVISION, TIMM)) and width != 1.0:
        raise UserError("width applies to the cnn_* models only; leave it at 1.0")
    if name.startswith(TORCHVISION):
        net = torchvision_net(name, in_channels, image_size, weights, stochastic_depth)
        backbone, head = split_head(net)
        return Classifier(backbone, head.in_features, num_classes, dropout)
    if name.startswith(TIMM):
        if stochastic_depth is not None:
            check_stochastic_depth(name)
        backbone, head = timm_models.timm_classifier(
            name, num_classes, in_channels, image_size, weights, stochastic_depth
        )
        model = Classifier(backbone, head.in_features, num_classes, dropout)
        if weights is None:  # timm's own head, initialised as timm does for this model
            model.head = head
        return model
    if weights is not None:
        raise UserError(
            f"weights files initialise torchvision:NAME and timm:NAME models, not {name!r}"
        )
    if stochastic_depth is not None:
        check_stochastic_depth(name)
    backbone, dim = _REGISTRY[name](in_channels, image_size, width)
    return Classifier(backbone, dim, num_classes, dropout)


def torchvision_net(
    name: str,
    in_channels: int,
    image_size: int,
    weights: str | None = None,
    stochastic_depth: float | None = None,
) -> nn.Module:
    """A torchvision classifier as torchvision builds it; with ``weights`` its own head keeps
    the number of classes of the file and the file is loaded strictly; ``stochastic_depth``
    replaces the architecture's own rate (UserError where it has none)."""
    check_model_name(name)
    bare = name.removeprefix(TORCHVISION)
    kwargs: dict = {"aux_logits": False} if bare in _AUX_LOGITS else {}
    if bare.startswith("vit_"):
        kwargs["image_size"] = image_size  # position embeddings are sized to the input
    if stochastic_depth is not None:
        check_stochastic_depth(name)
        kwargs["stochastic_depth_prob"] = stochastic_depth
    sd = load_state_dict_file(weights) if weights else None
    if sd is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
        kwargs["num_classes"] = _classes_in(bare, kwargs, sd, weights or "")
    net = tvm.get_model(bare, weights=None, **kwargs)
    if sd is not None:
        try:
            net.load_state_dict(sd)
        except RuntimeError as exc:
            raise UserError(
                f"weights {storage.display(weights or '')} do not fit {name}: "
                f"{mismatch_message(str(exc))}"
            ) from None
    if in_channels != 3:
        net = _RepeatChannels(net, 3)
    return net


_STOCHASTIC_DEPTH_HINT = (
    "it applies to torchvision archs built with it (efficientnet_*, convnext_*, swin_*, maxvit_t, "
    "...) and timm models with a drop_path_rate: use dropout or RandAugment as noise"
)


def check_stochastic_depth(name: str) -> None:
    """UserError unless the model ``name`` is built with a stochastic depth rate."""
    if name.startswith(TIMM) and timm_models.has_stochastic_depth(name):
        return
    if name.startswith(TORCHVISION):
        bare = name.removeprefix(TORCHVISION)
        kwargs: dict = {"aux_logits": False} if bare in _AUX_LOGITS else {}
        with torch.device("meta"):  # the architecture only: no memory, no init
            try:
                tvm.get_model(bare, weights=None, stochastic_depth_prob=0.0, **kwargs)
                return
            except TypeError:
                pass
    raise UserError(f"{name} has no stochastic depth; {_STOCHASTIC_DEPTH_HINT}")


def _classes_in(bare: str, kwargs: dict, sd: dict[str, torch.Tensor], path: str) -> int:
    """Rows of the head's weight in ``sd`` (so a fine-tuned 37-class file loads too)."""
    with torch.device("meta"):  # the architecture only: no memory, no init
        probe = tvm.get_model(bare, weights=None, **kwargs)
    name, _ = _last_linear(probe)
    key = f"{name}.weight"
    if key not in sd or sd[key].ndim != 2:
        raise UserError(
            f"weights {storage.display(path)} do not fit torchvision:{bare}: no {key} "
            f"(it holds {', '.join(list(sd)[:3])}, ...)"
        )
    return int(sd[key].shape[0])


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the last ``nn.Linear`` registered: torchvision's classifier."""
    found = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UserError(f"{type(net).__name__} has no linear classifier head")
    return found[-1]


def split_head(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(backbone, head)``: ``net`` with its final linear layer replaced by the identity."""
    inner = net.net if isinstance(net, _RepeatChannels) else net
    name, head = _last_linear(inner)
    parent_name, _, attr = name.rpartition(".")
    parent = inner.get_submodule(parent_name) if parent_name else inner
    setattr(parent, attr, nn.Identity())
    return net, head


class _RepeatChannels(nn.Module):
    """Feeds a 1-channel image to a 3-channel network (what ``convert("RGB")`` does)."""

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        self.net = net
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, self.channels, -1, -1))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


def _cnn(blocks: int, convs: int, base: int = 32) -> ModelFactory:
    """A VGG-style CNN: ``blocks`` stages of ``convs`` 3x3 convs and a max-pool, widths doubling."""

    def factory(in_channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(blocks):
            cout = max(8, round(base * width * 2**i))
            layers += _conv_bn(cin, cout)
            for _ in range(convs - 1):
                layers += _conv_bn(cout, cout)
            if image_size >> (i + 1) >= 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers), cin

    return factory


# The small CNN family; ``width`` scales every layer (width=2 is a 4x-FLOPs teacher).
register_model("cnn")(_cnn(blocks=3, convs=1))
register_model("cnn_deep")(_cnn(blocks=3, convs=2))


def _resnet(builder: Callable[..., tvm.ResNet]) -> ModelFactory:
    def factory(in_channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
        if width != 1.0:
            raise UserError("width applies to the cnn_* models only; leave it at 1.0 for resnets")
        net = builder(weights=None)
        if image_size < SMALL_IMAGE:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim

    return factory


register_model("resnet18")(_resnet(tvm.resnet18))
register_model("resnet34")(_resnet(tvm.resnet34))
register_model("resnet50")(_resnet(tvm.resnet50))
