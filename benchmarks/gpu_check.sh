#!/usr/bin/env bash
# The GPU check: one script for a fresh machine with torch, torchvision and matplotlib only
# (no flwr, no Ray, no internet). From the repository root:
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine: at most 6 minutes
#   PYTHON=python bash benchmarks/gpu_check.sh        # when torch is not in python3
#   GPU_CHECK_PARALLEL="1 2 4" bash benchmarks/gpu_check.sh   # also the side-by-side processes
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # a quick run on a CPU
#
# Steps (each under its own time limit: with the environment probe's, the limits add up to
# 360 s, so the whole stays within 6 minutes, 405 s with GPU_CHECK_PARALLEL; a failed step does
# not stop the others, and the exit status says whether any failed):
#   1. benchmarks/throughput.py: training images/s of VGG16-GN original / FedPara 0.1 / 0.4, the
#      baseline's way vs the fast path (+ ablations) and the captured CUDA-graph step,
#      overheads, projected preset wall times, 16 clients trained together (fedpara/cohort.py)
#      against one after the other, and two agreement checks with dropout off: together vs
#      apart, graphed vs eager (FedPara 0.1 first, the file rewritten after each model, so a
#      time limit loses the last model's part first)  -> throughput-<device>.json
#      Not measured unless GPU_CHECK_PARALLEL is set: the side-by-side processes
#      (throughput.py --parallel 1 2 4; the step's limit then grows by 45 s, past 6 minutes).
#      A full run without them writes a throughput file without `parallel_clients`, and
#      book/performance.md shows a note in their place.
#   2. a 2-round FedAvg smoke over fedpara.task without Flower, fast and plain path, on fake
#      CIFAR-10 files                                   -> gpu-smoke-<device>.json
#   3. benchmarks/layer_overhead.py with the eager fast path's settings (task.Speed.default on
#      CUDA without its graph: float32, channels-last, cuDNN autotuning)
#                                                       -> layer_overhead-<device>.json
#   4. benchmarks/deployment_rounds.py: 2 rounds of cifar10-noniid/fedpara (E = 1) through
#      Flower's deployment runtime (a SuperLink and one SuperNode holding all 100 partitions,
#      the cohort engine, its ClientApps forwarding to one long-lived fedpara.worker) on
#      full-size fake CIFAR-10, each round's wall time against the projection from step 1's
#      file                                              -> deployment-<device>.json
#      Needs flwr: installed, or its wheels in benchmarks/device-wheels with the split in
#      benchmarks/device-splits, which benchmarks/prepare_device.sh makes on a machine with a
#      network (carry both folders to the device). Without either, the step fails (is skipped
#      in the tiny mode).
# Results go to $OUT when it is set (the device tool's output folder), else benchmarks/results/.
# Copy them into benchmarks/results/ and commit them; book/performance.md reads them from there.
# GPU_CHECK_TINY=1 shrinks every step to seconds: it checks the script, it measures nothing, so
# without $OUT its files go to a new temporary folder, never over the committed results.
# Its deployment step keeps the full-size fake training set, so that it reads the split that
# prepare_device.sh stored: with the wheels and the split, it rehearses the device's step 4.
# To rehearse with the GPU machine's software on a CPU, give PYTHON a Python 3.12 venv holding
# only that machine's torch and torchvision (2.11.0 and 0.26.0 on the H200 of 2026-11; from
# PyPI with --no-deps, their CUDA libraries taken from an installed CUDA build of torch),
# numpy and matplotlib.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install needed
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
case "${GPU_CHECK_TINY:-0}" in  # anything else would run the full check into benchmarks/results
  0 | 1) ;;
  *) echo "GPU_CHECK_TINY must be 0 or 1, got '${GPU_CHECK_TINY}'" >&2; exit 2 ;;
esac
if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  RESULTS="${OUT:-$(mktemp -d -t fedpara-gpu-check-tiny.XXXXXX)}"
else
  RESULTS="${OUT:-benchmarks/results}"
fi
mkdir -p "$RESULTS"
echo "results: $RESULTS"

if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  THROUGHPUT=(--batch 4 --samples 4 --repeats 2 --gammas 0.1 --paths baseline plain fast
              --eval-samples 4 --threads 1 --cohort 2)
  SMOKE=(--smoke-rounds 1 --smoke-clients 2 --smoke-samples 8 --batch 4 --threads 1)
  OVERHEAD=(--repeats 1 --steps 1 --batch 4 --threads 1 --variants original fedpara)
  DEPLOY=(--rounds 1 --set clients_per_round=2 --set client_samples=8 --set local_epochs=1
          --set eval_samples=16 --test-images 100)
