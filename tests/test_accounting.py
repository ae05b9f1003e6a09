"""Accounting: the paper's communication costs, and which state_dict keys each algorithm sends."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedpara.accounting import (
    ALGORITHMS,
    comm_cost_gib,
    count_params,
    global_state_keys,
    payload_bytes,
)
from fedpara.models import mlp, vgg16


@pytest.mark.parametrize(
    "num_classes, parameterization, gamma, clients, rounds, gib",
    [
        (10, "original", 0.1, 16, 200, 363.67),  # CIFAR-10: 200 rounds × 16 clients
        (10, "fedpara", 0.1, 16, 200, 36.88),
        (100, "original", 0.4, 8, 400, 364.77),  # CIFAR-100: 400 rounds × 8 clients
        (100, "fedpara", 0.4, 8, 400, 108.05),
    ],
)
def test_a_full_run_costs_what_the_paper_reports(
    num_classes, parameterization, gamma, clients, rounds, gib
):
    model = vgg16(num_classes, parameterization=parameterization, gamma=gamma)
    assert round(comm_cost_gib(model, clients, rounds), 2) == gib


def test_payload_is_the_bytes_of_the_tensors_at_their_dtype():
    model = mlp(parameterization="fedpara")
    assert payload_bytes(model) == 4 * count_params(model)
    assert payload_bytes(model.half()) == 2 * count_params(model)
    assert payload_bytes(model.state_dict()) == payload_bytes(model)
    arrays = {k: v.numpy() for k, v in model.float().state_dict().items()}
    assert payload_bytes(arrays) == 4 * count_params(model)


def test_payload_of_a_flower_record_counts_the_numbers_it_carries():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    record = ArrayRecord(model.state_dict())
    assert payload_bytes(record) == payload_bytes(model)
    assert payload_bytes(record, transport="float16") == payload_bytes(model, transport="float16")
    with pytest.raises(ValueError, match=r"payload_bytes counts.*'w' is a list"):
        payload_bytes({"w": [1.0, 2.0]})


def test_buffers_travel_with_the_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    buffer_bytes = 8 * 4 * 2 + 8  # running mean and var (float32), num_batches_tracked (int64)
    assert payload_bytes(model) == 4 * count_params(model) + buffer_bytes


def test_count_params_counts_a_shared_parameter_once():
    layer = nn.Linear(4, 4)
    assert count_params(nn.Sequential(layer, layer)) == 20
    layer.bias.requires_grad_(False)  # trainable or not
    assert count_params(layer) == 20


def test_a_16_bit_wire_shrinks_floating_point_numpy_arrays_only():
    arrays = {"w": np.zeros(3, np.float32), "mask": np.zeros(4, np.bool_),
              "ids": np.zeros(2, np.uint8)}
    assert payload_bytes(arrays, transport="float16") == 3 * 2 + 4 + 2


def test_no_clients_or_no_rounds_cost_nothing():
    model = mlp()
    assert comm_cost_gib(model, 0, 10) == comm_cost_gib(model, 4, 0) == 0.0


def test_each_algorithm_sends_its_own_keys():
    model = mlp(parameterization="fedpara", personalized=True)
    keys = list(model.state_dict())
    assert global_state_keys(model, "fedavg") == keys
    assert global_state_keys(model, "local") == []
    assert global_state_keys(model, "fedper") == [k for k in keys if not k.startswith("head.")]
    pfedpara = global_state_keys(model, "pfedpara")
    assert pfedpara == [  # W1's factors only: W2's factors and the biases stay local
        f"{layer}.{factor}"
        for layer in ("classifier.0", "classifier.2", "head")
        for factor in ("x1", "y1")
    ]
    sizes = {a: payload_bytes(model, a) for a in ALGORITHMS}
    assert sizes["local"] == 0 < sizes["pfedpara"] < sizes["fedper"] < sizes["fedavg"]
    assert comm_cost_gib(model, 10, 100, "pfedpara") == 2 * 10 * 100 * sizes["pfedpara"] / 2**30


def test_pfedpara_sends_half_of_the_factors_and_no_bias():
    model = mlp(parameterization="fedpara", personalized=True)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert payload_bytes(model, "pfedpara") == 4 * ((count_params(model) - biases) // 2)


def test_pfedpara_keeps_norms_and_dense_layers_local():
    model = vgg16(parameterization="fedpara", personalized=True)
    sent = global_state_keys(model, "pfedpara")
    assert sent and all(k.rsplit(".", 1)[1] in ("x1", "y1", "t1") for k in sent)
    assert not any(k.startswith(("classifier.", "head.")) for k in sent)


def test_pfedpara_sends_a_shared_layers_w1_under_every_name_it_has():
    from fedpara.convert import fedparafy
    from fedpara.task import get_arrays, set_arrays, split_keys

    layer = nn.Linear(64, 64)
    model, _ = fedparafy(nn.Sequential(layer, nn.ReLU(), layer), linear=True, personalized=True)
    sent, kept = split_keys(model, "pfedpara")
    assert sent == ["0.x1", "0.y1", "2.x1", "2.y1"]
    # a client loads the server's global arrays, then its own local ones (client_app's order):
    # the local ones must not bring back its old copy of the shared W1
    local = get_arrays(model, kept)
    set_arrays(model, {k: torch.full_like(v, 7.0) for k, v in get_arrays(model, sent).items()})
    set_arrays(model, local)
    assert bool((model[0].x1 == 7).all()) and model[0] is model[2]


def test_pfedpara_without_personalized_layers_is_an_error():
    with pytest.raises(ValueError, match="personalized"):
        global_state_keys(vgg16(parameterization="fedpara"), "pfedpara")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: global_state_keys(m, "fedprox"), "algorithm"),
        (lambda m: payload_bytes(m, "scaffold"), "algorithm"),
        (lambda m: payload_bytes(m.state_dict(), "fedper"), "algorithm"),
        (lambda m: payload_bytes([torch.zeros(3)]), "model_or_state_dict"),
        (lambda m: comm_cost_gib(m, -1, 10), "clients_per_round"),
        (lambda m: comm_cost_gib(m, 4, 2.5), "rounds"),
        (lambda m: comm_cost_gib(m, True, 10), "clients_per_round"),
        (lambda m: global_state_keys(nn.Linear(2, 2), "fedper"), "head"),
    ],
)
def test_bad_accounting_arguments_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(mlp())
