"""Experiment configuration: one dataclass, the named presets and their profiles.

    from fedpara.config import get_preset
    config = get_preset("fmnist-noniid", variant="fedpara", profile="smoke", rounds=3)

`ExperimentConfig` is the single description of a federated run. It is validated in one place
(`__post_init__`), before any data is loaded, and it maps to Flower's run config (kebab-case
keys, scalar values) and back through `to_run_config` / `from_run_config`, so `flwr run .`,
the CLI and the notebooks all end up with the same object.

A preset fixes a dataset, a model and a protocol; a *variant* picks what the preset compares
(the parameterization for the FedAvg presets, the algorithm for the personalization presets);
a *profile* scales it: `full` is the paper's protocol (or, for the Fashion-MNIST presets, a real
experiment sized for a 2-core CPU), `quick` is sized for a free Colab GPU, `smoke` for a test.
What a run took is measured, not written here: each history stores its rounds' `wall_seconds`
(the run table of book/experiments/fashion_mnist.md shows them), and benchmarks/throughput.py
measures training throughput per device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# The names a field allows, defined here once: this module imports nothing from the library,
# and the modules that implement each name import its tuple from here.
DATASETS = ("cifar10", "cifar100", "fashion-mnist", "mnist", "femnist")  # data.py
MODELS = ("vgg16", "mlp", "cnn")  # models.py
# height = width of each dataset's images, in pixels (data.DatasetInfo.image_size)
IMAGE_SIZES = {"cifar10": 32, "cifar100": 32, "fashion-mnist": 28, "mnist": 28, "femnist": 28}
# the models built for one image size (models.build_model): VGG16's five pools take 32×32 to
# the 1×1 map its classifier reads; the others adapt (the MLP's input width is the image's)
MODEL_IMAGE_SIZES = {"vgg16": 32}
PARAMETERIZATIONS = ("original", "lowrank", "fedpara")  # models.py
ALGORITHMS = ("fedavg", "fedper", "pfedpara", "local")  # accounting.py
SCHEMES = ("iid", "dirichlet", "shard", "natural")  # partition.py
TRANSPORTS = ("float32", "float16", "bfloat16")  # transport.py
PROFILES = ("full", "quick", "smoke")
# How a round's clients train (fedpara/cohort.py): "client" = each node trains its own partition
# (task.train, the reference); "cohort" = one node trains all the round's partitions together as
# one vmap program (cohort.train_cohort): the same numbers to float tolerance for models without
# dropout (dropout draws differ, their distribution does not), traffic still counted per client.
# The one node (the first sampled partition's) trains partitions other nodes hold: every node
# loads the whole dataset, and FedAvg's clients keep no state. It emulates many clients on one
# machine (a simulation, or one GPU node holding the federation), not separate data owners.
ENGINES = ("client", "cohort")
EVALUATIONS = ("server", "clients")
# personalized algorithms keep part of the model on the client, so only clients can score them
PERSONALIZED = ("fedper", "pfedpara", "local")
# How pFedPara splits a FedPara layer (accounting.global_state_keys decides what travels):
# "plus-one" is the paper's W = W1 ⊙ (W2 + 1); "product" keeps W = W1 ⊙ W2 with the same split
# (beyond the paper). Either way only the W1 factors are sent; W2, biases and norms stay local.
PERSONAL_SPLITS = ("plus-one", "product")
# The server's aggregation rule, each Flower's own implementation (flwr.serverapp.strategy;
# server_app.flower_strategy builds it): FedAvg, FedProx (its proximal term is applied in the
# client's training, task.train), FedAvgM (server momentum), FedAdam and FedYogi (adaptive
# server steps). Beyond the book's reproduction of the paper (book/experiments/strategies.md).
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
# which strategies read which of the server-side fields (the others must leave them at default)
STRATEGY_FIELDS = {
    "proximal_mu": ("fedprox",),
    "server_lr": ("fedavgm", "fedadam", "fedyogi"),
    "server_momentum": ("fedavgm",),
}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_ALLOWED = {
    "dataset": DATASETS,
    "model": MODELS,
    "parameterization": PARAMETERIZATIONS,
    "algorithm": ALGORITHMS,
    "partition": SCHEMES,
    "evaluation": EVALUATIONS,
    "transport": TRANSPORTS,
    "personal_split": PERSONAL_SPLITS,
    "strategy": STRATEGIES,
    "engine": ENGINES,
}
# Where and how a run executed, not what it computed: two configs that differ only in these
# fields describe the same experiment (a stored history counts, a checkpoint resumes).
EXECUTION_FIELDS = frozenset({
    "data_dir", "device", "results_dir", "checkpoint_dir", "checkpoint_every",
    "client_num_cpus", "client_num_gpus", "fast_batches", "engine", "round_timeout",
})


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one federated run. Units: rounds, epochs, images, bytes.

    Empty strings and zeros stand for "not set" (Flower's run config has no None).
    """

    # what is learned
    dataset: str = "fashion-mnist"
    model: str = "mlp"
    parameterization: str = "fedpara"
    gamma: float = 0.1  # FedPara rank rule, in (0, 1] (not the parameter fraction)
    nonlinear: bool = False  # FedPara with tanh: W = tanh(W1) ⊙ tanh(W2)
    algorithm: str = "fedavg"
    # pFedPara only: the form of its layers (PERSONAL_SPLITS) and a learning-rate multiplier for
    # the client-local W2 factors (1 = the paper's single learning rate)
    personal_split: str = "plus-one"
    local_lr_scale: float = 1.0
    # how the server turns the clients' arrays into the next global ones (STRATEGIES), and the
    # settings of the strategies that have them: FedProx's mu, the server learning rate of
    # FedAvgM (its server_learning_rate) and of FedAdam/FedYogi (their eta), FedAvgM's momentum
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    # the number format of the arrays on the wire (fedpara/transport.py): float32, float16 or
    # bfloat16; both ends compute in float32, only the copies sent are rounded
    transport: str = "float32"
    # the federation
    num_clients: int = 4
    clients_per_round: int = 2  # exactly this many train each round, sampled from the seed
    rounds: int = 2
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    lr_decay: float = 1.0  # lr in round r is lr * lr_decay ** (r - 1), constant within a round
    # how the training set is split over clients
    partition: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration, used by partition="dirichlet"
    shards_per_client: int = 2  # used by partition="shard"
    client_samples: int = 0  # train on N random samples of each partition (smoke); 0 = all
    # how a round is scored: "server" = the global model on the test set, in the ServerApp;
    # "clients" = each client's model on its own held-out data, weighted by examples
    evaluation: str = "server"
    eval_samples: int = 0  # server evaluation on the first N test images; 0 = the full test set
    seed: int = 0
    # where and how it runs
    data_dir: str = ""  # "" = $FEDPARA_DATA, else ./data
    device: str = "auto"  # auto = CUDA if present, else CPU
    # the fast path (task.py): client data resident on the device (data.TensorBatches) and, on
    # CUDA, channels-last and cuDNN autotuning, on a CPU freed memory kept for reuse
    # (task.Speed.default); False = DataLoader, contiguous
    fast_batches: bool = True
    engine: str = "client"  # ENGINES: "cohort" trains a round's clients together on one node
    client_num_cpus: float = 1.0  # Ray resources per simulated client
    # 0 with device cuda: one client on the GPU at a time, back to back in one Ray worker (the
    # default; book/performance.md); a fraction f runs up to 1/f clients side by side on it
    client_num_gpus: float = 0.0
    # seconds a client has to answer each message of a round (training, then client evaluation)
    # before the run stops with its error; it is each message's time to live in Flower, so a
    # ClientApp that hangs under a live SuperNode cannot hold a round for long. 0 = Flower's
    # default time to live (12 hours). A resumed run may set another value.
    round_timeout: float = 0.0
    checkpoint_dir: str = ""  # "" = no checkpoints
    checkpoint_every: int = 10  # rounds between checkpoints
    results_dir: str = "results"  # where a `flwr run` ServerApp saves its history
    # where the config came from (names the history file)
    preset: str = "custom"
    variant: str = ""
    profile: str = "full"

    def __post_init__(self) -> None:
        # built by hand as by from_dict: each value cast to its field's type ("5" -> 5, a Path
        # -> str, "false" -> False), or a ValueError naming the field (bool("false") is True)
        for name in _FIELD_TYPES:
            object.__setattr__(self, name, _cast(name, getattr(self, name)))
        self.validate()

    # validation -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its allowed values."""
        for name, kind in _FIELD_TYPES.items():  # a config changed after it was built
            value = getattr(self, name)
            if not _is_kind(value, kind):
                raise ValueError(f"{name}={value!r} is not a valid {kind}")
        for name, allowed in _ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}"
                )
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must be in (0, 1]")
        positive = ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size",
                    "shards_per_client", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be an integer >= 1")
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} must be <= "
                f"num_clients={self.num_clients}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be a finite number > 0")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay={self.lr_decay} must be in (0, 1] (0 would stop training)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha} must be a finite number > 0")
        for name in ("client_samples", "eval_samples", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.seed >= 2**63:  # a Flower run config (TOML) holds signed 64-bit integers
            raise ValueError(f"seed={self.seed} must be < 2**63")
        if self.partition == "natural" and self.dataset != "femnist":
            raise ValueError(
                f"partition='natural' splits by writer, which only dataset='femnist' records; "
                f"allowed for dataset={self.dataset!r}: iid, dirichlet, shard")
        if self.model in MODEL_IMAGE_SIZES and \
                MODEL_IMAGE_SIZES[self.model] != IMAGE_SIZES[self.dataset]:
            size = MODEL_IMAGE_SIZES[self.model]
            fits = [d for d in DATASETS if IMAGE_SIZES[d] == size]
            any_size = [m for m in MODELS if m not in MODEL_IMAGE_SIZES]
            raise ValueError(
                f"model={self.model!r} needs {size}×{size} images and dataset={self.dataset!r} "
                f"has {IMAGE_SIZES[self.dataset]}×{IMAGE_SIZES[self.dataset]}; allowed datasets "
                f"for it: {', '.join(fits)} (models {', '.join(any_size)} take any of them)")
        if self.algorithm == "pfedpara" and self.parameterization != "fedpara":
            raise ValueError(
                f"algorithm='pfedpara' needs parameterization='fedpara' (its W2 factors are the "
                f"personal part), got parameterization={self.parameterization!r}"
            )
        if not (math.isfinite(self.local_lr_scale) and self.local_lr_scale > 0):
            raise ValueError(f"local_lr_scale={self.local_lr_scale} must be > 0 (a multiplier of "
                             f"lr for pFedPara's local factors; 1 = the same learning rate)")
        if self.algorithm != "pfedpara":
            for name, default in (("personal_split", "plus-one"), ("local_lr_scale", 1.0)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} applies to algorithm='pfedpara' only "
                        f"(got algorithm={self.algorithm!r}); leave it at {default!r}"
                    )
        self._validate_strategy()
        if self.engine == "cohort" and self.algorithm != "fedavg":
            raise ValueError(f"engine='cohort' trains stateless clients only (algorithm='fedavg'); "
                             f"algorithm={self.algorithm!r} keeps state on each node, so it needs "
                             f"engine='client'")
        if self.engine == "cohort" and not self.fast_batches:
            raise ValueError("engine='cohort' needs fast_batches=True: each client's batches "
                             "then come from its own generator, as they would alone (a "
                             "DataLoader's augmentation draws from one shared generator)")
        if self.algorithm in PERSONALIZED and self.evaluation != "clients":
            raise ValueError(
                f"algorithm={self.algorithm!r} keeps part of each model on its client, so it needs "
                f"evaluation='clients' (allowed for it: clients), got {self.evaluation!r}"
            )
        if self.nonlinear and self.parameterization != "fedpara":
            raise ValueError(f"nonlinear=True needs parameterization='fedpara', "
                             f"got {self.parameterization!r}")
        if not _DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device={self.device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        if not (math.isfinite(self.client_num_cpus) and self.client_num_cpus > 0):
            raise ValueError(f"client_num_cpus={self.client_num_cpus} must be a finite number > 0")
        if not (math.isfinite(self.client_num_gpus) and self.client_num_gpus >= 0):
            raise ValueError(f"client_num_gpus={self.client_num_gpus} must be a finite number >= 0")
        if not (math.isfinite(self.round_timeout) and self.round_timeout >= 0):
            raise ValueError(f"round_timeout={self.round_timeout} must be a finite number of "
                             f"seconds >= 0 (0 = Flower's default time to live, 12 hours)")
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r}; allowed: {', '.join(PROFILES)}")

    def _validate_strategy(self) -> None:
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu={self.proximal_mu} must be >= 0 (FedProx's weight of "
                             f"mu/2 * ||w - w_global||^2; 0 = FedAvg)")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr={self.server_lr} must be > 0 (the server's step on the "
                             f"clients' mean update)")
        if self.strategy in ("fedadam", "fedyogi") and not self.server_lr < 1:
            raise ValueError(
                f"server_lr={self.server_lr} is {self.strategy}'s eta: every weight would move by "
                f"about that much each round; allowed for it: 0 < server_lr < 1 (Flower's "
                f"defaults: 0.1 for FedAdam, 0.01 for FedYogi)")
        if self.strategy in ("fedavgm", "fedadam", "fedyogi") and self.transport != "float32":
            raise ValueError(
                f"transport={self.transport!r} is supported with strategy fedavg or fedprox "
                f"only: {self.strategy} steps from the float32 global model, which the clients "
                f"never received (they start from its {self.transport} copy); allowed for it: "
                f"float32")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server_momentum={self.server_momentum} must be in [0, 1)")
        defaults = {f.name: f.default for f in fields(self)}
        for name, strategies in STRATEGY_FIELDS.items():
            if self.strategy not in strategies and getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to strategy "
                    f"{' or '.join(map(repr, strategies))} only (got strategy={self.strategy!r}); "
                    f"leave it at {defaults[name]!r}")
        if self.algorithm == "local" and self.strategy != "fedavg":
            raise ValueError(f"strategy={self.strategy!r} has nothing to aggregate with "
                             f"algorithm='local' (nothing is sent); allowed for it: fedavg")

    # derived values ---------------------------------------------------------------------

    @property
    def variant_name(self) -> str:
        """The variant label of the history file: the preset's, else what this run varies."""
        if self.variant:
            return self.variant
        return self.parameterization if self.algorithm == "fedavg" else self.algorithm

    @property
    def run_name(self) -> str:
        """The name of this run's history file and checkpoint folder: `<variant>-<profile>`,
        then `+field=value` for every field that differs from what its preset, variant and
        profile give (EXECUTION_FIELDS aside), e.g. `fedpara-full+proximal_mu=0.1`, so that a
        run with changed settings never overwrites the preset's own history. A config that is
        not a known preset's variant has no suffix."""
        stem = f"{self.variant_name}-{self.profile}"
        changed = self.changes_from_preset()
        if not changed:
            return stem
        suffix = "".join(f"+{k}={_file_value(v)}" for k, v in changed.items())
        if len(suffix) > 80:  # file names have a length limit: name the changes by a digest
            digest = hashlib.sha256(repr(sorted(changed.items())).encode()).hexdigest()
            suffix = f"+{len(changed)}-changes-{digest[:12]}"
        return stem + suffix

    def changes_from_preset(self) -> dict[str, Any]:
        """The fields whose values differ from what the preset, variant and profile give
        (EXECUTION_FIELDS aside), name -> this config's value; empty for a preset's own run
        and for a config that is not a known preset's variant."""
        preset = PRESETS.get(self.preset)
        if preset is None or self.variant not in preset.variants or self.profile not in PROFILES:
            return {}
        reference = get_preset(self.preset, variant=self.variant, profile=self.profile)
        return {k: getattr(self, k) for k in differing_fields(reference.to_dict(), self)}

    @property
    def personalized(self) -> bool:
        """True when part of the model never leaves the client (FedPer, pFedPara, local)."""
        return self.algorithm in PERSONALIZED

    def round_lr(self, server_round: int) -> float:
        """Learning rate of round `server_round` (1-based): lr * lr_decay ** (round - 1)."""
        return self.lr * self.lr_decay ** (server_round - 1)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields changed (cast and validated again)."""
        _check_field_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExperimentConfig:
        """Build from snake_case keys, each value cast to its field's type (`__post_init__`)."""
        _check_field_names(values)
        return cls(**values)

    # Flower run config (kebab-case keys) -------------------------------------------------

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flower's run config: kebab-case keys, scalar values (what `flwr run` passes)."""
        return {name.replace("_", "-"): value for name, value in self.to_dict().items()}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ExperimentConfig:
        """Inverse of `to_run_config`; missing keys take the dataclass defaults."""
        return cls.from_dict({key.replace("-", "_"): value for key, value in run_config.items()})


