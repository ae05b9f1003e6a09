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
                 ) -> list[TrainResult]:
    """Train `models[k]` on `batches[k]` for every k at once; what `task.train` does to each.

    The models must share one architecture; their parameters are updated in place (on
    `device`) and each gets its `TrainResult`. `seeds` seed torch's generator once for the
    cohort (dropout); the batches' order and augmentation come from each client's own
    generator. `lr_scale`, `proximal_mu` and `proximal_to` are `task.train`'s, the same for
    every client.
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
    if seeds is not None:
        torch.manual_seed(int(seeds[0]))
    for model in models:
        model.to(device).train()
    params, buffers = stack_module_state(list(models))  # detached copies, K x shape
    params = {name: p.detach().requires_grad_(False) for name, p in params.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")
    scale = {name: float((lr_scale or {}).get(name, 1.0)) for name in params}
    anchored = set(params if proximal_to is None else proximal_to) & set(params)
    anchors = ({name: params[name].clone() for name in anchored} if proximal_mu > 0 else {})

    def loss(p, b, x, y, weight):
        logits = functional_call(skeleton, (p, b), (x,))
        # per-sample losses weighted 1/n_k (0 for padding): the mean over the real samples
        return (F.cross_entropy(logits, y, reduction="none") * weight).sum()

    step = vmap(grad_and_value(loss), randomness="different")
    totals = torch.zeros(k, device=device)  # float32, as task.train sums (MPS has no float64)
    seen = [0] * k
    for _ in range(epochs):
        for x, y, weight, active, sizes, counts in _steps(batches, device):
            grads, mean_losses = step(params, buffers, x, y, weight)
            with torch.no_grad():
                totals += mean_losses.float() * sizes  # the batches' summed losses
                for name, p in params.items():
                    g = grads[name]
                    if name in anchors:  # FedProx: mu * (p - anchor)
                        g = g + proximal_mu * (p - anchors[name])
                    # an inactive client (no batch left) takes no step: its update is 0 * g
                    shape = (k,) + (1,) * (p.dim() - 1)
                    p.sub_(g * (active.to(p.dtype) * (lr * scale[name])).view(shape))
            for i, n in enumerate(counts):  # counted on the host: no device sync per step
                seen[i] += n
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][i])
    losses = totals.tolist()
    return [TrainResult(loss=losses[i] / max(seen[i], 1), num_examples=_num_samples(b))
            for i, b in enumerate(batches)]


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
