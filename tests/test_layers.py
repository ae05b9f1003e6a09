"""FedPara layers: Table 1, the reference formulas, the recompute Function's gradients (also
under torch.func), initialization, bad input."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, stack_module_state, vmap

from fedpara import layers
from fedpara.layers import (
    FedParaConv2d,
    FedParaLinear,
    LowRankConv2d,
    LowRankLinear,
    _branch,
    _combine,
    _combine_grads,
    _combine_in_place,
    _fedpara_weight,
    _FedParaWeight,
    _reference_weight,
    rank_from_gamma,
    rank_from_param_fraction,
)
from fedpara.models import cnn, mlp

F64 = {"dtype": torch.float64}


pytestmark = pytest.mark.usefixtures("one_thread")


def weight_params(layer: nn.Module) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if n != "bias")


def unfolding_rank(weight: torch.Tensor) -> int:
    """Rank of the (out, in·kh·kw) unfolding, in float64."""
    return int(torch.linalg.matrix_rank(weight.reshape(weight.shape[0], -1).double()))


# ----------------------------------------------------------------------------------------------
# Table 1: m = n = O = I = 256, k = 3, R = 16


TABLE_1 = [
    # layer, #params, max rank
    (lambda: nn.Linear(256, 256, bias=False, **F64), 65_536, 256),
    (lambda: LowRankLinear(256, 256, rank=32, bias=False, **F64), 16_384, 32),
    (lambda: FedParaLinear(256, 256, rank=16, bias=False, **F64), 16_384, 256),
    (lambda: nn.Conv2d(256, 256, 3, bias=False, **F64), 589_824, 256),
    (lambda: LowRankConv2d(256, 256, 3, rank=32, bias=False, **F64), 20_992, 32),
    (lambda: FedParaConv2d(256, 256, 3, rank=16, bias=False, **F64), 20_992, 256),
]


@pytest.mark.parametrize("make, params, rank", TABLE_1)
def test_table_1_parameter_counts_and_ranks(make, params, rank):
    layer = make()
    weight = layer.compose_weight() if hasattr(layer, "compose_weight") else layer.weight
    assert weight_params(layer) == params
    assert unfolding_rank(weight.detach()) == rank


@pytest.mark.parametrize("r", [3, 5, 7])
def test_hadamard_of_two_rank_r_factors_reaches_rank_r_squared(r):
    # R² < min(m, n): the product's rank is R², while the same budget as low-rank gives 2R
    fedpara = FedParaLinear(60, 80, rank=r, bias=False, **F64)
    lowrank = LowRankLinear(60, 80, rank=2 * r, bias=False, **F64)
    assert weight_params(fedpara) == weight_params(lowrank)
    assert unfolding_rank(fedpara.compose_weight().detach()) == r * r
    assert unfolding_rank(lowrank.compose_weight().detach()) == 2 * r


def test_a_1x1_convolution_uses_the_matrix_form():
    conv = FedParaConv2d(64, 128, 1, rank=8)
    assert weight_params(conv) == 2 * 8 * (64 + 128)
    assert conv.compose_weight().shape == (128, 64, 1, 1)
    assert not hasattr(conv, "t1")


def test_lowrank_given_gamma_has_the_fedpara_budget():
    for shape, kernel in (((784, 200), None), ((128, 256), 3), ((64, 128), 1)):
        if kernel is None:
            a, b = FedParaLinear(*shape, gamma=0.3), LowRankLinear(*shape, gamma=0.3)
        else:
            a, b = (
                FedParaConv2d(*shape, kernel, gamma=0.3),
                LowRankConv2d(*shape, kernel, gamma=0.3),
            )
        assert b.rank == 2 * a.rank
        assert weight_params(a) == weight_params(b)


# ----------------------------------------------------------------------------------------------
# rank rules


def test_rank_from_gamma_interpolates_between_full_rank_and_the_dense_budget():
    # 512→512 3×3: r_min = ⌈√512⌉ = 23, r_max = 309 (the largest R with 2(9R² + 1024R) <= 512²·9)
    assert rank_from_gamma(512, 512, 3, 1.0) == 309
    assert 2 * (9 * 309**2 + 1024 * 309) <= 512 * 512 * 9 < 2 * (9 * 310**2 + 1024 * 310)
    assert rank_from_gamma(512, 512, 3, 0.1) == math.ceil(0.9 * 23 + 0.1 * 309) == 52
    assert rank_from_gamma(512, 512, 3, 0.5) == math.ceil(0.5 * 23 + 0.5 * 309) == 166
    # linear layers use the matrix count 2R(m + n) <= m·n: r_max = ⌊2000 / 420⌋ = 4
    assert rank_from_gamma(10, 200, 1, 1.0) == 4
    assert rank_from_gamma(200, 784, 1, 0.5) == math.ceil(0.5 * 15 + 0.5 * 79) == 47


def test_rank_from_param_fraction_keeps_about_that_fraction():
    dense = 256 * 256 * 9
    for fraction in (0.05, 0.1, 0.3):
        r = rank_from_param_fraction(256, 256, 3, fraction)
        count = lambda r: 2 * r * (512 + 9 * r)  # noqa: E731
        assert count(r - 1) < fraction * dense <= count(r)
    assert rank_from_param_fraction(256, 256, 3, 1e-6) == 16  # the floor ⌈√256⌉


def test_rank_rules_in_the_matrix_form_and_at_their_floors():
    # matrix form: the smallest R with 2R(out + in) >= fraction·out·in (above the floor ⌈√784⌉)
    for fraction in (0.5, 0.9):
        r = rank_from_param_fraction(200, 784, 1, fraction)
        assert 2 * (r - 1) * 984 < fraction * 200 * 784 <= 2 * r * 984
    # the floor is the larger side's ⌈√·⌉, whichever side that is
    assert rank_from_param_fraction(64, 256, 3, 1e-6) == 16
    assert rank_from_param_fraction(256, 64, 3, 1e-6) == 16
    # a layer too small for any FedPara rank (r_max = ⌊20 / 24⌋ = 0) still gets R = 1
    assert rank_from_gamma(10, 2, 1, 1.0) == 1


# ----------------------------------------------------------------------------------------------
# the reference formulas against the fast paths

VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # plus_one, nonlinear
# (out, in, rank, kernel): kernel None is the matrix form
FACTOR_SHAPES = [(5, 4, 3, None), (7, 2, 4, None), (5, 4, 3, (3, 2)), (6, 3, 2, (3, 3)),
                 (4, 5, 3, (1, 3))]


def factors(tucker: bool, rank: int = 3, out: int = 5, inp: int = 4, kernel=(3, 2), seed=0):
    """Factors x1, y1[, t1], x2, y2[, t2] in float64, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, **F64).requires_grad_()  # noqa: E731
    one = lambda: [make(out, rank), make(inp, rank)] + (  # noqa: E731
        [make(rank, rank, *kernel)] if tucker else [])
    return one() + one()