_FIELD_TYPES = {f.name: f.type for f in fields(ExperimentConfig)}


def differing_fields(stored: Mapping[str, Any], config: ExperimentConfig, *,
                     also: Iterable[str] = ()) -> list[str]:
    """Names of the fields where a stored config (a dict) differs from `config`, sorted, leaving
    out EXECUTION_FIELDS and the fields in `also`. Empty: the same experiment.

    A field missing from the stored config was added to ExperimentConfig after the run was made;
    it counts as its default value (new fields default to the behaviour that existed before).
    """
    ignored = EXECUTION_FIELDS.union(also)
    defaults = {f.name: f.default for f in fields(ExperimentConfig)}
    return sorted(k for k, v in config.to_dict().items()
                  if k not in ignored and stored.get(k, defaults[k]) != v)


def _check_field_names(values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELD_TYPES)}"
        )


def as_bool(name: str, value: Any) -> bool:
    """`value` as a flag: True/False, "true"/"false"/"1"/"0" (any case) or the integers 1/0;
    anything else raises ValueError naming `name` (bool("false") would be True)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else value
    if text in ("true", "1", 1):
        return True
    if text in ("false", "0", 0):
        return False
    raise ValueError(f"{name}={value!r} is not a valid bool; allowed: true, false, 1, 0")


def _is_kind(value: Any, kind: str) -> bool:
    """Whether `value` already has the field type `kind` (a bool is not a number)."""
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    return isinstance(value, {"int": int, "float": (int, float), "str": str}[kind])


def _cast(name: str, value: Any) -> Any:
    """Cast a run-config or command-line value to the type of field `name`. A bool is refused
    where a number is expected (True would become 1), and a number is not a string (a path is)."""
    kind = _FIELD_TYPES[name]
    if kind == "bool":
        return as_bool(name, value)
    expected = {"int": "an integer", "float": "a number", "str": "a string"}[kind]
    try:
        if isinstance(value, bool):
            raise ValueError
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if isinstance(value, os.PathLike):  # a folder given as a Path
            return os.fspath(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"{name}={value!r} is not a valid {kind}; expected {expected}") from None


def _file_value(value: Any) -> str:
    """A field value as part of a file name: true/false, numbers as Python writes them,
    characters other than letters, digits, '.', '_' and '-' replaced by '_'."""
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# presets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named protocol: base settings, the variants it compares and its three profiles."""

    description: str
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]  # the first is the default
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)


