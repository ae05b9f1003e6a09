"""FedPara layer cost, this working tree's fedpara/layers.py against another revision's.

    python benchmarks/layers_before_after.py --baseline HEAD~1 --repeats 15 --threads 1

Loads the baseline's fedpara/layers.py (from `git show REV:fedpara/layers.py`) next to the
current one, builds VGG16's 13 FedParaConv2d layers (γ from --gamma, same seed: the same
weights in both) and times, interleaved and in alternating order, per round:

- compose: forward + backward of the 13 composed weights alone (the layers' recompute Function);
- layer: forward + backward of each layer on a random batch of its input size (32×32 images).

Reports the median over rounds of the current/baseline time ratio (rounds are adjacent in
time, so the ratio is robust to load from other processes) and the medians of each, and, for
one 512-channel layer's forward + backward, the operations that do arithmetic or move data as
torch's profiler lists them (the matrix products, the elementwise products, the copies, ...;
an operation called inside another is not counted again). On a GPU each is at least one
kernel launch, which is what bounds a FedPara step there. `--channels-last` gives the layers
channels-last inputs. Prints JSON; writes nothing unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedpara.storage import write_atomic  # noqa: E402  (imports nothing of the layers)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_checks  # noqa: E402
from layer_overhead import device_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# VGG16's convolutions: (in, out, input side) for 32×32 images
VGG16_CONVS = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8),
               (256, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 4),
               (512, 512, 2), (512, 512, 2), (512, 512, 2)]


def load_layers(source: str, name: str):
    """fedpara/layers.py from a file's text, as a standalone module (it imports only torch)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    try:
        spec = importlib.util.spec_from_file_location(name, f.name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        os.unlink(f.name)  # the module is loaded; the file is not needed any more
    return module


def build(module, gamma: float, personalized: bool, nonlinear: bool):
    torch.manual_seed(0)
    return [module.FedParaConv2d(i, o, 3, padding=1, gamma=gamma, personalized=personalized,
                                 nonlinear=nonlinear) for i, o, _ in VGG16_CONVS]


# operations that compute or copy (views, allocations and bookkeeping are left out)
COMPUTE_OPS = {"aten::" + n for n in (
    "mm", "bmm", "addmm", "addmm_", "matmul", "mul", "mul_", "add", "add_", "sub", "rsub",
    "neg", "tanh", "tanh_", "copy_", "clone", "contiguous", "fill_", "zero_", "sum", "addcmul_",
    "mkldnn_convolution", "convolution_backward", "_conv_depthwise2d", "thnn_conv2d")} | {
    "mkldnn::_linear_pointwise"}  # the composition's products on x86 CPUs (fedpara.layers._linear)


def compute_ops(layer, x) -> dict[str, int]:
    """Counts of COMPUTE_OPS in one forward + backward of `layer` on `x`, outermost only."""
    from torch.profiler import ProfilerActivity, profile

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in COMPUTE_OPS:
                return False
            parent = parent.cpu_parent
        return True

    layer(x).sum().backward()  # warm-up: one-time set-up work is not counted
    layer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    counts: dict[str, int] = {}
    for e in prof.events():
        if e.name in COMPUTE_OPS and outermost(e):
            counts[e.name] = counts.get(e.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def time_compose(layers) -> float:
    start = time.perf_counter()
    for m in layers:
        w = m._compose_for_forward()
        w.backward(torch.ones_like(w))
    return time.perf_counter() - start


def time_layer(layers, inputs) -> float:
    start = time.perf_counter()
    for m, x in zip(layers, inputs, strict=True):
        m(x).square().mean().backward()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="HEAD", help="git revision of the baseline layers.py")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--personalized", action="store_true", help="pFedPara: W1 ⊙ (W2 + 1)")
    p.add_argument("--nonlinear", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--channels-last", action="store_true", help="channels-last layer inputs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "repeats", "batch")
    cli_checks.threads(p, args.threads)
    cli_checks.gammas(p, "--gamma", args.gamma)
    cli_checks.out(p, args.out)
    shown = subprocess.run(["git", "show", f"{args.baseline}:fedpara/layers.py"], cwd=ROOT,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        why = (shown.stderr.strip() or "git failed").splitlines()[-1]
        p.error(f"--baseline {args.baseline}: no fedpara/layers.py at that git revision ({why})")
    baseline_src = shown.stdout
    if args.threads:
        torch.set_num_threads(args.threads)
    modules = {"baseline": load_layers(baseline_src, "_layers_baseline"),
               "current": load_layers((ROOT / "fedpara/layers.py").read_text(), "_layers_current")}
    nets = {k: build(m, args.gamma, args.personalized, args.nonlinear) for k, m in modules.items()}
    for a, b in zip(*(n for n in nets.values()), strict=True):  # same seed, same weights
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(args.batch, i, s, s, generator=g) for i, _, s in VGG16_CONVS]
    if args.channels_last:
        inputs = [x.to(memory_format=torch.channels_last) for x in inputs]
    big = max(range(len(VGG16_CONVS)), key=lambda i: VGG16_CONVS[i][0] * VGG16_CONVS[i][1])
    ops = {k: compute_ops(nets[k][big], inputs[big]) for k in nets}
    times = {(k, what): [] for k in nets for what in ("compose", "layer")}
    for k in nets:  # warm-up
        time_compose(nets[k]), time_layer(nets[k], inputs)
    for r in range(args.repeats):
        for k in (("baseline", "current") if r % 2 == 0 else ("current", "baseline")):
            times[(k, "compose")].append(time_compose(nets[k]))
            times[(k, "layer")].append(time_layer(nets[k], inputs))
    record = {"benchmark": "layers_before_after", "device": device_name(torch.device("cpu")),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "baseline": args.baseline,
              "baseline_commit": subprocess.run(
                  ["git", "rev-parse", "--short", args.baseline], cwd=ROOT, check=True,
                  capture_output=True, text=True).stdout.strip(),
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "gamma": args.gamma, "batch": args.batch,
              "personalized": args.personalized, "nonlinear": args.nonlinear,
              "channels_last": args.channels_last, "repeats": args.repeats,
              "layer_ops": {"layer": "{}→{} channels, forward + backward".format(*VGG16_CONVS[big]),
                            **{k: {"total": sum(c.values()), "by_op": c}
                               for k, c in ops.items()}}}
    for what in ("compose", "layer"):
        cur, base = times[("current", what)], times[("baseline", what)]
        record[what] = {
            "median_seconds": {"baseline": statistics.median(base),
                               "current": statistics.median(cur)},
            "ratio_paired_median": statistics.median(c / b for c, b in zip(cur, base)),
            "ratio_of_minima": min(cur) / min(base),
        }
    print(json.dumps(record, indent=2))
    if args.out:
        write_atomic(args.out, (json.dumps(record, indent=2) + "\n").encode())
    return record


if __name__ == "__main__":
    main()
