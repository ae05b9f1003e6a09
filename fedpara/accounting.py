"""Parameters, payloads and traffic: what each federated algorithm sends per round.

`global_state_keys` is the one place that decides which `state_dict` entries travel:

- fedavg:   every entry.
- pfedpara: only the W1 factors (x1, y1[, t1]) of the personalized FedPara layers. Everything
            else stays on the client: the W2 factors, every bias, normalization parameters and
            any layer that is not a personalized FedPara layer (as the Flower baseline runs
            pFedPara: the client restores its whole saved state, then overwrites the W1 keys).
- fedper:   every entry except the personal head, `head.*`.
- local:    nothing (each client trains alone).

Traffic follows the paper's accounting: each participating client downloads and uploads the
payload once per round, so a run costs 2 × clients per round × payload × rounds. The payload
counts floating-point numbers at their dtype, or at the wire format of fedpara/transport.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .config import ALGORITHMS  # the allowed names live in config
from .layers import FactorizedLayer
from .transport import wire_itemsize

__all__ = ["ALGORITHMS", "comm_cost_gib", "count_params", "global_state_keys", "payload_bytes"]
HEAD = "head."  # prefix of the personal last layer kept local by FedPer


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared parameter once), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def global_state_keys(model: nn.Module, algorithm: str = "fedavg") -> list[str]:
    """The `model.state_dict()` keys that `algorithm` sends to the server, in state_dict order.

    For "pfedpara" a model needs personalized FedPara layers (it sends their W1 factors only);
    "fedper" needs a `model.head` module.
    """
    _check_algorithm(algorithm)
    keys = list(model.state_dict().keys())
    if algorithm == "fedavg":
        return keys
    if algorithm == "local":
        return []
    if algorithm == "fedper":
        if not isinstance(getattr(model, "head", None), nn.Module):
            raise ValueError("algorithm='fedper' needs a model whose last layer is `model.head`")
        return [k for k in keys if not k.startswith(HEAD)]
    shared = {
        f"{prefix}.{name}" if prefix else name
        # every name a shared layer is registered under: state_dict lists its keys under each
        for prefix, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, FactorizedLayer) and module.personalized
        for name in module.global_parameter_names()
    }
    if not shared:
        raise ValueError("algorithm='pfedpara' needs a model with personalized FedPara layers "
                         "(build it with personalized=True)")
    return [k for k in keys if k in shared]


def _nbytes(key, value, float_itemsize: int | None) -> int:
    if isinstance(value, torch.Tensor):
        numel, itemsize, floating = value.numel(), value.element_size(), value.is_floating_point()
    elif hasattr(value, "shape") and hasattr(value, "dtype"):  # a numpy array or a Flower Array
        dtype = np.dtype(value.dtype)  # a Flower Array names its dtype as a string
        numel, itemsize, floating = math.prod(value.shape), dtype.itemsize, dtype.kind == "f"
    else:
        raise ValueError(f"payload_bytes counts torch tensors, numpy arrays and Flower Arrays; "
                         f"entry {key!r} is a {type(value).__name__}")
    return numel * (float_itemsize if floating and float_itemsize else itemsize)


def payload_bytes(model_or_state_dict: nn.Module | Mapping, algorithm: str = "fedavg",
                  transport: str | None = None) -> int:
    """Bytes of one upload (= one download).

    A model sends the entries `global_state_keys(model, algorithm)` selects. A state_dict (a
    mapping of names to torch tensors or numpy arrays) counts all its entries: select the
    keys first; with a mapping, `algorithm` must stay "fedavg". A Flower ArrayRecord counts
    the numbers its Arrays hold, not their serialized bytes. Floating-point entries count
    at their own dtype, or at the wire format `transport` ("float32", "float16", "bfloat16";
    see fedpara/transport.py) when it is given.
    """
    _check_algorithm(algorithm)
    float_itemsize = wire_itemsize(transport) if transport is not None else None
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        return sum(_nbytes(k, state[k], float_itemsize)
                   for k in global_state_keys(model_or_state_dict, algorithm))
    if isinstance(model_or_state_dict, Mapping):
        if algorithm != "fedavg":
            raise ValueError(
                "algorithm must be 'fedavg' when passing a state_dict (it counts all its entries); "
                f"got {algorithm!r}: pass the model instead"
            )
        return sum(_nbytes(k, v, float_itemsize) for k, v in model_or_state_dict.items())
    raise ValueError(
        "model_or_state_dict must be an nn.Module or a mapping, "
        f"got {type(model_or_state_dict).__name__}"
    )


def comm_cost_gib(
    model: nn.Module | Mapping, clients_per_round: int, rounds: int, algorithm: str = "fedavg",
    transport: str | None = None,
) -> float:
    """Total traffic of a run in GiB (2³⁰ bytes): 2 × clients_per_round × payload × rounds,
    the payload counted as `payload_bytes(model, algorithm, transport)`.

    The paper's Figure 3 check: VGG16-GN CIFAR-10, 16 clients × 200 rounds, costs 363.67 GiB
    (original) and 36.88 GiB (FedPara γ=0.1).
    """
    for name, value in (("clients_per_round", clients_per_round), ("rounds", rounds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return 2 * clients_per_round * payload_bytes(model, algorithm, transport) * rounds / 2**30
