"""Image classifiers, registered by name: ``lenet5``, ``convnet`` (the default), ``resnet8``, ``resnet20``,
``resnet18`` (CIFAR-style stems).

Every model takes inputs in [0, 1] (N, C, H, W) and normalises inside ``forward``. A model is a
:class:`QNet`: ``Normalize -> QuantPoint -> body`` where the body is a ``Sequential`` of blocks that each
end in a :class:`~qrobust.quant.fake.QuantPoint`. The markers are identities in the float model; QAT
turns them into activation quantizers, and int8 export maps each block to a fused int8 kernel whose
output range is read from its marker (``qrobust.quant.deploy``).

References: LeNet-5 (LeCun et al. 1998); ResNet-8/20 (He et al. 2016, the 6n+2 CIFAR family);
ResNet-18 with the 3x3 CIFAR stem and no max-pool (as in most CIFAR robustness code).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.fake import QuantPoint
from qrobust.registry import MODELS


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the data pipeline hands models images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm (optional) -> ReLU (optional) -> max-pool (optional) -> quant point.

    The quant point sits after the pool: uniform quantization is monotone, so it commutes with max
    (``Q(maxpool(x)) == maxpool(Q(x))`` exactly) and quantizing the pooled tensor is the same function
    at a quarter of the cost (elementwise work is memory-bound on CPUs).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
                 bn: bool = True, relu: bool = True, pool: int = 0):
        padding = kernel // 2 if padding is None else padding
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()
        if pool:
            self.pool = nn.MaxPool2d(pool)
        self.q = QuantPoint()


class LinearAct(nn.Sequential):
    """linear -> ReLU (optional) -> quant point."""

    def __init__(self, fin: int, fout: int, relu: bool = True):
        super().__init__()
        self.fc = nn.Linear(fin, fout)
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.q = QuantPoint()


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(conv_bn(relu(conv_bn(x))) + shortcut(x))``, quantized after the add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride)
        self.conv2 = ConvBNAct(cout, cout, 3, 1, relu=False)
        self.shortcut = ConvBNAct(cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else nn.Identity()
        self.q = QuantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x)))


class QNet(nn.Module):
    """``body(input_q(normalize(x)))``: the shape every qrobust model has (see the module docstring)."""

    def __init__(self, arch: str, body: nn.Sequential, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.arch = arch
        self.normalize = Normalize(mean, std)
        self.input_q = QuantPoint()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_q(self.normalize(x)))


def _flat_features(features: nn.Sequential, channels: int, image_size: tuple[int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, channels, *image_size)).flatten(1).shape[1])


def _lenet5(channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    pad = 2 if min(image_size) < 32 else 0  # 28x28 inputs are padded to the 32x32 LeNet-5 was made for
    features = nn.Sequential(
        ConvBNAct(channels, 6, 5, padding=pad, bn=False, pool=2),
        ConvBNAct(6, 16, 5, padding=0, bn=False, pool=2), nn.Flatten(),
    )
    flat = _flat_features(features, channels, image_size)
    return nn.Sequential(*features, LinearAct(flat, 120), LinearAct(120, 84), LinearAct(84, num_classes, relu=False))


def _convnet(channels: int, num_classes: int, image_size: tuple[int, int], width: int = 32) -> nn.Sequential:
    features = nn.Sequential(
        ConvBNAct(channels, width, pool=2),
        ConvBNAct(width, 2 * width, pool=2),
        ConvBNAct(2 * width, 4 * width, pool=2), nn.Flatten(),
    )
    flat = _flat_features(features, channels, image_size)
    return nn.Sequential(*features, LinearAct(flat, num_classes, relu=False))


def _resnet(channels: int, num_classes: int, widths: Sequence[int], blocks: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = [ConvBNAct(channels, widths[0])]
    cin = widths[0]
    for stage, (cout, n) in enumerate(zip(widths, blocks, strict=True)):
        for i in range(n):
            layers.append(BasicBlock(cin, cout, stride=2 if (stage > 0 and i == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), LinearAct(cin, num_classes, relu=False)]
    return nn.Sequential(*layers)


_BODIES = {
    "lenet5": lambda c, k, hw: _lenet5(c, k, hw),
    "convnet": lambda c, k, hw, width=32: _convnet(c, k, hw, width=width),
    "resnet8": lambda c, k, hw: _resnet(c, k, (16, 32, 64), (1, 1, 1)),
    "resnet20": lambda c, k, hw: _resnet(c, k, (16, 32, 64), (3, 3, 3)),
    "resnet18": lambda c, k, hw: _resnet(c, k, (64, 128, 256, 512), (2, 2, 2, 2)),
}
for _name, _body in _BODIES.items():
    MODELS.register(_name)(_body)


def model_names() -> list[str]:
    return MODELS.names()


def build_model(name: str, *, channels: int, num_classes: int, image_size: Sequence[int],
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **kwargs) -> QNet:
    """Build a registered model sized for the data (channels, classes, resolution).

    ``kwargs`` are the architecture's own settings (``convnet``: ``width``, the first block's channels,
    default 32); an unknown one is a ConfigError naming the valid ones."""
    body_fn = MODELS.get(name)
    valid = [p for p in inspect.signature(body_fn).parameters][3:]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"model '{name}' has no setting {', '.join(unknown)}; "
                          + (f"its settings: {', '.join(valid)}" if valid else "it takes none"))
    width = kwargs.get("width", 1)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model width must be a whole number >= 1, got {width!r}")
    if channels < 1 or num_classes < 2:
        raise ConfigError(f"a model needs channels >= 1 and num_classes >= 2, got {channels} and {num_classes}")
    hw = (int(image_size[0]), int(image_size[1]))
    if min(hw) < 8:
        raise ConfigError(f"images of {hw[0]}x{hw[1]} are too small for '{name}'; use at least 8x8")
    mean = tuple(mean) if mean is not None else (0.5,) * channels
    std = tuple(std) if std is not None else (0.25,) * channels
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"mean/std need one value per channel ({channels}), got {len(mean)}/{len(std)}")
    model = QNet(name, body_fn(channels, num_classes, hw, **kwargs), mean, std)
    model.input_shape = (channels, *hw)
    model.num_classes = num_classes
    return model


def model_for_data(name: str, info, **kwargs) -> QNet:
    """Build a model sized from a :class:`qrobust.data.DatasetInfo`; ``kwargs`` as :func:`build_model`'s."""
    return build_model(name, channels=info.channels, num_classes=info.num_classes,
                       image_size=info.image_size, mean=info.mean, std=info.std, **kwargs)