def shaped_factors(shape, seed=0):
    out, inp, rank, kernel = shape
    return factors(kernel is not None, rank, out, inp, kernel or (1, 1), seed)


def test_the_reference_is_the_papers_formula_entry_by_entry():
    x1, y1, t1, x2, y2, t2 = factors(tucker=True, rank=2, out=3, inp=2, kernel=(2, 2))
    w = _reference_weight(True, False, x1, y1, t1, x2, y2, t2).detach()
    for o, i, k, l in [(0, 0, 0, 0), (2, 1, 1, 0), (1, 1, 0, 1)]:
        w1 = sum(x1[o, r] * y1[i, s] * t1[r, s, k, l] for r in range(2) for s in range(2))
        w2 = sum(x2[o, r] * y2[i, s] * t2[r, s, k, l] for r in range(2) for s in range(2))
        torch.testing.assert_close(w[o, i, k, l], (w1 * (w2 + 1)).detach())
    x1, y1, x2, y2 = factors(tucker=False)
    torch.testing.assert_close(_reference_weight(False, False, x1, y1, x2, y2),
                               (x1 @ y1.T) * (x2 @ y2.T))


@pytest.mark.parametrize("shape", FACTOR_SHAPES, ids=str)
def test_the_fast_contraction_order_gives_the_reference(shape):
    fs = shaped_factors(shape)
    half = len(fs) // 2
    torch.testing.assert_close(_branch(*fs[:half]) * _branch(*fs[half:]),
                               _reference_weight(False, False, *fs))


