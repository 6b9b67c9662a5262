"""Model registry: architecture name → classifier adapted to the input (channels, image size).

Every model is a :class:`Classifier`: a ``backbone`` mapping images to a feature vector and a
linear ``head``. Labeling takes embeddings from ``features``; fine-tuning may swap the head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tvm

from ssl_kd.errors import UserError

ModelFactory = Callable[[int, int, float], tuple[nn.Module, int]]
_REGISTRY: dict[str, ModelFactory] = {}

# Below this side an ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 28-32 px image
# to 7-8 px before the first residual block; CIFAR-style ResNets use a 3x3 stride-1 stem instead.
SMALL_IMAGE = 64


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
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    width: float = 1.0,
    dropout: float = 0.0,
) -> Classifier:
    """Build a randomly initialised classifier; unknown names raise UserError with the choices."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    backbone, dim = _REGISTRY[name](in_channels, image_size, width)
    return Classifier(backbone, dim, num_classes, dropout)


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
