"""One client's local training as a replayed CUDA graph: the step captured once, reused by all.

    trainer = GraphedTrainer(model, batch_x, batch_y, device=device, speed=speed)
    result = trainer.train(model, batches, epochs=1, lr=0.1, seed=seed)

A training step of a small model at batch 64 is bound by kernel launches, not arithmetic
(book/performance.md): FedPara's composition multiplies the kernel count. A CUDA graph records
the step's kernels once (forward, backward, the SGD update with the round's learning rate read
from a device tensor) and replays them with one launch. `GraphedTrainer` holds that graph for
one architecture and batch shape, with its own copy of the model whose parameters are the
graph's static tensors: `train` copies a client's weights in, replays one graph per full
batch, trains a shorter last batch eagerly on the same tensors (no sample dropped), and copies
the weights back out; so one capture serves every client and round of a run. Dropout still
draws new masks at each replay (PyTorch advances a captured generator's offset per replay),
and augmentation happens in the batches, outside the graph.

`capture=False` runs the same step eagerly, tensor for tensor: the CPU tests check it against
`task.train`, and benchmarks/gpu_check.sh compares graphed and eager loss trajectories on a GPU.
`task.train` uses a cached trainer when `Speed.graph` is on (CUDA and TensorBatches only).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpara.task import Proximal, _check_lr_scale

__all__ = ["GraphedTrainer", "trainer_for"]

_WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy init, cuDNN autotuning)
_CACHE: dict[tuple, GraphedTrainer] = {}  # least recently used first
_CACHE_SIZE = 4


class GraphedTrainer:
    """The SGD step of `template`'s architecture at batch shape (x, y), as a CUDA graph.

    `lr_scale` and `proximal_mu` / `proximal_to` are `task.train`'s; they are part of what is
    captured, so a trainer serves only runs with the same values. `speed` is a `task.Speed`
    (bf16 autocast and channels-last apply inside the graph).
    """

    def __init__(self, template: nn.Module, x: Tensor, y: Tensor, *, device: torch.device | str,
                 speed, lr_scale: Mapping[str, float] | None = None, proximal_mu: float = 0.0,
                 proximal_to: Iterable[str] | None = None, capture: bool | None = None) -> None:
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"capture=True needs a CUDA device, got device={self.device}")
        self.bf16, self.channels_last = speed.bf16, speed.channels_last
        self.signature = _signature(template)  # what `train` accepts
        self.model = copy.deepcopy(template).to(self.device).train()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        named = dict(self.model.named_parameters())
        _check_lr_scale(lr_scale or {}, named)
        self.params = list(named.values())
        self.buffers = list(self.model.buffers())  # copied in and out with the parameters
        # one learning-rate tensor per multiplier, filled before each client's training
        groups: dict[float, list[Tensor]] = {}
        for name, p in named.items():
            groups.setdefault(float((lr_scale or {}).get(name, 1.0)), []).append(p)
        self.groups = [(scale, ps, torch.zeros((), device=self.device, dtype=ps[0].dtype))
                       for scale, ps in groups.items()]
        # FedProx's term (task.Proximal); its anchors are static tensors, refilled per client
        self.proximal = (Proximal.of(self.model, float(proximal_mu), list(named)
                                     if proximal_to is None else proximal_to)
                         if proximal_mu > 0 else None)
        self.x = torch.zeros_like(x, device=self.device)
        if self.channels_last and self.x.dim() == 4:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.zeros_like(y, device=self.device)
        self.total = torch.zeros((), device=self.device)  # the client's summed batch losses
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.capture:
            self._capture()

    # the step -------------------------------------------------------------------------------

    def _step(self, x: Tensor, y: Tensor) -> None:
        """Forward, backward and SGD on the trainer's model; adds the batch's summed loss to
        `total`. Every op reads and writes fixed tensors, so it can be captured."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16,
                            cache_enabled=False):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        with torch.no_grad():
            if self.proximal is not None:  # FedProx: mu * (p - anchor) added to the gradient
                self.proximal.add_to_gradients()
            for _, ps, rate in self.groups:
                ps = [p for p in ps if p.grad is not None]  # a parameter the loss does not use
                if ps:
                    torch._foreach_sub_(ps, torch._foreach_mul([p.grad for p in ps], rate))
            self.total.add_(loss.detach().float() * len(y))

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self._zero_grads()
                self._step(self.x, self.y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._zero_grads()  # gradients allocated inside the graph: its static tensors
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a Ray worker's other threads may use CUDA while this one captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._step(self.x, self.y)

    def _zero_grads(self) -> None:
        for p in self.params:
            p.grad = None

    # a client -------------------------------------------------------------------------------

    def train(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, epochs: int,
              lr: float, seed: int | None = None) -> tuple[float, int]:
        """`epochs` passes over `batches` on `model`'s weights (copied in, trained, copied
        back); returns (mean loss per example, examples seen), as `task.train` counts them.
        `model` must have the template's `_signature` (its modules' settings, such as FedPara's
        `nonlinear`, and its tensors' names, shapes and dtypes)."""
        if _signature(model) != self.signature:
            raise ValueError("the model is not of the architecture this trainer captured")
        if seed is not None:
            torch.manual_seed(seed)
        theirs = [*model.parameters(), *model.buffers()]
        ours = [*self.params, *self.buffers]
        with torch.no_grad():
            for mine, other in zip(ours, theirs, strict=True):
                mine.copy_(other)
            if self.proximal is not None:  # this client's start is the anchor
                for anchor, p in zip(self.proximal.anchors, self.proximal.params, strict=True):
                    anchor.copy_(p)
            for scale, _, rate in self.groups:
                rate.fill_(lr * scale)
            self.total.zero_()
        seen = 0
        for _ in range(epochs):
            for x, y in batches:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                if self.graph is not None and x.shape == self.x.shape:
                    self.x.copy_(x)
                    self.y.copy_(y)
                    self.graph.replay()
                else:  # the shorter last batch (or no graph): the same step, eagerly
                    static = [p.grad for p in self.params]
                    self._zero_grads()
                    self._step(x, y)
                    for p, g in zip(self.params, static, strict=True):
                        p.grad = g  # the graph's gradient tensors stay attached
                seen += len(y)
        with torch.no_grad():
            for mine, other in zip(ours, theirs, strict=True):
                other.copy_(mine)
        return float(self.total) / max(seen, 1), seen


def _signature(model: nn.Module) -> tuple:
    """What makes two models the same architecture for a captured step."""
    return (repr(model), tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()))