@pytest.mark.parametrize("shape", FACTOR_SHAPES, ids=str)
@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_the_function_matches_the_reference_in_value_and_gradient(shape, plus_one, nonlinear):
    fs = shaped_factors(shape)
    probe = torch.randn(_reference_weight(plus_one, nonlinear, *fs).shape,
                        generator=torch.Generator().manual_seed(1), **F64)
    results = []
    for compose in (_reference_weight, _fedpara_weight):
        w = compose(plus_one, nonlinear, *fs)
        results.append((w.detach(), torch.autograd.grad((w * probe).sum(), fs)))
    (w_ref, g_ref), (w_fn, g_fn) = results
    torch.testing.assert_close(w_fn, w_ref)
    for a, b in zip(g_fn, g_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tucker", [False, True], ids=["matrix", "tucker"])
@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_recompute_function_passes_gradcheck(tucker, plus_one, nonlinear):
    fs = factors(tucker)
    assert gradcheck(lambda *f: _fedpara_weight(plus_one, nonlinear, *f), fs)


@pytest.mark.parametrize("tucker", [False, True], ids=["matrix", "tucker"])
@pytest.mark.parametrize("plus_one, nonlinear", [(False, False), (True, True)])
def test_the_function_can_be_differentiated_twice(tucker, plus_one, nonlinear):
    fs = factors(tucker, rank=2, out=3, inp=2, kernel=(2, 1))
    assert gradgradcheck(lambda *f: _fedpara_weight(plus_one, nonlinear, *f), fs)


@pytest.mark.parametrize("tucker", [False, True], ids=["matrix", "tucker"])
@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_the_function_has_forward_mode_derivatives(tucker, plus_one, nonlinear):
    # the Function's jvp against finite differences (torch.func.jvp, jacfwd, hessian use it)
    fs = factors(tucker)
    assert gradcheck(lambda *f: _fedpara_weight(plus_one, nonlinear, *f), fs,
                     check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("plus_one, nonlinear", [(False, False), (True, True)])
def test_a_layers_hessian_equals_the_plain_compositions(plus_one, nonlinear):
    # torch.func.hessian is forward over reverse mode: jvp under vmap, through the Function
    torch.manual_seed(0)
    layer = FedParaConv2d(3, 4, 3, padding=1, rank=2, plus_one=plus_one, nonlinear=nonlinear,
                          dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(x1):
        return torch.func.functional_call(layer, {**params, "x1": x1}, (x,)).square().sum()

    hessians = []
    for recompute in (True, False):
        layer.recompute = recompute
        hessians.append(torch.func.hessian(loss)(params["x1"]))
    torch.testing.assert_close(hessians[0], hessians[1])
    assert hessians[0].abs().max() > 0


@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_the_in_place_shortcuts_give_the_same_bits(plus_one, nonlinear):
    g = torch.Generator().manual_seed(0)
    w1, w2, grad_w = (torch.randn(6, 7, generator=g) for _ in range(3))
    assert torch.equal(_combine_in_place(w1.clone(), w2.clone(), plus_one, nonlinear),
                       _combine(w1, w2, plus_one, nonlinear))
    fresh = _combine_grads(grad_w, w1, w2, plus_one, nonlinear, in_place=False)
    shortcut = _combine_grads(grad_w, w1.clone(), w2.clone(), plus_one, nonlinear, in_place=True)
    for a, b in zip(shortcut, fresh, strict=True):
        assert torch.equal(a, b)


LAYERS = [
    lambda **kw: FedParaLinear(6, 5, rank=3, **kw, **F64),
    lambda **kw: FedParaConv2d(4, 5, 3, padding=1, rank=3, **kw, **F64),
    lambda **kw: FedParaConv2d(4, 5, (3, 1), stride=2, rank=2, **kw, **F64),
    lambda **kw: FedParaConv2d(4, 5, 1, rank=3, **kw, **F64),
]
LAYER_IDS = ["linear", "conv3x3", "conv3x1-stride2", "conv1x1"]


def layer_input(layer, n=2, seed=2):
    shape = (n, 6) if isinstance(layer, FedParaLinear) else (n, 4, 7, 7)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **F64)


@pytest.mark.parametrize("make", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("personalized, nonlinear", VARIANTS)
def test_layer_forward_and_gradients_match_the_plain_composition(make, personalized, nonlinear):
    torch.manual_seed(0)
    layer = make(personalized=personalized, nonlinear=nonlinear)
    x = layer_input(layer)
    results = []
    for recompute in (True, False):
        layer.recompute = recompute
        layer.zero_grad()
        out = layer(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in layer.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("make", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_compose_weight_matches_the_reference(make, plus_one, nonlinear):
    torch.manual_seed(0)
    layer = make(personalized=True, plus_one=plus_one, nonlinear=nonlinear)
    fs = (*layer._factors(1), *layer._factors(2))
    expected = _reference_weight(plus_one, nonlinear, *fs)
    composed = layer.compose_weight()
    torch.testing.assert_close(composed, expected.reshape(composed.shape))


def test_forward_composes_the_formula_of_each_variant():
    torch.manual_seed(0)
    layer = FedParaLinear(6, 5, rank=2, **F64)
    w1, w2 = layer.x1 @ layer.y1.T, layer.x2 @ layer.y2.T
    expected = {
        (False, False): w1 * w2,
        (True, False): w1 * (w2 + 1),
        (False, True): torch.tanh(w1) * torch.tanh(w2),
        (True, True): torch.tanh(w1) * (torch.tanh(w2) + 1),
    }
    for (plus_one, nonlinear), w in expected.items():
        layer.plus_one, layer.nonlinear = plus_one, nonlinear
        torch.testing.assert_close(layer.compose_weight(), w)
        torch.testing.assert_close(
            _fedpara_weight(plus_one, nonlinear, *layer._factors(1), *layer._factors(2)), w
        )


# ----------------------------------------------------------------------------------------------
# torch.func: many copies of a layer or a model as one vmap program

K = 3  # copies


def _layer_loss(layer):
    """loss(factors, x) of `layer` with its factors passed in (bias left out)."""
    def loss(fs, x):
        w = _fedpara_weight(layer.plus_one, layer.nonlinear, *fs)
        if isinstance(layer, FedParaLinear):
            return F.linear(x, w).sin().sum()
        return layer._conv(x, layer._shape(w)).sin().sum()
    return loss


def _stacked_copies(layer, k=K):
    """K different copies of the layer's factors, stacked on a new dim 0."""
    g = torch.Generator().manual_seed(3)
    fs = (*layer._factors(1), *layer._factors(2))
    return [torch.stack([f.detach() * (1 + 0.3 * torch.randn(f.shape, generator=g, **F64))
                         for _ in range(k)]) for f in fs]


@pytest.mark.parametrize("make", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_vmap_of_grad_over_stacked_factors_equals_separate_gradients(make, plus_one, nonlinear):
    torch.manual_seed(0)
    layer = make(personalized=True, plus_one=plus_one, nonlinear=nonlinear, bias=False)
    loss, stacked = _layer_loss(layer), _stacked_copies(layer)
    x = torch.stack([layer_input(layer, seed=s) for s in range(K)])
    batched = vmap(grad(loss))(stacked, x)
    for k in range(K):
        fs = [f[k].clone().requires_grad_() for f in stacked]
        separate = torch.autograd.grad(loss(fs, x[k]), fs)
        for a, b in zip(batched, separate, strict=True):
            torch.testing.assert_close(a[k], b)
    for a, b in zip(grad(loss)([f[K - 1] for f in stacked], x[K - 1]), separate, strict=True):
        torch.testing.assert_close(a, b)  # torch.func.grad alone


@pytest.mark.parametrize("make", LAYERS[:2], ids=LAYER_IDS[:2])
@pytest.mark.parametrize("plus_one, nonlinear", [(True, False), (False, True)])
def test_vmap_with_one_branch_shared_or_only_the_data_batched(make, plus_one, nonlinear):
    # in-place ops would fail here: one operand batched, the other not
    torch.manual_seed(0)
    layer = make(personalized=True, plus_one=plus_one, nonlinear=nonlinear, bias=False)
    loss, stacked = _layer_loss(layer), _stacked_copies(layer)
    half = len(stacked) // 2
    x = torch.stack([layer_input(layer, seed=s) for s in range(K)])
    shared_w1 = [f[0] for f in stacked[:half]]
    # pFedPara's cohort: one global W1, a local W2 per client
    per_client = vmap(grad(lambda f2, f1, xb: loss([*f1, *f2], xb)), in_dims=(0, None, 0))(
        stacked[half:], shared_w1, x)
    # per-sample gradients: the same factors, a batch of inputs
    per_sample = vmap(grad(loss), in_dims=(None, 0))([f[0] for f in stacked], x)
    for k in range(K):
        fs = [f[0].clone().requires_grad_() for f in stacked[:half]] + [
            f[k].clone().requires_grad_() for f in stacked[half:]]
        separate = torch.autograd.grad(loss(fs, x[k]), fs)
        for a, b in zip(per_client, separate[half:], strict=True):
            torch.testing.assert_close(a[k], b)
        fs = [f[0].clone().requires_grad_() for f in stacked]
        separate = torch.autograd.grad(loss(fs, x[k]), fs)
        for a, b in zip(per_sample, separate, strict=True):
            torch.testing.assert_close(a[k], b)


@pytest.mark.parametrize(
    "make, image",
    [
        (lambda **kw: mlp(parameterization="fedpara", **kw), (1, 28, 28)),
        (lambda **kw: cnn(parameterization="fedpara", **kw), (1, 12, 12)),
    ],
    ids=["mlp", "cnn"],
)
@pytest.mark.parametrize("personalized, nonlinear", [(False, False), (True, True)])
def test_functional_call_vmap_over_stacked_models_equals_separate_backward(
    make, image, personalized, nonlinear
):
    torch.manual_seed(0)
    models = [make(personalized=personalized, nonlinear=nonlinear).double() for _ in range(K)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(K, 3, *image, generator=g, **F64), torch.randint(0, 10, (K, 3), generator=g)

    def loss(p, b, xb, yb):
        return F.cross_entropy(functional_call(skeleton, (p, b), (xb,)), yb)

    batched = vmap(grad(loss))(params, buffers, x, y)
    for k, model in enumerate(models):
        model.zero_grad()
        F.cross_entropy(model(x[k]), y[k]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(batched[name][k], p.grad, msg=name)


def test_the_function_keeps_only_small_factors_for_backward():
    """Nothing dense-sized is saved: the factors, each branch's B (R·in·kh·kw numbers) and
    the core's view used to build it."""
    layer = FedParaConv2d(64, 64, 3, rank=8, bias=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _fedpara_weight(False, False, *layer._factors(1), *layer._factors(2))
    dense = 64 * 64 * 9
    unfolded = 2 * 8 * 64 * 9  # B1 and B2
    assert saved and max(t.numel() for t in saved) <= 8 * 64 * 9 < dense
    assert sum(t.numel() for t in saved) <= 2 * weight_params(layer) + unfolded
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved.clear()
        _FedParaWeight.apply(False, False, layer.x1, layer.y1, layer.x2, layer.y2)
    assert [t.shape for t in saved] == [layer.x1.shape, layer.y1.shape] * 2  # its 4 inputs


@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_a_channels_last_kernel_is_the_same_kernel(plus_one, nonlinear):
    """For a channels-last input the forward composes the kernel straight into channels-last
    strides; values and gradients equal the contiguous composition's."""
    fs = factors(tucker=True, rank=3, out=5, inp=4, kernel=(3, 2))
    probe = torch.randn(5, 4, 3, 2, generator=torch.Generator().manual_seed(1), **F64)
    results = []
    for channels_last in (False, True):
        w = _fedpara_weight(plus_one, nonlinear, *fs, channels_last=channels_last)
        assert w.shape == (5, 4, 3, 2)
        assert w.is_contiguous(memory_format=torch.channels_last) == channels_last
        results.append((w.detach(), torch.autograd.grad((w * probe).sum(), fs)))
    (w_a, g_a), (w_b, g_b) = results
    torch.testing.assert_close(w_b, w_a)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(b, a)


def _counting_onednn(monkeypatch) -> list:
    """Route `layers._linear`'s oneDNN products through a counter; skip where there is none."""
    op = layers._onednn_linear()
    if op is None:
        pytest.skip("this torch build has no oneDNN linear op")
    calls = []
    monkeypatch.setattr(layers, "_onednn_linear", lambda: lambda *a: calls.append(1) or op(*a))
    return calls


@pytest.mark.parametrize("tucker", [False, True], ids=["matrix", "tucker"])
@pytest.mark.parametrize("plus_one, nonlinear", VARIANTS)
def test_onednn_products_give_the_blas_results_in_float32(monkeypatch, tucker, plus_one,
                                                          nonlinear):
    """On the CPU, float32 eager composition multiplies with oneDNN (2 products forward, 6
    backward); with oneDNN switched off it uses `@`. Both agree to float32 rounding."""
    calls = _counting_onednn(monkeypatch)
    fs = [f.detach().float().requires_grad_() for f in factors(tucker, rank=4, out=9, inp=7)]
    probe = torch.randn(_reference_weight(plus_one, nonlinear, *fs).shape,
                        generator=torch.Generator().manual_seed(1))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", enabled)
        w = _fedpara_weight(plus_one, nonlinear, *fs)
        results.append((w.detach(), torch.autograd.grad((w * probe).sum(), fs)))
        assert len(calls) == (8 if enabled else 0)
        calls.clear()
    (w_dnn, g_dnn), (w_blas, g_blas) = results
    torch.testing.assert_close(w_dnn, w_blas)
    for a, b in zip(g_dnn, g_blas, strict=True):
        torch.testing.assert_close(a, b)


def test_the_onednn_check_leaves_the_random_stream_alone():
    layers._onednn_linear.cache_clear()
    torch.manual_seed(0)
    layers._onednn_linear()
    after_check = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after_check, torch.rand(3), rtol=0, atol=0)


def test_onednn_is_left_out_where_it_has_no_rule(monkeypatch):
    """No oneDNN product under vmap (no batching rule), with create_graph (no derivative), or
    for float64; the eager float32 path does use it."""
    calls = _counting_onednn(monkeypatch)
    layer = FedParaConv2d(4, 6, 3, padding=1, rank=2, bias=False)
    x = torch.randn(2, 2, 4, 5, 5)
    stacked = _stacked_copies(layer, k=2)
    vmap(grad(_layer_loss(layer)))([f.float() for f in stacked], x)
    fs = [f.detach().requires_grad_() for f in (*layer._factors(1), *layer._factors(2))]
    w = _fedpara_weight(False, False, *fs)
    torch.autograd.grad(w.square().sum(), fs, create_graph=True)
    assert len(calls) == 2  # the forward only: backward ran with grad mode on
    calls.clear()
    double = [f.double() for f in fs]
    torch.autograd.grad(_fedpara_weight(False, False, *double).sum(), double)
    assert calls == []
    torch.autograd.grad(_fedpara_weight(False, False, *fs).sum(), fs)
    assert len(calls) == 8
    calls.clear()
    a, w = torch.randn(3, 8)[:, ::2], torch.randn(5, 4)  # a strided operand: BLAS takes it
    torch.testing.assert_close(layers._linear(a, w, onednn=True), a @ w.T)
    assert calls == []
    layers._linear(a.contiguous(), w.T.contiguous().T, onednn=True)
    assert len(calls) == 1


def test_a_fedpara_model_compiles_into_one_graph_that_trains_as_eager(monkeypatch):
    """torch.compile traces a FedPara model (Tucker-2 convolutions and a FedPara head) without
    a graph break, forward and backward (fullgraph=True; the aot_eager backend runs AOTAutograd
    without code generation), calls no oneDNN product inside, and gives eager's loss and
    gradients, which multiply by oneDNN, to float32 rounding."""
    import torch._dynamo

    calls = _counting_onednn(monkeypatch)
    torch.manual_seed(0)
    model = cnn(parameterization="fedpara", gamma=0.3)
    model.head = FedParaLinear(128, 10, gamma=0.5)
    twin = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    traced = F.cross_entropy(compiled(x), y)
    traced.backward()
    assert calls == []  # traced: `@` throughout
    eager = F.cross_entropy(model(x), y)
    eager.backward()
    assert len(calls) == 8 * 5  # eager: 4 convolutions and the head, 8 products each
    torch.testing.assert_close(traced, eager)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    torch._dynamo.reset()


def test_the_conv_layer_composes_channels_last_for_a_channels_last_input(monkeypatch):
    torch.manual_seed(0)
    layer = FedParaConv2d(4, 6, 3, padding=1, rank=2).double()
    x = torch.randn(2, 4, 5, 5, **F64)
    layouts = []
    conv = layer._conv
    monkeypatch.setattr(layer, "_conv", lambda i, w: layouts.append(
        w.is_contiguous(memory_format=torch.channels_last)) or conv(i, w))
    out = layer(x)
    out_cl = layer(x.to(memory_format=torch.channels_last))
    assert layouts == [False, True]
    torch.testing.assert_close(out_cl, out)


def test_bfloat16_autocast_composes_in_float32_and_returns_float32_gradients():
    torch.manual_seed(0)
    layer = FedParaConv2d(8, 16, 3, padding=1, rank=4)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    reference = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    F.conv2d(x, layer.compose_weight(), layer.bias, padding=1).sum().backward()
    for p, g in zip(layer.parameters(), reference, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, p.grad, rtol=0.05, atol=0.05 * p.grad.abs().max().item())


# ----------------------------------------------------------------------------------------------
# initialization: the composed weight has about the Kaiming std of the dense layer


SHAPES = [  # (kind, in, out, kernel)
    ("linear", 784, 200, 1),
    ("linear", 200, 10, 1),
    ("conv", 1, 32, 3),
    ("conv", 3, 64, 3),
    ("conv", 64, 128, 3),
    ("conv", 512, 512, 3),
    ("conv", 64, 256, 1),
]


def initial_std_ratio(kind, fan, out, k, variant):
    """The composed weight's std at initialization over the dense layer's Kaiming std."""
    torch.manual_seed(0)
    kw = {"gamma": 0.1}
    if variant == "pfedpara":
        kw["personalized"] = True
    if variant == "nonlinear":
        kw["nonlinear"] = True
    if kind == "linear":
        layer = (LowRankLinear if variant == "lowrank" else FedParaLinear)(fan, out, **kw)
    else:
        layer = (LowRankConv2d if variant == "lowrank" else FedParaConv2d)(fan, out, k, **kw)
    assert all(p.abs().sum() > 0 for n, p in layer.named_parameters() if n != "bias")
    return layer.compose_weight().std().item() / math.sqrt(2 / (fan * k * k))


@pytest.mark.parametrize("kind, fan, out, k", SHAPES)
@pytest.mark.parametrize("variant", ["fedpara", "pfedpara", "nonlinear", "lowrank"])
def test_composed_weight_starts_near_kaiming_std(kind, fan, out, k, variant):
    assert 0.5 <= initial_std_ratio(kind, fan, out, k, variant) <= 2.0


@pytest.mark.parametrize("kind, fan, out, k", [s for s in SHAPES if s[1] * s[3] ** 2 >= 64])
@pytest.mark.parametrize("variant", ["fedpara", "pfedpara", "nonlinear", "lowrank"])
def test_a_large_layer_starts_within_15_percent_of_kaiming_std(kind, fan, out, k, variant):
    # the wide band above is for layers of a few inputs, whose std varies from seed to seed;
    # a layer with many weights averages that out, so a variance off by 2 shows (std × 1.41)
    assert 0.85 <= initial_std_ratio(kind, fan, out, k, variant) <= 1.15


# ----------------------------------------------------------------------------------------------
# global and local parameters


def test_a_personalized_layer_defaults_to_the_papers_plus_one():
    assert FedParaLinear(8, 16, rank=2, personalized=True).plus_one
    assert FedParaConv2d(8, 16, 3, rank=2, personalized=True).plus_one
    assert not FedParaConv2d(8, 16, 3, rank=2).plus_one


def test_pfedpara_shares_only_the_first_branch():
    conv = FedParaConv2d(8, 16, 3, rank=4, personalized=True)
    assert conv.local_parameter_names() == ["x2", "y2", "t2", "bias"]
    assert conv.local_factor_names() == ["x2", "y2", "t2"]
    assert conv.global_parameter_names() == ["x1", "y1", "t1"]
    linear = FedParaLinear(8, 16, rank=4, personalized=True, bias=False)
    assert linear.local_parameter_names() == ["x2", "y2"]
    assert linear.global_parameter_names() == ["x1", "y1"]


@pytest.mark.parametrize("tucker", [False, True], ids=["linear", "conv"])
def test_the_product_split_composes_without_the_plus_one(tucker):
    torch.manual_seed(0)
    make = (lambda **k: FedParaConv2d(3, 4, 3, rank=2, **k, **F64)) if tucker else (
        lambda **k: FedParaLinear(6, 5, rank=2, **k, **F64))
    layer = make(personalized=True, plus_one=False)
    assert layer.personalized and not layer.plus_one and layer.local_factor_names()
    w1 = _branch(*layer._factors(1))
    w2 = _branch(*layer._factors(2))
    torch.testing.assert_close(layer.compose_weight().reshape(w1.shape), w1 * w2)
    # initialized as plain FedPara: the composed weight at about the Kaiming scale
    fan_in = layer.compose_weight()[0].numel()
    assert 0.3 <= layer.compose_weight().std().item() / math.sqrt(2 / fan_in) <= 3


@pytest.mark.parametrize(
    "layer",
    [
        FedParaLinear(8, 16, rank=4),
        FedParaConv2d(8, 16, 3, rank=4),
        LowRankConv2d(8, 16, 3, rank=5),
    ],
)
def test_without_personalization_every_parameter_is_global(layer):
    assert layer.local_parameter_names() == []
    assert layer.global_parameter_names() == [n for n, _ in layer.named_parameters()]


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: FedParaLinear(8, 8, gamma=0.0), "gamma"),
        (lambda: FedParaLinear(8, 8, gamma=1.5), "gamma"),
        (lambda: FedParaLinear(8, 8, gamma=-0.1), "gamma"),
        (lambda: FedParaConv2d(8, 8, 3, gamma="0.1"), "gamma"),
        (lambda: FedParaLinear(8, 8, rank=0), "rank"),
        (lambda: LowRankLinear(8, 8, rank=-2), "rank"),
        (lambda: FedParaConv2d(8, 8, 3, rank=2.5), "rank"),
        (lambda: FedParaLinear(8, 8, rank=True), "rank"),
        (lambda: FedParaLinear(8, 8, rank=2, gamma=0.1), "exactly one of rank"),
        (lambda: FedParaConv2d(8, 8, 3), "exactly one of rank"),
        (lambda: LowRankConv2d(8, 8, 3), "exactly one of rank"),
        (lambda: FedParaConv2d(8, 8, 3, rank=2, groups=2), "groups"),
        (lambda: LowRankConv2d(8, 8, 3, rank=2, groups=4), "groups"),
        (lambda: FedParaLinear(0, 8, rank=2), "in_features"),
        (lambda: LowRankLinear(8, -1, rank=2), "out_features"),
        (lambda: FedParaConv2d(8, 0, 3, rank=2), "out_channels"),
        (lambda: FedParaConv2d(8, 8, 0, rank=2), "kernel_size"),
        (lambda: rank_from_gamma(8, 8, 3, 2.0), "gamma"),
        (lambda: rank_from_gamma(0, 8, 3, 0.5), "out_features"),
        (lambda: rank_from_param_fraction(8, 8, 3, 0.0), "fraction"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_parameter(build, match):
    with pytest.raises(ValueError, match=match):
        build()
