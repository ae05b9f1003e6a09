"""Wire precision: 16-bit encodings of the arrays a round sends, and what they cost; packing
the arrays of a message into one flat array per dtype."""

import pytest
import torch
from flwr.app import ArrayRecord

from fedpara.accounting import comm_cost_gib, payload_bytes
from fedpara.config import ExperimentConfig, get_preset
from fedpara.models import mlp
from fedpara.transport import (
    TRANSPORTS,
    decode,
    encode,
    from_wire,
    pack,
    to_wire,
    unpack,
    wire_itemsize,
)

# largest relative rounding error of a normal number: half a unit in the last place
RELATIVE_ERROR = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
WIRE_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}


def _state():
    torch.manual_seed(0)
    return {"weight": torch.randn(64, 32) * 0.05, "scale": torch.rand(32) * 50 + 1e-3,
            "steps": torch.tensor(12345, dtype=torch.int64)}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_round_trip_rounds_to_the_format_and_keeps_integers(transport):
    state = _state()
    wire = encode(state, transport)
    assert wire["weight"].dtype == wire["scale"].dtype == WIRE_DTYPE[transport]
    assert wire["weight"].element_size() == wire_itemsize(transport)
    assert wire["steps"].dtype == torch.int64 and int(wire["steps"]) == 12345
    back = decode(ArrayRecord(wire).to_torch_state_dict(), transport)  # through Flower's arrays
    for key in ("weight", "scale"):
        assert back[key].dtype == torch.float32
        error = ((back[key] - state[key]).abs() / state[key].abs()).max().item()
        assert error <= RELATIVE_ERROR[transport]
        if transport != "float32":  # the rounding is the format's own, to nearest
            assert torch.equal(back[key], state[key].to(getattr(torch, transport)).float())
            assert error > 0
    assert int(back["steps"]) == 12345


def test_float64_arrays_travel_in_the_wire_format_and_arrive_as_float32():
    state = {"w": torch.tensor([1 / 3, 2.0], dtype=torch.float64)}
    for transport in TRANSPORTS:
        wire = encode(state, transport)
        assert wire["w"].dtype == WIRE_DTYPE[transport]
        assert decode(wire, transport)["w"].dtype == torch.float32
    assert decode(state, "float32")["w"].dtype == torch.float32  # whatever the sender did


def test_float16_flushes_tiny_numbers_that_bfloat16_keeps():
    tiny = {"w": torch.full((4,), 1e-9)}
    assert decode(encode(tiny, "float16"), "float16")["w"].abs().max() == 0
    assert torch.allclose(decode(encode(tiny, "bfloat16"), "bfloat16")["w"], tiny["w"], rtol=2**-8)


def test_float16_refuses_finite_numbers_it_would_turn_into_inf():
    largest = torch.finfo(torch.float16).max  # 65504; up to 65520 (excluded) rounds down to it
    fits = {"w": torch.tensor([largest, -65519.0, 1.0])}
    assert decode(encode(fits, "float16"), "float16")["w"].tolist() == [largest, -largest, 1.0]
    for big in (65520.0, -1e6):
        with pytest.raises(ValueError, match=r"float16.*'w'.*beyond.*65504.*bfloat16"):
            to_wire({"b": torch.zeros(2), "w": torch.tensor([1.0, big])}, "float16")
    with pytest.raises(ValueError, match=r"it holds 1e\+06, beyond"):  # the largest it holds
        encode({"w": torch.tensor([7e4, -1e6, 8e4])}, "float16")
    # bfloat16 has float32's range, and a number that is already inf or NaN is sent as it is
    assert decode(encode({"w": torch.tensor([1e6])}, "bfloat16"), "bfloat16")["w"].item() > 9e5
    diverged = decode(encode({"w": torch.tensor([float("inf"), float("nan")])}, "float16"),
                      "float16")["w"]
    assert diverged[0].isinf() and diverged[1].isnan()


def test_a_16_bit_wire_halves_the_payload_of_floats_only():
    model = mlp(parameterization="fedpara", gamma=0.1)
    full = payload_bytes(model)
    for transport in ("float16", "bfloat16"):
        assert payload_bytes(model, transport=transport) * 2 == full
        assert comm_cost_gib(model, 4, 10, transport=transport) * 2 == comm_cost_gib(model, 4, 10)
    state = _state()
    assert payload_bytes(state, transport="bfloat16") == 2 * (64 * 32 + 32) + 8  # int64 stays
    assert payload_bytes(state, transport="bfloat16") == sum(
        v.numel() * v.element_size() for v in encode(state, "bfloat16").values())


def test_int16_entries_travel_unchanged_except_under_bfloat16_which_refuses_them():
    state = {"w": torch.tensor([0.5, 1.0]), "count": torch.tensor([1, 2, 300], dtype=torch.int16)}
    for transport in ("float32", "float16"):
        assert torch.equal(from_wire(to_wire(state, transport), transport)["count"], state["count"])
    with pytest.raises(ValueError, match=r"transport='bfloat16'.*int16.*count"):
        to_wire(state, "bfloat16")


def test_bad_transport_names_the_parameter_and_the_allowed_values():
    for call in (lambda: encode(_state(), "int8"), lambda: wire_itemsize("fp8"),
                 lambda: ExperimentConfig(transport="half")):
        with pytest.raises(ValueError, match=r"transport=.*float32, float16, bfloat16"):
            call()


def test_transport_preset_differs_from_its_reference_only_on_the_wire():
    for variant, transport in (("fedpara-bf16", "bfloat16"), ("fedpara-fp16", "float16")):
        config = get_preset("fmnist-transport", variant=variant).to_dict()
        reference = get_preset("fmnist-noniid", variant="fedpara").to_dict()
        differ = {k for k in config if config[k] != reference[k]}
        assert differ == {"transport", "preset", "variant"}
        assert config["transport"] == transport


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_packing_sends_one_array_per_dtype_and_the_same_numbers_and_bytes(transport):
    state = {"conv.x1": torch.randn(8, 3), "count": torch.tensor(7), "conv.t1": torch.randn(3, 3,
             2, 2), "bias": torch.randn(8), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    record = ArrayRecord(to_wire(state, transport))  # as a message holds it
    assert len(record) == 2  # the floats (in the wire format) and the int64 entry
    wire = record.to_torch_state_dict()
    assert sum(v.numel() * v.element_size() for v in wire.values()) == payload_bytes(
        state, transport=transport)
    back = from_wire(wire, transport)
    assert list(back) == list(state)  # the first order, across the two dtypes
    expected = decode(encode(state, transport), transport)
    for key, value in expected.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype
        assert torch.equal(back[key], value), key


def test_an_unpacked_record_is_read_as_it_is_and_a_bad_layout_is_refused():
    state = _state()
    assert list(unpack(state)) == list(state) and unpack(state)["weight"] is state["weight"]
    packed = pack({"w": torch.ones(2, 3)})
    (key, flat), = packed.items()
    with pytest.raises(ValueError, match="does not hold the 6 numbers its layout names"):
        unpack({key: flat[:5]})
    with pytest.raises(ValueError, match="of shape \\(2, 3\\) does not hold"):  # not flat
        unpack({key: flat.reshape(2, 3)})
    with pytest.raises(ValueError, match="mixes packed and plain arrays"):
        unpack({**packed, "plain": torch.ones(1)})