def _fedavg_variants(gamma: float) -> dict[str, dict[str, Any]]:
    # low-rank at the same gamma has the same parameter count as FedPara (the fair comparison)
    return {
        "fedpara": {"parameterization": "fedpara", "gamma": gamma},
        "lowrank": {"parameterization": "lowrank", "gamma": gamma},
        "original": {"parameterization": "original"},
    }


_PFEDPARA = {"algorithm": "pfedpara", "parameterization": "fedpara"}
_PERSONAL_VARIANTS = {
    "pfedpara": _PFEDPARA,  # the paper's W1 ⊙ (W2 + 1), one learning rate
    # beyond the paper: W1 ⊙ W2 with W2 local; W2's factors at 30 times the learning rate
    "pfedpara-product": {**_PFEDPARA, "personal_split": "product"},
    "pfedpara-lr30": {**_PFEDPARA, "local_lr_scale": 30.0},
    "fedper": {"algorithm": "fedper", "parameterization": "original"},
    # a control beyond the paper: FedPer on pFedPara's FedPara model (same capacity, only the
    # head personal), to separate "which part is personal" from "how large the model is"
    "fedper-fedpara": {"algorithm": "fedper", "parameterization": "fedpara"},
    "fedavg": {"algorithm": "fedavg", "parameterization": "original"},
    "local": {"algorithm": "local", "parameterization": "original"},
}

