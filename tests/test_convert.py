"""fedpara.convert: fedparafy swaps layers for FedPara ones and reports what it skipped."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from fedpara.accounting import count_params
from fedpara.convert import LayerChange, fedparafy
from fedpara.layers import FedParaConv2d, FedParaLinear

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1))
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.tiny = nn.Conv2d(64, 2, 1)
        self.fc = nn.Linear(2, 10)
        self.big_fc = nn.Linear(128, 128)

    def forward(self, x):
        x = self.tiny(self.depthwise(self.block(self.stem(x))))
        return self.big_fc(torch.cat([self.fc(x.mean((2, 3)))] * 12 + [torch.zeros(len(x), 8)], 1))


def test_fedparafy_swaps_convolutions_keeps_names_and_reports_skips():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 3, 8, 8)
    before = count_params(model)
    model, changes = fedparafy(model, gamma=0.1)
    report = {c.name: c for c in changes}
    assert [c.name for c in changes] == ["stem", "block.0", "block.2", "depthwise", "tiny"]
    assert {n for n, c in report.items() if c.replaced} == {"stem", "block.0", "block.2"}
    assert "grouped" in report["depthwise"].reason
    assert report["tiny"].reason == "would not shrink"
    assert isinstance(model.block[0], FedParaConv2d) and isinstance(model.fc, nn.Linear)
    assert {"stem.x1", "block.0.t2", "block.2.y1", "depthwise.weight", "fc.weight"} <= set(
        model.state_dict()
    )
    replaced = [c for c in changes if c.replaced]
    assert count_params(model) == before - sum(
        c.dense_params - c.factorized_params for c in replaced
    )
    assert model(x).shape == (2, 128)


def test_fedparafy_converts_linear_layers_when_asked():
    model, changes = fedparafy(Toy(), gamma=0.5, linear=True, personalized=True)
    assert isinstance(model.big_fc, FedParaLinear) and model.big_fc.personalized
    assert isinstance(model.fc, nn.Linear)  # 2 -> 10 would not shrink
    assert next(c for c in changes if c.name == "fc").reason == "would not shrink"


def test_fedparafy_converts_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model, changes = fedparafy(torchvision.models.resnet18(num_classes=10), gamma=0.1)
    assert len(changes) == 20 and all(c.replaced for c in changes)
    assert isinstance(model.layer4[1].conv2, FedParaConv2d)
    assert count_params(model) < 1_000_000
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fedparafy_carries_over_each_layers_settings():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=2, dilation=2, bias=False))
    dense = dense.double().eval()
    x = torch.randn(1, 64, 11, 11, dtype=torch.float64)
    expected = dense(x).shape  # (1, 64, 6, 6): without the stride 11×11, without the dilation 7×7
    model, _ = fedparafy(dense, gamma=0.1, nonlinear=True)
    layer = model[0]
    assert isinstance(layer, FedParaConv2d) and layer.nonlinear and not layer.training
    assert layer.bias is None and layer.x1.dtype == torch.float64
    assert model(x).shape == expected


def test_fedparafy_converts_a_bare_layer_and_keeps_what_it_cannot_shrink_or_pad():
    layer, changes = fedparafy(nn.Conv2d(64, 64, 3), gamma=0.1)
    assert isinstance(layer, FedParaConv2d) and changes[0].name == "" and changes[0].replaced
    model, changes = fedparafy(
        nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, padding_mode="circular")), gamma=0.1)
    assert type(model[0]) is nn.Conv2d and changes[0].reason == "padding_mode='circular'"
    # Linear(8, 8) at γ = 1: R = 2 and 2R(8 + 8) = 64 = 8·8, no smaller: kept dense
    kept, changes = fedparafy(nn.Linear(8, 8), gamma=1.0, linear=True)
    assert type(kept) is nn.Linear
    assert changes == [LayerChange("", "Linear", 64, 64, 2, False, "would not shrink")]


def test_fedparafy_keeps_a_shared_layer_shared():
    shared = nn.Conv2d(64, 64, 3, padding=1)
    model, changes = fedparafy(nn.Sequential(shared, nn.ReLU(), shared), gamma=0.1)
    assert isinstance(model[0], FedParaConv2d) and model[2] is model[0]  # one layer, two places
    assert [c.name for c in changes] == ["0"]
    assert count_params(model) == count_params(model[0])


def test_a_converted_transformer_layer_runs_its_fused_inference_path():
    # nn.TransformerEncoderLayer reads linear1.weight and linear2.weight directly in eval mode
    torch.manual_seed(0)
    model, changes = fedparafy(nn.TransformerEncoderLayer(64, 4, dim_feedforward=256,
                                                          batch_first=True),
                               gamma=0.1, linear=True)
    assert [c.name for c in changes if c.replaced] == ["linear1", "linear2"]
    out_proj = next(c for c in changes if c.name == "self_attn.out_proj")
    assert out_proj.reason == "unsupported type NonDynamicallyQuantizableLinear"
    assert torch.equal(model.linear1.weight, model.linear1.compose_weight())
    x = torch.randn(2, 5, 64)
    model.eval()
    fused_calls = []
    fused_op = torch._transformer_encoder_layer_fwd

    def counted(*args, **kwargs):
        fused_calls.append(1)
        return fused_op(*args, **kwargs)

    with torch.no_grad():
        torch._transformer_encoder_layer_fwd = counted
        try:
            fused = model(x)
        finally:
            torch._transformer_encoder_layer_fwd = fused_op
        assert fused_calls, "the fused path did not run"
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            plain = model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"parameterization": "original"}, "parameterization"),
        ({"gamma": 0.0}, "gamma"),
        ({"parameterization": "lowrank", "personalized": True}, "personalized"),
    ],
)
def test_fedparafy_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fedparafy(Toy(), **kwargs)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 256)
        self.head = nn.Linear(256, 1000, bias=False)
        self.head.weight = self.emb.weight


def test_fedparafy_keeps_tied_weights_tied():
    model = TiedLM()
    before = count_params(model)
    model, changes = fedparafy(model, gamma=0.1, linear=True)
    assert changes == [
        LayerChange("head", "Linear", 256_000, 0, 0, False, "weight shared with emb")
    ]
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    assert count_params(model) == before

    # two distinct layers holding one weight, or one bias, are both kept dense
    convs = [nn.Conv2d(64, 64, 3) for _ in range(4)]
    convs[1].weight = convs[0].weight
    convs[3].bias = convs[2].bias
    model, changes = fedparafy(nn.Sequential(*convs), gamma=0.1)
    assert [c.reason for c in changes] == [
        "weight shared with 1",
        "weight shared with 0",
        "bias shared with 3",
        "bias shared with 2",
    ]
    assert all(type(m) is nn.Conv2d for m in model) and model[1].weight is model[0].weight


class MyConv2d(nn.Conv2d):
    pass


class MyLinear(nn.Linear):
    pass


def test_fedparafy_reports_layers_it_cannot_convert():
    model = nn.Sequential(
        nn.Conv1d(128, 128, 3),
        nn.Conv3d(64, 64, 3),
        nn.ConvTranspose2d(128, 128, 3),
        parametrizations.weight_norm(nn.Conv2d(128, 128, 3)),
        MyConv2d(128, 128, 3),
        nn.Conv2d(128, 128, 3),
        MyLinear(128, 128),
    )
    before = count_params(model)
    model, changes = fedparafy(model, gamma=0.1)  # linear=False: Linear layers are not visited
    assert [(c.name, c.kind, c.dense_params, c.replaced, c.reason) for c in changes] == [
        ("0", "Conv1d", 128 * 128 * 3, False, "unsupported type Conv1d"),
        ("1", "Conv3d", 64 * 64 * 27, False, "unsupported type Conv3d"),
        ("2", "ConvTranspose2d", 128 * 128 * 9, False, "unsupported type ConvTranspose2d"),
        ("3", "ParametrizedConv2d", 128 * 128 * 9 + 128, False, "parametrized weight"),
        ("4", "MyConv2d", 128 * 128 * 9, False, "unsupported type MyConv2d"),
        ("5", "Conv2d", 128 * 128 * 9, True, ""),
    ]
    assert count_params(model) == before - (changes[5].dense_params - changes[5].factorized_params)
    assert isinstance(model[5], FedParaConv2d) and type(model[4]) is MyConv2d

    _, changes = fedparafy(nn.Sequential(MyLinear(128, 128)), gamma=0.1, linear=True)
    assert changes == [
        LayerChange("0", "MyLinear", 128 * 128, 0, 0, False, "unsupported type MyLinear")
    ]


@pytest.mark.parametrize(
    "kind, register",
    [
        ("forward", nn.Module.register_forward_hook),
        ("forward pre", nn.Module.register_forward_pre_hook),
        ("backward", nn.Module.register_full_backward_hook),
    ],
    ids=["forward", "forward-pre", "backward"],
)
def test_fedparafy_keeps_layers_with_hooks(kind, register):
    calls = []
    model = nn.Sequential(nn.Conv2d(64, 64, 3))
    register(model[0], lambda *args: calls.append(1))
    model, changes = fedparafy(model, gamma=0.1)
    assert type(model[0]) is nn.Conv2d
    assert changes[0].reason == f"has hooks ({kind})" and not changes[0].replaced
    model(torch.randn(1, 64, 5, 5, requires_grad=True)).sum().backward()
    assert calls == [1]


@pytest.mark.parametrize("attr", ["weight", "bias"])
def test_fedparafy_keeps_layers_whose_parameters_have_hooks(attr):
    grads = []
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3))
    getattr(model[0], attr).register_hook(grads.append)
    getattr(model[1], attr).register_post_accumulate_grad_hook(grads.append)
    model, changes = fedparafy(model, gamma=0.1)
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d]
    assert [c.reason for c in changes] == [f"has hooks ({attr} gradient)",
                                           f"has hooks ({attr} post-accumulate-grad)"]
    model(torch.randn(1, 64, 7, 7)).sum().backward()
    assert len(grads) == 2


def test_fedparafy_keeps_frozen_layers_dense():
    model = nn.Sequential(nn.Conv2d(64, 64, 3).requires_grad_(False), nn.Conv2d(64, 64, 3))
    model[1].bias.requires_grad_(False)
    model, changes = fedparafy(model, gamma=0.1)
    assert [c.reason for c in changes] == ["frozen weight", "frozen bias"]
    assert all(type(m) is nn.Conv2d for m in model)
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, False]
