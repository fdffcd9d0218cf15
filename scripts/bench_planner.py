#!/usr/bin/env python
"""The optimising planner against ONNX Runtime on each model's *original* ONNX (tf2onnx for
a Keras model, ``torch.onnx.export`` for torchvision's), on the CPU, with random non-zero
weights everywhere:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python scripts/bench_planner.py [--models mlp cnn mnv2 resnet18 ...] [--repeats 7]

For each model, in alternating blocks (each contender's: idle, a warm-up call, a timed call), medians:
gpu-mdf as written (``optimize=False``), gpu-mdf optimised (and optimised with its compiled CPU
kernels off, ``GPU_MDF_NUMBA=0``: NumPy's forms), ONNX Runtime on the original
ONNX and, for Keras models, ``tf.function``; the MLP also gets the time of its three GEMMs
alone in NumPy (OpenBLAS's sgemm: the floor under any NumPy engine). It checks both gpu-mdf
programs against ONNX Runtime first (1e-4 x max|y|). Then, on the strict CuPy stand-in
(``gpu_mdf.bench.standin_counts``), the kernel launches and the new device bytes of one
steady-state batch, as written, optimised, and replayed as a CUDA graph.

Where the time goes: on one CPU block of the optimised program (the items ``Program.run``
gives one thread; the whole batch for the MLP), on one thread, gpu-mdf, the matrix products
that run made (every ``matmul``, recorded with its operands and rerun alone: OpenBLAS's
sgemm, the floor under an engine whose convolutions are im2col and NumPy's matmul), and
ONNX Runtime with one intra-op thread on the same items.

Prints a Markdown table; ``--json`` writes the rows. Ratios are what to compare: the
machine's absolute speed moves 2x between runs. Unset OpenBLAS's variables in this
command only (they select slow kernels on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

KERAS = {"mlp": 10000, "cnn": 2048, "mnv2": 32}          # model -> batch
TORCHVISION = {"resnet18": "resnet18", "tv_mobilenet_v2": "mobilenet_v2", "efficientnet_b0": "efficientnet_b0"}
MODELS = [*KERAS, *TORCHVISION]


@dataclass
class Row:
    model: str
    batch: int
    ms: dict = field(default_factory=dict)          # contender -> median ms per batch
    launches: dict = field(default_factory=dict)    # "as written"/"optimised"/"CUDA graphs" -> launches per batch
    new_bytes: dict = field(default_factory=dict)   # same -> new device bytes per steady-state batch
    layers: int = 0
    notes: list = field(default_factory=list)
    cpu_kernels: str = ""
    one_thread: dict = field(default_factory=dict)  # items, and ms of gpu-mdf / its products alone / ORT


def _random_weights(model, seed=0):
    """Every weight random and non-zero; variances near 1 (BatchNormalization stays sane)."""
    r = np.random.default_rng(seed)
    for w in model.weights:
        base = 1.0 if "variance" in w.path or w.path.endswith("gamma") else 0.0
        scale = (1.0 / max(1, int(np.prod(w.shape[:-1])))) ** 0.5 if len(w.shape) >= 2 else 0.1
        w.assign((base + scale * r.standard_normal(w.shape)).astype("float32"))
    return model


def keras_model(name: str):
    from gpu_mdf.tfquiet import keras as _keras
    keras = _keras("the benchmark")
    keras.utils.set_random_seed(0)
    if name == "mnv2":
        return _random_weights(keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None))
    from gpu_mdf.config import load_config, reference_config
    from gpu_mdf.train import build_model
    cfg = reference_config() if name == "mlp" else load_config(ROOT / "configs" / "mnist_cnn.yaml")
    return _random_weights(build_model(cfg))


def keras_case(name: str, batch: int, tmp: Path):
    """(MDF document, input batch, original ONNX bytes, tf.function or None, keras model)."""
    import tf2onnx

    from gpu_mdf.convert import keras_to_mdf
    from gpu_mdf.tfquiet import tensorflow
    tf = tensorflow("the benchmark")
    model = keras_model(name)
    shape = tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(1).random((batch,) + shape).astype(np.float32)
    doc = keras_to_mdf(model)
    fn = tf.function(lambda t: model(t, training=False))
    spec = (tf.TensorSpec((None,) + shape, tf.float32, name="x"),)
    onnx_model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    return doc, x, onnx_model.SerializeToString(), lambda: fn(x).numpy(), model


def torchvision_case(name: str, batch: int, tmp: Path):
    import onnx
    from check_torchvision import export

    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    path = tmp / f"{name}.onnx"
    export(TORCHVISION[name], path, 224)
    x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    return onnx_to_mdf_doc(onnx.load(str(path)), model_id=name), x, path.read_bytes(), None, None


#: Seconds of idle before each block: ONNX Runtime's and OpenBLAS's worker threads spin for
#: 20-50 ms after their last work, and whatever runs then shares the cores with them (gpu-mdf
#: on the CNN at batch 8: 16 ms 5 ms after an ORT run, 2.8 ms 50 ms after).
SETTLE = 0.1


def alternating(fns: dict, repeats: int) -> dict:
    """Median ms of each function over ``repeats`` alternating blocks. A block is one
    function's: idle (:data:`SETTLE`, so the others' threads have stopped spinning), one
    untimed call (its own threads and caches warm, as in a run of many batches), one timed."""
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            time.sleep(SETTLE)
            f()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@contextlib.contextmanager
def numpy_forms():
    """gpu-mdf without its compiled CPU kernels (GPU_MDF_NUMBA=0): NumPy's forms of the ops."""
    before = os.environ.get("GPU_MDF_NUMBA")
    os.environ["GPU_MDF_NUMBA"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["GPU_MDF_NUMBA"]
        else:
            os.environ["GPU_MDF_NUMBA"] = before


def recorded_products(prog, x):
    """Run ``prog`` on ``x`` once, recording every matrix product it makes (operands copied
    in their memory order, so that BLAS sees the same layouts); returns a function making
    those products alone, and their count. A compiled kernel's products (inside it, one
    image at a time) count as one product over every image: a fused inverted residual's
    (``expand depthwise``) expansion (if it has one) with the same operands and its projection with zeros
    of its input's shape (the depthwise conv's values never leave the kernel); a conv by
    images' (``conv images``) with zeros of its columns' shape."""
    from gpu_mdf.engine.ops import cpu
    calls, real, call = [], np.matmul, cpu._call

    def record(a, b, *args, **kw):
        calls.append((np.copy(a, order="K"), np.copy(b, order="K")))
        return real(a, b, *args, **kw)

    def record_kernel(name, *args):
        y = call(name, *args)
        if name == "expand depthwise":
            xl, we, wp, project, expand = args[0], args[1], args[15], args[16], args[20]
            if expand:                          # (none before a first block's depthwise conv)
                calls.append((np.ascontiguousarray(xl).reshape(-1, xl.shape[-1]), np.copy(we)))
            if project:
                calls.append((np.zeros((y.size // y.shape[-1], wp.shape[0]), y.dtype), np.copy(wp)))
        elif name.startswith("conv images"):
            wm = args[1]
            calls.append((np.zeros((y.size // y.shape[-1], wm.shape[0]), y.dtype), np.copy(wm)))
        return y
    np.matmul, cpu._call = record, record_kernel
    try:
        prog.run(x, threads=1)
    finally:
        np.matmul, cpu._call = real, call

    def run():
        for a, b in calls:
            real(a, b)
    return run, len(calls)


def one_thread(prog, x, onnx_bytes, repeats: int) -> dict:
    """gpu-mdf, its products alone and ONNX Runtime on one block, each on one thread."""
    import onnxruntime as ort

    from gpu_mdf.engine.backend import blas_threads
    xb = x[:prog.block_size] if prog.block_size else x
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: xb}
    with blas_threads(1):
        products, n = recorded_products(prog, xb)
        ms = alternating({"gpu-mdf": lambda: prog.run(xb, threads=1), "products alone": products,
                          "ORT": lambda: sess.run(None, feed)}, repeats)
    return {"items": len(xb), "products": n, **ms}


def measure(name: str, repeats: int) -> Row:
    import onnxruntime as ort

    from gpu_mdf.engine import compile
    from gpu_mdf.engine.ops import cpu
    batch = KERAS.get(name, 32)
    row = Row(name, batch)
    with tempfile.TemporaryDirectory() as tmp:
        case = keras_case if name in KERAS else torchvision_case
        doc, x, onnx_bytes, tf_fn, model = case(name, batch, Path(tmp))
    if model is not None:
        row.layers = len(model.layers)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    want = sess.run(None, feed)[0]
    plain, opt = compile(doc, device="cpu", optimize=False), compile(doc, device="cpu")
    with numpy_forms():
        numpy_only = compile(doc, device="cpu")

    def run_numpy_forms():
        with numpy_forms():
            return numpy_only.run(x)
    row.notes = list(opt.plan.notes)
    row.cpu_kernels = cpu.describe()
    for label, run in (("as written", lambda: plain.run(x)), ("optimised", lambda: opt.run(x)),
                       ("optimised, NumPy forms", run_numpy_forms)):
        got = run()
        err = float(np.abs(got - want).max())
        if err > 1e-4 * float(np.abs(want).max()):
            raise SystemExit(f"{name}: gpu-mdf ({label}) differs from ONNX Runtime by {err:.3g}")
    fns = {"gpu-mdf as written": lambda: plain.run(x), "gpu-mdf optimised": lambda: opt.run(x),
           "gpu-mdf optimised, NumPy forms": run_numpy_forms, "ORT (original ONNX)": lambda: sess.run(None, feed)}
    if tf_fn is not None:
        fns["tf.function"] = tf_fn
    if name == "mlp":
        fns["GEMMs alone (NumPy)"] = recorded_products(opt, x)[0]
    row.ms = alternating(fns, repeats)
    row.one_thread = one_thread(opt, x, onnx_bytes, repeats)
    from gpu_mdf.bench import standin_counts
    for label, c in (standin_counts(doc, x[:4]) or {}).items():
        row.launches[label], row.new_bytes[label] = c["launches"], c["new_bytes"]
    return row


def table(rows: list[Row]) -> str:
    lines = ["| model | batch | as written | optimised | ORT (original ONNX) | optimised / ORT "
             "| optimised, NumPy forms / ORT | tf.function "
             "| optimised / tf.function | launches per batch (as written → optimised → CUDA graph replay) "
             "| new device bytes per batch |",
             "|---" * 11 + "|"]
    for r in rows:
        ms = r.ms
        tf = f"{ms['tf.function']:.2f} ms" if "tf.function" in ms else "—"
        tf_ratio = f"{ms['gpu-mdf optimised'] / ms['tf.function']:.2f}×" if "tf.function" in ms else "—"
        per_layer = f" ({r.launches['optimised'] / r.layers:.2f} per layer)" if r.layers else ""
        ort = ms["ORT (original ONNX)"]
        lines.append(f"| {r.model} | {r.batch} | {ms['gpu-mdf as written']:.2f} ms | {ms['gpu-mdf optimised']:.2f} ms "
                     f"| {ort:.2f} ms | {ms['gpu-mdf optimised'] / ort:.2f}× "
                     f"| {ms['gpu-mdf optimised, NumPy forms'] / ort:.2f}× | {tf} | {tf_ratio} "
                     f"| {r.launches['as written']} → {r.launches['optimised']}{per_layer} "
                     f"→ {r.launches['CUDA graphs']} | {r.new_bytes['optimised']:,} |")
    lines += ["", "Where the time goes, one block on one thread (products alone: the matrix products that "
              "run made, rerun alone with the same operands: OpenBLAS's sgemm):", "",
              "| model | items | gpu-mdf | its products alone | ORT, one thread | gpu-mdf / ORT "
              "| products alone / ORT |", "|---" * 7 + "|"]
    for r in rows:
        t = r.one_thread
        lines.append(f"| {r.model} | {t['items']} | {t['gpu-mdf']:.2f} ms | {t['products alone']:.2f} ms "
                     f"({t['products']} products) | {t['ORT']:.2f} ms | {t['gpu-mdf'] / t['ORT']:.2f}× "
                     f"| {t['products alone'] / t['ORT']:.2f}× |")
    for r in rows:
        if "GEMMs alone (NumPy)" in r.ms:
            lines.append(f"\n{r.model}: its GEMMs alone (OpenBLAS sgemm) take {r.ms['GEMMs alone (NumPy)']:.2f} ms "
                         f"({r.ms['GEMMs alone (NumPy)'] / r.ms['ORT (original ONNX)']:.2f}× ORT's whole model).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
        print("note: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set: NumPy's figures are slow kernels' "
              "(run under env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)", file=sys.stderr)
    if os.environ.get("GPU_MDF_BENCH_TUNE", "1") == "1":
        from gpu_mdf.engine import tune_host_allocator
        tune_host_allocator()      # as gpu-mdf bench and infer do: large temporaries stay in the heap
    rows = []
    for name in args.models:
        rows.append(measure(name, args.repeats))
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in rows[-1].ms.items()), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\nCPU kernels: {rows[0].cpu_kernels if rows else '?'} (the NumPy-forms column: GPU_MDF_NUMBA=0)")
    for r in rows:
        print(f"{r.model}: " + ("; ".join(r.notes) or "no pass changed anything"))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
