#!/usr/bin/env bash
# The prepared GPU check: for a machine with an NVIDIA GPU and CuPy, possibly no
# TensorFlow and no network. Needs the bundle made by scripts/prepare_gpu_check.py
# (on any machine with TensorFlow). Runs the GPU tests and the GPU benchmark and
# prints one table. Budget: under 5 minutes on one GPU.
#
#   bash scripts/gpu_check.sh [BUNDLE_DIR=gpu_check_bundle] [IMAGES=1000000]
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-gpu_check_bundle}
IMAGES=${2:-1000000}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GPU_MDF_CHECK_DIR="$PWD/$BUNDLE"
status=0

[ -f "$BUNDLE/reference.mdf.json" ] || { echo "missing $BUNDLE/reference.mdf.json: run scripts/prepare_gpu_check.py"; exit 2; }
echo "== gpu-mdf info"
$PY -m gpu_mdf info --no-tensorflow || status=1
echo "== GPU tests (pytest -m gpu)"
if $PY -c "import pytest" 2>/dev/null; then
  timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -o addopts="" || status=1
else
  echo "pytest not installed: tests skipped"; status=1
fi
echo "== GPU benchmark"
timeout 120 $PY scripts/gpu_bench.py "$BUNDLE" --images "$IMAGES" || status=1
exit $status
