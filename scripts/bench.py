#!/usr/bin/env python
"""Benchmark gpu-mdf against ONNX Runtime, TensorFlow and EvaluableGraph.

    python scripts/bench.py [MDF_FILE] [--keras-model M.keras] [--stream 1000000]

Same as ``gpu-mdf bench``. Without arguments it uses runs/mnist_dense from
``make run`` (model.mdf.json and model.keras).
"""

import sys
from pathlib import Path

from gpu_mdf.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    run = Path("runs/mnist_dense")
    if not any(a.endswith((".json", ".yaml")) for a in args) and (run / "model.mdf.json").exists():
        args = [str(run / "model.mdf.json"), "--keras-model", str(run / "model.keras")] + args
    sys.exit(main(["bench", *args]))
