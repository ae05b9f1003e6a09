"""The paper's models, each in three parameterizations: original (dense), lowrank and fedpara.

- `vgg16`: VGG16 with GroupNorm for 32×32 images, as in the paper and the Flower baseline;
  only the 13 convolutions are factorized, the classifier stays dense.
- `mlp`: a fully connected net for the personalization experiments; every layer is factorized.
- `cnn`: a small VGG-style net with GroupNorm for 28×28 grayscale images that trains in
  minutes on a laptop CPU (the book's CPU presets on Fashion-MNIST).

Every model is a `Net`: `features` -> flatten -> `classifier` -> `head`, and `head` is always
the last layer (FedPer keeps it on the client).

Initialization: a layer that has a factorized counterpart starts, in every parameterization,
at the Kaiming-normal variance 2 / fan_in (dense: kaiming_normal_ and a zero bias; factorized:
the variance-matched factors of layers.py), so original, lowrank and fedpara start at the same
weight scale. Linear layers that are never factorized (the classifier and head of vgg16 and
cnn) keep PyTorch's default init, as in the baseline: a Kaiming classifier behind VGG's
dropout starts at a loss of ~5 and diverges at the paper's learning rate 0.1.
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import MODEL_IMAGE_SIZES, MODELS, PARAMETERIZATIONS  # the names live in config
from .layers import FedParaConv2d, FedParaLinear, LowRankConv2d, LowRankLinear, _check_gamma

__all__ = ["MODELS", "PARAMETERIZATIONS", "Net", "build_model", "cnn", "mlp", "vgg16"]

# VGG16's 13 convolutions (output channels) and 5 max-pools ("M"), one block per line
VGG16_LAYERS = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip
GROUPS = 2  # GroupNorm groups, as in the paper's VGG16-GN


# ----------------------------------------------------------------------------------------------
# helpers


def _check(parameterization: str, gamma: float, personalized: bool, nonlinear: bool,
           plus_one: bool | None = None) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )
    if (personalized or nonlinear or plus_one) and parameterization != "fedpara":
        raise ValueError(
            "personalized=True, plus_one=True and nonlinear=True require parameterization='fedpara', "
            f"got parameterization={parameterization!r}"
        )
    if parameterization != "original":
        _check_gamma(gamma)


def _dense_init(layer: nn.Conv2d | nn.Linear) -> nn.Module:
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(in_c: int, out_c: int, p: str, gamma: float, personalized: bool, nonlinear: bool,
          plus_one: bool | None):
    """A 3×3, padding-1 convolution with bias in parameterization `p`."""
    if p == "original":
        return _dense_init(nn.Conv2d(in_c, out_c, 3, padding=1))
    if p == "lowrank":
        return LowRankConv2d(in_c, out_c, 3, padding=1, gamma=gamma)
    return FedParaConv2d(
        in_c, out_c, 3, padding=1, gamma=gamma, personalized=personalized, nonlinear=nonlinear,
        plus_one=plus_one,
    )


def _linear(in_f: int, out_f: int, p: str, gamma: float, personalized: bool, nonlinear: bool,
            plus_one: bool | None):
    if p == "original":
        return _dense_init(nn.Linear(in_f, out_f))
    if p == "lowrank":
        return LowRankLinear(in_f, out_f, gamma=gamma)
    return FedParaLinear(in_f, out_f, gamma=gamma, personalized=personalized, nonlinear=nonlinear,
                         plus_one=plus_one)


def _conv_block(in_c: int, out_c: int, *conv_args) -> list[nn.Module]:
    return [_conv(in_c, out_c, *conv_args), nn.GroupNorm(GROUPS, out_c), nn.ReLU(inplace=True)]


# ----------------------------------------------------------------------------------------------
# models


class Net(nn.Module):
    """features -> flatten -> classifier -> head. Input (N, C, H, W); output logits (N, classes)."""

    def __init__(self, features: nn.Module, classifier: nn.Module, head: nn.Module):
        super().__init__()
        self.features, self.classifier, self.head = features, classifier, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.classifier(self.features(x).flatten(1)))


def vgg16(
    num_classes: int = 10,
    *,
    parameterization: str = "original",
    gamma: float = 0.1,
    in_channels: int = 3,
    personalized: bool = False,
    nonlinear: bool = False,
    plus_one: bool | None = None,
) -> Net:
    """VGG16 with GroupNorm for 32×32 inputs: the paper's CIFAR model, as in the baseline.

    13 conv 3×3 (padding 1, bias) each followed by GroupNorm(2 groups) and ReLU, 5 max-pools,
    classifier Dropout–Linear(512, 512)–ReLU–Dropout–Linear(512, 512)–ReLU, head
    Linear(512, num_classes). Only the convolutions are factorized (rank from `rank_from_gamma`).
    Parameters: CIFAR-10 original 15,253,578, fedpara γ=0.1 1,546,844; CIFAR-100 original
    15,299,748, fedpara γ=0.4 4,531,856 (the paper's 15.25M / 1.55M / 4.53M).
    Needs 32×32 inputs: the five pools take the map to 1×1 before the 512-wide classifier.
    """
    _check(parameterization, gamma, personalized, nonlinear, plus_one)
    conv_args = (parameterization, gamma, personalized, nonlinear, plus_one)
    layers, c = [], in_channels
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_block(c, v, *conv_args)
            c = v
    classifier = nn.Sequential(
        nn.Dropout(),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
    )
    return Net(nn.Sequential(*layers), classifier, nn.Linear(512, num_classes))


def mlp(
    in_features: int = 784,
    hidden: tuple[int, ...] = (200, 200),
    num_classes: int = 10,
    *,
    parameterization: str = "original",
    gamma: float = 0.5,
    personalized: bool = False,
    nonlinear: bool = False,
    plus_one: bool | None = None,
) -> Net:
    """Fully connected ReLU net in_features -> *hidden -> num_classes; all layers factorized.

    The default (200, 200) is McMahan et al.'s "2NN" for MNIST, which the Flower baseline
    cites for its personalization model; the baseline itself used 784-200-256-10, which is
    `mlp(hidden=(200, 256))`. Input (N, ...) is flattened to (N, in_features). With
    parameterization="fedpara", every layer including the head is a FedParaLinear (the baseline's
    pFedPara model at γ=0.5), so with personalized=True each layer has a local W2. A head with
    very few outputs then holds more numbers than a dense one: no rank fits the dense layer's
    size (2R(m + n) > m·n for every R ≥ 1, e.g. 200 → 2), and `layers.rank_from_gamma` still
    gives R ≥ 1; the model as a whole stays smaller.
    """
    _check(parameterization, gamma, personalized, nonlinear, plus_one)
    if not hidden or not all(isinstance(h, int) and h >= 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty tuple of positive ints, got {hidden!r}")
    args = (parameterization, gamma, personalized, nonlinear, plus_one)
    layers, f = [], in_features
    for h in hidden:
        layers += [_linear(f, h, *args), nn.ReLU(inplace=True)]
        f = h
    return Net(nn.Flatten(), nn.Sequential(*layers), _linear(f, num_classes, *args))


def cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    *,
    parameterization: str = "original",
    gamma: float = 0.1,
    personalized: bool = False,
    nonlinear: bool = False,
    plus_one: bool | None = None,
) -> Net:
    """A small VGG-style CNN with GroupNorm for 28×28 grayscale images, fast on a CPU.

    Three stages conv–GN–ReLU–max-pool with 32, 64 and 128 channels (28 -> 14 -> 7 -> 4), one
    more 128-channel conv–GN–ReLU on the 4×4 map, global average pooling, head
    Linear(128, num_classes). 242,250 parameters (original, 10 classes), 99% of them in the
    convolution kernels, which are the factorized layers (as in VGG16); about 10 M
    multiply-adds per 28×28 image.
    Works for any input size ≥ 8×8 (the pooling is global).
    """
    _check(parameterization, gamma, personalized, nonlinear, plus_one)
    args = (parameterization, gamma, personalized, nonlinear, plus_one)
    layers, c = [], in_channels
    for v in (32, 64, 128):
        layers += [*_conv_block(c, v, *args), nn.MaxPool2d(2, ceil_mode=True)]
        c = v
    layers += [*_conv_block(128, 128, *args), nn.AdaptiveAvgPool2d(1)]
    return Net(nn.Sequential(*layers), nn.Sequential(), nn.Linear(128, num_classes))


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    parameterization: str = "original",
    gamma: float = 0.1,
    personalized: bool = False,
    nonlinear: bool = False,
    plus_one: bool | None = None,
) -> Net:
    """One of MODELS by name, for square images of `image_size` pixels (data.DatasetInfo's).

    "mlp" takes in_features = in_channels·image_size² (default 28×28); "vgg16" needs 32×32
    images (config.MODEL_IMAGE_SIZES); "cnn" takes any size from 8×8.

    personalized: FedPara layers whose W2 factors stay on the client (pFedPara); plus_one: the
    weight is W1 ⊙ (W2 + 1) (default: the same as personalized, the paper's pFedPara).
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    needed = MODEL_IMAGE_SIZES.get(name)
    if image_size is None:
        image_size = needed or 28
    elif needed is not None and image_size != needed:
        raise ValueError(f"image_size={image_size!r}: model {name!r} takes {needed}×{needed} "
                         f"images only; allowed: image_size={needed}")
    kwargs = dict(
        parameterization=parameterization,
        gamma=gamma,
        personalized=personalized,
        nonlinear=nonlinear,
        plus_one=plus_one,
    )
    if name == "vgg16":
        return vgg16(num_classes, in_channels=in_channels, **kwargs)
    if name == "mlp":
        return mlp(in_channels * image_size * image_size, num_classes=num_classes, **kwargs)
    return cnn(in_channels, num_classes, **kwargs)
