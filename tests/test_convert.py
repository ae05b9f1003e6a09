"""fedpara.convert: fedparafy swaps layers for FedPara ones and reports what it skipped."""

import pytest
import torch
from torch import nn

from fedpara.accounting import count_params
from fedpara.convert import fedparafy
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
