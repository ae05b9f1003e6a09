"""Wire precision: the number format in which arrays travel between server and clients.

    from fedpara.transport import decode, encode
    wire = encode(state_dict, "bfloat16")  # what goes into the message: 2 bytes per number
    state = decode(wire, "bfloat16")  # float32 tensors again, rounded to bfloat16's precision

FedPara cuts the *count* of numbers a round sends; sending each number in 16 bits instead of 32
halves the bytes again, independently. Both ends keep float32 (the server averages in float64 and
keeps a float32 global model; clients train in float32): only the copies on the wire are rounded.

- float32: unchanged (the default).
- float16: IEEE half precision, 11 significant bits, largest value 65504; numbers below 3e-8
  (half the smallest subnormal, 2**-24) round to zero. `encode` refuses finite numbers that
  would round to ±inf (65520 and beyond): one client's inf would spread through the average.
- bfloat16: float32's range with 8 significant bits. NumPy (and so Flower's `Array`) has no
  bfloat16, so each number travels as its 16-bit pattern in an int16 array; `decode` reads the
  pattern back. Only the receiver's `transport` setting says an int16 array is bfloat16, so both
  ends must use the same setting (they do: it is part of the `ExperimentConfig` every message
  carries).

Integer entries (e.g. BatchNorm's `num_batches_tracked`) travel unchanged in every format,
except that bfloat16 refuses int16 entries: they would read back as bfloat16 patterns.

Packing: `to_wire` also packs the encoded arrays into one flat array per dtype, and `from_wire`
unpacks them (`pack`, `unpack`). Flower 1.42 moves every array of a message as objects of its
own (one request each in a deployment, each hashed and stored), so a model of many small
arrays pays per array, not per byte: FedPara's VGG16 has twice the original's arrays at a
tenth of its bytes. Packed, a client's arrays are one or a few objects; the numbers and the
bytes counted are the same. The layout (names, shapes, positions) travels in the flat array's
key, so a packed record describes itself; a record that is not packed is read as it is.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor

from fedpara.config import TRANSPORTS  # the allowed names live in config

__all__ = ["TRANSPORTS", "decode", "encode", "from_wire", "pack", "to_wire", "unpack",
           "wire_itemsize"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BFLOAT16_CARRIER = torch.int16  # the int type bfloat16's bits travel in
PACKED = "fedpara.packed "  # the key of a packed array starts so; its JSON layout follows


def _check(transport: str) -> torch.dtype:
    if transport not in _DTYPES:
        raise ValueError(f"transport={transport!r} is not supported; allowed: "
                         f"{', '.join(TRANSPORTS)}")
    return _DTYPES[transport]


def wire_itemsize(transport: str) -> int:
    """Bytes per floating-point number on the wire (4 for float32, 2 for the 16-bit formats)."""
    return _check(transport).itemsize


def encode(arrays: Mapping[str, Tensor], transport: str) -> OrderedDict[str, Tensor]:
    """The wire form of `arrays`: floating tensors rounded (to nearest even) to `transport`."""
    dtype = _check(transport)
    if dtype == torch.bfloat16:
        carried = [key for key, value in arrays.items() if value.dtype == _BFLOAT16_CARRIER]
        if carried:
            raise ValueError(f"transport='bfloat16' carries its numbers in int16 arrays, so int16 "
                             f"entries cannot travel with it (found {', '.join(carried[:5])}); "
                             f"use transport='float32' or 'float16'")
    wire = OrderedDict()
    for key, value in arrays.items():
        if value.is_floating_point() and value.dtype != dtype:
            value, source = value.to(dtype), value
            if dtype == torch.float16:
                _check_range(key, source, value)
        if value.dtype == torch.bfloat16:
            value = value.view(_BFLOAT16_CARRIER)
        wire[key] = value
    return wire


def _check_range(key: str, source: Tensor, wire: Tensor) -> None:
    overflow = torch.isinf(wire) & torch.isfinite(source)
    if overflow.any():
        largest = source[overflow].abs().max().item()
        raise ValueError(f"transport='float16' cannot carry {key!r}: it holds {largest:.4g}, "
                         f"beyond float16's largest number ({torch.finfo(torch.float16).max:.0f}),"
                         f" so it would arrive as inf; use transport='bfloat16' or 'float32'")


def decode(arrays: Mapping[str, Tensor], transport: str) -> OrderedDict[str, Tensor]:
    """Inverse of `encode`: float32 tensors (integer entries unchanged)."""
    _check(transport)
    state = OrderedDict()
    for key, value in arrays.items():
        if transport == "bfloat16" and value.dtype == _BFLOAT16_CARRIER:
            value = value.view(torch.bfloat16)
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        state[key] = value
    return state


def pack(arrays: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """`arrays` as one flat tensor per dtype, keyed by `PACKED` + the JSON of its layout:
    [[position, name, shape], ...] in the order of `arrays` (`unpack` inverts it exactly)."""
    groups: dict[torch.dtype, list] = {}
    for position, (name, value) in enumerate(arrays.items()):
        groups.setdefault(value.dtype, []).append((position, name, value))
    packed = OrderedDict()
    for entries in groups.values():
        layout = [[position, name, list(value.shape)] for position, name, value in entries]
        flat = torch.cat([value.detach().reshape(-1) for _, _, value in entries])
        packed[PACKED + json.dumps(layout, separators=(",", ":"))] = flat
    return packed


def unpack(arrays: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The arrays `pack` packed, in their first order, each a view of its flat tensor;
    `arrays` as they are when none of its keys is packed."""
    if not any(key.startswith(PACKED) for key in arrays):
        return OrderedDict(arrays)
    entries = []
    for key, flat in arrays.items():
        if not key.startswith(PACKED):
            raise ValueError(f"a record mixes packed and plain arrays (plain: {key!r})")
        layout = json.loads(key[len(PACKED):])
        sizes = [math.prod(shape) for _, _, shape in layout]
        if sum(sizes) != flat.numel() or flat.dim() != 1:
            raise ValueError(f"a packed array of shape {tuple(flat.shape)} does not hold the "
                             f"{sum(sizes)} numbers its layout names")
        for (position, name, shape), piece in zip(layout, flat.split(sizes), strict=True):
            entries.append((position, name, piece.view(shape)))
    return OrderedDict((name, value) for _, name, value in sorted(entries))


def to_wire(arrays: Mapping[str, Tensor], transport: str) -> OrderedDict[str, Tensor]:
    """What a message carries: `arrays` encoded in `transport` (`encode`), then packed."""
    return pack(encode(arrays, transport))


def from_wire(arrays: Mapping[str, Tensor], transport: str) -> OrderedDict[str, Tensor]:
    """The arrays a message carried, unpacked and decoded: float32 again (`decode`)."""
    return decode(unpack(arrays), transport)
