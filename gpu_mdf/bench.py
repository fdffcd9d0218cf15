"""Benchmark: gpu-mdf against ONNX Runtime, TensorFlow and modeci_mdf's EvaluableGraph.

One run, the same weights and the same 10k MNIST test images for every engine;
warm-ups, then repeated timings (median); every figure is printed with its ratio to
gpu-mdf's own time in the same run. A streaming case pushes N images (the test set
tiled into a ``.npy`` file read in chunks) through gpu-mdf in a fresh process that
imports no TensorFlow, and reports throughput and peak resident memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .data import load_mnist, normalize
from .engine import compile, cpu_threads, load_constants
from .errors import GpuMdfError
from .extras import hint, installed


def timeit(fn, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- #
# Inputs and engines
# --------------------------------------------------------------------------- #
def mdf_to_onnx(mdf, constants=None):
    """The MDF graph as an ONNX model (the ONNX Runtime baseline when there is no
    original ONNX file); ValueError for graphs with MDF expressions."""
    from .engine.onnx_export import to_onnx
    return to_onnx(compile(mdf, device="cpu", constants=constants))


def takes_mnist(prog) -> bool:
    """Whether the graph's input takes 784 values an item (MNIST's images, in any layout)."""
    spec = prog.primary_input
    item = tuple(spec.shape[1:]) if spec is not None and spec.shape else None
    return item is not None and -1 not in item and int(np.prod(item)) == 784


def bench_inputs(prog, batch: int | None):
    """The batch every engine gets: the MNIST test images (normalised as the graph says)
    for a graph taking 784 values an item; random normal data of the declared shape
    otherwise. Returns (array, description)."""
    spec = prog.primary_input
    if spec is None:
        raise GpuMdfError(f"the benchmark feeds one input; this graph takes {[p.describe() for p in prog.inputs]}"
                          " (bind the others with --constants)")
    item = tuple(spec.shape[1:]) if spec.shape else None
    if takes_mnist(prog):
        (_, _), (xte, _) = load_mnist()
        n = batch or len(xte)
        x = np.resize(xte, (n, 28, 28))
        return normalize(x, prog.normalize).reshape((n,) + item), f"{n:,} MNIST test images"
    if item is None or -1 in item:
        raise GpuMdfError(f"input {spec.name} has no fixed item shape ({spec.describe()}); cannot make data")
    n = batch or 64
    x = np.random.default_rng(0).standard_normal((n,) + item).astype(prog.dtype)
    return x, f"{n:,} random items of shape {item}"


def _openblas_note() -> str:
    bad = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.get(v)]
    if bad:
        return (f"WARNING: {' and '.join(bad)} set: NumPy may use slow BLAS kernels here "
                f"(time with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE ...`)")
    return "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"


def run_table(mdf_path, keras_path, repeats: int, skip: set[str], echo=print, onnx_path=None, constants=None,
              batch: int | None = None, precisions: tuple[str, ...] = (), cuda_graphs: bool = False) -> list[dict]:
    consts = load_constants(constants) if constants else None
    prog_cpu = compile(mdf_path, device="cpu", constants=consts)
    x, what = bench_inputs(prog_cpu, batch)
    echo(f"  data: {what}; {_openblas_note()}; {cpu_threads()} CPU threads")
    rows: list[dict] = []
    ref = outputs_of(prog_cpu, prog_cpu.run(x))

    def add(name, seconds, out=None):
        diff = None if out is None else max_diff(outputs_of(prog_cpu, out), ref)
        rows.append({"engine": name, "seconds": seconds, "images_per_s": len(x) / seconds,
                     "max_abs_diff_vs_gpu_mdf": diff})
        echo(f"  measured {name}: {seconds * 1e3:.2f} ms")
        return rows[-1]

    def skipped(name, why):
        echo(f"  {name}: not measured ({why})")

    add("gpu-mdf (NumPy, CPU)", timeit(lambda: prog_cpu.run(x), repeats), ref)
    add("gpu-mdf (NumPy, CPU, no NaN check)", timeit(lambda: prog_cpu.run(x, check=False), repeats), ref)
    as_written = compile(mdf_path, device="cpu", constants=consts, optimize=False)
    add("gpu-mdf (NumPy, CPU, as written: optimize=False)", timeit(lambda: as_written.run(x), repeats),
        as_written.run(x))
    from .engine.backend import probe_gpu
    probe = probe_gpu()
    if probe.usable:
        pg = compile(mdf_path, device="gpu", constants=consts)
        add("gpu-mdf (CuPy, device-resident)", *device_resident(pg, x, repeats))
        add("gpu-mdf (CuPy, from host float32)", timeit(lambda: pg.run(x), repeats), pg.run(x))
        if cuda_graphs:      # the warm-ups capture: the timed runs replay
            gg = compile(mdf_path, device="gpu", constants=consts, cuda_graphs=True)
            add("gpu-mdf (CuPy, CUDA graphs, device-resident)", *device_resident(gg, x, repeats))
            echo(f"  {gg.cuda_graphs.describe()}")
    else:
        skipped("CuPy", probe.reason)
        if cuda_graphs:
            skipped("CUDA graphs", probe.reason)
    if precisions:
        _precision_rows(mdf_path, consts, x, ref, precisions, repeats, probe, add, skipped, echo)

    if "onnxruntime" not in skip:
        _onnxruntime_row(mdf_path, keras_path, onnx_path, consts, x, repeats, add, skipped, echo)
    if "tensorflow" not in skip and keras_path and not installed("tensorflow"):
        skipped("TensorFlow", hint("tensorflow", "this baseline"))
    elif "tensorflow" not in skip and keras_path:
        from .tfquiet import keras as _keras
        from .tfquiet import tensorflow
        tf, keras = tensorflow(), _keras()
        model = keras.models.load_model(keras_path, compile=False, safe_mode=True)
        xk = x.reshape((len(x),) + tuple(model.input_shape[1:]))
        add(f"TensorFlow {tf.__version__} model.predict (batch {len(x)})",
            timeit(lambda: model.predict(xk, batch_size=len(xk), verbose=0), max(3, repeats // 4)),
            model.predict(xk, batch_size=len(xk), verbose=0))
        fn = tf.function(lambda t: model(t, training=False))
        xt = tf.constant(xk)
        add("TensorFlow tf.function", timeit(lambda: outputs_of(prog_cpu, fn(xt)), repeats), fn(xt))
    if "evaluablegraph" not in skip:
        _evaluable_graph_row(mdf_path, prog_cpu, x, consts, add, skipped)
    # measured again last: the spread between the two gpu-mdf rows shows this machine's drift
    add("gpu-mdf (NumPy, CPU), measured again last", timeit(lambda: prog_cpu.run(x), repeats), ref)
    base = rows[0]["seconds"]
    for r in rows:
        r["time_vs_gpu_mdf"] = r["seconds"] / base
    return rows


def _precision_rows(mdf_path, consts, x, ref, precisions, repeats, probe, add, skipped, echo):
    """The opt-in reduced precisions (``compile(precision=...)``), each timed and compared
    with float32's outputs: max |difference| and, for class scores, top-1 agreement."""
    def report(row, out, prog):
        outs = outputs_of(prog, out)
        row["top1_agreement_vs_gpu_mdf"] = agree = top1_agreement(outs[0], ref[0])
        scale = float(np.abs(ref[0]).max())
        echo(f"  {row['engine']}: max|diff| vs float32 {row['max_abs_diff_vs_gpu_mdf']:.2e} (max|y| {scale:.3g})"
             + ("" if agree is None else f"; top-1 agreement {agree:.2%} of {len(outs[0]):,} items"))

    for precision in precisions:       # the programs cast float inputs to their own type
        if precision == "fp16":
            p16 = compile(mdf_path, device="cpu", constants=consts, precision="fp16")
            out = p16.run(x)
            report(add("gpu-mdf (NumPy, CPU, fp16)", timeit(lambda p=p16: p.run(x), repeats), out), out, p16)
        if not probe.usable:
            skipped(f"gpu-mdf (CuPy, {precision})", probe.reason)
            continue
        pg = compile(mdf_path, device="gpu", constants=consts, precision=precision)
        seconds, out = device_resident(pg, x, repeats)
        report(add(f"gpu-mdf (CuPy, {precision}, device-resident)", seconds, out), out, pg)


