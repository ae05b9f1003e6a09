"""Local training and evaluation, without Flower: what one client (or the server) computes.

    model = init_model(config)
    data = client_data(config, partition_id=0, seed=1)
    train(model, data.train, epochs=1, lr=0.1, device=resolve_device("auto"), seed=1)
    evaluate(model, data.holdout, device=resolve_device("auto")).accuracy

Imports with torch, torchvision and numpy only (partitioning needs flwr-datasets when it runs).
Training is plain SGD without momentum or weight decay, re-created every round, as in the paper;
the learning rate of a round comes from `ExperimentConfig.round_lr`. One optimization step is
`train_step`.

The fast path (`config.fast_batches`, the default): a client's samples live on the training
device as tensors (data.TensorBatches, crop and flip done there per batch) and, on CUDA, the step
runs in channels-last memory format with cuDNN autotuning, replayed as a captured CUDA graph
(`Speed`, fedpara/graphed.py; bf16 autocast is an option).
`fast_batches=False` is the plain path: a DataLoader and fp32 contiguous math. On a CPU the fast
path changes the data path and keeps freed memory mapped for reuse (`retain_freed_memory`); the
math stays fp32 (see book/performance.md for the timings).
Evaluation is fp32 on both paths.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import math
import numbers
import platform
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpara.accounting import global_state_keys
from fedpara.config import ExperimentConfig
from fedpara.data import TensorBatches, as_tensors, dataset_info, load_dataset, make_loader
from fedpara.layers import FactorizedLayer
from fedpara.models import build_model
from fedpara.partition import holdout_indices, partition

EVAL_BATCH_SIZE = 1000  # images per forward pass when scoring (no gradients)
Batches = Iterable[tuple[Tensor, Tensor]]  # TensorBatches or a DataLoader


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training cross-entropy over all steps, per example (0.0 with no data)
    num_examples: int  # training samples in one pass over the client's data (the FedAvg weight)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per example
    accuracy: float  # correct / num_examples (nan when there are none)
    correct: int
    num_examples: int


@dataclass(frozen=True)
class ClientData:
    train: Batches  # the client's training partition, shuffled each pass
    holdout: Batches  # the client's own held-out test samples (personalized evaluation)
    num_train: int
    num_holdout: int


# model and arrays --------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA if present, else CPU; any other name as given, if this machine has it.

    Raises ValueError naming the device and the ones this machine allows (a run fails here,
    before any data is loaded, instead of at its first tensor on the missing device).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    allowed = ["auto", "cpu"]
    if cuda:
        allowed += ["cuda", *(f"cuda:{i}" for i in range(cuda))]
    if mps:
        allowed.append("mps")
    try:
        device = torch.device(name)
    except RuntimeError:  # e.g. "gpu" or an index torch cannot parse
        raise ValueError(f"device={name!r} is not a device name; allowed here: "
                         f"{', '.join(allowed)}") from None
    if str(device) not in allowed:  # also xpu, meta, cpu:3, ...: not what a run here can use
        raise ValueError(f"device={name!r} is not available on this machine; allowed here: "
                         f"{', '.join(allowed)}")
    return device


def init_model(config: ExperimentConfig) -> nn.Module:
    """The initial model: the same weights on the server and on every client (seeded).

    pFedPara uses personalized FedPara layers, W = W1 ⊙ (W2 + 1) (or W1 ⊙ W2 with
    personal_split="product"); `nonlinear` applies tanh to each branch. Each call returns a
    fresh copy of a model built once per process, so a client called back to back pays a copy
    of the weights, not their random initialization.
    """
    personalized = config.algorithm == "pfedpara"
    plus_one = personalized and config.personal_split == "plus-one"
    return copy.deepcopy(_initial_model(config.dataset, config.model, config.parameterization,
                                        config.gamma, personalized, plus_one,
                                        config.nonlinear, config.seed))


@functools.lru_cache(maxsize=4)
def _initial_model(dataset: str, model: str, parameterization: str, gamma: float,
                   personalized: bool, plus_one: bool, nonlinear: bool, seed: int) -> nn.Module:
    """The seeded initial model of these settings (never handed out: init_model copies it)."""
    info = dataset_info(dataset)
    # on the CPU whatever the default device, and without touching the caller's random state
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(
            model,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            image_size=info.image_size,
            parameterization=parameterization,
            gamma=gamma,
            personalized=personalized,
            plus_one=plus_one,
            nonlinear=nonlinear,
        )


def split_keys(model: nn.Module, algorithm: str) -> tuple[list[str], list[str]]:
    """(global, local) state_dict keys: what travels to the server and what stays."""
    global_keys = global_state_keys(model, algorithm)
    shared = set(global_keys)
    return global_keys, [k for k in model.state_dict() if k not in shared]


def get_arrays(model: nn.Module, keys: Iterable[str]) -> OrderedDict[str, Tensor]:
    """Detached, contiguous CPU copies of the state_dict entries `keys`, in that order."""
    state = model.state_dict()
    return OrderedDict(
        (k, state[k].detach().cpu().clone(memory_format=torch.contiguous_format)) for k in keys
    )


def set_arrays(model: nn.Module, arrays: Mapping[str, Tensor | np.ndarray]) -> None:
    """Copy `arrays` into the model's state_dict entries of the same names (shapes must match).

    Every key and shape is checked before anything is copied, so a refused call leaves the
    model as it was (an array that would broadcast into a larger entry is refused too).
    """
    state = model.state_dict()
    unknown = [k for k in arrays if k not in state]
    if unknown:
        raise ValueError(f"arrays has keys the model lacks: {', '.join(unknown[:5])}")
    values = {key: torch.as_tensor(value) for key, value in arrays.items()}
    wrong = [f"{key} has shape {tuple(v.shape)}, the model's {tuple(state[key].shape)}"
             for key, v in values.items() if v.shape != state[key].shape]
    if wrong:
        raise ValueError(f"arrays do not fit the model: {'; '.join(wrong[:5])}")
    with torch.no_grad():
        for key, value in values.items():
            state[key].copy_(value)


def weighted_mean(states: Iterable[Mapping[str, Tensor]], examples: Sequence[float]
                  ) -> OrderedDict[str, Tensor]:
    """The clients' arrays averaged, weighted by their examples: float64 tensors. The server's
    FedAvg step (`fedpara.server_app` calls it on the decoded replies, in partition order).

    The arithmetic is that of Flower's `aggregate_arrayrecords` on float64 arrays (weights
    `n / sum(n)`; each array times its weight, added in place in the given order), so the
    result is bit for bit Flower's, without what its path costs: every reply re-wrapped as a
    float64 `Array` (serialized to bytes, read back) and the mean serialized once more
    (`benchmarks/aggregation.py` times both). `states` may be a generator: one client's
    arrays are held at a time. Every client must send the same keys with the same shapes
    (ValueError naming the first that differs), and the examples must not sum to 0.
    """
    total = sum(examples)
    if not total > 0:
        raise ValueError(f"examples must sum to more than 0, got {list(examples)}")
    factors = [n / total for n in examples]
    mean: OrderedDict[str, Tensor] = OrderedDict()
    count = 0
    for count, state in enumerate(states, start=1):
        if count > len(factors):
            break
        if count > 1 and state.keys() != mean.keys():
            differ = sorted(set(state) ^ set(mean))
            raise ValueError(f"client {count} of {len(factors)} sent other keys than client 1: "
                             f"{', '.join(differ[:5])}")
        for key, value in state.items():  # in place on a copy: one temporary per array
            term = value.to(torch.float64, copy=True).mul_(factors[count - 1])
            if key not in mean:
                mean[key] = term
            elif term.shape != mean[key].shape:
                raise ValueError(f"client {count} of {len(factors)} sent {key} of shape "
                                 f"{tuple(term.shape)}, client 1 {tuple(mean[key].shape)}")
            else:
                mean[key] += term
    if count != len(factors):
        raise ValueError(f"more or fewer clients' arrays than weights ({len(factors)})")
    return mean


def lr_scales(model: nn.Module, config: ExperimentConfig) -> dict[str, float]:
    """Parameter name -> learning-rate multiplier: pFedPara's local W2 factors get
    `config.local_lr_scale` (empty when it is 1 or the algorithm is not pFedPara)."""
    if config.algorithm != "pfedpara" or config.local_lr_scale == 1.0:
        return {}
    return {
        f"{prefix}.{name}" if prefix else name: config.local_lr_scale
        for prefix, module in model.named_modules()
        if isinstance(module, FactorizedLayer)
        for name in module.local_factor_names()
    }


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's training in one round (shuffling, augmentation, dropout)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


# training and evaluation -------------------------------------------------------------------


@dataclass(frozen=True)
class Speed:
    """How a training step runs. Only `bf16` changes the arithmetic; the others change how
    the same arithmetic is laid out, which kernels compute it, how they are launched, or where
    its memory comes from.
    """

    bf16: bool = False  # autocast the forward to bfloat16 (weights, gradients, SGD stay fp32)
    channels_last: bool = False  # NHWC layout for the images and the model's 4-D tensors
    cudnn_benchmark: bool = False  # cuDNN times its algorithms once per new shape (CUDA only)
    # CUDA with TensorBatches only: replay the step as a captured CUDA graph (fedpara/graphed.py)
    graph: bool = False
    # CPU only: the process keeps freed memory mapped for the next step (`retain_freed_memory`;
    # process-wide, and it stays on once a training run has turned it on)
    retain_memory: bool = False

    @classmethod
    def default(cls, device: torch.device | str, fast: bool = True) -> Speed:
        """The fast path's options on `device`: on CUDA channels-last, cuDNN autotuning and the
        step replayed as a captured CUDA graph (`graph`, which applies to TensorBatches only);
        on a CPU freed memory kept for reuse (`retain_freed_memory`); float32 everywhere.

        On CUDA the captured step is the default since benchmarks/gpu_check.sh measured it on
        an H200: several times the eager step's images/s at the presets' batch size, where the
        eager step is bound by kernel launches, with graphed and eager loss trajectories equal
        to float rounding (book/performance.md has the numbers). bf16 autocast stays off: the
        eager step measured slower in bf16 (autocast adds cast kernels), and under the graph
        the two differed by less than the spread of the repeats; benchmarks/throughput.py
        measures both on any device ("graph", "graph+bf16", "fast", "fast+bf16"). On a CPU,
        what bf16 gains depends on the CPU's bfloat16 instructions and it would change the
        numbers of the fp32 histories on record; channels-last gave no consistent gain where
        measured. So a CPU keeps the plain arithmetic.
        """
        kind = torch.device(device).type
        on = fast and kind == "cuda"
        return cls(bf16=False, channels_last=on, cudnn_benchmark=on, graph=on,
                   retain_memory=fast and kind == "cpu")


PLAIN = Speed()  # fp32, contiguous, cuDNN's heuristics: the reference arithmetic

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64 bits
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX = -1, -3, 32 * 2**20


@functools.cache
def retain_freed_memory() -> bool:
    """Keep the memory this process frees mapped for reuse (glibc's allocator); True if set.

    A FedPara step allocates dense-sized tensors that live for one step only: the composed
    weights (kept from the forward pass to the backward) and the branches the backward pass
    rebuilds. glibc hands large freed blocks back to the kernel (unmapping them, or trimming
    the top of its heap), so the next step faults the same memory in again, one zero-filled
    page at a time. Here blocks below 32 MiB come from the heap, and up to 1 GiB of free heap
    stays mapped: after the first step, the process reuses its own memory. The price is that
    the process keeps up to that much freed memory (for the models here, its peak) until it
    exits. The setting is process-wide, and glibc's adaptive thresholds cannot be restored once
    it is made, so it is applied once. False where the C library is not glibc (nothing is
    changed) or glibc refused a value. Under an allocator preloaded in glibc's place (jemalloc,
    tcmalloc), glibc accepts the call but no longer serves the allocations, so True says
    nothing there. `benchmarks/memory_retention.py` measures what it changes, in processes
    with and without it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and mallopt(_M_TRIM_THRESHOLD, 2**30))


