"""GPU probe: CUDA-graphed steps in processes side by side, and torch.compile of FedPara.

What it measures:

A. 1, 2, 4 and 8 processes on the same GPU, each replaying its own CUDA-graphed training step
   (VGG16-GN FedPara gamma=0.1, then original, batch 64, float32) for a fixed time; the stored
   figure is the sum of their images per second. It shows whether clients trained side by side
   add throughput once each step is already one graph launch.
B. torch.compile of the FedPara model at batch 64, in the default and "reduce-overhead" modes:
   the first step's time (compile_s) and the median step afterwards.

The process part stops starting new measurements after about 100 s. From the repository root,
on a CUDA machine:

    PYTHONPATH=. python benchmarks/probes/probe_graph_processes_compile.py OUT.json

with OUT.json e.g. benchmarks/results/cuda-probe-graph-processes-compile.json.
"""

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F



def graphed_worker(param, seconds, start_evt, q):
    from fedpara.models import vgg16

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    m = vgg16(10, parameterization=param, gamma=0.1).to(dev).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(64, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()
    q.put("ready")
    start_evt.wait()
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            g.replay()
        n += 20
        torch.cuda.synchronize()
    q.put(n * 64 / (time.time() - t0))


def run_processes(param, procs, seconds=6.0):
    ctx = mp.get_context("spawn")
    start_evt, q = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=graphed_worker, args=(param, seconds, start_evt, q))
          for _ in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        assert q.get(timeout=120) == "ready"
    start_evt.set()
    rates = [q.get(timeout=120) for _ in ps]
    for p in ps:
        p.join()
    return sum(rates)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the JSON file to write (rewritten after each run)")
    OUT = parser.parse_args().out
    from fedpara.storage import write_atomic

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    T0 = time.time()
    for param in ("fedpara", "original"):
        for procs in (1, 2, 4, 8):
            if time.time() - T0 > 100:
                break
            try:
                rate = run_processes(param, procs)
                rec = {"what": "graphed_processes", "model": param, "processes": procs,
                       "images_per_s": rate}
            except Exception as ex:  # noqa: BLE001
                rec = {"what": "graphed_processes", "model": param, "processes": procs,
                       "error": repr(ex)[:300]}
            res["runs"].append(rec)
            print(rec, flush=True)
            write_atomic(OUT, json.dumps(res, indent=1).encode())
    from fedpara.models import vgg16

    dev = torch.device("cuda")
    for mode in ("default", "reduce-overhead"):
        if time.time() - T0 > 150:
            break
        rec = {"what": "compile", "model": "fedpara", "mode": mode}
        try:
            m = vgg16(10, parameterization="fedpara", gamma=0.1).to(dev).train()
            opt = torch.optim.SGD(m.parameters(), lr=0.01)
            cm = torch.compile(m, mode=mode)
            x = torch.randn(64, 3, 32, 32, device=dev)
            y = torch.randint(0, 10, (64,), device=dev)

            def step():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(cm(x), y)
                loss.backward()
                opt.step()

            c0 = time.time()
            step()
            torch.cuda.synchronize()
            rec["compile_s"] = time.time() - c0
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            ts = []
            for _ in range(30):
                t = time.time()
                step()
                torch.cuda.synchronize()
                ts.append(time.time() - t)
            rec["step_s"] = statistics.median(ts)
            rec["images_per_s"] = 64 / rec["step_s"]
        except Exception as ex:  # noqa: BLE001
            rec["error"] = repr(ex)[:400]
        res["runs"].append(rec)
        print(rec, flush=True)
        write_atomic(OUT, json.dumps(res, indent=1).encode())
    res["elapsed_s"] = time.time() - T0
    write_atomic(OUT, json.dumps(res, indent=1).encode())
    print("done", round(res["elapsed_s"]), "s")
