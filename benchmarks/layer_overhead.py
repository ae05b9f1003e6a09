"""What FedPara's weight composition costs: one SGD step of VGG16-GN, FedPara γ=0.1 vs original.

    python benchmarks/layer_overhead.py --repeats 5
    python benchmarks/layer_overhead.py --device cuda --channels-last --cudnn-benchmark
                                      # on a GPU, the fast path's settings (task.Speed.default)

Each variant runs forward + backward + SGD step on random 32×32 images (batch 64 by default);
variants are interleaved (the order flips every repeat) and the per-step medians are compared;
on a shared machine also look at the median of the per-round ratios and the ratio of the minima.
Variants: `original` (dense convs), `fedpara` (the layers' recompute Function), and
`fedpara_autograd` (the same layers composed with plain autograd, `layer.recompute = False`).

Memory: on CUDA, torch.cuda.max_memory_allocated over one step, each variant measured with only
its own model, gradients and batch on the device (built, measured, freed before the next one is
built; the timed models are built afterwards). On CPU, where torch keeps no
allocator statistics, an estimate of what is resident at the start of backward: parameters +
their gradients + every tensor saved for backward (activations and composed weights, found
with torch.autograd.graph.saved_tensors_hooks, each storage counted once, parameters not
counted twice). Transient buffers inside an op are not seen.

On a CPU the process keeps freed memory mapped, as training does by default there
(`fedpara.task.retain_freed_memory`; `--no-retain-memory` to leave glibc's default, and
benchmarks/memory_retention.py for the difference it makes).

Also measured: the composition alone (forward + backward of the 13 weights, no convolution) in
three implementations, to show where the time goes; the multiply-add counts of the
convolutions and of the composition; and the rate (multiply-adds per second) of each kind of
work on the largest layer (`arithmetic_rates`). Writes
benchmarks/results/layer_overhead-<device>.json (`--out` to choose).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_checks  # noqa: E402
from fedpara import task  # noqa: E402
from fedpara.layers import FedParaConv2d, _fedpara_weight  # noqa: E402
from fedpara.layers import _linear as fedpara_linear  # noqa: E402
from fedpara.models import vgg16  # noqa: E402
from fedpara.storage import write_atomic  # noqa: E402

VARIANTS = ("original", "fedpara", "fedpara_autograd")
RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------------------------
# helpers


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    name = names[0] if names else platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn, repeats: int, device: torch.device) -> list[float]:
    """Seconds of `repeats` calls of fn, each timed alone (the device synchronized around it)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def build(variant: str, gamma: float, device: torch.device, channels_last: bool):
    model = vgg16(
        10, parameterization="original" if variant == "original" else "fedpara", gamma=gamma
    )
    for m in model.modules():
        if isinstance(m, FedParaConv2d):
            m.recompute = variant != "fedpara_autograd"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def step(model, opt, x, y, bf16: bool) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def memory_bytes(model, opt, x, y, bf16: bool) -> dict:
    """Peak allocated bytes (CUDA) or the resident estimate described at the top (CPU)."""
    device = x.device
    if device.type == "cuda":
        opt.zero_grad(set_to_none=True)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(model, opt, x, y, bf16)
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device)}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
    params = {
        p.untyped_storage().data_ptr(): p.numel() * p.element_size() for p in model.parameters()
    }
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    loss.backward()
    param_bytes = sum(params.values())
    return {
        "saved_for_backward_bytes": saved,
        "parameter_bytes": param_bytes,
        "peak_bytes": 2 * param_bytes + saved,  # parameters + gradients + saved tensors
    }


def memory_alone(variant: str, args: argparse.Namespace, x, y) -> dict:
    """memory_bytes of `variant` on a model of its own, freed afterwards: on CUDA the peak then
    holds no other variant's weights or gradients."""
    model, opt = build(variant, args.gamma, x.device, args.channels_last)
    if x.device.type == "cuda":  # cuDNN autotuning's trial workspaces are not the step's memory
        step(model, opt, x, y, args.bf16)
    memory = memory_bytes(model, opt, x, y, args.bf16)
    del model, opt
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
    return memory