def freed_memory_retained() -> bool:
    """Whether this process keeps its freed memory: `retain_freed_memory` has run (a CPU
    training on the fast path runs it) and glibc took the setting. Asking changes nothing."""
    return retain_freed_memory.cache_info().currsize > 0 and retain_freed_memory()


@dataclass(frozen=True)
class Proximal:
    """FedProx's term mu/2 * sum ||p - anchor||^2 over `params` (Li et al., 2020), added to the
    loss's gradient as mu * (p - anchor) rather than to the loss itself (the same update)."""

    mu: float
    params: list[Tensor]
    anchors: list[Tensor]  # detached copies of `params` when the round's training began

    @classmethod
    def of(cls, model: nn.Module, mu: float, names: Iterable[str]) -> Proximal:
        """The term over the parameters among `names` (state_dict keys: the buffers among
        them have no gradient and are skipped; a name the model lacks is refused)."""
        names = list(dict.fromkeys(names))  # a name given twice is one term
        _check_proximal_to(model, names)
        named = dict(model.named_parameters())
        params = [named[n] for n in names if n in named]  # buffers have no gradient
        return cls(mu, params, [p.detach().clone() for p in params])

    def add_to_gradients(self) -> None:
        pairs = [(p.grad, p, a) for p, a in zip(self.params, self.anchors, strict=True)
                 if p.grad is not None]
        if pairs:
            grads, params, anchors = map(list, zip(*pairs, strict=True))
            torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=self.mu)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
               bf16: bool = False, proximal: Proximal | None = None) -> Tensor:
    """One SGD step on a batch x (B, C, H, W), y (B,); returns the batch's mean loss (no sync).

    bf16: run the forward under bfloat16 autocast (the loss and the backward's accumulation into
    the fp32 gradients follow autocast's rules; FedPara weights are composed in fp32).
    proximal: FedProx's term, added to the gradients (the returned loss is the cross-entropy).
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    if proximal is not None:
        proximal.add_to_gradients()
    optimizer.step()
    return loss.detach()


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    """Turn cuDNN autotuning on for a block (it is a process-wide flag), then restore it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def train(model: nn.Module, batches: Batches, *, epochs: int, lr: float,
          device: torch.device | str = "cpu", seed: int | None = None,
          speed: Speed | None = None, lr_scale: Mapping[str, float] | None = None,
          proximal_mu: float = 0.0, proximal_to: Iterable[str] | None = None) -> TrainResult:
    """`epochs` passes of SGD (no momentum, no weight decay) over `batches` at learning rate `lr`.

    `lr_scale` maps parameter names to a multiplier of `lr` (see `lr_scales`); the others
    train at `lr`. `proximal_mu` > 0 adds FedProx's term mu/2 * ||w - w_start||^2 over the
    parameters named in `proximal_to` (default: all), w_start being their values on entry; the
    reported loss is the cross-entropy alone.

    `seed` seeds torch's global generator first (dropout, DataLoader augmentation); the shuffling
    of TensorBatches comes from the generator it was built with. `speed` defaults to the fast
    path's options for the device when `batches` are TensorBatches (`Speed.default`), else to
    the plain arithmetic; the model is returned in the contiguous layout either way. On a CPU
    the default fast path also calls `retain_freed_memory`, which changes the allocator of the
    whole process for good (`speed=PLAIN` leaves it alone).
    `batches` is iterated once per epoch (and once more to count a list's examples), so a
    one-shot iterator such as a generator is refused.
    """
    _check_training(epochs, lr, proximal_mu)
    _check_batches(batches)
    # the settings that name parameters are checked before the model or the generator changes
    _check_lr_scale(lr_scale or {}, dict(model.named_parameters()))
    if proximal_mu > 0 and proximal_to is not None:
        proximal_to = list(proximal_to)  # it may be an iterator: read once
        _check_proximal_to(model, proximal_to)
    device = torch.device(device)
    if speed is None:
        speed = Speed.default(device, fast=isinstance(batches, TensorBatches))
    if speed.retain_memory and device.type == "cpu":
        retain_freed_memory()
    if seed is not None:
        torch.manual_seed(seed)
    model.to(device).train()
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights (and FedPara cores) only
    optimizer = torch.optim.SGD(_param_groups(model, lr, lr_scale or {}), lr=lr, momentum=0.0,
                                weight_decay=0.0)
    if speed.graph and device.type == "cuda" and isinstance(batches, TensorBatches):
        from fedpara.graphed import trainer_for

        shape = (batches.batch_size, *batches.x.shape[1:])
        try:  # captured (and autotuned) on first use, then replayed
            with _cudnn_benchmark(speed.cudnn_benchmark):
                trainer = trainer_for(model, batches.x.new_empty(shape),
                                      batches.y.new_empty(shape[:1]), device=device, speed=speed,
                                      lr_scale=lr_scale, proximal_mu=proximal_mu,
                                      proximal_to=proximal_to)
                loss, _ = trainer.train(model, batches, epochs=epochs, lr=lr, seed=seed)
        finally:
            if speed.channels_last:
                model.to(memory_format=torch.contiguous_format)
        return TrainResult(loss=loss, num_examples=_num_samples(batches))
    proximal = None
    if proximal_mu > 0:
        names = [n for n, _ in model.named_parameters()] if proximal_to is None else proximal_to
        proximal = Proximal.of(model, proximal_mu, names)
    total, seen = torch.zeros((), device=device), 0
    try:
        with _cudnn_benchmark(speed.cudnn_benchmark and device.type == "cuda"):
            for _ in range(epochs):
                for x, y in batches:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if speed.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    total += train_step(model, optimizer, x, y, bf16=speed.bf16,
                                        proximal=proximal) * len(y)
                    seen += len(y)
    finally:
        if speed.channels_last:
            model.to(memory_format=torch.contiguous_format)
    return TrainResult(loss=float(total) / max(seen, 1), num_examples=_num_samples(batches))


