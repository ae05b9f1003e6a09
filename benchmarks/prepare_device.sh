#!/usr/bin/env bash
# Prepare, on a machine with the package registry and the venv, what the GPU check's deployment
# step needs on a GPU machine that has torch but neither flwr nor a network:
#   benchmarks/device-wheels/  flwr (the version installed here) and its dependencies as wheels
#                              for that machine's Python (DEVICE_PYTHON, default 3.12,
#                              manylinux x86_64), without numpy (it has it) and uv (runtime
#                              dependency installation is off)
#   benchmarks/device-splits/  the clients' split of the fake CIFAR-10 the step writes, which
#                              needs flwr-datasets to compute (fedpara.partition, $FEDPARA_SPLITS)
# Both folders are git-ignored: carry them to the device with the working tree.
#
#   bash benchmarks/prepare_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
WHEELS=benchmarks/device-wheels
FLWR_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("flwr"))')"
rm -rf "$WHEELS"
"$PY" -m pip download --quiet --disable-pip-version-check "flwr==$FLWR_VERSION" \
  --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$WHEELS"
rm -f "$WHEELS"/numpy-*.whl "$WHEELS"/uv-*.whl
echo "wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
"$PY" benchmarks/deployment_rounds.py --prepare --splits benchmarks/device-splits "$@"