# The paper's CIFAR protocol, as the Flower baseline ran it (its README's hyperparameter table,
# baselines/fedpara in the Flower repository): SGD without momentum, batch 64, lr 0.1 decayed
# by 0.992 per round, E = 10 local epochs for the IID splits and E = 5 for the non-IID ones.
_CIFAR = dict(model="vgg16", batch_size=64, lr=0.1, lr_decay=0.992)
_IID_EPOCHS, _NONIID_EPOCHS = 10, 5
# quick: same federation, fewer rounds and epochs (sized for a Colab GPU session);
# smoke: two clients train on 64 images each, scored on 256 test images (sized for a CPU test).
_CIFAR10_PROFILES = {
    "full": {},
    "quick": {"rounds": 30, "local_epochs": 2},
    "smoke": {"rounds": 2, "clients_per_round": 2, "local_epochs": 1, "client_samples": 64,
              "eval_samples": 256},
}
_CIFAR100_PROFILES = {
    "full": {},
    "quick": {"rounds": 40, "local_epochs": 2},
    "smoke": {"rounds": 2, "clients_per_round": 2, "local_epochs": 1, "client_samples": 64,
              "eval_samples": 256},
}

_STRATEGY_SETTINGS = {
    "fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
    "fedavgm": {"strategy": "fedavgm", "server_lr": 0.1, "server_momentum": 0.9},
    "fedadam": {"strategy": "fedadam", "server_lr": 0.01},
}
_FMNIST_NONIID = dict(dataset="fashion-mnist", model="cnn", partition="dirichlet", alpha=0.5,
                      num_clients=20, clients_per_round=4, rounds=40, local_epochs=1,
                      batch_size=32, lr=0.1, lr_decay=0.992)
