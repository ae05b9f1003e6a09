"""A round's clients trained together: one vmap program over their stacked models.

    results = train_cohort(models, [data.train for data in clients], epochs=1, lr=0.1,
                           seeds=[...], device=device)

`task.train` trains one client; on a GPU a client's small batches leave most of the device
idle, so a round's K clients are better trained as one program whose every kernel is K times
larger. `train_cohort` does that with `torch.func`: the K models' parameters are stacked
(`stack_module_state`), one `vmap(grad(loss))` computes all K gradients in one pass, and one
SGD update moves all K. Each client sees exactly the batches it would see alone (its own
`TensorBatches`, shuffled and augmented by its own generator), so with dropout off the K
models end where K separate `task.train` calls leave them, to float tolerance (the kernels
sum in another order). Clients of unequal size are exact too: at step s every client that
still has a batch trains on it, a shorter last batch is padded and its padding masked out of
the loss, and a client with no batch left takes no step at all; no sample is dropped or
repeated. Dropout draws differ from the one-client path (vmap draws one tensor for the
cohort, `randomness="different"`), so only its distribution is the same.

On CUDA the step (forward, backward and update of all K) is captured once as a CUDA graph and
replayed, as fedpara/graphed.py does for one client: eager, the vmap program still launches one
kernel after another from Python, and at these sizes the launches, not the arithmetic, set the
pace. One capture serves every round of a run: a round's stacked weights are copied into the
graph's tensors and back out.

Works for models whose per-sample outputs do not depend on the other samples of the batch
(GroupNorm, no BatchNorm): every model here. `task.train` stays the reference and the CPU
default; this is the GPU engine's training half (book/performance.md).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from fedpara import task
from fedpara.graphed import _signature, kept
from fedpara.task import (
    Batches,
    TrainResult,
    _check_batches,
    _check_lr_scale,
    _check_proximal_to,
    _check_training,
    _num_samples,
)

__all__ = ["train_cohort"]


def train_cohort(models: Sequence[nn.Module], batches: Sequence[Batches], *, epochs: int,
                 lr: float, device: torch.device | str = "cpu",
                 seeds: Sequence[int] | None = None,
                 lr_scale: Mapping[str, float] | None = None,
                 proximal_mu: float = 0.0, proximal_to: Sequence[str] | None = None,
                 graph: bool | None = None) -> list[TrainResult]:
    """Train `models[k]` on `batches[k]` for every k at once; what `task.train` does to each.

    The models must share one architecture; their parameters are updated in place (on
    `device`) and each gets its `TrainResult`. `seeds` seed torch's generator once for the
    cohort (dropout); the batches' order and augmentation come from each client's own
    generator. `lr_scale`, `proximal_mu` and `proximal_to` are `task.train`'s, the same for
    every client. `graph` (CUDA only; default: `task.Speed.default(device).graph`, on for
    CUDA) replays the step as a captured CUDA graph, kept for the next call with the same
    architecture, number of clients, batch shape and settings (`_CohortStep`); off, the step
    runs eagerly.
    """
    k = len(models)
    if k == 0 or len(batches) != k:
        raise ValueError(f"models and batches must be non-empty and of equal length, got "
                         f"{len(models)} models and {len(batches)} batch sources")
    _check_training(epochs, lr, proximal_mu)
    for i, b in enumerate(batches):
        _check_batches(b, f"batches[{i}]")
    names = [list(dict(m.named_parameters())) for m in models]
    if any(n != names[0] for n in names[1:]):
        raise ValueError("train_cohort needs models of one architecture (the same parameters)")
    _check_lr_scale(lr_scale or {}, names[0])
    _check_per_sample(models[0])
    if seeds is not None and len(seeds) != k:
        raise ValueError(f"seeds must name one seed per model ({k}), got {len(seeds)}")
    if proximal_to is not None and proximal_mu > 0:  # as task.train: checked when it is used
        proximal_to = list(proximal_to)
        _check_proximal_to(models[0], proximal_to)
    device = torch.device(device)
    graph = task.Speed.default(device).graph if graph is None else bool(graph)
    if graph:
        _check_capture(device)
    if seeds is not None:
        torch.manual_seed(int(seeds[0]))
    for model in models:
        model.to(device).train()
    params, _ = stack_module_state(list(models))  # detached copies, K x shape (no buffers)
    params = {name: p.detach().requires_grad_(False) for name, p in params.items()}
    scale = {name: float((lr_scale or {}).get(name, 1.0)) for name in params}
    anchored = sorted(set(params if proximal_to is None else proximal_to) & set(params))
    settings = dict(scale=scale, proximal_mu=float(proximal_mu),
                    anchored=anchored if proximal_mu > 0 else [])
    step: _CohortStep | None = None
    seen = [0] * k
    for _ in range(epochs):
        for x, y, weight, active, sizes, counts in _steps(batches, device):
            if step is None:  # the first step's shapes key the captured step
                step = (_cached_step(models[0], params, x, y, weight, device, **settings)
                        if graph else _CohortStep(models[0], params, x, y, weight, **settings))
                step.start(params, lr)
            step.run(x, y, weight, active, sizes)
            for i, n in enumerate(counts):  # counted on the host: no device sync per step
                seen[i] += n
    if step is None:  # no client had a batch
        return [TrainResult(loss=0.0, num_examples=_num_samples(b)) for b in batches]
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(step.params[name][i])
    losses = step.totals.tolist()
    return [TrainResult(loss=losses[i] / max(seen[i], 1), num_examples=_num_samples(b))
            for i, b in enumerate(batches)]


class _CohortStep:
    """The cohort's SGD step on fixed tensors: the stacked parameters (`params`), FedProx's
    anchors, one learning-rate tensor per multiplier and the clients' summed losses (`totals`).
    `run` takes a step's stacked batch; with `capture` (CUDA) the step at the first batch's
    shapes is recorded as a CUDA graph once and replayed for every batch of those shapes
    (forward, backward and update, one launch), and a batch of other shapes (a round's shorter
    last step) runs the same step eagerly on the same tensors. `start` copies a round's
    clients in, so one capture serves every round with the same number of clients."""

    def __init__(self, template: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                 weight: Tensor, *, scale: Mapping[str, float], proximal_mu: float,
                 anchored: Sequence[str], capture: bool = False) -> None:
        self.k, device = x.shape[0], x.device
        skeleton = copy.deepcopy(template).to("meta")
        # captured: tensors of its own, refilled by `start`; eager: the round's stacked tensors
        self.params = ({n: p.clone() for n, p in params.items()} if capture else dict(params))
        self.proximal_mu = proximal_mu
        self.anchors = {n: params[n].clone() for n in anchored}
        # one learning-rate tensor per multiplier and dtype, each parameter's key in `rate_of`
        self.rate_of = {n: (float(scale[n]), p.dtype) for n, p in self.params.items()}
        self.rates = {key: torch.zeros((), device=device, dtype=key[1])
                      for key in set(self.rate_of.values())}
        self.totals = torch.zeros(self.k, device=device)  # float32, as task.train sums

        def loss(p, x, y, weight):
            logits = functional_call(skeleton, p, (x,))
            # per-sample losses weighted 1/n_k (0 for padding): the mean over the real samples
            return (F.cross_entropy(logits, y, reduction="none") * weight).sum()

        self._grad = vmap(grad_and_value(loss), randomness="different")
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self.x, self.y, self.weight = (torch.zeros_like(t) for t in (x, y, weight))
            self.active = torch.zeros(self.k, device=device)
            self.sizes = torch.zeros(self.k, device=device)
            self._capture()

    def _step(self, x: Tensor, y: Tensor, weight: Tensor, active: Tensor, sizes: Tensor
              ) -> None:
        grads, mean_losses = self._grad(self.params, x, y, weight)
        with torch.no_grad():
            self.totals.add_(mean_losses.float() * sizes)  # the batches' summed losses
            for name, p in self.params.items():
                g = grads[name]
                if name in self.anchors:  # FedProx: mu * (p - anchor)
                    g = g + self.proximal_mu * (p - self.anchors[name])
                # an inactive client (no batch left) takes no step: its update is 0 * g
                rate = active.to(p.dtype) * self.rates[self.rate_of[name]]
                p.sub_(g * rate.view((self.k,) + (1,) * (p.dim() - 1)))

    def _capture(self) -> None:
        # warm-up on a side stream (lazy initialization, cuDNN's choices), then the capture;
        # the inputs are zeros and no client is active, so the parameters do not move
        device = self.x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self._step(self.x, self.y, self.weight, self.active, self.sizes)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a Ray worker's other threads may use CUDA while this one captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._step(self.x, self.y, self.weight, self.active, self.sizes)

    def start(self, params: Mapping[str, Tensor], lr: float) -> None:
        """A round's clients in: their stacked parameters (also FedProx's anchors), the
        learning rate, no losses yet."""
        with torch.no_grad():
            for name, p in self.params.items():
                if p is not params[name]:
                    p.copy_(params[name])
            for name, anchor in self.anchors.items():
                anchor.copy_(params[name])
            for (s, _), rate in self.rates.items():
                rate.fill_(lr * s)
            self.totals.zero_()

    def run(self, x: Tensor, y: Tensor, weight: Tensor, active: Tensor, sizes: Tensor) -> None:
        if self.graph is not None and x.shape == self.x.shape:
            for static, t in ((self.x, x), (self.y, y), (self.weight, weight),
                              (self.active, active), (self.sizes, sizes)):
                static.copy_(t)
            self.graph.replay()
        else:
            self._step(x, y, weight, active, sizes)


def _check_capture(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"graph=True (a captured step) needs a CUDA device, got device={device}")


_WARMUP_STEPS = 3  # eager steps before a capture, as fedpara/graphed.py
_CACHE: dict[tuple, _CohortStep] = {}  # least recently used first
_CACHE_SIZE = 2  # a run uses one shape (its clients per round); each holds K models' memory


def _cached_step(template: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                 weight: Tensor, device: torch.device, *, scale: Mapping[str, float],
                 proximal_mu: float, anchored: Sequence[str]) -> _CohortStep:
    """The captured step for this architecture, cohort and batch shape and these settings
    (cuDNN's autotuning among them: a capture keeps the convolution algorithms it found)."""
    key = (_signature(template), tuple(x.shape), x.dtype, y.dtype, weight.dtype, str(device),
           tuple(sorted(scale.items())), proximal_mu, tuple(anchored),
           torch.backends.cudnn.benchmark)
    return kept(_CACHE, _CACHE_SIZE, key, lambda: _CohortStep(
        template, params, x, y, weight, scale=scale, proximal_mu=proximal_mu, anchored=anchored,
        capture=True))


def _check_per_sample(model: nn.Module) -> None:
    """Refuse what the stacked program cannot train as `task.train` would: buffers (BatchNorm's
    running statistics would stay where they are, and the padding would enter the batch's
    statistics) and frozen parameters (the stacked update moves every parameter)."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"train_cohort trains models without buffers (per-sample models, e.g. "
                         f"GroupNorm instead of BatchNorm); this one has {', '.join(buffers[:5])}")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"train_cohort updates every parameter; frozen (requires_grad=False): "
                         f"{', '.join(frozen[:5])}: use task.train")


def _steps(batches: Sequence[Batches], device: torch.device
           ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[int]]]:
    """One pass of every client, step by step: (x, y, weight, active, sizes, counts) stacked
    over the clients, each batch padded to the step's largest; weight is 1/n on a client's n
    real samples and 0 on padding; active is 0 for a client whose pass has ended; sizes are
    the n on the device, counts the same on the host.

    A client whose pass has ended still runs a zero batch through the program (its step is
    then multiplied by 0): with clients of very unequal sizes that is wasted work, which
    grouping a round's clients by size would avoid.
    """
    iterators = [iter(b) for b in batches]
    while True:
        current = [next(it, None) for it in iterators]
        present = [c for c in current if c is not None]
        if not present:
            return
        width = max(len(c[1]) for c in present)
        counts = [len(c[1]) if c is not None else 0 for c in current]
        if all(n == width for n in counts):  # the common case: no padding
            x = torch.stack([c[0].to(device) for c in current])
            y = torch.stack([c[1].to(device) for c in current])
        else:
            x_shape, dtype = present[0][0].shape[1:], present[0][0].dtype
            x = torch.zeros((len(current), width, *x_shape), dtype=dtype, device=device)
            y = torch.zeros((len(current), width), dtype=present[0][1].dtype, device=device)
            for i, c in enumerate(current):
                if c is not None:
                    x[i, :counts[i]] = c[0].to(device)
                    y[i, :counts[i]] = c[1].to(device)
        # built on the host, one transfer each: 1/n on the real samples, 0 on the padding
        sizes = torch.tensor(counts, dtype=torch.float64)
        weight = (torch.arange(width).unsqueeze(0) < sizes.unsqueeze(1)) / sizes.clamp_min(
            1).unsqueeze(1)
        yield (x, y, weight.to(device=device, dtype=x.dtype if x.is_floating_point()
                                else torch.float32),
               (sizes > 0).to(device=device, dtype=torch.float32),
               sizes.to(device=device, dtype=torch.float32), counts)