def multiply_adds(model, x) -> dict:
    """Multiply-adds of one training step: convolutions (≈ 3× forward) and the composition."""
    conv = compose = 0
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, o.shape))
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, FedParaConv2d))
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for m, (n, o, h, w) in shapes.items():
        taps = m.kernel_size[0] * m.kernel_size[1]
        conv += 3 * n * h * w * o * m.in_channels * taps
        if isinstance(m, FedParaConv2d):  # GEMMs of out·in·taps·R: 2 forward, 2 rebuilt, 4 grads
            compose += 8 * o * m.in_channels * taps * m.rank
    return {"conv_step": conv, "compose_step": compose, "compose_fraction": compose / conv}


def arithmetic_rates(model, x, device: torch.device, repeats: int = 5) -> dict:
    """Multiply-adds per second of the step's two kinds of work, timed apart on the largest
    FedPara layer: its forward convolution at this batch, and its composition's dense product
    (out × R times R × in·kh·kw) as the layers run it (`fedpara.layers._linear`: oneDNN on
    x86 CPUs) and as torch's BLAS GEMM (`@`) runs it, with a large square GEMM (1024³) for
    comparison. Where the composition's product runs below the convolutions' rate, composing
    a tenth of the multiply-adds costs more than a tenth of the time; the square product tells
    how much of a BLAS gap is the library itself and how much the inner size of only R.
    Minimum of `repeats` timings each."""
    layer = max((m for m in model.modules() if isinstance(m, FedParaConv2d)),
                key=lambda m: m.out_channels * m.in_channels)
    inputs = {}
    hook = layer.register_forward_hook(lambda m, i, o: inputs.setdefault("x", i[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    dense = torch.randn(layer.out_channels, layer.in_channels, *layer.kernel_size, device=device)
    left = torch.randn(layer.out_channels, layer.rank, device=device)
    right = torch.randn(layer.rank, layer.in_channels * taps, device=device)
    xin = inputs["x"].detach()
    conv_args = (None, layer.stride, layer.padding, layer.dilation)
    n, _, h, w = F.conv2d(xin, dense, *conv_args).shape

    def best(fn) -> float:
        fn()  # warm-up
        return min(timings(fn, repeats, device))

    square = torch.randn(1024, 1024, device=device)
    conv_s = best(lambda: F.conv2d(xin, dense, *conv_args))
    with torch.no_grad():  # the product as the composition runs it (oneDNN on x86 CPUs)
        product_s = best(lambda: fedpara_linear(left, right.T, True))
    gemm_s = best(lambda: left @ right)
    square_s = best(lambda: square @ square)
    conv_macs = n * h * w * layer.out_channels * layer.in_channels * taps
    gemm_macs = layer.out_channels * layer.rank * layer.in_channels * taps
    return {"layer": f"{layer.in_channels}→{layer.out_channels}, rank {layer.rank}",
            "conv_forward_macs_per_second": conv_macs / conv_s,
            "compose_product_macs_per_second": gemm_macs / product_s,
            # torch's BLAS GEMM (`@`) on the same shape and on a large square product (1024³)
            "compose_gemm_macs_per_second": gemm_macs / gemm_s,
            "square_gemm_macs_per_second": 1024**3 / square_s}


def _einsum_branch(x, y, t):
    # the one-line composition of public implementations, left to right
    return torch.einsum("rskl,or,is->oikl", t, x, y)


def compose_seconds(layers, how: str, device: torch.device) -> float:
    """Forward + backward of all the layers' weights alone (no convolution), waiting for the
    device's queued work before the clock stops (on CUDA the calls only launch kernels)."""
    sync(device)
    start = time.perf_counter()
    for m in layers:
        if how == "einsum_autograd":
            w = _einsum_branch(m.x1, m.y1, m.t1) * _einsum_branch(m.x2, m.y2, m.t2)
        elif how == "ordered_autograd":
            w = m.compose_weight()
        else:  # "ordered_recompute"
            w = _fedpara_weight(False, False, m.x1, m.y1, m.t1, m.x2, m.y2, m.t2)
        w.backward(torch.ones_like(w))
    sync(device)
    return time.perf_counter() - start


def write_json(path: Path, record: dict) -> None:
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN autotuning (torch.backends.cudnn.benchmark; CUDA only)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="keep freed memory mapped (fedpara.task.retain_freed_memory; "
                        "process-wide); default: as task.Speed.default on the device, on a CPU")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/layer_overhead-<device>.json)")
    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "repeats", "steps", "batch")
    cli_checks.threads(p, args.threads)
    cli_checks.unique(p, "--variants", args.variants)
    if set(args.variants) - {"original"}:  # the original model has no gamma
        cli_checks.gammas(p, "--gamma", args.gamma)
    device = cli_checks.device(p, args.device)
    cli_checks.cuda_only(p, device, "--cudnn-benchmark", args.cudnn_benchmark)
    cli_checks.out(p, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.retain_memory is None:  # what training does by default on this device
        args.retain_memory = task.Speed.default(device).retain_memory
    if args.retain_memory:
        task.retain_freed_memory()
    retained = task.freed_memory_retained()  # an earlier CPU training may have set it too
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    memory = {v: memory_alone(v, args, x, y) for v in args.variants}
    models = {v: build(v, args.gamma, device, args.channels_last) for v in args.variants}
    for v in args.variants:  # warm-up (cuDNN autotuning, allocator)
        step(*models[v], x, y, args.bf16)
    times = {v: [] for v in args.variants}
    for r in range(args.repeats):
        for v in args.variants if r % 2 == 0 else reversed(args.variants):
            model, opt = models[v]
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, x, y, args.bf16)
            sync(device)
            times[v].append((time.perf_counter() - start) / args.steps)
    median = {v: statistics.median(t) for v, t in times.items()}

    record = {
        "benchmark": "layer_overhead",
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        # other processes on the machine skew CPU timings: 1-minute load average around the run
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "vgg16-gn, 10 classes",
        "gamma": args.gamma,
        "batch": args.batch,
        "image": [3, 32, 32],
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "cudnn_benchmark": args.cudnn_benchmark,
        # freed memory kept mapped for the next step (as the CPU training default does)
        "retained_freed_memory": retained,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "step_seconds": times,
        "median_step_seconds": median,
        "memory": memory,
        "memory_measure": "cuda max_memory_allocated, each variant alone on the device"
        if device.type == "cuda" else
        "parameters + gradients + tensors saved for backward (estimate)",
    }  # fmt: skip
    if "original" in median:
        base, base_mem = median["original"], memory["original"]["peak_bytes"]
        others = [v for v in median if v != "original"]
        record["time_ratio"] = {v: median[v] / base for v in others}
        # robust to load from other processes: rounds are adjacent in time, so compare within one
        record["time_ratio_paired_median"] = {
            v: statistics.median(a / b for a, b in zip(times[v], times["original"], strict=True))
            for v in others
        }
        record["time_ratio_of_minima"] = {v: min(times[v]) / min(times["original"]) for v in others}
        record["memory_ratio"] = {
            v: memory[v]["peak_bytes"] / base_mem for v in memory if v != "original"
        }
    fedpara = next((models[v][0] for v in ("fedpara", "fedpara_autograd") if v in models), None)
    if fedpara is not None:
        record["multiply_adds"] = multiply_adds(fedpara, x)
        record["arithmetic_rates"] = arithmetic_rates(fedpara, x, device)
        layers = [m for m in fedpara.modules() if isinstance(m, FedParaConv2d)]
        hows = ("einsum_autograd", "ordered_autograd", "ordered_recompute")
        samples = {h: [] for h in hows}
        for _ in range(max(3, args.repeats)):
            for h in hows:
                samples[h].append(compose_seconds(layers, h, device))
        record["compose_seconds"] = {h: statistics.median(s) for h, s in samples.items()}
        fedpara.zero_grad(set_to_none=True)

    for v in median:
        mem = memory[v]["peak_bytes"] / 2**20
        print(f"{v:18s} step {median[v]:.3f} s   memory {mem:8.1f} MiB")
    keys = ("time_ratio", "time_ratio_paired_median", "time_ratio_of_minima", "memory_ratio")
    for key in (*keys, "multiply_adds", "arithmetic_rates", "compose_seconds"):
        if key in record:
            print(f"{key}: {json.dumps(record[key])}")
    out = args.out or RESULTS / f"layer_overhead-{slug(record['device'])}.json"
    write_json(out, record)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
