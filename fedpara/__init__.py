"""FedPara: low-rank Hadamard product parameterization for communication-efficient federated learning.

The layers, models, data and accounting import with torch alone; the Flower parts
(`run_experiment`, the client and server apps) are loaded on first use, so the training
path also works on a machine without Flower or Ray.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "FedParaLinear": "layers",
    "FedParaConv2d": "layers",
    "LowRankLinear": "layers",
    "LowRankConv2d": "layers",
    "rank_from_gamma": "layers",
    "rank_from_param_fraction": "layers",
    "vgg16": "models",
    "mlp": "models",
    "cnn": "models",
    "build_model": "models",
    "fedparafy": "convert",
    "count_params": "accounting",
    "payload_bytes": "accounting",
    "comm_cost_gib": "accounting",
    "global_state_keys": "accounting",
    "load_dataset": "data",
    "partition": "partition",
    "ExperimentConfig": "config",
    "get_preset": "config",
    "History": "history",
    "run_experiment": "experiment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"fedpara.{_EXPORTS[name]}"), name)
        globals()[name] = value  # cache: the next lookup skips this function
        return value
    raise AttributeError(f"module 'fedpara' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