else
  THROUGHPUT=(--repeats 3 --cohort 16 --cohort-models fedpara-0.1 original)
  SMOKE=(--smoke-rounds 2)
  OVERHEAD=(--channels-last --cudnn-benchmark)
  DEPLOY=(--rounds 2 --set local_epochs=1)
fi
# time limits (s): the environment probe and the four steps, 20 + 150 + 35 + 30 + 125 = 360
# (sized from the steps' times on an H200, "ok in N s" in benchmarks/results/gpu_check.log,
# where the deployment's rounds each paid a fresh ClientApp process's imports, device and data;
# the worker now pays them once)
ENV_LIMIT=20 THROUGHPUT_LIMIT=150 SMOKE_LIMIT=35 OVERHEAD_LIMIT=30 DEPLOY_LIMIT=125
read -r -a PARALLEL <<< "${GPU_CHECK_PARALLEL:-}"
if ((${#PARALLEL[@]})); then
  THROUGHPUT+=(--parallel "${PARALLEL[@]}")
  THROUGHPUT_LIMIT=$((THROUGHPUT_LIMIT + 45))
  echo "side-by-side processes ${PARALLEL[*]}: the throughput step's limit is ${THROUGHPUT_LIMIT} s"
else
  echo "side-by-side processes not measured (GPU_CHECK_PARALLEL=\"1 2 4\" adds them): the" \
    "throughput file will have no parallel_clients"
fi
WHEELS="${GPU_CHECK_WHEELS:-benchmarks/device-wheels}"  # flwr's wheels (prepare_device.sh)
if [[ -d "$WHEELS" ]]; then
  DEPLOY+=(--wheels "$WHEELS")
fi

# what the machine has (environment.txt), and the device's name as a file-name slug
ENV_SCRIPT='
import platform, sys, torch, torchvision
sys.path.insert(0, "benchmarks")
from layer_overhead import device_name, slug
from fedpara.storage import write_atomic
lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
         f"torchvision {torchvision.__version__}", f"cuda available {torch.cuda.is_available()}"]
if torch.cuda.is_available():
    lines += [f"device {torch.cuda.get_device_name()}", f"cuda {torch.version.cuda}",
              f"cudnn {torch.backends.cudnn.version()}"]
for name in ("flwr", "ray"):
    try:
        __import__(name)
        lines.append(f"{name} importable")
    except ImportError:
        lines.append(f"{name} not installed")
write_atomic(sys.argv[1], ("\n".join(lines) + "\n").encode())
print("\n".join(lines), file=sys.stderr)
print(slug(device_name(torch.device(sys.argv[2]))))
'
SLUG=$(timeout "$ENV_LIMIT" "$PY" -c "$ENV_SCRIPT" "$RESULTS/environment.txt" "$DEVICE") \
  || { echo "no torch, no benchmarks or no $DEVICE device here: nothing measured"; exit 1; }
echo "device slug: $SLUG"

failed=0
step() {  # step <name> <seconds> <command...>
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  if timeout "$limit" "$@"; then
    echo "== $name: ok in $((SECONDS - start)) s"
  else
    echo "== $name: FAILED (status $?) after $((SECONDS - start)) s"
    failed=1
  fi
}

step throughput "$THROUGHPUT_LIMIT" "$PY" benchmarks/throughput.py --device "$DEVICE" \
  "${THROUGHPUT[@]}" --out "$RESULTS/throughput-$SLUG.json"
step smoke "$SMOKE_LIMIT" "$PY" benchmarks/throughput.py --device "$DEVICE" --smoke-only \
  "${SMOKE[@]}" --out "$RESULTS/gpu-smoke-$SLUG.json"
step layer_overhead "$OVERHEAD_LIMIT" "$PY" benchmarks/layer_overhead.py --device "$DEVICE" \
  "${OVERHEAD[@]}" --out "$RESULTS/layer_overhead-$SLUG.json"
if [[ "${GPU_CHECK_TINY:-0}" == 1 && ! -d "$WHEELS" ]] && ! "$PY" -c "import flwr" 2>/dev/null
then
  echo "== deployment: skipped (no flwr and no $WHEELS; the tiny mode only)"
else
  # its --timeout counts the setup and leaves its daemons the time to stop inside the step's
  step deployment "$DEPLOY_LIMIT" "$PY" benchmarks/deployment_rounds.py --device "$DEVICE" \
    "${DEPLOY[@]}" --timeout $((DEPLOY_LIMIT - 2)) --throughput "$RESULTS/throughput-$SLUG.json" \
    --out "$RESULTS/deployment-$SLUG.json"
fi

ls -l "$RESULTS"
exit $failed