def tracked_parameters(model: nn.Module) -> list[str]:
    """The parameters whose per-round change a client reports: all but biases, in model order."""
    return [name for name, _ in model.named_parameters() if not name.endswith("bias")]


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the tracked parameters, to measure how far training moves them."""
    named = dict(model.named_parameters())
    return {name: named[name].detach().clone() for name in tracked_parameters(model)}


def relative_changes(before: Mapping[str, Tensor], model: nn.Module) -> list[float]:
    """‖θ_after − θ_before‖ / ‖θ_before‖ for each tracked parameter, in `tracked_parameters` order."""
    named = dict(model.named_parameters())
    changes = [(named[name].detach() - old.to(named[name].device)).norm()
               / old.norm().clamp_min(1e-12).to(named[name].device)
               for name, old in before.items()]
    return torch.stack(changes).tolist() if changes else []  # one device sync, not one each


def _check_training(epochs: int, lr: float, proximal_mu: float) -> None:
    """Refuse the settings `train` and `cohort.train_cohort` cannot train with, naming each."""
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be an integer >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr} must be a finite number > 0")
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ValueError(f"proximal_mu={proximal_mu} must be a finite number >= 0")


def _check_batches(batches: Batches, name: str = "batches") -> None:
    """Refuse a one-shot iterator (a generator, `iter(...)`): its second epoch would be empty
    and its examples could not be counted. Checked without iterating (a DataLoader would start
    its workers)."""
    if isinstance(batches, Iterator):
        raise ValueError(f"{name} is a one-shot {type(batches).__name__}, which one epoch would "
                         f"use up; allowed: a list of (x, y) batches, a DataLoader or a "
                         f"data.TensorBatches")


def _check_proximal_to(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse `proximal_to` names that are not keys of the model's state_dict (a misspelt name
    would silently leave that parameter out of FedProx's term)."""
    unknown = sorted(set(names) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"proximal_to names entries the model lacks: {', '.join(unknown[:5])}")


