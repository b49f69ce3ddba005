"""defenda.models: output shapes, no in-place ops, Opacus compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defenda.models import ACTIVATIONS, MLP, ConvNet, LeNet, ResNet18, SmallCNN, build_model

torch.set_num_threads(1)


def _small_models() -> list[tuple[str, nn.Module, tuple[int, ...], int]]:
    """(label, model, input shape, classes); the ResNet is narrow so the tests stay fast."""
    return [
        ("mlp-tabular", build_model("mlp", (30,), 2, widths=(16, 8)), (30,), 2),
        ("mlp-image", build_model("mlp", (1, 8, 8), 10, act="tanh"), (1, 8, 8), 10),
        ("cnn-digits", build_model("cnn", (1, 8, 8), 10), (1, 8, 8), 10),
        ("cnn-cifar", build_model("cnn", (3, 32, 32), 10, act="gelu"), (3, 32, 32), 10),
        ("cnn-odd", SmallCNN(1, 7, 3), (1, 7, 7), 3),
        ("resnet-group", ResNet18(3, 10, norm="group", width=8), (3, 32, 32), 10),
        ("resnet-batch", ResNet18(1, 4, norm="batch", width=4), (1, 16, 16), 4),
        ("convnet-photos", build_model("convnet", (3, 32, 32), 10, width=4), (3, 32, 32), 10),
        ("convnet-faces-head", build_model("convnet", (1, 25, 25), 2, width=4, head=(16,)), (1, 25, 25), 2),
        ("convnet-batch", ConvNet(3, 32, 10, width=4, norm="batch"), (3, 32, 32), 10),
        ("lenet", build_model("lenet", (3, 32, 32), 10), (3, 32, 32), 10),
        ("lenet-faces", LeNet(1, 25, 2), (1, 25, 25), 2),
    ]


def _ids(value: object) -> str:
    return value if isinstance(value, str) else ""


@pytest.mark.parametrize(("label", "model", "shape", "classes"), _small_models(), ids=_ids)
def test_output_shapes_and_backward(label: str, model: nn.Module, shape: tuple[int, ...], classes: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_build_model_resnet_and_errors() -> None:
    model = build_model("resnet18", (3, 32, 32), 10)
    assert isinstance(model, ResNet18)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # group norm by default
    assert isinstance(build_model("mlp", (30,), 2), MLP)
    with pytest.raises(ValueError, match="image inputs"):
        build_model("cnn", (30,), 2)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="unknown activation"):
        build_model("mlp", (30,), 2, act="swish")
    with pytest.raises(ValueError, match="image inputs"):
        build_model("convnet", (30,), 2)
    with pytest.raises(ValueError, match="at least 9"):
        build_model("convnet", (3, 8, 8), 10)


def test_convnet_and_lenet_follow_their_papers() -> None:
    """The Inverting Gradients ConvNet: 8 convolutions w..4w, two max-pools, one linear 36w → classes at 32×32;
    DLG's LeNet: three 5×5 convolutions of 12 channels, strides 2, 2, 1, sigmoid, linear 768 → classes."""
    net = build_model("convnet", (3, 32, 32), 10, width=8)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16, 32, 32, 32, 32, 32]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 2
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(36 * 8, 10)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # group norm by default
    headed = build_model("convnet", (3, 32, 32), 10, width=8, head=(64,))
    assert [(m.in_features, m.out_features) for m in headed.modules() if isinstance(m, nn.Linear)] == [
        (288, 64), (64, 10)]
    lenet = build_model("lenet", (3, 32, 32), 100)
    assert [(c.kernel_size, c.stride, c.out_channels) for c in lenet.modules() if isinstance(c, nn.Conv2d)] == [
        ((5, 5), (2, 2), 12), ((5, 5), (2, 2), 12), ((5, 5), (1, 1), 12)]
    assert sum(isinstance(m, nn.Sigmoid) for m in lenet.modules()) == 3
    assert [(m.in_features, m.out_features) for m in lenet.modules() if isinstance(m, nn.Linear)] == [(768, 100)]
    assert isinstance(build_model("resnet18", (3, 32, 32), 10, width=8).fc, nn.Linear)
    assert build_model("resnet18", (3, 32, 32), 10, width=8).fc.in_features == 64


@pytest.mark.parametrize(("label", "model", "shape", "classes"), _small_models(), ids=_ids)
def test_no_inplace_modules(label: str, model: nn.Module, shape: tuple[int, ...], classes: int) -> None:
    # Opacus' per-sample gradient hooks (and attacks' double backward) break on in-place ops.
    assert [name for name, m in model.named_modules() if getattr(m, "inplace", False)] == []


def test_activations_are_fresh_and_not_inplace() -> None:
    for name in ACTIVATIONS:
        m = build_model("mlp", (4,), 2, widths=(3,), act=name)
        assert not any(getattr(mod, "inplace", False) for mod in m.modules())


@pytest.mark.parametrize(
    "model",
    [
        build_model("mlp", (30,), 2),
        build_model("cnn", (1, 8, 8), 10),
        ResNet18(3, 10, norm="group", width=8),
        ConvNet(3, 32, 10, width=4),
        LeNet(3, 32, 10),
    ],
    ids=["mlp", "cnn", "resnet18-group", "convnet-group", "lenet"],
)
def test_opacus_accepts_the_dp_models(model: nn.Module) -> None:
    validators = pytest.importorskip("opacus.validators")
    assert validators.ModuleValidator.validate(model, strict=False) == []


def test_opacus_rejects_batchnorm_resnet() -> None:
    """The BatchNorm variant is for non-DP baselines only; Opacus must say so rather than silently work."""
    validators = pytest.importorskip("opacus.validators")
    assert validators.ModuleValidator.validate(ResNet18(3, 10, norm="batch", width=4), strict=False) != []
