"""FedPara and low-rank layers: the weight is composed from small factors on every forward.

FedPara (Hyeon-Woo et al., ICLR 2022) writes a layer's weight as the Hadamard product of two
low-rank branches,

    W = W1 ⊙ W2,   W_i = X_i Y_iᵀ                      (fully connected, Prop. 1)
    W = W1 ⊙ W2,   W_i = T_i ×1 X_i ×2 Y_i             (convolution, Prop. 3, Tucker-2)

with X_i: (out, R), Y_i: (in, R) and a core T_i: (R, R, kh, kw). The product reaches rank R²
with only 2R(out + in) (or 2R(out + in + R·kh·kw)) parameters, where a conventional low-rank
factorization with the same budget stops at rank 2R. Variants:

- personalized (pFedPara): the W1 factors are global (sent to the server), the W2 factors stay
  on the client, and the weight is the paper's W = W1 ⊙ (W2 + 1) (`plus_one`, on by default
  for a personalized layer); `plus_one=False` keeps W = W1 ⊙ W2 with W2 local (a variant
  beyond the paper, see book/experiments/personalization.md).
- nonlinear: W = tanh(W1) ⊙ tanh(W2) (tanh(W1) ⊙ (tanh(W2) + 1) with `plus_one`).

`_reference_weight` writes the paper's formulas one line each (X_i Y_iᵀ, one einsum per
Tucker-2 branch, W1 ⊙ (W2 + 1)). It is the reference the tests check the two fast paths
against. Both write every branch in matrix form, X_i B_iᵀ, where B_i is Y_i or, for Tucker-2,
the unfolding of T_i ×2 Y_i built with one small GEMM (`_unfolded`): `compose_weight()` then
uses plain autograd, and the forward pass calls `_FedParaWeight`, an autograd Function that
saves only X_i and B_i and rebuilds W1 and W2 in backward, so the dense-sized branches are not
kept alive between forward and backward. A layer's composition is a handful of GEMMs and
products, few and large kernels; on x86 CPUs the dense products go through oneDNN
(`_linear`). `_FedParaWeight` also works under torch.func (vmap, grad), for training many
clients' copies as one program.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FactorizedLayer",
    "FedParaConv2d",
    "FedParaLinear",
    "LowRankConv2d",
    "LowRankLinear",
    "rank_from_gamma",
    "rank_from_param_fraction",
]

# ----------------------------------------------------------------------------------------------
# helpers: validation and parameter counts


def _pair(kernel_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    if len(kernel_size) != 2 or not all(isinstance(k, int) and k >= 1 for k in kernel_size):
        raise ValueError(
            f"kernel_size must be a positive int or a pair of them, got {kernel_size!r}"
        )
    return tuple(kernel_size)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_gamma(gamma: float) -> None:
    if not isinstance(gamma, Real) or isinstance(gamma, bool) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")


def _check_rank_or_gamma(rank: int | None, gamma: float | None) -> None:
    if (rank is None) == (gamma is None):
        raise ValueError(f"pass exactly one of rank= or gamma=, got rank={rank!r}, gamma={gamma!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if gamma is not None:
        _check_gamma(gamma)


def _ceil_sqrt(n: int) -> int:
    root = math.isqrt(n)
    return root if root * root == n else root + 1


def _fedpara_weight_params(out_features: int, in_features: int, taps: int, rank: int) -> int:
    """Parameters of a FedPara weight with `taps` = kh·kw kernel positions (1: matrix form)."""
    per_branch = rank * (out_features + in_features) + (rank * rank * taps if taps > 1 else 0)
    return 2 * per_branch


def _largest_rank_within(out_features: int, in_features: int, taps: int) -> int:
    """The largest R whose FedPara weight has no more parameters than the dense one (0 if none)."""
    dense = out_features * in_features * taps
    s = out_features + in_features
    if taps == 1:  # 2R(O + I) <= O·I
        return dense // (2 * s)
    # 2·taps·R² + 2·s·R <= dense: start from the float root, then fix it with exact integers
    r = int((-s + math.sqrt(s * s + 2 * taps * dense)) / (2 * taps))
    while _fedpara_weight_params(out_features, in_features, taps, r + 1) <= dense:
        r += 1
    while r > 0 and _fedpara_weight_params(out_features, in_features, taps, r) > dense:
        r -= 1
    return r


def rank_from_gamma(
    out_features: int, in_features: int, kernel_size: int | tuple[int, int], gamma: float
) -> int:
    """FedPara's inner rank R for a layer, by the rule that reproduces the paper's model sizes.

    This is the Flower baseline's rule: with r_min = ⌈√min(out, in)⌉ (the smallest R whose
    R² can reach full rank) and r_max = the largest R whose FedPara weight has no more
    parameters than the dense weight, R = ⌈(1 − γ)·r_min + γ·r_max⌉. γ interpolates between
    those two ranks; it is *not* the fraction of parameters kept (for that, see
    `rank_from_param_fraction`). The weight count is 2R(out + in) for a 1×1 kernel or a linear
    layer (matrix form) and 2R(out + in + R·kh·kw) otherwise (Tucker-2 form).

    Args:
        out_features, in_features: output / input channels (or features).
        kernel_size: kh, or (kh, kw); 1 for a linear layer.
        gamma: in (0, 1].
    Returns:
        R >= 1.
    """
    _check_sizes(out_features=out_features, in_features=in_features)
    kh, kw = _pair(kernel_size)
    _check_gamma(gamma)
    r_min = _ceil_sqrt(min(out_features, in_features))
    r_max = _largest_rank_within(out_features, in_features, kh * kw)
    # the baseline's float expression as it is, so that every rank agrees with the baseline's:
    # where float error lands just above an integer (e.g. 0.8·3 + 0.2·3 = 3.0000000000000004)
    # it rounds up one more than exact arithmetic would, so R is not always monotone in γ
    return max(1, math.ceil((1 - gamma) * r_min + gamma * r_max))


def rank_from_param_fraction(
    out_features: int, in_features: int, kernel_size: int | tuple[int, int], fraction: float
) -> int:
    """FedPara's inner rank R that keeps about `fraction` of the dense layer's weight parameters.

    The authors' notebook rule: the smallest R with 2R(out + in + R·kh·kw) >= fraction·out·in·kh·kw
    (2R(out + in) for the matrix form), but at least max(⌈√out⌉, ⌈√in⌉). It gives model sizes
    different from the paper's tables (which follow `rank_from_gamma`); use one rule or the other,
    and say which.
    """
    _check_sizes(out_features=out_features, in_features=in_features)
    kh, kw = _pair(kernel_size)
    if not isinstance(fraction, Real) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    taps = kh * kw
    target = fraction * out_features * in_features * taps
    s = out_features + in_features
    if taps == 1:
        r = math.ceil(target / (2 * s))
    else:  # positive root of taps·R² + s·R = target/2
        r = math.ceil((-s + math.sqrt(s * s + 2 * taps * target)) / (2 * taps))
    return max(r, _ceil_sqrt(out_features), _ceil_sqrt(in_features))


# ----------------------------------------------------------------------------------------------
# the paper's formulas: the reference composition


def _reference_weight(plus_one: bool, nonlinear: bool, *factors: Tensor) -> Tensor:
    """The composed weight written as the paper's formulas, with plain autograd ops.

    Takes `_FedParaWeight.apply`'s arguments: factors (x1, y1, x2, y2) for the matrix form,
    (x1, y1, t1, x2, y2, t2) for the Tucker-2 form. Training never calls it: the tests check
    the fast contraction order (`_branch`), the layers' `compose_weight()` and the
    memory-saving `_FedParaWeight` against it.
    """
    if len(factors) == 4:
        x1, y1, x2, y2 = factors
        w1, w2 = x1 @ y1.T, x2 @ y2.T  # W_i = X_i Y_iᵀ (Prop. 1)
    else:
        x1, y1, t1, x2, y2, t2 = factors
        w1 = torch.einsum("or,is,rskl->oikl", x1, y1, t1)  # W1 = T1 ×1 X1 ×2 Y1 (Prop. 3)
        w2 = torch.einsum("or,is,rskl->oikl", x2, y2, t2)  # W2 = T2 ×1 X2 ×2 Y2
    if nonlinear:
        w1, w2 = torch.tanh(w1), torch.tanh(w2)
    return w1 * (w2 + 1) if plus_one else w1 * w2  # pFedPara: W1 ⊙ (W2 + 1); FedPara: W1 ⊙ W2


# ----------------------------------------------------------------------------------------------
# the fast composition: contraction order, in-place combination, and the gradients


def _unfolded(y: Tensor, t: Tensor | None = None, channels_last: bool = False) -> Tensor:
    """B with a branch's unfolding (out, in·kh·kw) = x Bᵀ: y itself in the matrix form.

    For the Tucker-2 form, B is the unfolding of Z = T ×2 Y (R, in, kh, kw), built with one GEMM
    of R·kh·kw·R·in multiply-adds: the core, viewed as (R·kh·kw, R), times yᵀ gives Z with its
    taps before its inputs, (R, kh, kw, in). That is the unfolding of a channels-last kernel;
    for the standard (contiguous) one the small Z is transposed to (R, in, kh, kw) first.
    Either way the dense branch is then one GEMM of out·R·in·kh·kw, so a layer composes its
    weight with a few large GEMMs and no per-factor reshuffling (an einsum would add copies).
    """
    if t is None:
        return y
    r, s, kh, kw = t.shape
    # core[(r, k, l), s] = t[r, s, k, l]: a copy of the small core, or a view of a channels-last t
    core = t.permute(0, 2, 3, 1).reshape(r * kh * kw, s)
    z = (core @ y.T).reshape(r, kh * kw, y.shape[0])  # Z[r, (k, l), i]
    if not channels_last:
        z = z.transpose(1, 2)  # Z[r, i, (k, l)]
    return z.reshape(r, -1).T  # (in·kh·kw, R), rows ordered as the kernel's memory


def _dense(w: Tensor, y: Tensor, t: Tensor | None, channels_last: bool = False) -> Tensor:
    """The unfolding (out, in·kh·kw) back as the kernel: (out, in), or (out, in, kh, kw) with
    contiguous or channels-last strides (whichever `_unfolded` was built for)."""
    if t is None:
        return w
    kh, kw = t.shape[2:]
    if channels_last:
        return w.reshape(w.shape[0], kh, kw, y.shape[0]).permute(0, 3, 1, 2)
    return w.reshape(w.shape[0], y.shape[0], kh, kw)


def _branch(x: Tensor, y: Tensor, t: Tensor | None = None) -> Tensor:
    """One dense branch: x yᵀ (out, in), or the Tucker-2 tensor t ×1 x ×2 y (out, in, kh, kw).

    The reference's branch (`_reference_weight`) in the contraction order of `_unfolded`.
    """
    return _dense(x @ _unfolded(y, t).T, y, t)


def _combine(w1: Tensor, w2: Tensor, plus_one: bool, nonlinear: bool) -> Tensor:
    """W = f(W1) ⊙ g(W2): f = tanh or identity, g = f, plus 1 when `plus_one` (pFedPara)."""
    if nonlinear:
        w1, w2 = torch.tanh(w1), torch.tanh(w2)
    return w1 * (w2 + 1) if plus_one else w1 * w2


def _combine_in_place(w1: Tensor, w2: Tensor, plus_one: bool, nonlinear: bool) -> Tensor:
    """`_combine`, overwriting the fresh branches w1 and w2 (no dense-sized allocation)."""
    if nonlinear:
        w1, w2 = w1.tanh_(), w2.tanh_()
    if plus_one:
        w2 = w2.add_(1)
    return w1.mul_(w2)


def _combine_grads(g: Tensor, w1: Tensor, w2: Tensor, plus_one: bool, nonlinear: bool,
                   in_place: bool) -> tuple[Tensor, Tensor]:
    """dL/dW1 and dL/dW2 from g = dL/dW, with w1 and w2 the branches before any tanh.

    With `in_place`, the recomputed w1 and w2 are overwritten: that spares two dense-sized
    allocations per layer, which on a CPU cost more than the multiplications themselves.
    Both ways multiply in the same order, so they give the same bits.
    """
    if not in_place:
        if nonlinear:  # tanh' = 1 - tanh²
            a, b = torch.tanh(w1), torch.tanh(w2)
            return (b + 1 if plus_one else b) * g * (1 - a * a), a * g * (1 - b * b)
        return (w2 + 1 if plus_one else w2) * g, w1 * g
    # the same products in place, in the same order
    if nonlinear:
        a, b = w1.tanh_(), w2.tanh_()
        g1 = (b + 1 if plus_one else b.clone()).mul_(g).mul_(1 - a * a)  # before a is overwritten
        return g1, a.mul_(g).mul_(1 - b * b)
    return (w2.add_(1) if plus_one else w2).mul_(g), w1.mul_(g)


def _in_place_allowed() -> bool:
    """Whether the composition may overwrite its own intermediates.

    Yes in plain eager autograd. No under a torch.func transform: vmap may batch one operand
    of an in-place op and not the other (the gradient but not the factors, or one branch only),
    which an in-place op cannot hold. No when grad mode is on inside backward (create_graph,
    torch.func.grad): autograd then records the backward, and overwriting what it saved fails.
    """
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    return not torch.is_grad_enabled() and not transforms_active()


@functools.cache
def _onednn_linear():
    """oneDNN's matrix product `a @ wᵀ` for float32 CPU tensors, or None where it is missing.

    On x86 CPUs, oneDNN (which already runs torch's CPU convolutions) can run the
    composition's products much faster than torch's BLAS GEMM; `benchmarks/layer_overhead.py`
    records both rates on the machine it runs on. The op is the one torch.compile emits for
    CPU linear layers; it has no autograd formula and no vmap rule, so only `_FedParaWeight`'s
    eager forward and backward use it (`_linear`). Checked once against `@`, on a product
    with a transposed operand as those use; anything unexpected leaves `@` in charge.
    """
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        # fixed numbers, not torch.randn: the check must not move the global random stream
        a = torch.arange(15.0).reshape(5, 3).sin()
        w = torch.arange(21.0).reshape(3, 7).cos().T
        ok = torch.allclose(op(a, w, None, "none", [], ""), a @ w.T, rtol=1e-5, atol=1e-5)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return op if ok else None


def _dense_or_transposed(t: Tensor) -> bool:
    return t.dim() == 2 and (t.is_contiguous() or t.T.is_contiguous())


def _linear(a: Tensor, w: Tensor, onednn: bool) -> Tensor:
    """a @ wᵀ, by oneDNN when `onednn` (eager, no transform) and the tensors allow it.

    oneDNN gets float32 CPU matrices that are contiguous or transposes of contiguous ones, the
    layouts `_FedParaWeight` passes; other strides can be very slow there, so they go to `@`.
    So does anything torch.compile traces: the compiler cannot follow the one-time check (it
    would break the graph at every layer) and picks its own kernels for `@`.
    """
    if (onednn and not torch.compiler.is_compiling() and a.device.type == "cpu"
            and a.dtype == w.dtype == torch.float32
            and _dense_or_transposed(a) and _dense_or_transposed(w)
            and torch.backends.mkldnn.enabled and _onednn_linear() is not None):
        return _onednn_linear()(a, w, None, "none", [], "")
    return a @ w.T


def _no_autocast(device_type: str):
    """Compose in the factors' dtype: autocast, if on, applies to the F.linear/F.conv2d after."""
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else nullcontext()


class _FedParaWeight(torch.autograd.Function):
    """Memory-saving composition W = f(x1 b1ᵀ) ⊙ g(x2 b2ᵀ); saves only its inputs for backward.

    apply(plus_one, nonlinear, x1, b1, x2, b2), with b_i = `_unfolded(y_i, t_i)`: the matrix
    form of any FedPara layer (`_fedpara_weight` builds the arguments and the kernel's shape).
    Plain autograd would keep both dense branches until backward; here backward rebuilds
    them from x_i and b_i (one GEMM each), whose sizes are R/(in·kh·kw) and R/out of the
    dense branch's.

    Works under torch.func (vmap, grad, and so vmap over functional_call of stacked models;
    forward mode through the eager subclass `_FedParaWeightForwardAD`): forward and backward
    are plain torch ops, so torch generates the vmap rule; the in-place shortcuts run only in
    eager autograd (`_in_place_allowed`). With create_graph the backward is itself
    differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(plus_one: bool, nonlinear: bool, x1: Tensor, b1: Tensor, x2: Tensor,
                b2: Tensor) -> Tensor:
        eager = _in_place_allowed()
        combine = _combine_in_place if eager else _combine
        return combine(_linear(x1, b1, eager), _linear(x2, b2, eager), plus_one, nonlinear)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        plus_one, nonlinear, *factors = inputs
        ctx.plus_one, ctx.nonlinear = plus_one, nonlinear
        ctx.save_for_backward(*factors)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x1, b1, x2, b2 = ctx.saved_tensors
        eager = _in_place_allowed()
        with _no_autocast(grad.device.type):
            grad = grad.to(x1.dtype)
            w1, w2 = _linear(x1, b1, eager), _linear(x2, b2, eager)
            g1, g2 = _combine_grads(grad, w1, w2, ctx.plus_one, ctx.nonlinear, in_place=eager)
            # dL/dx = g b and dL/db = gᵀ x, the latter as (xᵀ g)ᵀ (the faster form for oneDNN)
            return (None, None, _linear(g1, b1.T, eager), _linear(x1.T, g1.T, eager).T,
                    _linear(g2, b2.T, eager), _linear(x2.T, g2.T, eager).T)


class _FedParaWeightForwardAD(_FedParaWeight):
    """`_FedParaWeight` with forward-mode derivatives (torch.func.jvp, jacfwd, hessian).

    A subclass, used in eager mode only: torch.compile cannot trace a custom jvp (it would
    break the graph at every layer), and a compiled step never needs one.
    """

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        _FedParaWeight.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[2:])

    @staticmethod
    def jvp(ctx, _plus_one, _nonlinear, *tangents: Tensor | None) -> Tensor:
        """dW from the factors' tangents: dW_i = dx_i b_iᵀ + x_i db_iᵀ, then
        dW = f'(W1) dW1 ⊙ g(W2) + f(W1) ⊙ g'(W2) dW2 with f = g - [plus_one] = tanh or the
        identity. Out of place: the inputs stay untouched."""
        x1, b1, x2, b2 = ctx.saved_tensors
        parts = []
        for x, b, dx, db in ((x1, b1, *tangents[:2]), (x2, b2, *tangents[2:])):
            w = x @ b.T
            dw = torch.zeros_like(w)
            if dx is not None:
                dw = dw + dx @ b.T
            if db is not None:
                dw = dw + x @ db.T
            if ctx.nonlinear:
                w = torch.tanh(w)
                dw = (1 - w * w) * dw
            parts.append((w, dw))
        (a, da), (b, db) = parts
        return da * (b + 1 if ctx.plus_one else b) + a * db


def _fedpara_weight(plus_one: bool, nonlinear: bool, *factors: Tensor,
                    channels_last: bool = False) -> Tensor:
    """The forward pass's composed kernel; the same value as `_reference_weight`.

    Takes the reference's arguments, factors (x1, y1, x2, y2) or (x1, y1, t1, x2, y2, t2).
    Each branch's small factor b_i = `_unfolded(y_i, t_i)` is built with plain autograd ops
    (kept for backward: R·in·kh·kw numbers), then `_FedParaWeight` forms the dense product.
    With `channels_last`, a Tucker-2 kernel comes out with channels-last strides, the layout
    a channels-last convolution wants, with one small copy fewer. Composes in the factors' dtype:
    autocast, if on, applies to the F.linear/F.conv2d after.
    """
    half = len(factors) // 2
    (x1, y1, *t1), (x2, y2, *t2) = factors[:half], factors[half:]
    t1, t2 = (t[0] if t else None for t in (t1, t2))
    with _no_autocast(x1.device.type):
        b1, b2 = _unfolded(y1, t1, channels_last), _unfolded(y2, t2, channels_last)
        function = (_FedParaWeight if torch.compiler.is_compiling()
                    else _FedParaWeightForwardAD)
        w = function.apply(plus_one, nonlinear, x1, b1, x2, b2)
    return _dense(w, y1, t1, channels_last)


# ----------------------------------------------------------------------------------------------
# initialization


def _kaiming_variance(fan_in: int) -> float:
    """Var of a Kaiming-normal dense weight (ReLU gain, fan-in mode): 2 / fan_in."""
    return 2.0 / fan_in


def _pre_tanh_variance(target: float) -> float:
    """Variance s with E[tanh(√s·Z)²] = target for Z ~ N(0, 1): a branch's variance before tanh.

    Found by bisection over Gaussian quantiles; a target of 1 or more (fan_in <= 2) is out of
    tanh's reach and gets the largest s searched, 16.
    """
    z = torch.special.ndtri((torch.arange(1024, dtype=torch.float64) + 0.5) / 1024)
    lo, hi = 0.0, 16.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.tanh(math.sqrt(mid) * z).square().mean() < target else (lo, mid)
    return (lo + hi) / 2


def _normal_rms_(factor: Tensor, std: float) -> None:
    """Gaussian draw rescaled to a root-mean-square of exactly `std`.

    Small factors (y of a 3-channel input has 3·R entries) would otherwise put a large random
    scale into the composed weight, different from seed to seed. The composed weight's std
    against Kaiming's is checked in tests/test_layers.py and discussed in the Initialization
    section of book/hadamard_layers.md.
    """
    factor.normal_()
    factor.mul_(std / factor.square().mean().sqrt())


def _factor_std(branch_variance: float, terms: int, factors_per_term: int) -> float:
    """Std σ of i.i.d. zero-mean factors so that a branch has the given variance.

    A branch entry is a sum of `terms` products of `factors_per_term` independent factors
    (x·y: R terms of 2; Tucker-2 x·y·t: R² terms of 3), so Var = terms · σ^(2·factors_per_term).
    """
    return (branch_variance / terms) ** (1.0 / (2 * factors_per_term))


# ----------------------------------------------------------------------------------------------
# layers


class FactorizedLayer(nn.Module):
    """Common interface and constructor steps of the factorized layers.

    Attributes:
        rank: FedPara's inner rank R per branch, or a low-rank layer's inner dimension.
        gamma: the γ the rank came from (None when `rank` was given).
        personalized: True for pFedPara layers (W2's factors are client-local).
        plus_one: True when the weight is W1 ⊙ (W2 + 1) (pFedPara's form), else W1 ⊙ W2.

    A subclass constructor checks its sizes, calls `FactorizedLayer.__init__` (rank), registers
    its factors with `_new` and draws them, then calls `_add_bias`, the last parameter.
    """

    rank: int
    personalized: bool = False
    plus_one: bool = False

    def __init__(
        self,
        out_size: int,
        in_size: int,
        kernel_size: tuple[int, int],
        *,
        rank: int | None,
        gamma: float | None,
        rank_scale: int = 1,
        device=None,
        dtype=None,
    ):
        """Exactly one of `rank` or `gamma`; given γ, rank = rank_scale · rank_from_gamma(...)
        (2 for a low-rank layer: the budget of the FedPara layer at that γ)."""
        super().__init__()
        _check_rank_or_gamma(rank, gamma)
        self.gamma = gamma
        self.rank = (
            rank
            if rank is not None
            else rank_scale * rank_from_gamma(out_size, in_size, kernel_size, gamma)
        )
        self._factory = {"device": device, "dtype": dtype}  # for the constructor only

    def _new(self, *shape: int) -> nn.Parameter:
        """An uninitialized factor (the constructor draws it)."""
        return nn.Parameter(torch.empty(*shape, **self._factory))

    def _add_bias(self, out_size: int, bias: bool) -> None:
        """The bias (zeros, registered after the factors) or None; ends the constructor."""
        self.bias = nn.Parameter(torch.zeros(out_size, **self._factory)) if bias else None
        del self._factory

    def compose_weight(self) -> Tensor:
        """The dense weight, shaped as in nn.Linear / nn.Conv2d, composed with plain autograd."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The dense weight, composed anew at each read (`compose_weight`; differentiable, not
        a parameter), for code written for nn.Linear / nn.Conv2d that reads `.weight`, such
        as nn.TransformerEncoderLayer's fused inference path. Training updates the factors."""
        return self.compose_weight()

    def global_parameter_names(self) -> list[str]:
        """Relative names of the parameters pFedPara sends: W1's factors when personalized
        (accounting.global_state_keys applies this), every parameter otherwise."""
        names = [n for n, _ in self.named_parameters(recurse=False)]
        return [n for n in names if n in ("x1", "y1", "t1")] if self.personalized else names

    def local_parameter_names(self) -> list[str]:
        """Relative names of the parameters that never leave a pFedPara client: W2's factors
        and the bias (nothing for a layer that is not personalized)."""
        shared = set(self.global_parameter_names())
        return [n for n, _ in self.named_parameters(recurse=False) if n not in shared]

    def local_factor_names(self) -> list[str]:
        """W2's factors when personalized (what `local_lr_scale` speeds up), else []."""
        return [n for n in self.local_parameter_names() if n in ("x2", "y2", "t2")]


class _FedParaLayer(FactorizedLayer):
    """Factors x1, y1[, t1] (branch 1, global); x2, y2[, t2] (branch 2, local if personalized).

    The constructor shared by FedParaLinear and FedParaConv2d (kernel (1, 1): matrix form).
    """

    def __init__(
        self,
        out_size: int,
        in_size: int,
        kernel_size: tuple[int, int],
        *,
        rank: int | None,
        gamma: float | None,
        bias: bool,
        personalized: bool,
        plus_one: bool | None,
        nonlinear: bool,
        device,
        dtype,
    ):
        super().__init__(
            out_size, in_size, kernel_size, rank=rank, gamma=gamma, device=device, dtype=dtype
        )
        self.personalized, self.nonlinear, self.recompute = personalized, nonlinear, True
        self.plus_one = personalized if plus_one is None else bool(plus_one)
        (kh, kw), r = kernel_size, self.rank
        self.tucker = kh * kw > 1
        # registration order is the state_dict order: x1, y1, t1, x2, y2, t2, bias
        self.x1, self.y1 = self._new(out_size, r), self._new(in_size, r)
        if self.tucker:
            self.t1 = self._new(r, r, kh, kw)
        self.x2, self.y2 = self._new(out_size, r), self._new(in_size, r)
        if self.tucker:
            self.t2 = self._new(r, r, kh, kw)
        self._init_factors(in_size * kh * kw)
        self._add_bias(out_size, bias)

    def _factors(self, i: int) -> tuple[Tensor, ...]:
        """Branch i's factors: (x_i, y_i), or (x_i, y_i, t_i) in the Tucker-2 form."""
        if i == 1:
            return (self.x1, self.y1, self.t1) if self.tucker else (self.x1, self.y1)
        return (self.x2, self.y2, self.t2) if self.tucker else (self.x2, self.y2)

    @torch.no_grad()
    def _init_factors(self, fan_in: int) -> None:
        """Match the composed weight's variance to Kaiming's 2 / fan_in for the dense layer.

        Independent zero-mean branches give Var(W1 ⊙ W2) = Var(W1)·Var(W2), so each branch gets
        variance √v for the target v. With `plus_one`, Var(W1 ⊙ (W2 + 1)) = Var(W1)·(Var(W2) + 1);
        both branches get u with u(1 + u) = v, so W starts as W1 times (1 + a small personal
        modulation of std √u). With nonlinear=True those are the variances after tanh; the
        branches get the (larger) variance before tanh that gives them, treating a branch entry
        as Gaussian. Never zero-init a factor (as adapter libraries do): W ≡ 0 would also kill
        the gradient of the other branch.
        """
        v = _kaiming_variance(fan_in)
        branch_var = (math.sqrt(1 + 4 * v) - 1) / 2 if self.plus_one else math.sqrt(v)
        if self.nonlinear:
            branch_var = _pre_tanh_variance(branch_var)
        terms, per_term = (self.rank**2, 3) if self.tucker else (self.rank, 2)
        std = _factor_std(branch_var, terms, per_term)
        for f in (*self._factors(1), *self._factors(2)):  # the draw order: x1, y1, t1, x2, ...
            _normal_rms_(f, std)

    def _compose(self) -> Tensor:
        """W1 and W2 in the fast contraction order, combined with plain autograd."""
        w1, w2 = _branch(*self._factors(1)), _branch(*self._factors(2))
        return _combine(w1, w2, self.plus_one, self.nonlinear)

    def _compose_for_forward(self, channels_last: bool = False) -> Tensor:
        """The kernel for the forward pass (channels-last strides on request, Tucker-2 only)."""
        if not self.recompute:
            return self._compose()
        return _fedpara_weight(self.plus_one, self.nonlinear, *self._factors(1),
                               *self._factors(2), channels_last=channels_last)

    def _fedpara_repr(self) -> str:
        return (f"personalized={self.personalized}, plus_one={self.plus_one}, "
                f"nonlinear={self.nonlinear}")


class FedParaLinear(_FedParaLayer):
    """Fully connected layer with W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ), X_i: (out, R), Y_i: (in, R).

    Input (..., in_features) -> output (..., out_features). Exactly one of `rank` (R) or
    `gamma` (R from `rank_from_gamma`). Weight parameters: 2R(in + out), rank up to R².
    Set `layer.recompute = False` to compose with plain autograd (more memory, same result).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        personalized: bool = False,
        plus_one: bool | None = None,
        nonlinear: bool = False,
        device=None,
        dtype=None,
    ):
        _check_sizes(in_features=in_features, out_features=out_features)
        super().__init__(
            out_features, in_features, (1, 1), rank=rank, gamma=gamma, bias=bias,
            personalized=personalized, plus_one=plus_one, nonlinear=nonlinear,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.in_features, self.out_features = in_features, out_features

    def compose_weight(self) -> Tensor:
        # W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ), or (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ + 1) with plus_one: (out, in)
        return _combine(self.x1 @ self.y1.T, self.x2 @ self.y2.T, self.plus_one, self.nonlinear)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self._compose_for_forward(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, {self._fedpara_repr()}"
        )


def _check_conv_args(in_channels, out_channels, kernel_size, groups) -> tuple[int, int]:
    """Validate a factorized convolution's sizes; returns the kernel size as a pair."""
    _check_sizes(in_channels=in_channels, out_channels=out_channels)
    if groups != 1:
        raise ValueError(
            f"groups must be 1 (grouped convolutions are not supported), got {groups!r}"
        )
    return _pair(kernel_size)


def _is_channels_last(input: Tensor) -> bool:
    """Whether a batch of images is laid out channels-last (and not also contiguous)."""
    return (input.dim() == 4 and not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last))


class _ConvMixin:
    """Shared convolution arguments and forward for the factorized Conv2d layers."""

    def _set_conv_args(self, in_channels, out_channels, kernel_size, stride, padding, dilation):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def _conv(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(input, weight, self.bias, self.stride, self.padding, self.dilation)

    def _conv_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


class FedParaConv2d(_ConvMixin, _FedParaLayer):
    """Convolution whose kernel is W = W1 ⊙ W2 with Tucker-2 branches (Prop. 3).

    W_i[o, c, h, w] = Σ_{r,s} X_i[o, r] · Y_i[c, s] · T_i[r, s, h, w], with X_i: (out, R),
    Y_i: (in, R), T_i: (R, R, kh, kw); weight parameters 2R(out + in + R·kh·kw), and each
    unfolding of W has rank up to R². A 1×1 kernel uses the matrix form (no core).
    Input (N, in, H, W) -> output (N, out, H', W') as nn.Conv2d. Exactly one of rank / gamma.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride=1,
        padding=0,
        dilation=1,
        *,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        personalized: bool = False,
        plus_one: bool | None = None,
        nonlinear: bool = False,
        groups: int = 1,
        device=None,
        dtype=None,
    ):
        kernel = _check_conv_args(in_channels, out_channels, kernel_size, groups)
        super().__init__(
            out_channels, in_channels, kernel, rank=rank, gamma=gamma, bias=bias,
            personalized=personalized, plus_one=plus_one, nonlinear=nonlinear,
            device=device, dtype=dtype,
        )  # fmt: skip
        self._set_conv_args(in_channels, out_channels, kernel, stride, padding, dilation)

    def _shape(self, w: Tensor) -> Tensor:
        return w if self.tucker else w.view(self.out_channels, self.in_channels, 1, 1)

    def compose_weight(self) -> Tensor:
        return self._shape(self._compose())  # (out, in, kh, kw)

    def forward(self, input: Tensor) -> Tensor:
        channels_last = self.tucker and _is_channels_last(input)
        return self._conv(input, self._shape(self._compose_for_forward(channels_last)))

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, {self._fedpara_repr()}"


class LowRankLinear(FactorizedLayer):
    """Conventional low-rank baseline: W = X Yᵀ with X: (out, rank), Y: (in, rank).

    `rank` is the inner dimension, hence the maximal rank; weight parameters rank·(in + out).
    Given `gamma`, rank = 2·rank_from_gamma(...), the budget of a FedParaLinear at that γ
    (the fair comparison of the paper's Figure 3).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        _check_sizes(in_features=in_features, out_features=out_features)
        super().__init__(
            out_features, in_features, (1, 1), rank=rank, gamma=gamma, rank_scale=2,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.in_features, self.out_features = in_features, out_features
        self.x = self._new(out_features, self.rank)
        self.y = self._new(in_features, self.rank)
        std = _factor_std(_kaiming_variance(in_features), self.rank, 2)
        with torch.no_grad():
            _normal_rms_(self.x, std), _normal_rms_(self.y, std)
        self._add_bias(out_features, bias)

    def compose_weight(self) -> Tensor:
        return self.x @ self.y.T  # (out, in)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.compose_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


class LowRankConv2d(_ConvMixin, FactorizedLayer):
    """Conventional low-rank convolution with the same budget as FedParaConv2d.

    The additive twin of FedPara: W = W1 + W2, two Tucker-2 branches with inner ranks
    ⌈rank/2⌉ and ⌊rank/2⌋ (equivalently one Tucker-2 tensor of inner dimension `rank` with a
    block-diagonal core). With rank = 2R this has FedParaConv2d's 2R(out + in + R·kh·kw)
    parameters (Table 1: 20,992 for 256→256, 3×3, R = 16), but the unfoldings of a sum have
    rank ≤ rank = 2R instead of R². A 1×1 kernel uses one matrix W = X Yᵀ of inner dimension
    `rank` (factors x1, y1). Given `gamma`, rank = 2·rank_from_gamma(...).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride=1,
        padding=0,
        dilation=1,
        *,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        groups: int = 1,
        device=None,
        dtype=None,
    ):
        kernel = _check_conv_args(in_channels, out_channels, kernel_size, groups)
        super().__init__(
            out_channels, in_channels, kernel, rank=rank, gamma=gamma, rank_scale=2,
            device=device, dtype=dtype,
        )  # fmt: skip
        self._set_conv_args(in_channels, out_channels, kernel, stride, padding, dilation)
        (kh, kw), out_c, in_c = kernel, out_channels, in_channels
        self.tucker = kh * kw > 1
        # Tucker form: branches of ranks ⌈rank/2⌉ and ⌊rank/2⌋ (one branch when rank is 1);
        # matrix form: one branch of rank `rank`
        r1, r2 = ((self.rank + 1) // 2, self.rank // 2) if self.tucker else (self.rank, 0)
        self.branches = [1, 2] if r2 > 0 else [1]
        self.x1, self.y1 = self._new(out_c, r1), self._new(in_c, r1)
        if self.tucker:
            self.t1 = self._new(r1, r1, kh, kw)
        if r2 > 0:
            self.x2, self.y2, self.t2 = (
                self._new(out_c, r2), self._new(in_c, r2), self._new(r2, r2, kh, kw)
            )
        # Var(W1 + W2) = (a² + b²)·σ⁶ for Tucker branches of ranks a, b; r·σ⁴ for the matrix form
        v = _kaiming_variance(in_c * kh * kw)
        std = _factor_std(v, r1 * r1 + r2 * r2, 3) if self.tucker else _factor_std(v, r1, 2)
        with torch.no_grad():
            for p in self.parameters(recurse=False):  # x1, y1, t1, x2, y2, t2 in that order
                _normal_rms_(p, std)
        self._add_bias(out_c, bias)

    def compose_weight(self) -> Tensor:
        if not self.tucker:  # W = X1 Y1ᵀ
            return (self.x1 @ self.y1.T).view(self.out_channels, self.in_channels, 1, 1)
        w = _branch(self.x1, self.y1, self.t1)  # W = W1 + W2, each branch T ×1 X ×2 Y
        return w + _branch(self.x2, self.y2, self.t2) if len(self.branches) == 2 else w

    def forward(self, input: Tensor) -> Tensor:
        return self._conv(input, self.compose_weight())

    def extra_repr(self) -> str:
        return self._conv_repr()
