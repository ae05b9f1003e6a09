"""GPU probe: is a training step bound by kernel launches? Eager vs one CUDA graph per step.

What it measures: for VGG16-GN original and FedPara gamma=0.1 (10 classes) at batch 64 and 32,
in float32 and under bf16 autocast, the median time of one eager training step (forward,
backward, SGD) and of the same step captured once as a CUDA graph (torch.cuda.graph) and
replayed. A replay launches the whole step with one call, so the difference between the two is
the cost of launching its kernels one by one from Python. From the repository root, on a CUDA
machine:

    PYTHONPATH=. python benchmarks/probes/probe_graph.py benchmarks/results/cuda-probe-graph.json
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fedpara.models import vgg16
from fedpara.storage import write_atomic

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", help="the JSON file to write (rewritten after each run)")
OUT = parser.parse_args().out
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
T0 = time.time()


def timed(fn, n=40, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return statistics.median(ts)


for batch in (64, 32):
    for param in ("original", "fedpara"):
        for bf16 in (False, True):
            rec = {"model": param, "batch": batch, "bf16": bf16}
            try:
                torch.manual_seed(0)
                m = vgg16(10, parameterization=param, gamma=0.1).to(dev).train()
                opt = torch.optim.SGD(m.parameters(), lr=0.01)
                x = torch.randn(batch, 3, 32, 32, device=dev)
                y = torch.randint(0, 10, (batch,), device=dev)

                def step():
                    opt.zero_grad(set_to_none=False)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                        loss = F.cross_entropy(m(x), y)
                    loss.backward()
                    opt.step()
                    return loss

                rec["eager_s"] = timed(step)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    static_loss = step()
                rec["graph_s"] = timed(g.replay)
                rec["graph_images_per_s"] = batch / rec["graph_s"]
                rec["eager_images_per_s"] = batch / rec["eager_s"]
                rec["loss_finite"] = bool(torch.isfinite(static_loss).item())
            except Exception as ex:  # noqa: BLE001
                rec["error"] = repr(ex)[:400]
            res["runs"].append(rec)
            print(rec, flush=True)
            write_atomic(OUT, json.dumps(res, indent=1).encode())
res["elapsed_s"] = time.time() - T0
write_atomic(OUT, json.dumps(res, indent=1).encode())
print("done", round(res["elapsed_s"]), "s")