def _check_lr_scale(lr_scale: Mapping[str, float], names: Iterable[str]) -> None:
    """Refuse an `lr_scale` that names a parameter not in `names`, or a multiplier that is not
    a finite number > 0 (`train`, `cohort.train_cohort` and `graphed.GraphedTrainer`)."""
    unknown = sorted(set(lr_scale) - set(names))
    if unknown:
        raise ValueError(f"lr_scale names parameters the model lacks: {', '.join(unknown[:5])}")
    bad = {k: v for k, v in lr_scale.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"lr_scale multipliers must be finite numbers > 0, got {bad}")


def _param_groups(model: nn.Module, lr: float, lr_scale: Mapping[str, float]) -> list[dict]:
    """SGD parameter groups: one at `lr`, one per distinct multiplier in `lr_scale` (checked
    by `train` with `_check_lr_scale` before anything else)."""
    named = dict(model.named_parameters())
    groups: dict[float, list[Tensor]] = {}
    for name, p in named.items():
        groups.setdefault(float(lr_scale.get(name, 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, *, device: torch.device | str = "cpu"
             ) -> EvalResult:
    """Mean cross-entropy per example and accuracy of `model` over `batches`."""
    device = torch.device(device)
    model.to(device).eval()
    loss, correct, n = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0, 0)
    return EvalResult(float(loss) / n, float(correct) / n, int(correct), n)


def _num_samples(batches: Batches) -> int:
    """Samples in one pass: TensorBatches' tensors, a DataLoader's sampler (its dataset by
    default), or a list's batches (with drop_last, only the full batches')."""
    if isinstance(batches, TensorBatches):
        return len(batches) * batches.batch_size if batches.drop_last else len(batches.x)
    if isinstance(batches, torch.utils.data.DataLoader):
        n = len(batches.sampler)  # what a pass draws: the dataset, unless a sampler picks fewer
        return n // batches.batch_size * batches.batch_size if batches.drop_last else n
    return sum(len(y) for _, y in batches)


# data --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _splits(dataset: str, data_dir: str):
    """(train, test) of a dataset, loaded once per process."""
    return load_dataset(dataset, data_dir or None)


def load_splits(config: ExperimentConfig):
    """The (train, test) splits of the config's dataset, cached for the life of the process."""
    return _splits(config.dataset, config.data_dir)


class SplitError(ValueError):
    """The config's split cannot be drawn from its dataset (more shards than samples, a
    Dirichlet draw that leaves clients nearly empty, more clients than FEMNIST writers)."""


def client_indices(config: ExperimentConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every client's training positions and held-out test positions, computed once per process
    and dataset; SplitError, naming the config's split settings, if they cannot be drawn."""
    try:
        return _client_indices(config.dataset, config.data_dir, config.partition,
                               config.num_clients, config.alpha, config.shards_per_client,
                               config.seed)
    except ValueError as err:
        settings = {"dirichlet": f", alpha={config.alpha:g}",
                    "shard": f", shards_per_client={config.shards_per_client}"}
        raise SplitError(
            f"partition={config.partition!r} with num_clients={config.num_clients}"
            f"{settings.get(config.partition, '')} cannot split {config.dataset}'s training "
            f"set: {err}") from err


@functools.lru_cache(maxsize=4)
def _client_indices(dataset: str, data_dir: str, scheme: str, num_clients: int, alpha: float,
                    shards: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every client's training positions and held-out test positions (computed once per process)."""
    train_set, test_set = _splits(dataset, data_dir)
    ids = train_set.writer_ids if scheme == "natural" else None
    parts = partition(train_set.labels, num_clients, scheme, alpha=alpha,
                      shards_per_partition=shards, ids=ids, seed=seed)
    test_ids = test_set.writer_ids if ids is not None else None
    holdouts = holdout_indices(train_set.labels, parts, test_set.labels, ids=ids,
                               test_ids=test_ids, seed=seed)
    return parts, holdouts


def make_batches(split, indices, config: ExperimentConfig, device: torch.device, *, train: bool,
                 seed: int) -> Batches:
    """Batches over `split[indices]` as the config serves them (without any partitioning).

    `config.fast_batches`: TensorBatches on `device` (shuffled and, for a CIFAR training split,
    cropped and flipped there, from a generator seeded with `seed`); else a DataLoader.
    Training batches hold `config.batch_size` images, evaluation batches EVAL_BATCH_SIZE.
    """
    batch_size = config.batch_size if train else EVAL_BATCH_SIZE
    if not config.fast_batches:
        return make_loader(split, indices, batch_size, shuffle=train, seed=seed)
    x, y = as_tensors(split, indices, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if train else None
    return TensorBatches(x, y, batch_size, shuffle=train, augment=train and split.augment,
                         generator=generator, fill=split.pad_value)  # pad with black


def client_data(config: ExperimentConfig, partition_id: int, *, seed: int = 0,
                device: torch.device | None = None) -> ClientData:
    """Client `partition_id`'s training batches and held-out batches on `device`.

    Fast path (`config.fast_batches`): the samples as tensors on the device, shuffled and
    augmented per batch there (data.TensorBatches); else a DataLoader.
    """
    if not 0 <= partition_id < config.num_clients:
        raise ValueError(f"partition_id={partition_id}; allowed: 0..{config.num_clients - 1}")
    device = device or resolve_device(config.device)
    train_set, test_set = _splits(config.dataset, config.data_dir)
    parts, holdouts = client_indices(config)
    train_indices = parts[partition_id]
    if 0 < config.client_samples < len(train_indices):  # a random subset, the same every round
        rng = np.random.default_rng([config.seed, partition_id])
        train_indices = np.sort(rng.choice(train_indices, config.client_samples, replace=False))
    holdout = holdouts[partition_id]
    return ClientData(
        train=make_batches(train_set, train_indices, config, device, train=True, seed=seed),
        holdout=make_batches(test_set, holdout, config, device, train=False, seed=seed),
        num_train=len(train_indices),
        num_holdout=len(holdout),
    )


def test_data(config: ExperimentConfig, device: torch.device | None = None) -> Batches:
    """The test set (its first `eval_samples` images when set) for server-side evaluation."""
    device = device or resolve_device(config.device)
    _, test_set = _splits(config.dataset, config.data_dir)
    n = min(config.eval_samples or len(test_set), len(test_set))
    return make_batches(test_set, np.arange(n), config, device, train=False, seed=0)
