#!/usr/bin/env python
"""Time per image against batch size and model size, on the CPU: where the engine's per-op
overhead stops mattering.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python scripts/bench_scaling.py [--models mlp cnn mnv2 resnet50] [--max-seconds 3]

Models (random non-zero weights): the reference MLP and the CNN config (MNIST), Keras's
MobileNetV2 (alpha 0.35, 96x96) and ResNet50 (64x64, the smallest input it takes times two).
Batch sizes 1, 8, 64, 512, 4096, 8192; a model stops growing its batch once one run passes
``--max-seconds`` (ResNet50 at 8,192 images would take minutes here). Each cell is the
median of 5 runs after a warm-up, in alternating blocks on quiet cores
(``bench_planner.alternating``), in microseconds per image, for gpu-mdf optimised and for
ONNX Runtime on tf2onnx's export of the same model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCHES = (1, 8, 64, 512, 4096, 8192)
RUNS = 5                      # medians of 5 timed runs after one warm-up


def model_of(name: str):
    from bench_planner import _random_weights, keras_model
    if name in ("mlp", "cnn", "mnv2"):
        return keras_model(name)
    from gpu_mdf.tfquiet import keras as _keras
    keras = _keras("the benchmark")
    keras.utils.set_random_seed(0)
    return _random_weights(keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "mnv2", "resnet50"])
    ap.add_argument("--max-seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import tf2onnx
    from bench_planner import alternating

    from gpu_mdf.convert import keras_to_mdf
    from gpu_mdf.engine import compile
    from gpu_mdf.tfquiet import tensorflow
    tf = tensorflow("the benchmark")
    print("| model | params | " + " | ".join(f"batch {b:,}" for b in BATCHES) + " |")
    print("|---|---|" + "---|" * len(BATCHES))
    for name in args.models:
        model = model_of(name)
        shape = tuple(model.inputs[0].shape[1:])
        prog = compile(keras_to_mdf(model), device="cpu")
        spec = (tf.TensorSpec((None,) + shape, tf.float32, name="x"),)
        onnx_model, _ = tf2onnx.convert.from_function(tf.function(lambda t, m=model: m(t, training=False)),
                                                      input_signature=spec, opset=17)
        sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        cells = []
        for b in BATCHES:
            x = np.random.default_rng(0).random((b,) + shape, dtype=np.float32)
            ms = alternating({"ours": lambda p=prog, x=x: p.run(x, check=False),
                              "ORT": lambda s=sess, x=x: s.run(None, {"x": x})}, RUNS)
            ours, theirs = ms["ours"] / 1e3, ms["ORT"] / 1e3
            cells.append(f"{ours / b * 1e6:,.1f} µs ({ours / theirs:.2f}× ORT)")
            print(f"{name} batch {b}: {ours * 1e3:.2f} ms, ORT {theirs * 1e3:.2f} ms", file=sys.stderr, flush=True)
            if max(ours, theirs) > args.max_seconds:
                break
        cells += ["—"] * (len(BATCHES) - len(cells))
        print(f"| {name} | {model.count_params() / 1e6:.2f} M | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
