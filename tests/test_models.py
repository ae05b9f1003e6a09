"""Models: the paper's VGG16 sizes, the `head` convention, training."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpara.accounting import count_params
from fedpara.layers import FactorizedLayer, FedParaConv2d, FedParaLinear, LowRankConv2d
from fedpara.models import MODELS, PARAMETERIZATIONS, build_model, cnn, mlp, vgg16


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    "num_classes, parameterization, gamma, params",
    [
        (10, "original", 0.1, 15_253_578),
        (10, "fedpara", 0.1, 1_546_844),
        (100, "original", 0.4, 15_299_748),
        (100, "fedpara", 0.4, 4_531_856),
    ],
)
def test_vgg16_has_the_papers_parameter_counts(num_classes, parameterization, gamma, params):
    assert (
        count_params(vgg16(num_classes, parameterization=parameterization, gamma=gamma)) == params
    )


def test_vgg16_lowrank_has_the_fedpara_budget_and_only_convs_are_factorized():
    fedpara = vgg16(parameterization="fedpara", gamma=0.1)
    lowrank = vgg16(parameterization="lowrank", gamma=0.1)
    assert count_params(lowrank) == count_params(fedpara)
    assert sum(isinstance(m, FedParaConv2d) for m in fedpara.modules()) == 13
    assert sum(isinstance(m, LowRankConv2d) for m in lowrank.modules()) == 13
    assert not any(isinstance(m, FactorizedLayer) for m in [*fedpara.classifier, fedpara.head])


# ----------------------------------------------------------------------------------------------
# shapes and the head convention


INPUTS = {"vgg16": (2, 3, 32, 32), "mlp": (2, 1, 28, 28), "cnn": (2, 1, 28, 28)}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_every_model_ends_in_head_and_returns_logits(name, parameterization):
    in_channels = INPUTS[name][1]
    model = build_model(
        name, num_classes=7, in_channels=in_channels, parameterization=parameterization
    )
    last_name, last = list(model.named_modules())[-1]
    assert last_name == "head" and last is model.head
    assert model(torch.randn(INPUTS[name])).shape == (2, 7)


def test_mlp_input_size_follows_in_channels_and_image_size():
    model = build_model("mlp", num_classes=10, in_channels=3)
    assert model.classifier[0].in_features == 3 * 28 * 28
    assert mlp(hidden=(200, 256)).head.in_features == 256
    on_cifar = build_model("mlp", num_classes=10, in_channels=3, image_size=32)
    assert on_cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_models_take_numpy_gammas_as_the_layers_do():
    np = pytest.importorskip("numpy")
    model = vgg16(parameterization="fedpara", gamma=np.float32(0.1))
    assert count_params(model) == count_params(vgg16(parameterization="fedpara", gamma=0.1))


def test_fedpara_mlp_factorizes_every_layer_including_the_head():
    model = mlp(parameterization="fedpara", personalized=True)
    layers = [m for m in model.modules() if isinstance(m, FedParaLinear)]
    assert len(layers) == 3 and model.head is layers[-1]
    assert all(m.personalized for m in layers)
    # with two classes no rank fits a dense head's 402 numbers: R = 1 at γ = 0.5 and R = 2 at
    # γ = 0.1 (2R(200 + 2) + 2), as the docstring says, while the model stays smaller
    dense = mlp(num_classes=2)
    for gamma, head in ((0.5, 406), (0.1, 810)):
        two = mlp(num_classes=2, parameterization="fedpara", gamma=gamma)
        assert (count_params(two.head), count_params(dense.head)) == (head, 402)
        assert count_params(two) < count_params(dense)


def test_vgg16_and_cnn_have_their_documented_structure():
    model = vgg16()
    norms = [m for m in model.features if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 13 and all(n.num_groups == 2 for n in norms)
    assert [type(m) for m in model.classifier] == [nn.Dropout, nn.Linear, nn.ReLU] * 2
    small = cnn(in_channels=3)
    x = torch.randn(2, 3, 28, 28)
    assert small.features[:-1](x).shape == (2, 128, 4, 4)  # 28 -> 14 -> 7 -> 4, then pooled
    assert small(x).shape == (2, 10)


def test_dense_layers_start_at_kaiming_fan_in_with_a_zero_bias():
    torch.manual_seed(0)
    dense = [m for build in (vgg16, mlp, cnn) for m in build().features.modules()
             if isinstance(m, nn.Conv2d)] + [m for m in mlp().modules() if isinstance(m, nn.Linear)]
    for layer in dense:
        fan_in = layer.weight[0].numel()
        assert 0.9 <= layer.weight.std().item() / math.sqrt(2 / fan_in) <= 1.1
        assert not layer.bias.any()


@pytest.mark.parametrize("build", [vgg16, mlp, cnn])
def test_variant_flags_reach_every_factorized_layer(build):
    model = build(parameterization="fedpara", personalized=True, plus_one=False, nonlinear=True)
    layers = [m for m in model.modules() if isinstance(m, FactorizedLayer)]
    assert layers and all(m.personalized and not m.plus_one and m.nonlinear for m in layers)


def test_cnn_is_small_and_factorized_in_its_convolutions():
    original, fedpara = cnn(), cnn(parameterization="fedpara", gamma=0.1)
    assert 100_000 <= count_params(original) <= 300_000
    assert count_params(fedpara) < count_params(original) / 4
    assert sum(isinstance(m, FedParaConv2d) for m in fedpara.modules()) == 4


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_model("resnet", num_classes=10), "name"),
        (lambda: vgg16(parameterization="dense"), "parameterization"),
        (lambda: mlp(parameterization="lowrank", personalized=True), "personalized"),
        (lambda: cnn(parameterization="original", nonlinear=True), "nonlinear"),
        (lambda: mlp(parameterization="lowrank", plus_one=True), "plus_one"),
        (lambda: vgg16(parameterization="fedpara", gamma=0.0), "gamma"),
        (lambda: mlp(hidden=()), "hidden"),
        (lambda: vgg16(parameterization="fedpara", gamma=True), "gamma"),
        # VGG16's five pools leave no map of a 28×28 image: refused before any layer is built
        (lambda: build_model("vgg16", num_classes=10, in_channels=1, image_size=28),
         "image_size=28.*allowed: image_size=32"),
    ],
)
def test_bad_model_arguments_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# training


def gaussian_classes(n: int, seed: int = 0):
    """Ten classes in 784-D: a class prototype (norm ≈ 8) under unit Gaussian noise (norm ≈ 28)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return 0.3 * prototypes[y] + torch.randn(n, 784, generator=g), y


@pytest.mark.parametrize("personalized", [False, True], ids=["fedpara", "pfedpara"])
def test_a_fedpara_mlp_learns_a_synthetic_task(personalized):
    x, y = gaussian_classes(2500)
    torch.manual_seed(0)
    model = mlp(784, parameterization="fedpara", gamma=0.5, personalized=personalized)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # epochs over the first 2,000 examples
        for idx in torch.randperm(2000).split(50):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(x[2000:]).argmax(1) == y[2000:]).float().mean().item()
    assert accuracy > 0.9


def test_vgg16_fedpara_gradients_reach_every_factor():
    torch.manual_seed(0)
    model = vgg16(parameterization="fedpara", gamma=0.1)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
