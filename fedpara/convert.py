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

import torch
from torch import nn
from torch.nn.utils import parametrize

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
        kind: the module's type name: "Conv2d" or "Linear" for a layer fedparafy can convert,
            anything else (e.g. "Conv1d", "ParametrizedConv2d") for one it cannot.
        dense_params: parameters of the dense weight (bias excluded; the bias is kept as is).
            For a parametrized weight, the parameters its parametrization stores; 0 for a
            lazy layer's uninitialized weight.
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


# every per-module hook dictionary: a replaced layer would lose whatever is registered in them
_HOOKS = {
    "forward": "_forward_hooks",
    "forward pre": "_forward_pre_hooks",
    "backward": "_backward_hooks",
    "backward pre": "_backward_pre_hooks",
    "state_dict": "_state_dict_hooks",
    "state_dict pre": "_state_dict_pre_hooks",
    "load_state_dict pre": "_load_state_dict_pre_hooks",
    "load_state_dict post": "_load_state_dict_post_hooks",
}


# the hook dictionaries of a Parameter: they stay with the old tensor, which the new layer drops
_TENSOR_HOOKS = {"gradient": "_backward_hooks",
                 "post-accumulate-grad": "_post_accumulate_grad_hooks"}


def _weight_params(module: nn.Module) -> int:
    """Parameters `module` stores for its weight, without evaluating a parametrization."""
    if parametrize.is_parametrized(module, "weight"):
        return sum(p.numel() for p in module.parametrizations["weight"].parameters())
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or nn.parameter.is_lazy(weight):
        return 0
    return weight.numel()


def _unsupported_reason(module: nn.Module) -> str:
    if parametrize.is_parametrized(module):
        return "parametrized " + ", ".join(module.parametrizations.keys())
    return f"unsupported type {type(module).__name__}"


def _skip_reason(module: nn.Module, holders: dict[int, dict[int, str]]) -> str:
    for attr in ("weight", "bias"):
        param = getattr(module, attr)
        if param is None:
            continue
        others = [n for i, n in holders.get(id(param), {}).items() if i != id(module)]
        if others:
            # replacing one holder would untie it and leave the dense tensor in the other
            return f"{attr} shared with {others[0] or '<model>'}"
    hooks = [kind for kind, attr in _HOOKS.items() if getattr(module, attr, None)]
    for attr in ("weight", "bias"):  # tensor hooks (Tensor.register_hook and the like) too
        param = getattr(module, attr)
        hooks += [f"{attr} {kind}" for kind, hook_attr in _TENSOR_HOOKS.items()
                  if param is not None and getattr(param, hook_attr, None)]
    if hooks:
        return f"has hooks ({', '.join(hooks)})"
    for attr in ("weight", "bias"):
        param = getattr(module, attr)
        if param is not None and not param.requires_grad:
            # the new factors start from a fresh initialization: frozen, they would be fixed
            # random weights; trainable, they would undo the freeze
            return f"frozen {attr}"
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

    Only modules whose type is exactly nn.Conv2d / nn.Linear are converted. Other convolutions
    (Conv1d, Conv3d, ConvTranspose*, subclasses of Conv2d) and, with linear=True, subclasses of
    nn.Linear (e.g. the output projection inside nn.MultiheadAttention, whose weight is read
    directly) are left alone and reported as "unsupported type <Name>", or as "parametrized
    weight" when torch.nn.utils.parametrize has swapped in a subclass (weight_norm,
    spectral_norm, ...).

    Each layer gets R = rank_from_gamma(out, in, kernel, γ) (a low-rank layer: inner dimension
    2R, the same budget). A layer is kept dense when its weight or bias Parameter is also held
    by another module (tied weights: replacing one holder would break the tie and keep the
    dense tensor alive in the other), when it or its weight or bias has hooks (they would not
    move to the new layer), when its weight or bias is frozen (requires_grad=False: the new
    factors start from a fresh initialization, so freezing them would fix random weights and
    leaving them trainable would undo the freeze), when factorizing would not shrink its
    weight, when it is a grouped convolution, or when its padding_mode is not "zeros".

    A layer registered under several names (the same module object at several places) becomes
    one FedPara layer at all of them; its LayerChange carries the first name.

    Returns:
        (model, changes): the same model object (or the new layer if `model` itself is a
        layer), and one LayerChange per Conv2d/Linear visited and per unsupported convolution
        (or, with linear=True, unsupported linear layer), in module order.
    """
    if parameterization not in FACTORIZED:
        raise ValueError(f"parameterization must be one of {FACTORIZED}, got {parameterization!r}")
    _check_gamma(gamma)
    if (personalized or nonlinear) and parameterization != "fedpara":
        raise ValueError("personalized=True and nonlinear=True require parameterization='fedpara'")

    kinds = (nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)
    families = (nn.modules.conv._ConvNd, nn.Linear) if linear else (nn.modules.conv._ConvNd,)
    # every name of every visited module: a module registered under several names (shared
    # weights) is replaced by one new layer at all of them, so the sharing survives the conversion
    names: dict[int, list[str]] = {}
    visited = []
    # id(parameter) -> {id(module): first name} of every module holding it directly
    holders: dict[int, dict[int, str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), {}).setdefault(id(m), n)
        if isinstance(m, families):
            if id(m) not in names:
                names[id(m)] = []
                visited.append((n, m))
            names[id(m)].append(n)
    changes = []
    for name, module in visited:
        kind = type(module).__name__
        if type(module) not in kinds:
            reason = _unsupported_reason(module)
            changes.append(LayerChange(name, kind, _weight_params(module), 0, 0, False, reason))
            continue
        dense = module.weight.numel()
        reason = _skip_reason(module, holders)
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
