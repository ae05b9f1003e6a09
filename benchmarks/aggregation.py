"""The ServerApp's averaging of a round's replies, before and after `weighted_mean`.

    python benchmarks/aggregation.py --clients 16 --repeats 5

Both paths start from the same replies (each client's arrays in Flower `Array`s, as they arrive)
and end with the new global arrays in float32:

- "flower_float64": what `FedParaStrategy.aggregate_train` did before: every reply decoded,
  re-wrapped as float64 `Array`s, averaged by Flower's FedAvg (`aggregate_train`), the result
  cast back to float32;
- "weighted_mean": what it does now: `FedParaStrategy.aggregate_train` itself, which averages
  the decoded tensors with the same float64 arithmetic (`fedpara.task.weighted_mean`).

Timed interleaved in one process (median of `--repeats`), for the model of each of a preset's
variants (default cifar10-noniid: VGG16 original, low-rank and FedPara at gamma = 0.1); every
repeat also checks that the two results are bit for bit equal. Writes
benchmarks/results/aggregation-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cli_checks  # noqa: E402
from layer_overhead import device_name, slug  # noqa: E402

from fedpara import task  # noqa: E402
from fedpara.config import PRESETS, get_preset  # noqa: E402
from fedpara.storage import write_atomic  # noqa: E402


def _replies(arrays: dict[str, torch.Tensor], clients: int, seed: int) -> list:
    """`clients` replies as the ServerApp receives them: arrays in `Array`s, unequal sizes."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedpara.messages import ARRAYS, CHANGE, METRICS, NUM_EXAMPLES, PARTITION_ID, TRAIN_LOSS

    generator = torch.Generator().manual_seed(seed)
    replies = []
    for p in range(clients):
        state = {k: (v + torch.randn(v.shape, generator=generator) * 0.01).numpy()
                 for k, v in arrays.items()}
        metrics = MetricRecord({NUM_EXAMPLES: 400 + 37 * p, PARTITION_ID: p, TRAIN_LOSS: 1.0,
                                CHANGE: [0.0]})
        replies.append(Message(content=RecordDict({
            ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
            METRICS: metrics}), dst_node_id=p + 1, message_type="train", group_id="1"))
    return replies


def flower_float64(strategy, replies) -> dict[str, np.ndarray]:
    """The previous path: float64 `Array`s through Flower's FedAvg, cast back."""
    from flwr.app import Array, ArrayRecord

    from fedpara.messages import ARRAYS
    from fedpara.transport import decode

    decoded = [decode(m.content[ARRAYS].to_torch_state_dict(), strategy.config.transport)
               for m in replies]
    for message, state in zip(replies, decoded, strict=True):
        message.content[ARRAYS] = ArrayRecord({k: Array(v.numpy().astype(np.float64))
                                               for k, v in state.items()})
    result, _ = strategy.flower.aggregate_train(1, replies)
    return {k: np.asarray(result[k].numpy()).astype(decoded[0][k].numpy().dtype)
            for k in decoded[0]}


def measure(config, clients: int, repeats: int) -> dict:
    from fedpara.server_app import FedParaStrategy

    model = task.init_model(config)
    arrays = task.get_arrays(model, task.split_keys(model, config.algorithm)[0])
    strategy = FedParaStrategy(config)
    strategy.nodes = {p: p + 1 for p in range(clients)}
    times: dict[str, list[float]] = {"flower_float64": [], "weighted_mean": []}
    for repeat in range(repeats + 1):  # the first is a warm-up, untimed
        results = {}
        order = list(times) if repeat % 2 else list(times)[::-1]
        for path in order:
            replies = _replies(arrays, clients, seed=repeat)
            start = time.perf_counter()
            if path == "flower_float64":
                results[path] = flower_float64(strategy, replies)
            else:
                new, _ = strategy.aggregate_train(1, replies)
                results[path] = {k: v.numpy() for k, v in new.items()}
            elapsed = time.perf_counter() - start
            if repeat:
                times[path].append(elapsed)
        for key, value in results["flower_float64"].items():
            if not np.array_equal(value, results["weighted_mean"][key]):
                raise AssertionError(f"the two paths differ at {key!r} (repeat {repeat})")
    medians = {path: statistics.median(t) for path, t in times.items()}
    return {
        "model_bytes": int(sum(v.numel() * v.element_size() for v in arrays.values())),
        "seconds": times,
        "median_seconds_per_client": {path: m / clients for path, m in medians.items()},
        "speedup": medians["flower_float64"] / medians["weighted_mean"],
        "bit_for_bit_equal": True,  # checked every repeat above
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar10-noniid", choices=sorted(PRESETS))
    p.add_argument("--clients", type=int, default=16, help="replies averaged per round")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "clients", "repeats")
    cli_checks.out(p, args.out)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0  # as a run
    logging.getLogger("flwr").setLevel(logging.WARNING)  # not one INFO line per aggregation
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    models = {}
    for variant in PRESETS[args.preset].variants:
        config = get_preset(args.preset, variant=variant, profile="full").replace(
            device="cpu", strategy="fedavg")
        name = "original" if config.parameterization == "original" else \
            f"{config.parameterization}-{config.gamma}"
        models[name] = measure(config, args.clients, args.repeats)
        m = models[name]["median_seconds_per_client"]
        print(f"{args.preset}/{variant} ({name}): {m['flower_float64'] * 1e3:.1f} -> "
              f"{m['weighted_mean'] * 1e3:.1f} ms per client, "
              f"{models[name]['speedup']:.2f}x, bit for bit equal")
    import flwr

    record = {
        "benchmark": "aggregation",
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "preset": args.preset,
        "clients": args.clients,
        "repeats": args.repeats,
        "models": models,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"aggregation-{slug(record['device'])}.json"
    write_atomic(out, (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
