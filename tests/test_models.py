"""Model registry: names → classifiers adapted to the input; unknown names list the choices."""

from __future__ import annotations

import pytest
import torch

from ssl_kd.errors import UserError
from ssl_kd.models.registry import count_parameters, create_model, list_models


def test_registry_lists_required_models() -> None:
    assert {"resnet18", "resnet50", "cnn", "cnn_deep"} <= set(list_models())


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(UserError, match=r"unknown model .vit_huge.*resnet18"):
        create_model("vit_huge", 10)


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [
        ("cnn", 1, 28),
        ("cnn_deep", 3, 32),
        ("resnet18", 1, 28),
        ("resnet50", 3, 32),
        ("resnet18", 3, 96),
    ],
)
def test_models_adapt_to_input(name: str, channels: int, size: int) -> None:
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.features(x).shape == (2, model.feature_dim)


def test_width_multiplier_scales_cnn_and_is_refused_for_resnets() -> None:
    small = count_parameters(create_model("cnn", 10, 1, 28, width=1.0))
    wide = count_parameters(create_model("cnn", 10, 1, 28, width=2.0))
    assert 3 * small < wide < 5 * small  # conv parameters grow with width squared
    with pytest.raises(UserError, match="width"):
        create_model("resnet18", 10, width=2.0)