def trainer_for(model: nn.Module, x: Tensor, y: Tensor, *, device: torch.device, speed,
                lr_scale: Mapping[str, float] | None = None, proximal_mu: float = 0.0,
                proximal_to: Iterable[str] | None = None) -> GraphedTrainer:
    """A cached `GraphedTrainer` for this architecture, batch shape and step settings (the
    last few are kept: a run uses one or two). `proximal_to` is read once (it may be an
    iterator): the same names key the cache and build the trainer."""
    if proximal_to is not None:
        proximal_to = tuple(proximal_to)
    key = (_signature(model), tuple(x.shape), x.dtype, tuple(y.shape), str(device), speed,
           tuple(sorted((lr_scale or {}).items())), float(proximal_mu),
           proximal_to if proximal_mu > 0 else None)
    return kept(_CACHE, _CACHE_SIZE, key, lambda: GraphedTrainer(
        model, x, y, device=device, speed=speed, lr_scale=lr_scale, proximal_mu=proximal_mu,
        proximal_to=proximal_to))


def kept(cache: dict, size: int, key: tuple, make: Callable[[], Any]) -> Any:
    """`cache[key]`, made by `make()` if missing; `cache` keeps the `size` most recently used
    (its order: least recently used first). Shared by the captured steps here and in
    fedpara/cohort.py."""
    if key in cache:
        cache[key] = cache.pop(key)  # now the most recently used
    else:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]
