"""`fedparafy`: turn any model's convolutions (and optionally linear layers) into FedPara layers.

    from torchvision.models import resnet18
    model, changes = fedparafy(resnet18(num_classes=10), gamma=0.1)
    for c in changes: print(c)

Module names stay the same, so a converted model's `state_dict` keys are the old module names
plus the factor names (`layer1.0.conv1.x1`, ...). Converted layers start from a fresh,
variance-matched initialization: FedPara trains the factors from scratch, it does not
approximate existing weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import (
    FedParaConv2d,
    FedParaLinear,
    LowRankConv2d,
    LowRankLinear,
    _check_gamma,
)

__all__ = ["LayerChange", "fedparafy"]

FACTORIZED = ("lowrank", "fedpara")


@dataclass(frozen=True)
class LayerChange:
    """What `fedparafy` did to one dense layer.

    Attributes:
        name: the module's name in `model.named_modules()`.
        kind: "Conv2d" or "Linear".
        dense_params: parameters of the dense weight (bias excluded; the bias is kept as is).
        factorized_params: parameters of the factorized weight at this γ (0 if not computed).
        rank: FedPara's R or the low-rank inner dimension (0 if not computed).
        replaced: whether the layer was swapped.
        reason: why it was skipped ("" if replaced).
    """

    name: str
    kind: str
    dense_params: int
    factorized_params: int
    rank: int
    replaced: bool
    reason: str = ""


def _factorized(
    module: nn.Module, parameterization: str, gamma: float, personalized: bool, nonlinear: bool
):
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    bias = module.bias is not None
    fedpara = parameterization == "fedpara"
    extra = {"personalized": personalized, "nonlinear": nonlinear} if fedpara else {}
    if isinstance(module, nn.Conv2d):
        cls = FedParaConv2d if fedpara else LowRankConv2d
        return cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, gamma=gamma, bias=bias, **extra, **factory,
        )  # fmt: skip
    cls = FedParaLinear if fedpara else LowRankLinear
    return cls(module.in_features, module.out_features, gamma=gamma, bias=bias, **extra, **factory)


def _skip_reason(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return ""


def fedparafy(
    model: nn.Module,
    gamma: float = 0.1,
    parameterization: str = "fedpara",
    *,
    linear: bool = False,
    personalized: bool = False,
    nonlinear: bool = False,
) -> tuple[nn.Module, list[LayerChange]]:
    """Replace `model`'s nn.Conv2d (and, with linear=True, nn.Linear) layers in place.

    Only modules whose type is exactly nn.Conv2d / nn.Linear are visited: subclasses (e.g. the
    output projection inside nn.MultiheadAttention, whose weight is read directly) are left alone.

    Each layer gets R = rank_from_gamma(out, in, kernel, γ) (a low-rank layer: inner dimension
    2R, the same budget). A layer is kept dense when factorizing would not shrink its weight,
    when it is a grouped convolution, or when its padding_mode is not "zeros".

    A layer registered under several names (shared weights) becomes one FedPara layer at all
    of them; its LayerChange carries the first name.

    Returns:
        (model, changes): the same model object (or the new layer if `model` itself is a
        layer), and one LayerChange per Conv2d/Linear visited, in module order.
    """
    if parameterization not in FACTORIZED:
        raise ValueError(f"parameterization must be one of {FACTORIZED}, got {parameterization!r}")
    _check_gamma(gamma)
    if (personalized or nonlinear) and parameterization != "fedpara":
        raise ValueError("personalized=True and nonlinear=True require parameterization='fedpara'")

    kinds = (nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)
    # every name of every target: a module registered under several names (shared weights)
    # is replaced by one new layer at all of them, so the sharing survives the conversion
    names: dict[int, list[str]] = {}
    targets = []
    for n, m in model.named_modules(remove_duplicate=False):
        if type(m) in kinds:
            if id(m) not in names:
                names[id(m)] = []
                targets.append((n, m))
            names[id(m)].append(n)
    changes = []
    for name, module in targets:
        kind = type(module).__name__
        dense = module.weight.numel()
        reason = _skip_reason(module)
        if reason:
            changes.append(LayerChange(name, kind, dense, 0, 0, False, reason))
            continue
        new = _factorized(module, parameterization, gamma, personalized, nonlinear)
        factorized = sum(p.numel() for n, p in new.named_parameters() if n != "bias")
        rank = new.rank
        if factorized >= dense:
            changes.append(
                LayerChange(name, kind, dense, factorized, rank, False, "would not shrink")
            )
            continue
        new.train(module.training)
        if not name:  # `model` itself is the layer
            model = new
        else:
            for place in names[id(module)]:
                parent, _, child = place.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
        changes.append(LayerChange(name, kind, dense, factorized, rank, True))
    return model, changes
