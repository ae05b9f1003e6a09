"""A few rounds of a preset through Flower's deployment runtime, timed against the projection.

    python benchmarks/deployment_rounds.py                        # cifar10-noniid/fedpara, 3 rounds
    python benchmarks/deployment_rounds.py --wheels benchmarks/device-wheels \
        --throughput benchmarks/results/throughput-nvidia-h200.json   # on the GPU machine

One SuperLink and one SuperNode holding every partition (`scripts/local_deployment.sh` with
NODES=1), fedpara's apps submitted with `flwr run`, on fake CIFAR files written in the real
on-disk format at the dataset's full size (so every client holds its full share). The run is
the preset's full profile with `--rounds`, `--engine` and `--set` overrides. By default the
SuperNode's ClientApps forward their work to one long-lived `fedpara.worker` (WORKER=1), which
keeps torch, the device, the data and the captured steps between rounds; `--no-worker` trains in
the process Flower starts for each message, which pays all of that every round. What it reports:
each round's wall time as the ServerApp measured it (`RoundRecord.wall_seconds`), and, given a
throughput file measured on the same machine (`benchmarks/throughput.py`), the projection for
each round with the clients it sampled (the images/s of the engine's path for those clients'
images, padded to the largest for the cohort engine, plus the per-client overheads and the
evaluation measured with it), the same for the average client (`throughput.project_config`,
what the preset projections use), and the measured/projected ratio of the medians of the rounds
after the first (the first also pays cuDNN autotuning). On a CPU, compare like with like:
`--threads N` runs the deployment's processes on the N torch threads the throughput file was
measured with (its `threads`); both numbers are recorded.

Machines without flwr (the GPU machine has torch only): `--wheels DIR` installs the wheels in
DIR into a private folder first and runs Flower from there. The clients' split needs
flwr-datasets unless it is stored: `--splits DIR` is $FEDPARA_SPLITS (fedpara.partition), where
`--prepare` (on a machine with flwr-datasets) stores the split of the same fake labels and
stops. `benchmarks/prepare_device.sh` does both preparations for the GPU check: the wheels
(without numpy and uv, which that machine has or does not need) and the split.
Writes benchmarks/results/deployment-<device>.json (`--out` to choose), the device named as
benchmarks/layer_overhead.py and gpu_check.sh name it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cli_checks  # noqa: E402
from layer_overhead import device_name, slug  # noqa: E402

from fedpara.config import PRESETS, ExperimentConfig, get_preset, parse_overrides  # noqa: E402
from fedpara.fakedata import write_fake_cifar  # noqa: E402
from fedpara.partition import SPLITS_ENV  # noqa: E402
from fedpara.run import run_config_pairs  # noqa: E402
from fedpara.storage import write_atomic  # noqa: E402

ENGINES_PATH = {"cohort": "cohort", "client": "default"}  # the throughput path each engine runs
# fedpara.server_app.POLL_ENV, spelled here because this script runs without flwr installed
POLL_ENV = "FEDPARA_POLL_SECONDS"
FULL_SIZE = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}


def flower_bin(wheels: Path | None, work: Path) -> tuple[Path, dict[str, str]]:
    """A folder with `python` and Flower's commands, and the environment that makes them work:
    the wheels in `wheels` installed into `work` when given, else this interpreter's own."""
    here = Path(sys.executable).parent
    if wheels is None:
        if shutil.which("flower-superlink", path=str(here)) and _importable("flwr"):
            return here, {}
        raise SystemExit("flwr is not installed here: pass --wheels DIR "
                         "(benchmarks/prepare_device.sh fills one)")
    files = sorted(str(w) for w in Path(wheels).glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files there")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(site), *files], check=True)
    (site / "bin" / "python").symlink_to(sys.executable)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    return site / "bin", env


def _importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"],
                          capture_output=True).returncode == 0


STOP_SECONDS = 15  # what the deployment gets to stop its daemons once told to


