"""GPU probe: one VGG16-GN training step timed directly, eager, compiled and vmapped.

What it measures (all on CUDA, cudnn.benchmark on, random CIFAR-shaped inputs):

A. Images per second of one forward + backward + SGD step, eager, for VGG16-GN original and
   FedPara gamma=0.1 (10 classes) and FedPara gamma=0.4 / original (100 classes): at batch 64
   (one client's batch) with bf16 autocast and channels-last, at batch 64 in plain float32, and
   at batch 256 and 1024 with bf16 and channels-last (what a design that merges the batches of
   several clients could reach). Also the step's FLOPs per image (FlopCounterMode, at batch 8,
   so FedPara's per-step weight composition is divided by 8 images, not by the batch) and the
   peak memory.
B. torch.compile (default mode) of the same step at batch 64 (bf16, channels-last), original
   and then FedPara 0.1 if the time budget allows.
C. 16 clients trained as one torch.func.vmap program (batch 64 each, bf16 autocast), original
   then FedPara 0.1. An error there is stored as {"what": "vmap16", "error": ...} and ends
   part C.

Every time is a median over timed steps after warm-up (CUDA events). The script stops adding
measurements when its time budget runs low. From the repository root, on a CUDA machine:

    PYTHONPATH=. python benchmarks/probes/probe_eager_compile_vmap.py OUT.json [BUDGET]

with OUT.json e.g. benchmarks/results/cuda-probe-eager-compile-vmap.json and BUDGET the
time budget in seconds (default 150).
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedpara.models import vgg16
from fedpara.storage import write_atomic

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", help="the JSON file to write (rewritten as it goes)")
parser.add_argument("budget", nargs="?", type=float, default=150.0,
                    help="seconds for the whole probe (default 150)")
_args = parser.parse_args()
if not 0 < _args.budget < float("inf"):
    parser.error(f"budget must be a positive number of seconds, got {_args.budget}")
OUT, BUDGET = _args.out, _args.budget
T0 = time.time()
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}


def left():
    return BUDGET - (time.time() - T0)


def save():
    write_atomic(OUT, json.dumps(res, indent=1).encode())


def make(param, gamma, classes, cl):
    m = vgg16(classes, parameterization=param, gamma=gamma).to(dev).train()
    if cl:
        m = m.to(memory_format=torch.channels_last)
    return m


def step_fn(model, opt, bf16):
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def time_steps(step, x, y, warm=8, n=30):
    for _ in range(warm):
        step(x, y)
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        step(x, y)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def flops_per_image(model, classes, bf16):
    x = torch.randn(8, 3, 32, 32, device=dev)
    y = torch.randint(0, classes, (8,), device=dev)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 8


MODELS = [("original", 0.1, 10), ("fedpara", 0.1, 10), ("fedpara", 0.4, 100),
          ("original", 0.1, 100)]


def run_a(param, gamma, classes, batch, bf16, cl):
    m = make(param, gamma, classes, cl)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=dev)
    torch.cuda.reset_peak_memory_stats()
    t = time_steps(step_fn(m, opt, bf16), x, y, n=30 if batch <= 256 else 15)
    try:
        fl = flops_per_image(m, classes, bf16)
    except Exception:  # noqa: BLE001
        fl = float("nan")
    res["runs"].append({"what": "eager", "model": param, "gamma": gamma, "classes": classes,
                        "batch": batch, "bf16": bf16, "channels_last": cl,
                        "step_s": t, "images_per_s": batch / t,
                        "train_flops_per_image": fl,
                        "achieved_tflops": fl * batch / t / 1e12,
                        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
    print(res["runs"][-1], flush=True)
    save()


# A: eager steps
SETTINGS = [(64, True, True), (64, False, False), (1024, True, True), (256, True, True)]
for batch, bf16, cl in SETTINGS:
    for param, gamma, classes in MODELS:
        if left() < 20:
            break
        try:
            run_a(param, gamma, classes, batch, bf16, cl)
        except Exception as ex:  # noqa: BLE001
            res["runs"].append({"what": "eager", "model": param, "batch": batch,
                                "error": repr(ex)[:300]})
            print(res["runs"][-1], flush=True)

# B: torch.compile at batch 64
for param, gamma, classes in MODELS[:2]:
    if left() < 60:
        break
    try:
        m = make(param, gamma, classes, True)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        cm = torch.compile(m)
        x = torch.randn(64, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (64,), device=dev)
        c0 = time.time()
        step = step_fn(cm, opt, True)
        step(x, y)
        torch.cuda.synchronize()
        compile_s = time.time() - c0
        t = time_steps(step, x, y)
        res["runs"].append({"what": "compile", "model": param, "gamma": gamma, "batch": 64,
                            "compile_s": compile_s, "step_s": t, "images_per_s": 64 / t})
    except Exception as ex:  # noqa: BLE001
        res["runs"].append({"what": "compile", "model": param, "error": repr(ex)[:500]})
    print(res["runs"][-1], flush=True)
    save()

# C: 16 clients as one vmapped program
try:
    from torch.func import functional_call, grad, stack_module_state, vmap

    for param, gamma, classes in MODELS[:2]:
        if left() < 25:
            break
        K = 16
        models = [make(param, gamma, classes, False) for _ in range(K)]
        params, buffers = stack_module_state(models)
        base = models[0]

        def loss_fn(p, b, x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = functional_call(base, (p, b), (x,))
            return F.cross_entropy(out.float(), y)

        g = vmap(grad(loss_fn), randomness="different")
        x = torch.randn(K, 64, 3, 32, 32, device=dev)
        y = torch.randint(0, classes, (K, 64), device=dev)

        def vstep(x, y):
            gr = g(params, buffers, x, y)
            with torch.no_grad():
                for k in params:
                    params[k].sub_(0.01 * gr[k])

        t = time_steps(vstep, x, y, warm=3, n=10)
        res["runs"].append({"what": "vmap16", "model": param, "gamma": gamma, "batch": 64,
                            "clients": K, "step_s": t, "images_per_s": K * 64 / t})
        print(res["runs"][-1], flush=True)
        save()
        del models, params, buffers
except Exception as ex:  # noqa: BLE001
    res["runs"].append({"what": "vmap16", "error": repr(ex)[:500]})
    print(res["runs"][-1], flush=True)

res["elapsed_s"] = time.time() - T0
save()
print("probe done in", round(res["elapsed_s"]), "s")
