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


def test_every_torchvision_classifier_is_listed() -> None:
    from torchvision import models as tvm

    names = set(list_models())
    expected = {f"torchvision:{n}" for n in tvm.list_models(module=tvm)}
    expected -= {"torchvision:squeezenet1_0", "torchvision:squeezenet1_1"}  # no linear head
    assert expected <= names and "torchvision:efficientnet_b0" in names


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [
        ("torchvision:mobilenet_v3_small", 1, 32),
        ("torchvision:efficientnet_b0", 3, 32),
        ("torchvision:vit_b_16", 3, 32),  # position embeddings sized to the input
        ("torchvision:googlenet", 3, 64),  # built without auxiliary classifiers
    ],
)
def test_torchvision_models_get_a_head_for_the_task(name: str, channels: int, size: int) -> None:
    model = create_model(name, num_classes=5, in_channels=channels, image_size=size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        assert model.features(x).shape == (2, model.feature_dim)
    assert model.head.out_features == 5


def test_torchvision_weights_initialise_all_but_the_head(tmp_path) -> None:
    from torchvision import models as tvm

    torch.manual_seed(0)
    net = tvm.resnet18()  # 1,000 ImageNet classes
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = create_model("torchvision:resnet18", 10, 3, 64, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.conv1.weight, net.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert model.head.out_features == 10
    gray = create_model("torchvision:resnet18", 10, 1, 64, weights=str(tmp_path / "r18.pth"))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # a gray image is the RGB image with three equal channels
        want = model.eval().features(x.repeat(1, 3, 1, 1))
        assert torch.allclose(gray.eval().features(x), want, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("torchvision:resnet51", "did you mean torchvision:resnet50"),
        ("torchvision:squeezenet1_0", "no linear classifier head"),
        ("efficientnet_b0", "did you mean torchvision:efficientnet_b0"),
    ],
)
def test_unknown_torchvision_names_suggest_close_ones(name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_model(name, 10)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path) -> None:
    from torchvision import models as tvm

    torch.save(tvm.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="do not fit torchvision:resnet34"):
        create_model("torchvision:resnet34", 10, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(UserError, match="weights files initialise torchvision:NAME and timm"):
        create_model("cnn", 10, weights=str(tmp_path / "r18.pth"))


def test_safetensors_weights_load_as_the_torch_file(tmp_path) -> None:
    from safetensors.torch import save_file
    from torchvision import models as tvm

    torch.manual_seed(0)
    sd = tvm.resnet18().state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    save_file(sd, str(tmp_path / "r18.safetensors"))
    # The format is read from the content: a safetensors file named .pth loads as one.
    (tmp_path / "renamed.pth").write_bytes((tmp_path / "r18.safetensors").read_bytes())
    built = [
        create_model("torchvision:resnet18", 10, 3, 64, weights=str(tmp_path / name))
        for name in ("r18.pth", "r18.safetensors", "renamed.pth")
    ]
    want = built[0].backbone.state_dict()
    for model in built[1:]:
        got = model.backbone.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_weights_files_of_neither_format_are_one_line(tmp_path) -> None:
    from safetensors.torch import save_file

    from ssl_kd.models.checkpoint import load_checkpoint

    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])  # header intact, tensor data short
    (tmp_path / "garbage.pth").write_bytes(b"PK\x03\x04 not a zip, not a pickle\n" * 20)
    cases = {
        "cut.safetensors": "a damaged safetensors file",
        "garbage.pth": "neither safetensors nor a torch.save file",
    }
    for name, expected in cases.items():
        with pytest.raises(UserError) as err:
            create_model("torchvision:resnet18", 10, weights=str(tmp_path / name))
        assert "\n" not in str(err.value) and expected in str(err.value), name
        assert "not a readable state_dict file" in str(err.value)
    # A safetensors file holds tensors only: as --init or a teacher checkpoint it is refused
    # with the way to use it.
    with pytest.raises(UserError, match="safetensors state_dict, not an ssl_kd checkpoint") as err:
        load_checkpoint(tmp_path / "ok.safetensors")
    assert "\n" not in str(err.value) and "--weights" in str(err.value)


def test_stochastic_depth_where_the_architecture_has_it() -> None:
    from torchvision.ops import StochasticDepth

    from ssl_kd.config import from_dict
    from ssl_kd.errors import ConfigError
    from ssl_kd.train.options import StudentConfig

    model = create_model("torchvision:efficientnet_b0", 4, 3, 32, stochastic_depth=0.4)
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    # torchvision scales the rate with depth, up to the one asked for (its default is 0.2)
    assert rates and max(rates) == pytest.approx(0.4 * (len(rates) - 1) / len(rates))
    for name in ("torchvision:resnet18", "cnn"):
        with pytest.raises(UserError, match="has no stochastic depth"):
            create_model(name, 4, 3, 32, stochastic_depth=0.1)
    base = {"data": "d", "out": "o", "stochastic_depth": 0.1}
    from_dict(StudentConfig, {**base, "arch": "torchvision:convnext_tiny"})  # accepted
    with pytest.raises(ConfigError, match=r"stochastic_depth.*cnn_deep has no stochastic depth"):
        from_dict(StudentConfig, {**base, "arch": "cnn_deep"})
    with pytest.raises(ConfigError, match="init already built one"):
        from_dict(StudentConfig, {**base, "arch": "torchvision:efficientnet_b0", "init": "x.pt"})