def deploy(pairs: str, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run scripts/local_deployment.sh; past `timeout`, stop it the way that lets it stop the
    daemons it started (SIGTERM to its whole process group, then its exit trap runs, for at
    most STOP_SECONDS). A SIGTERM to this process (an outer `timeout`) stops them the same way:
    they run in a session of their own, which that signal would not reach."""
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "local_deployment.sh"), pairs],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(wait: float) -> str:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.communicate(timeout=wait)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.communicate()[0]

    def terminated(signum, frame):
        stop(STOP_SECONDS)
        raise SystemExit(f"stopped by signal {signum}: the deployment's daemons were stopped")

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        return 124, stop(STOP_SECONDS) + f"\n(stopped after {timeout:.0f} s of deployment)"
    finally:
        signal.signal(signal.SIGTERM, before)


def experiment(args: argparse.Namespace, data_dir: Path, results_dir: Path) -> ExperimentConfig:
    config = get_preset(args.preset, variant=args.variant, profile="full")
    return config.replace(rounds=args.rounds, engine=args.engine, device=args.device,
                          data_dir=str(data_dir), results_dir=str(results_dir),
                          checkpoint_dir="", **parse_overrides(args.set))


def prepare_split(config: ExperimentConfig, splits: Path) -> dict:
    """Store the clients' split of `config`'s (fake) data in `splits`, as the run would."""
    from fedpara import task

    before = set(splits.glob("split-*.npz"))
    os.environ[SPLITS_ENV] = str(splits.resolve())
    task.client_data(config.replace(device="cpu"), 0)
    files = sorted(set(splits.glob("split-*.npz")) - before) or sorted(before)
    print(f"split stored in {splits}: {[f.name for f in files]}")
    return {"splits": [str(f) for f in files]}


def projection(config: ExperimentConfig, throughput_file: Path, train: int, test: int) -> dict:
    """The run's projected seconds per round from a throughput file, with what it used."""
    import throughput as tp  # benchmarks/throughput.py

    try:
        record = json.loads(Path(throughput_file).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--throughput {throughput_file}: cannot read it as a throughput "
                         f"record ({err}); benchmarks/throughput.py writes one") from None
    model = tp.preset_model(config.preset, config.variant)
    path = ENGINES_PATH[config.engine]
    if path == "cohort":
        cohort = record.get("cohort", {}).get(model, {})
        if cohort.get("clients") != config.clients_per_round:
            raise SystemExit(f"{throughput_file} has no cohort of {config.clients_per_round} "
                             f"clients for {model} (a throughput run stopped before its cohort "
                             f"part has none): run throughput.py --cohort "
                             f"{config.clients_per_round} --cohort-models {model}")
        rates = record.get("round_images_per_second", {})  # the cohort's rate, by model
        images_per_second = (rates[model] if model in rates
                             else cohort["images_per_second_together"])
        # the measurement's clients held equal shares, padded to whole batches: its rate per
        # padded slot (what the sampled rounds count) is the image rate times this
        share, batch = cohort["samples_per_client"], record["settings"]["batch"]
        slots_per_image = math.ceil(share / batch) * batch / share
    else:  # files from before the "default" alias name the default path separately
        rates = record["images_per_second"][model]
        path = path if path in rates else record.get("default_path") or "fast"
        images_per_second = rates[path]
    projected = tp.project_config(images_per_second, record["overheads"][model], config,
                                  train_images=train, test_images=test,
                                  cohort=config.engine == "cohort")
    return {"file": Path(throughput_file).name, "device": record["device"],
            "measured": record.get("date"), "threads": record.get("threads"),
            "model": model, "path": path,
            "images_per_second": images_per_second, "overheads": record["overheads"][model],
            **({"slots_per_image": slots_per_image} if path == "cohort" else {}),
            **projected}


def sampled_rounds(config: ExperimentConfig, projected: dict, sizes: list[list[int]],
                   tests: int) -> list[float]:
    """The projection of each round with the clients it sampled: `project_config`'s per-client
    overheads and evaluation, and the training of those clients' images (the cohort engine
    pads every client to the largest one's batches, so it trains K times the largest, at the
    measurement's rate per padded slot)."""
    import throughput as tp  # benchmarks/throughput.py

    seconds = []
    rate = projected["images_per_second"] * projected.get("slots_per_image", 1.0)
    for clients in sizes:
        if config.engine == "cohort":
            steps = max(math.ceil(n / config.batch_size) for n in clients)
            work = len(clients) * steps * config.batch_size  # padded slots
        else:
            work = sum(clients)
        seconds.append(tp.round_seconds(projected["overheads"], len(clients), work,
                                        config.local_epochs, rate, tests,
                                        cohort=config.engine == "cohort"))
    return seconds


def client_sizes(config: ExperimentConfig, rounds: list[list[int]]) -> list[list[int]]:
    """How many training images each sampled client of each round held."""
    from fedpara import task

    cpu = config.replace(device="cpu")
    return [[task.client_data(cpu, p).num_train for p in clients] for clients in rounds]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar10-noniid", choices=_cifar_presets())
    p.add_argument("--variant", default="fedpara")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--engine", default="cohort", choices=sorted(ENGINES_PATH))
    p.add_argument("--device", default="auto", help="the run's device (default: CUDA if "
                   "present, else the CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides (e.g. local_epochs=1); repeatable")
    p.add_argument("--train-images", type=int, default=None,
                   help="fake training images (default: the dataset's full size)")
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--wheels", type=Path, default=None, help="flwr's wheels, if not installed")
    p.add_argument("--splits", type=Path, default=ROOT / "benchmarks" / "device-splits",
                   help="$FEDPARA_SPLITS for the run (stored splits are read, new ones kept)")
    p.add_argument("--throughput", type=Path, default=None,
                   help="throughput-<device>.json measured on this machine, for the projection")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds for the whole script, setup included: the deployment is stopped "
                        "early enough for its daemons to stop within it")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the deployment's processes ($OMP_NUM_THREADS; default: "
                        "torch's own): match the throughput file's `threads` on a CPU")
    p.add_argument("--poll-seconds", type=float, default=None,
                   help="the ServerApp's wait between pulls for replies ($FEDPARA_POLL_SECONDS; "
                        "default: the ServerApp's own)")
    p.add_argument("--worker", action=argparse.BooleanOptionalAction, default=True,
                   help="the SuperNode's ClientApps forward their work to one long-lived "
                        "fedpara.worker (default), or train in the process Flower starts for "
                        "each message (--no-worker)")
    p.add_argument("--prepare", action="store_true",
                   help="only store the run's split in --splits (needs flwr-datasets) and stop")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/deployment-<device>.json)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    cli_checks.at_least(p, args, 1, "rounds", "train_images", "test_images")
    cli_checks.positive_seconds(p, "--poll-seconds", args.poll_seconds)
    cli_checks.positive_seconds(p, "--timeout", args.timeout, more_than=STOP_SECONDS)
    cli_checks.threads(p, args.threads)
    variants = PRESETS[args.preset].variants
    if args.variant not in variants:
        p.error(f"--variant {args.variant}: not one of {args.preset}'s; allowed: "
                f"{', '.join(variants)}")
    cli_checks.device(p, args.device)  # this machine has it (checked again in the run)
    cli_checks.out(p, args.out)

    with tempfile.TemporaryDirectory(prefix="fedpara-deployment-rounds-") as tmp:
        work = Path(tmp)
        try:  # the overrides checked first
            config = experiment(args, work / "data", work / "results")
        except ValueError as err:
            raise SystemExit(f"--set: {err}") from None
        full_train, full_test = FULL_SIZE[config.dataset]
        train, test = args.train_images or full_train, args.test_images or full_test
        # the projection's inputs, read before the run so that a wrong file stops it first
        projected = (projection(config, args.throughput, train, test)
                     if args.throughput is not None and not args.prepare else None)
        # Flower found (or its wheels installed) before the data is written
        bin_dir, env = (None, {}) if args.prepare else flower_bin(args.wheels, work)
        started = time.perf_counter()
        write_fake_cifar(work / "data", config.dataset, n_train=train, n_test=test)
        data_seconds = time.perf_counter() - started
        if args.prepare:
            return prepare_split(config, args.splits)
        env = {**os.environ, **env, "NODES": "1", "PARTITIONS": str(config.num_clients),
               "RESULTS_DIR": str(work / "results"), "VENV_BIN": str(bin_dir),
               "FEDPARA_SPLITS": str(args.splits.resolve()), "WORKER": str(int(args.worker))}
        env.pop(POLL_ENV, None)
        if args.poll_seconds is not None:
            env[POLL_ENV] = repr(args.poll_seconds)
        if args.threads is not None:  # read by torch in every process the deployment starts
            env["OMP_NUM_THREADS"] = str(args.threads)
        left = deadline - time.monotonic() - STOP_SECONDS
        if left <= 0:
            raise SystemExit(f"--timeout {args.timeout:g} s was spent on the setup "
                             f"(installing flwr, writing the data): no time left to deploy")
        started = time.perf_counter()
        status, output = deploy(run_config_pairs(config, without=("results-dir",)), env, left)
        run_seconds = time.perf_counter() - started
        if status != 0:
            sys.stderr.write(output[-6000:])
            raise SystemExit(f"the deployment run failed (status {status})")
        [history_path] = (work / "results").rglob("*.json")
        history = json.loads(history_path.read_text())
        os.environ[SPLITS_ENV] = str(args.splits.resolve())  # the run's split, read back
        sizes = client_sizes(config, [r["clients"] for r in history["records"]])

    walls = [r["wall_seconds"] for r in history["records"]]
    later = walls[1:] or walls
    record = {
        "benchmark": "deployment_rounds",
        "device": (history.get("hardware") or {}).get("device_name") or args.device,
        "hardware": history.get("hardware"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runtime": "Flower deployment: 1 SuperLink, 1 SuperNode holding every partition"
                   + (", its ClientApps forwarding to one fedpara.worker" if args.worker else ""),
        "worker": args.worker,
        "preset": config.preset, "variant": config.variant, "engine": config.engine,
        "config": config.to_dict(),
        "fake_images": {"train": train, "test": test},
        "server_poll_seconds": args.poll_seconds,  # null: the ServerApp's default
        # Flower's variable as the run had it; null: scripts/local_deployment.sh's default
        "superexec_poll_seconds": _float_or_none(env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL")),
        "threads": args.threads,  # null: torch's default in each process
        "data_seconds": data_seconds,
        "run_seconds": run_seconds,  # everything: daemons, `flwr run`, all rounds
        "round_wall_seconds": walls,
        "round_client_sizes": sizes,
        "median_round_seconds_after_first": statistics.median(later),
        "final_accuracy_on_fake_data": history["records"][-1]["accuracy"],
    }  # fmt: skip
    if projected is not None:
        # the average client's round (what the preset projections use), and each round with
        # its own sampled clients, which the measurement is compared with
        record["projection"] = projected
        tests = min(config.eval_samples, test) if config.eval_samples > 0 else test
        rounds = sampled_rounds(config, record["projection"], sizes, tests)
        record["projected_round_seconds"] = rounds
        record["median_projected_seconds_after_first"] = statistics.median(rounds[1:] or rounds)
        ratio = (record["median_round_seconds_after_first"]
                 / record["median_projected_seconds_after_first"])
        record["measured_to_projected"] = ratio
        record["within_20_percent"] = abs(ratio - 1) <= 0.2
    from fedpara.task import resolve_device  # "auto" is a device of the config, not torch's

    name = f"deployment-{slug(device_name(resolve_device(args.device)))}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    write_atomic(out, (json.dumps(record, indent=2) + "\n").encode())
    print(f"rounds (s): {[round(w, 2) for w in walls]}; after the first, median "
          f"{record['median_round_seconds_after_first']:.2f} s")
    if "projection" in record:
        print(f"projected with the sampled clients (s): "
              f"{[round(w, 2) for w in record['projected_round_seconds']]}; for the average "
              f"client {record['projection']['seconds_per_round']:.2f} s per round "
              f"({record['projection']['path']} path); measured/projected "
              f"{record['measured_to_projected']:.2f}")
    print(f"wrote {out}")
    return record


def run_summary(record: dict) -> dict:
    """What a comparison of several runs (benchmarks/server_poll.py, worker_rounds.py) keeps of
    one run's record: its rounds' wall times, their median after the first, the whole run."""
    return {key: record[key] for key in ("round_wall_seconds",
                                         "median_round_seconds_after_first", "run_seconds")}


def _cifar_presets() -> list[str]:
    from fedpara.config import PRESETS

    return sorted(name for name in PRESETS
                  if get_preset(name, profile="full").dataset in FULL_SIZE)


def _float_or_none(text: str | None) -> float | None:
    return None if text is None else float(text)


if __name__ == "__main__":
    main()