def device_resident(prog, x, repeats: int) -> tuple[float, dict]:
    """(median seconds of a batch already on the device, synchronised after each run; its
    outputs on the host)."""
    feeds = {prog.primary_input.name: prog.prepare(x)}

    def run():
        prog.execute(feeds)
        prog.backend.synchronize()
    seconds = timeit(run, repeats)
    return seconds, {k: prog.backend.to_host(v) for k, v in prog.execute(feeds).items()}


def top1_agreement(out: np.ndarray, ref: np.ndarray) -> float | None:
    """The fraction of items whose largest score is at the same place (None unless both are
    (items, classes) with at least two classes)."""
    out, ref = np.asarray(out), np.asarray(ref)
    if ref.ndim != 2 or ref.shape[1] < 2 or out.shape != ref.shape:
        return None
    return float(np.mean(out.argmax(1) == ref.argmax(1)))


def _onnxruntime_row(mdf_path, keras_path, onnx_path, consts, x, repeats, add, skipped, echo):
    """ONNX Runtime on the model's own ONNX (:func:`original_onnx`), else on the MDF export."""
    missing = [m for m in ("onnxruntime", *(() if onnx_path else ("onnx",))) if not installed(m)]
    if missing:
        skipped("ONNX Runtime", hint(missing[0], "this baseline"))
        return
    try:
        import onnxruntime as ort
        model_bytes, label = original_onnx(onnx_path, keras_path, echo) or (
            mdf_to_onnx(mdf_path, consts).SerializeToString(),
            "the MDF graph as ONNX: no original (give --onnx-model, or --keras-model with tf2onnx)")
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        xo = x.reshape((len(x),) + tuple(d if isinstance(d, int) else -1 for d in inp.shape[1:])) \
            if len(inp.shape) != x.ndim else x
        add(f"ONNX Runtime {ort.__version__} (CPU, {label})", timeit(lambda: sess.run(None, {inp.name: xo}),
                                                                    repeats), sess.run(None, {inp.name: xo}))
        # the session (whose threads spin-wait after each run) ends with this function,
        # before the next engine is timed
    except (ImportError, ValueError, OSError) as e:
        skipped("ONNX Runtime", e)
    except Exception as e:  # an ONNX Runtime refusal of the model
        skipped("ONNX Runtime", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def original_onnx(onnx_path, keras_path, echo=print) -> tuple[bytes, str] | None:
    """The model's own ONNX, ONNX Runtime's fair input: the file given, or tf2onnx's export
    of the Keras model (where tf2onnx is installed); None when there is neither."""
    if onnx_path:
        return Path(onnx_path).read_bytes(), "the original ONNX file"
    if not keras_path or not installed("tf2onnx") or not installed("tensorflow"):
        return None
    import tf2onnx

    from .tfquiet import keras as _keras
    from .tfquiet import tensorflow
    tf, keras = tensorflow(), _keras()
    model = keras.models.load_model(keras_path, compile=False, safe_mode=True)
    spec = tuple(tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=f"input_{i}")
                 for i, t in enumerate(model.inputs))
    fn = tf.function(lambda *t: model(list(t) if len(t) > 1 else t[0], training=False))
    try:
        onnx_model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    except Exception as e:        # a model tf2onnx cannot export: the MDF export instead, said
        echo(f"  tf2onnx could not export the Keras model ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return None
    return onnx_model.SerializeToString(), "tf2onnx of the Keras model"


def standin_counts(mdf_path, x, constants=None) -> dict | None:
    """Kernel launches and new device bytes of one steady-state batch on the strict CuPy
    stand-in (a GPU's costs, counted on the CPU): optimised, as written, and optimised and
    replayed as a CUDA graph (the input's normalisation, outside the graph, included)."""
    from .engine import standin
    if standin.c_compiler() is None:
        return None
    consts = load_constants(constants) if constants else None
    out = {}
    with standin.installed() as backend:
        for label, optimize, graphs in (("optimised", True, False), ("as written", False, False),
                                        ("CUDA graphs", True, True)):
            prog = compile(mdf_path, device=backend, constants=consts, optimize=optimize, cuda_graphs=graphs)
            prog.run(x)
            prog.run(x)
            standin.COUNT.reset()
            prog.run(x)
            out[label] = {"launches": standin.COUNT.launches, "new_bytes": standin.COUNT.new_bytes,
                          "pool_bytes": standin.COUNT.alloc_bytes, "syncs": standin.COUNT.d2h_syncs}
    return out


def outputs_of(prog, out) -> list[np.ndarray]:
    """An engine's result as a list of host arrays in the graph's output order: one
    array, a list (Keras, ONNX Runtime: in the model's order, which the converter keeps),
    or a dict by output name (gpu-mdf)."""
    if isinstance(out, dict):
        return [np.asarray(out[o.name]) for o in prog.outputs if o.name in out]
    if isinstance(out, (list, tuple)):
        return [np.asarray(o) for o in out]
    return [np.asarray(out)]


def max_diff(outs: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """The largest |difference| over the outputs an engine gives (the first k of the graph's)."""
    return max(float(np.abs(np.asarray(o, np.float64).reshape(r.shape) - r).max()) for o, r in zip(outs, ref))


def _evaluable_graph_row(mdf_path, prog, x, consts, add, skipped):
    if not installed("modeci_mdf"):
        skipped("modeci_mdf EvaluableGraph", hint("modeci_mdf", "this baseline"))
        return
    import contextlib
    import io

    from modeci_mdf.execution_engine import EvaluableGraph

    from .viz import modeci_model
    o = prog.outputs[0]
    init = dict(consts or {})
    for p in prog.inputs:
        init[p.name] = x.astype(np.float64) if p is prog.primary_input else p.default

    def eg_run():
        eg = EvaluableGraph(mm.graphs[0], verbose=False)
        eg.evaluate(initializer=init)
        return eg.enodes[o.node].evaluable_outputs[o.port].curr_value
    try:
        mm = modeci_model(mdf_path, len(x))   # a symbolic size ("n"): modeci_mdf cannot read its own
        with contextlib.redirect_stdout(io.StringIO()):
            out = eg_run()
            add("modeci_mdf EvaluableGraph", timeit(eg_run, 2, warmup=0), out)
    except Exception as e:
        skipped("modeci_mdf EvaluableGraph", f"it failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def stream_case(mdf_path, n: int, batch_size: int | None, constants=None) -> dict:
    """Stream n items from a .npy file in a fresh process (no TensorFlow) and measure."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _tiled_npy(Path(tmp) / "tiled.npy", n, _stream_items(mdf_path, constants))
        code = "import sys; from gpu_mdf.bench import _stream_child; _stream_child(*sys.argv[1:])"
        r = subprocess.run([sys.executable, "-c", code, str(mdf_path), str(path), str(batch_size or 0),
                            str(constants or "")], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"stream case failed: {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def _stream_items(mdf_path, constants) -> np.ndarray | None:
    """What the stream tiles: None (MNIST's test images, uint8) for a graph taking 784
    values an item, else the benchmark's own items of the graph's input shape."""
    prog = compile(mdf_path, device="cpu", constants=load_constants(constants) if constants else None)
    return None if takes_mnist(prog) else bench_inputs(prog, 1024)[0]


def _stream_child(mdf_path: str, data_path: str, batch_size: str, constants: str = "") -> None:
    """The streaming measurement, run in its own process; prints one JSON line."""
    from .data import open_dataset
    from .engine import tune_host_allocator

    tune_host_allocator()
    prog = compile(mdf_path, device="auto", constants=load_constants(constants) if constants else None)
    ds = open_dataset(data_path, invert="no")
    bs = prog.suggest_batch_size(int(batch_size) or None)
    t0, images = time.perf_counter(), 0
    for y in prog.run_many(x for _, x in ds.chunks(bs)):
        images += len(outputs_of(prog, y)[0])
    seconds = time.perf_counter() - t0
    print(json.dumps({"images": images, "seconds": seconds, "images_per_s": images / seconds,
                      "batch_size": bs, "device": prog.backend.device, "peak_rss_mb": _peak_rss_mb(),
                      "tf_imported": "tensorflow" in sys.modules}))


def _peak_rss_mb() -> float:
    """This address space's peak (VmHWM); ru_maxrss would inherit the parent's across fork."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tiled_npy(path: Path, n: int, items: np.ndarray | None = None) -> Path:
    """n items in a .npy file: ``items`` (default: MNIST's test images) repeated."""
    if items is None:
        (_, _), (items, _) = load_mnist()
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=items.dtype, shape=(n,) + items.shape[1:])
    for lo in range(0, n, len(items)):
        hi = min(lo + len(items), n)
        arr[lo:hi] = items[: hi - lo]
    arr.flush()
    del arr
    return path


def cluster_scaling(mdf_path, n: int, batch_size: int = 32768, echo=print, repeats: int = 2,
                    constants=None) -> list[dict]:
    """The same n-image job as one process, on local:1 and on local:2 (Dask); each
    job runs ``repeats`` times and the fastest run is reported."""
    from .batch import run_inference

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _tiled_npy(Path(tmp) / "tiled.npy", n, _stream_items(mdf_path, constants))
        outs = {}
        for label, cluster in (("single process", None), ("--cluster local:1", "local:1"),
                               ("--cluster local:2", "local:2")):
            best = None
            for attempt in range(repeats):  # each job twice, the faster kept: this VM is noisy
                out = Path(tmp) / f"{label.replace(' ', '_').replace(':', '')}_{attempt}"
                res = run_inference(mdf_path, out, source=str(data), device="cpu", batch_size=batch_size,
                                    progress=False, log=lambda *_: None, cluster=cluster, constants=constants)
                if best is None or res.metrics["seconds"] < best[1].metrics["seconds"]:
                    best = (out, res)
            out, res = best
            outs[label] = out
            rows.append({"job": label, "images": n, "seconds": res.metrics["seconds"],
                         "images_per_s": res.images_per_s})
            echo(f"  measured {label}: {res.metrics['seconds']:.2f} s (best of {repeats})")
        first = outs["single process"]
        compared = ["predictions.csv", *(o["file"] for o in best[1].metrics["outputs"])]
        for r in rows:
            r["identical_files"] = all((outs[r["job"]] / f).read_bytes() == (first / f).read_bytes()
                                       for f in compared)
    base = next(r for r in rows if r["job"] == "--cluster local:1")["images_per_s"]
    for r in rows:
        r["vs_local_1"] = r["images_per_s"] / base
    return rows


def render(rows: list[dict]) -> str:
    w = max(len(r["engine"]) for r in rows)
    lines = [f"{'engine':<{w}}  {'ms':>10}  {'images/s':>13}  {'time vs gpu-mdf':>15}  {'max|diff|':>9}",
             "-" * (w + 56)]
    for r in rows:
        d = "" if r["max_abs_diff_vs_gpu_mdf"] is None else f"{r['max_abs_diff_vs_gpu_mdf']:.1e}"
        lines.append(f"{r['engine']:<{w}}  {r['seconds'] * 1e3:>10.2f}  {r['images_per_s']:>13,.0f}  "
                     f"{r['time_vs_gpu_mdf']:>14.2f}x  {d:>9}")
    return "\n".join(lines)


def main(mdf_file, keras_model, repeats, stream, skip, json_out, echo=print, cluster_scaling_n=0,
         onnx_model=None, constants=None, batch=None, standin=False, precisions=(), cuda_graphs=False):
    if mdf_file is None and keras_model is None:
        raise GpuMdfError("give an MDF file (and --keras-model for the TensorFlow baselines)")
    if mdf_file is not None:
        from .convert.sources import model_kind, resolve_model
        if model_kind(mdf_file) == "onnx":          # ONNX Runtime runs the file itself
            onnx_model = onnx_model or mdf_file
            mdf_file = resolve_model(mdf_file, "none", log=echo)
    if mdf_file is None:  # convert the given Keras model
        from .convert import keras_to_mdf, load_keras_model, save_mdf
        tmp = Path(tempfile.mkdtemp()) / "bench.json"
        mdf_file = save_mdf(keras_to_mdf(load_keras_model(keras_model), normalize="l2"), tmp)
    echo(f"benchmark: {mdf_file}, median of {repeats} after warm-ups")
    rows = run_table(mdf_file, keras_model, repeats, skip, echo, onnx_path=onnx_model, constants=constants,
                     batch=batch, precisions=tuple(precisions), cuda_graphs=cuda_graphs)
    echo("")
    echo(render(rows))
    result = {"rows": rows}
    if standin:
        prog = compile(mdf_file, device="cpu", constants=load_constants(constants) if constants else None)
        x, what = bench_inputs(prog, min(batch or 64, 64))
        counts = standin_counts(mdf_file, x, constants)
        echo("")
        if counts is None:
            echo("stand-in: not counted (it runs generated CUDA C on the host and no C compiler was found)")
        else:
            result["standin"] = counts
            echo(f"strict CuPy stand-in, one steady-state batch of {what}: kernel launches "
                 f"{counts['optimised']['launches']} optimised ({counts['as written']['launches']} as written, "
                 f"{counts['CUDA graphs']['launches']} replayed as a CUDA graph); "
                 f"new device bytes {counts['optimised']['new_bytes']:,}; pool bytes used "
                 f"{counts['optimised']['pool_bytes']:,}; device->host syncs {counts['optimised']['syncs']}")
    if stream:
        s = stream_case(mdf_file, stream, None, constants)
        result["stream"] = s
        echo("")
        echo(f"stream: {s['images']:,} images from a .npy file on {s['device']} in {s['seconds']:.2f} s = "
             f"{s['images_per_s']:,.0f} images/s; batch {s['batch_size']}; peak RSS {s['peak_rss_mb']:.0f} MB; "
             f"TensorFlow imported: {s['tf_imported']}")
    if cluster_scaling_n:
        echo("")
        echo(f"Dask scaling: a {cluster_scaling_n:,}-image job (a .npy file, batch 32768), chunk phase, "
             "best of 2 runs each")
        rows = cluster_scaling(mdf_file, cluster_scaling_n, echo=echo, constants=constants)
        result["cluster_scaling"] = rows
        echo(f"{'job':<20} {'seconds':>8} {'images/s':>12} {'vs local:1':>10}  identical files")
        for r in rows:
            echo(f"{r['job']:<20} {r['seconds']:>8.2f} {r['images_per_s']:>12,.0f} {r['vs_local_1']:>9.2f}x  "
                 f"{r['identical_files']}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result