_FMNIST_NONIID_PROFILES = {
    "full": {},
    "quick": {"rounds": 20},
    "smoke": {"clients_per_round": 2, "rounds": 2, "client_samples": 500, "eval_samples": 2000},
}

PRESETS: dict[str, Preset] = {
    "cifar10-iid": Preset(
        "Figure 3(a): VGG16-GN on CIFAR-10, IID, 100 clients, 16 per round, 200 rounds, E = 10, "
        "gamma=0.1",
        dict(_CIFAR, dataset="cifar10", partition="iid", num_clients=100, clients_per_round=16,
             rounds=200, local_epochs=_IID_EPOCHS),
        _fedavg_variants(0.1),
        _CIFAR10_PROFILES,
    ),
    "cifar10-noniid": Preset(
        "Figure 3(d): as cifar10-iid with a per-class Dirichlet(0.5) split and E = 5",
        dict(_CIFAR, dataset="cifar10", partition="dirichlet", alpha=0.5, num_clients=100,
             clients_per_round=16, rounds=200, local_epochs=_NONIID_EPOCHS),
        _fedavg_variants(0.1),
        _CIFAR10_PROFILES,
    ),
    "cifar100-iid": Preset(
        "Figure 3(b): VGG16-GN on CIFAR-100, IID, 50 clients, 8 per round, 400 rounds, E = 10, "
        "gamma=0.4",
        dict(_CIFAR, dataset="cifar100", partition="iid", num_clients=50, clients_per_round=8,
             rounds=400, local_epochs=_IID_EPOCHS),
        _fedavg_variants(0.4),
        _CIFAR100_PROFILES,
    ),
    "cifar100-noniid": Preset(
        "Figure 3(e): as cifar100-iid with a per-class Dirichlet(0.5) split and E = 5",
        dict(_CIFAR, dataset="cifar100", partition="dirichlet", alpha=0.5, num_clients=50,
             clients_per_round=8, rounds=400, local_epochs=_NONIID_EPOCHS),
        _fedavg_variants(0.4),
        _CIFAR100_PROFILES,
    ),
    # Figure 5(a) is FEMNIST. Its protocol as the Flower baseline configured personalization
    # (baselines/fedpara: 100 clients, 10 per round, 100 rounds, 5 epochs of batch 10,
    # lr 0.01 * 0.999^r, pFedPara gamma=0.5; it ran them on MNIST, never on FEMNIST), applied
    # to FEMNIST split by writer, each client scored on its own writer's held-out images.
    "femnist-personal": Preset(
        "Figure 5(a): MLP on FEMNIST by writer; FedAvg, FedPer, pFedPara and local-only",
        dict(dataset="femnist", model="mlp", partition="natural", num_clients=100,
             clients_per_round=10, rounds=100, local_epochs=5, batch_size=10, lr=0.01,
             lr_decay=0.999, gamma=0.5, evaluation="clients"),
        _PERSONAL_VARIANTS,
        {
            "full": {},
            "quick": {"rounds": 30, "local_epochs": 2},
            "smoke": {"num_clients": 8, "clients_per_round": 2, "rounds": 2, "local_epochs": 1},
        },
    ),
    # CPU-sized, real data: a full run of each variant is sized for a 2-core CPU. How long the
    # rounds take is measured, not written here: the histories' wall_seconds (the run table of
    # book/experiments/fashion_mnist.md) and benchmarks/throughput.py.
    # fmnist-noniid: 20 clients of ~3,000 images, 4 per round, 1 epoch: ~12,000 CNN images a round
    # plus the 10,000-image test set on the server; 40 rounds are 8 passes over the data.
    # fmnist-personal: 100 clients x 600 images, 10 per round, 2 epochs of batch 10 (the
    # baseline ran 5), and every trained client scored each round.
    "fmnist-noniid": Preset(
        "Fashion-MNIST, small CNN, Dirichlet(0.5) non-IID: FedPara vs low-rank vs original",
        _FMNIST_NONIID,
        _fedavg_variants(0.1),
        _FMNIST_NONIID_PROFILES,
    ),
    # Beyond the paper: fmnist-noniid with every array sent in 16 bits (fedpara/transport.py).
    # Its float32 references are fmnist-noniid's fedpara and original runs (the same experiment).
    "fmnist-transport": Preset(
        "Fashion-MNIST as fmnist-noniid, arrays sent in 16 bits: bfloat16 and float16 on the wire",
        _FMNIST_NONIID,
        {
            "fedpara-bf16": {"parameterization": "fedpara", "gamma": 0.1, "transport": "bfloat16"},
            "fedpara-fp16": {"parameterization": "fedpara", "gamma": 0.1, "transport": "float16"},
            "original-bf16": {"parameterization": "original", "transport": "bfloat16"},
        },
        _FMNIST_NONIID_PROFILES,
    ),
    # Beyond the paper: fmnist-noniid's FedPara vs low-rank at other rank budgets. Its
    # gamma = 0.1 runs are fmnist-noniid's fedpara and lowrank (the same experiment).
    "fmnist-gamma": Preset(
        "Fashion-MNIST as fmnist-noniid: FedPara vs low-rank at gamma = 0.05, 0.2 and 0.4",
        _FMNIST_NONIID,
        {
            f"{kind}-{gamma}": {"parameterization": kind, "gamma": gamma}
            for gamma in (0.05, 0.2, 0.4)
            for kind in ("fedpara", "lowrank")
        },
        _FMNIST_NONIID_PROFILES,
    ),
    # Beyond the paper: fmnist-noniid under Flower's other strategies. Its FedAvg runs are
    # fmnist-noniid's fedpara and original (the same experiment). FedProx's mu is from the grid
    # its paper searched (Li et al., 2020); FedAvgM's momentum 0.9 with server lr 0.1 keeps the
    # effective step lr / (1 - momentum) at 1 (Hsu et al., 2019); FedAdam's server lr 0.01 with
    # Flower's beta_1 = 0.9, beta_2 = 0.99 and tau = 1e-3 is from the range Reddi et al. (2021)
    # searched. One setting each, the same for both models: a comparison, not a tuning.
    "fmnist-strategies": Preset(
        "Fashion-MNIST as fmnist-noniid: FedPara vs original under FedProx, FedAvgM and FedAdam",
        _FMNIST_NONIID,
        {
            f"{kind}-{name}": {**_fedavg_variants(0.1)[kind], **settings}
            for name, settings in _STRATEGY_SETTINGS.items()
            for kind in ("fedpara", "original")
        },
        _FMNIST_NONIID_PROFILES,
    ),
    # The analogue of Figure 5(c) (highly skewed MNIST): the Flower baseline's 2-shard split on
    # Fashion-MNIST. Each client sees two classes, so local-only training is already strong.
    "fmnist-personal": Preset(
        "Figure 5(c) analogue: Fashion-MNIST, MLP, 2 label shards per client; pFedPara vs "
        "FedPer vs FedAvg vs local",
        dict(dataset="fashion-mnist", model="mlp", partition="shard", shards_per_client=2,
             num_clients=100, clients_per_round=10, rounds=60, local_epochs=2, batch_size=10,
             lr=0.01, lr_decay=0.999, gamma=0.5, evaluation="clients"),
        _PERSONAL_VARIANTS,
        {
            "full": {},
            "quick": {"rounds": 30},
            "smoke": {"num_clients": 10, "clients_per_round": 2, "rounds": 2, "local_epochs": 1,
                      "client_samples": 300},
        },
    ),
    # Beyond the paper: a setting where collaboration matters. All 10 classes in a
    # Dirichlet(0.5) mix per client and only 30 training images each, so a client alone
    # overfits (local-only is clearly below FedAvg) while the label skew still rewards a
    # personal part. Each client is scored on ~100 held-out images with its label mix.
    "fmnist-personal-dirichlet": Preset(
        "Fashion-MNIST, MLP, Dirichlet(0.5) labels and 30 images per client: where "
        "collaboration matters",
        dict(dataset="fashion-mnist", model="mlp", partition="dirichlet", alpha=0.5,
             client_samples=30, num_clients=100, clients_per_round=10, rounds=60,
             local_epochs=5, batch_size=10, lr=0.01, lr_decay=0.999, gamma=0.5,
             evaluation="clients"),
        _PERSONAL_VARIANTS,
        {
            "full": {},
            "quick": {"rounds": 30},
            "smoke": {"num_clients": 10, "clients_per_round": 2, "rounds": 2, "local_epochs": 1},
        },
    ),
}


