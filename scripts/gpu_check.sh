#!/usr/bin/env bash
# The prepared GPU check: for a machine with an NVIDIA GPU and CuPy, possibly no
# TensorFlow and no network. Needs the bundle made by scripts/prepare_gpu_check.py
# (on any machine with TensorFlow). Runs gpu-mdf info, the GPU tests (CuPy vs NumPy on
# every bundle model, no synchronisation inside a batch, streaming, bulk inference,
# memory caps, OOM splitting) and the GPU benchmark table. Budget: under 5 minutes.
#
#   bash scripts/gpu_check.sh [BUNDLE_DIR=gpu_check_bundle] [IMAGES=1000000]
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-gpu_check_bundle}
IMAGES=${2:-1000000}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GPU_MDF_CHECK_DIR="$PWD/$BUNDLE"
status=0

[ -f "$BUNDLE/bundle.json" ] || { echo "missing $BUNDLE/bundle.json: run scripts/prepare_gpu_check.py"; exit 2; }
echo "== gpu-mdf info"
$PY -m gpu_mdf info --no-tensorflow || status=1
echo "== GPU tests (pytest -m gpu)"
if $PY -c "import pytest" 2>/dev/null; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -o addopts="" || status=1
else
  echo "pytest not installed: tests skipped"; status=1
fi
echo "== GPU benchmark"
timeout 120 $PY scripts/gpu_bench.py "$BUNDLE" --images "$IMAGES" || status=1
exit $status
