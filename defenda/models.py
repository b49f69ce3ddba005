"""Model families for the tasks. No in-place ops anywhere: Opacus' per-sample hooks need that.

* :class:`MLP` — fully connected ReLU net with configurable widths (SPEAR's setting,
  tabular tasks).
* :class:`SmallCNN` — LeNet-sized conv net for 8×8 … 32×32 images.
* :class:`ConvNet` — the eight-convolution ConvNet of the Inverting Gradients and breaching
  experiments (width configurable, GroupNorm or BatchNorm, optional fully connected head).
* :class:`LeNet` — DLG's LeNet (three 5×5 sigmoid convolutions, one linear layer).
* :class:`ResNet18` — CIFAR-style ResNet-18 (3×3 stem, no max-pool), BatchNorm or GroupNorm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (never in place)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Flatten → [Linear → act] × len(widths) → Linear(num_classes)."""

    def __init__(self, in_features: int, num_classes: int, widths: Sequence[int] = (200,), act: str = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for w in widths:
            layers += [nn.Linear(prev, w), activation(act)]
            prev = w
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """LeNet-sized CNN: two 3×3 convs (stride 1 then 2) and two linear layers.

    Sized so that an attack iteration on 8×8 digits costs about a millisecond on CPU.
    """

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, channels: int = 16, hidden: int = 64, act: str = "relu"
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            activation(act),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            activation(act),
        )
        side = math.ceil(image_size / 2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * channels * side * side, hidden), activation(act), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; use 'batch' or 'group'")


class ConvNet(nn.Module):
    """The ConvNet of Geiping et al.'s Inverting Gradients code and of breaching (``ConvNet``, width w).

    Eight 3×3 convolutions with widths w, 2w, 2w, 4w, 4w, 4w, [max-pool 3], 4w, 4w, [max-pool 3],
    each followed by a normalisation layer and ReLU, then one linear layer (36·w → classes at
    32×32 inputs; the flattened size follows the input size). The originals use BatchNorm; the
    default here is GroupNorm so Opacus' per-sample gradients work and a client's batch
    statistics do not leak through the forward pass (``norm="batch"`` gives the original).

    ``head`` adds fully connected hidden layers (Linear → ReLU) before the classifier: SPEAR's
    CNN route needs a Linear → ReLU whose input is the flattened conv features.

    Reference: J. Geiping et al., "Inverting Gradients", NeurIPS 2020; breaching's
    ``models/model_preparation.py`` (``ConvNet``).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16, norm: str = "group",
                 head: Sequence[int] = ()) -> None:
        super().__init__()
        plan: list[tuple[int, int] | str] = [(in_channels, width), (width, 2 * width), (2 * width, 2 * width), (2 * width, 4 * width),
                (4 * width, 4 * width), (4 * width, 4 * width), "pool", (4 * width, 4 * width),
                (4 * width, 4 * width), "pool"]
        layers: list[nn.Module] = []
        for step in plan:
            if isinstance(step, str):  # "pool"
                layers.append(nn.MaxPool2d(3))
                continue
            cin, cout = step
            layers += [nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        side = image_size // 3 // 3
        if side < 1:
            raise ValueError(f"model 'convnet' needs images of at least 9×9 pixels, got {image_size}×{image_size}")
        prev = 4 * width * side * side
        fc: list[nn.Module] = [nn.Flatten()]
        for w in head:
            fc += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        fc.append(nn.Linear(prev, num_classes))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """The LeNet of Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019; ``mit-han-lab/dlg``).

    Three 5×5 convolutions of 12 channels with strides 2, 2, 1 (padding 2) and sigmoid
    activations, then one linear layer (768 → classes at 32×32 inputs). DLG initialises
    the weights U(−0.5, 0.5); here PyTorch's default initialisation is kept so that the
    victim trains like the other models (an attack on DLG's initialisation can re-draw it).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, act: str = "sigmoid") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 12, 5, padding=2, stride=2), activation(act),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), activation(act),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), activation(act),
        )
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(12 * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; the residual sum is out-of-place (``a + b``) for Opacus."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.n2 = _norm(norm, cout)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al. 2016): 3×3 stem, four stages of two blocks."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, norm: str = "group", width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    widths: Sequence[int] = (200,),
    act: str = "relu",
    norm: str = "group",
    width: int | None = None,
    head: Sequence[int] = (),
) -> nn.Module:
    """A model of family ``arch`` (one of :data:`MODEL_FAMILIES`) for inputs of ``input_shape``.

    ``widths`` and ``act`` shape the mlp (``act`` also the cnn); ``norm``, ``width`` (channels;
    None: the family's default, convnet 16 and resnet18 64) and ``head`` (convnet only) the
    convolutional families.
    """
    if arch == "mlp":
        return MLP(math.prod(input_shape), num_classes, widths, act)
    if arch not in MODEL_FAMILIES:
        raise ValueError(f"unknown model {arch!r}; choose one of {list(MODEL_FAMILIES)}")
    if len(input_shape) != 3:
        raise ValueError(f"model {arch!r} needs image inputs (C, H, W); use 'mlp' for tabular tasks")
    channels, side = input_shape[0], input_shape[-1]
    if arch == "cnn":
        return SmallCNN(channels, side, num_classes, act=act)
    if arch == "convnet":
        return ConvNet(channels, side, num_classes, width=width or 16, norm=norm, head=head)
    if arch == "lenet":
        return LeNet(channels, side, num_classes)
    return ResNet18(channels, num_classes, norm=norm, width=width or 64)


#: The model families :func:`build_model` knows.
MODEL_FAMILIES = ("mlp", "cnn", "convnet", "lenet", "resnet18")


def bn_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The running mean and variance of every BatchNorm layer of ``model`` (empty without one):
    what an attacker granted the ``bn_stats`` knowledge flag is told."""
    return {name: (m.running_mean.detach().clone(), m.running_var.detach().clone())
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            and m.running_var is not None}