def get_preset(
    name: str, *, variant: str | None = None, profile: str = "full", **overrides: Any
) -> ExperimentConfig:
    """The config of preset `name`, variant `variant` (default: the preset's first), at `profile`.

    `overrides` are field values applied last (e.g. `rounds=3`); unknown names raise ValueError.
    Nothing is loaded: this only builds and validates the dataclass.
    """
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not defined; allowed: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    variant = variant or next(iter(preset.variants))
    if variant not in preset.variants:
        raise ValueError(
            f"variant={variant!r} is not one of preset {name!r}'s; "
            f"allowed: {', '.join(preset.variants)}"
        )
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}; allowed: {', '.join(PROFILES)}")
    _check_overridable(overrides)
    values = {**preset.base, **preset.variants[variant], **preset.profiles.get(profile, {})}
    preset_values = dict(values)
    values.update(overrides)
    values.update(preset=name, variant=variant, profile=profile)
    config = ExperimentConfig.from_dict(values)
    _check_overrides_apply(config, overrides, preset_values)
    return config


def _check_overrides_apply(config: ExperimentConfig, overrides: Mapping[str, Any],
                           preset_values: Mapping[str, Any]) -> None:
    """Refuse an override that changes a field this run never reads: it would compute the same
    run under another name (`run_name` adds `+field=value` for each change)."""
    unread = {
        "gamma": (config.parameterization == "original",
                  f"parameterization={config.parameterization!r} (a dense model has no rank "
                  f"to set)"),
        "alpha": (config.partition != "dirichlet",
                  f"partition={config.partition!r} (alpha is the Dirichlet split's "
                  f"concentration)"),
        "shards_per_client": (config.partition != "shard",
                              f"partition={config.partition!r} (shards_per_client is the shard "
                              f"split's)"),
    }
    defaults = {f.name: f.default for f in fields(ExperimentConfig)}
    for name, (ignored, why) in unread.items():
        before = _cast(name, preset_values.get(name, defaults[name]))
        if ignored and name in overrides and getattr(config, name) != before:
            raise ValueError(f"{name}={getattr(config, name)!r} has no effect with {why}; "
                             f"leave it at the preset's {before!r}")


def _check_overridable(overrides: Mapping[str, Any]) -> None:
    """Overrides must be fields, and not the three that name which preset's run this is."""
    _check_field_names(dict(overrides))
    chosen = sorted({"preset", "variant", "profile"} & set(overrides))
    if chosen:
        raise ValueError(f"{', '.join(chosen)}: not a field to override; a preset's run is "
                         f"chosen by get_preset's name, variant and profile arguments (on the "
                         f"command line --preset, --variant and --profile)")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse command-line `key=value` pairs (kebab- or snake-case keys) into typed field values."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected key=value, e.g. rounds=5")
        _check_overridable({key: raw})
        values[key] = _cast(key, raw.strip())
    return values
