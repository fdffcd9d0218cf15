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
from .engine import compile, load_mdf_dict
from .engine.ops import lookup
from .errors import GpuMdfError


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
# MDF -> ONNX for graphs made of onnx:: functions (the gpu-mdf converter's output)
# --------------------------------------------------------------------------- #
def mdf_to_onnx(mdf, opset: int = 17):
    """An ONNX model computing the same graph with the same weights.

    Supports graphs whose functions are ``onnx::`` ops and whose output ports and
    input-node outputs name a value directly; raises ValueError otherwise.
    """

    from onnx import TensorProto, helper, numpy_helper

    d = load_mdf_dict(mdf)
    (_, m), = d.items()
    (_, g), = m["graphs"].items()
    meta = (g.get("metadata") or {}).get("gpu_mdf", {})
    nodes, inits, inputs = [], [], []
    edges = {(e["receiver"], e["receiver_port"]): (e["sender"], e["sender_port"])
             for e in g.get("edges", {}).values()}
    port_value: dict[tuple[str, str], str] = {}

    def q(nid, name):
        return f"{nid}/{name}"

    order = list(g["nodes"])  # the converter writes nodes in topological order
    for nid in order:
        n = g["nodes"][nid]
        for pid, p in n.get("input_ports", {}).items():
            if (nid, pid) in edges:
                nodes.append(helper.make_node("Identity", [port_value[edges[(nid, pid)]]], [q(nid, pid)]))
            else:
                shape = ["N"] + list(p["shape"][1:])
                inputs.append(helper.make_tensor_value_info(q(nid, pid), TensorProto.FLOAT, shape))
        for pid, p in n.get("parameters", {}).items():
            inits.append(numpy_helper.from_array(np.asarray(p["value"], np.float32), q(nid, pid)))
        for fid, f in n.get("functions", {}).items():
            fname = f.get("function")
            spec = lookup(fname) if isinstance(fname, str) else None
            if spec is None or not fname.startswith("onnx::"):
                raise ValueError(f"node {nid} function {fid} ({fname or f.get('value')}) has no ONNX form")
            ins, attrs = [], {}
            names = list(spec.inputs) + list(spec.optional)
            for k, v in (f.get("args") or {}).items():
                if k in names or (spec.variadic and k not in spec.attrs):
                    if isinstance(v, str):
                        ins.append((names.index(k) if k in names else len(ins), q(nid, v)))
                    else:
                        a = np.asarray(v)
                        a = a.astype(np.int64 if a.dtype.kind in "iu" else np.float32)
                        cname = q(nid, f"{fid}_{k}")
                        inits.append(numpy_helper.from_array(a, cname))
                        ins.append((names.index(k) if k in names else len(ins), cname))
                else:
                    attrs[k] = v
            ins.sort()
            nodes.append(helper.make_node(fname.split("::")[1], [n_ for _, n_ in ins], [q(nid, fid)], **attrs))
        for pid, p in n.get("output_ports", {}).items():
            port_value[(nid, pid)] = q(nid, p["value"])
    outs = meta.get("outputs") or []
    out_names = []
    for nid in order:
        for pid in g["nodes"][nid].get("output_ports", {}):
            if pid in outs:
                out_names.append(pid)
                nodes.append(helper.make_node("Identity", [port_value[(nid, pid)]], [pid]))
    graph = helper.make_graph(nodes, "mdf", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in out_names],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


# --------------------------------------------------------------------------- #
# Engines
# --------------------------------------------------------------------------- #
def run_table(mdf_path, keras_path, repeats: int, skip: set[str], echo=print) -> list[dict]:
    (_, _), (xte, _) = load_mnist()
    prog_cpu = compile(mdf_path, device="cpu")
    x = normalize(xte, prog_cpu.normalize)
    rows: list[dict] = []
    ref = prog_cpu.run(x)

    def add(name, seconds, out=None):
        diff = float(np.abs(np.asarray(out) - ref).max()) if out is not None else None
        rows.append({"engine": name, "seconds": seconds, "images_per_s": len(x) / seconds,
                     "max_abs_diff_vs_gpu_mdf": diff})
        echo(f"  measured {name}: {seconds * 1e3:.2f} ms")

    add("gpu-mdf (NumPy, CPU)", timeit(lambda: prog_cpu.run(x), repeats), ref)
    add("gpu-mdf (NumPy, CPU, no NaN check)", timeit(lambda: prog_cpu.run(x, check=False), repeats), ref)
    from .backend import probe_gpu
    probe = probe_gpu()
    if probe.usable:
        pg = compile(mdf_path, device="gpu")
        xd = pg.backend.to_device(x)
        feeds = {pg.inputs[0].name: xd}

        def dev():
            pg.execute(feeds)
            pg.backend.synchronize()
        add("gpu-mdf (CuPy, device-resident)", timeit(dev, repeats), pg.run(x))
        add("gpu-mdf (CuPy, from host float32)", timeit(lambda: pg.run(x), repeats), pg.run(x))
        add("gpu-mdf (CuPy, from host uint8)", timeit(lambda: pg.run(xte), repeats), pg.run(xte))
    else:
        echo(f"  CuPy: not measured ({probe.reason})")

    if "onnxruntime" not in skip:
        try:
            import onnxruntime as ort
            sess = ort.InferenceSession(mdf_to_onnx(mdf_path).SerializeToString(),
                                        providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            add(f"ONNX Runtime {ort.__version__} (CPU)",
                timeit(lambda: sess.run(None, {name: x}), repeats), sess.run(None, {name: x})[0])
        except (ImportError, ValueError) as e:
            echo(f"  ONNX Runtime: skipped ({e})")
    if "tensorflow" not in skip and keras_path:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
        import tensorflow as tf
        model = keras.models.load_model(keras_path, compile=False)
        xk = x.reshape((len(x),) + tuple(model.input_shape[1:]))
        add(f"TensorFlow {tf.__version__} model.predict (batch 10000)",
            timeit(lambda: model.predict(xk, batch_size=10000, verbose=0), max(3, repeats // 4)),
            model.predict(xk, batch_size=10000, verbose=0))
        fn = tf.function(lambda t: model(t, training=False))
        xt = tf.constant(xk)
        add("TensorFlow tf.function", timeit(lambda: fn(xt).numpy(), repeats), fn(xt).numpy())
    if "evaluablegraph" not in skip:
        from modeci_mdf.execution_engine import EvaluableGraph
        from modeci_mdf.utils import load_mdf
        mm = load_mdf(str(mdf_path))
        o = prog_cpu.outputs[0]

        def eg_run():
            eg = EvaluableGraph(mm.graphs[0], verbose=False)
            eg.evaluate(initializer={prog_cpu.inputs[0].name: x})
            return eg.enodes[o.node].evaluable_outputs[o.port].curr_value
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            out = eg_run()
            add("modeci_mdf EvaluableGraph", timeit(eg_run, 2, warmup=0), out)
    # measured again last: the spread between the two gpu-mdf rows shows this machine's drift
    add("gpu-mdf (NumPy, CPU), measured again last", timeit(lambda: prog_cpu.run(x), repeats), ref)
    base = rows[0]["seconds"]
    for r in rows:
        r["time_vs_gpu_mdf"] = r["seconds"] / base
    return rows


def stream_case(mdf_path, n: int, batch_size: int | None) -> dict:
    """Stream n images from a .npy file in a fresh process (no TensorFlow) and measure."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _tiled_npy(Path(tmp) / "tiled.npy", n)
        code = "import sys; from gpu_mdf.bench import _stream_child; _stream_child(*sys.argv[1:])"
        r = subprocess.run([sys.executable, "-c", code, str(mdf_path), str(path), str(batch_size or 0)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"stream case failed: {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def _stream_child(mdf_path: str, data_path: str, batch_size: str) -> None:
    """The streaming measurement, run in its own process; prints one JSON line."""
    from .data import open_dataset
    from .engine import tune_host_allocator

    tune_host_allocator()
    prog = compile(mdf_path, device="auto")
    ds = open_dataset(data_path)
    bs = prog.suggest_batch_size(int(batch_size) or None)
    t0, images = time.perf_counter(), 0
    for y in prog.run_many(x for _, x in ds.chunks(bs)):
        images += len(y)
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


def _tiled_npy(path: Path, n: int) -> Path:
    (_, _), (xte, _) = load_mnist()
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 28, 28))
    for lo in range(0, n, len(xte)):
        hi = min(lo + len(xte), n)
        arr[lo:hi] = xte[: hi - lo]
    arr.flush()
    del arr
    return path


def cluster_scaling(mdf_path, n: int, batch_size: int = 32768, echo=print, repeats: int = 2) -> list[dict]:
    """The same n-image job as one process, on local:1 and on local:2 (Dask); each
    job runs ``repeats`` times and the fastest run is reported."""
    from .infer import run_inference

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _tiled_npy(Path(tmp) / "tiled.npy", n)
        outs = {}
        for label, cluster in (("single process", None), ("--cluster local:1", "local:1"),
                               ("--cluster local:2", "local:2")):
            best = None
            for attempt in range(repeats):  # each job twice, the faster kept: this VM is noisy
                out = Path(tmp) / f"{label.replace(' ', '_').replace(':', '')}_{attempt}"
                res = run_inference(mdf_path, out, source=str(data), device="cpu", batch_size=batch_size,
                                    progress=False, log=lambda *_: None, cluster=cluster)
                if best is None or res.metrics["seconds"] < best[1].metrics["seconds"]:
                    best = (out, res)
            out, res = best
            outs[label] = out
            rows.append({"job": label, "images": n, "seconds": res.metrics["seconds"],
                         "images_per_s": res.images_per_s})
            echo(f"  measured {label}: {res.metrics['seconds']:.2f} s (best of {repeats})")
        first = outs["single process"]
        for r in rows:
            r["identical_files"] = all((outs[r["job"]] / f).read_bytes() == (first / f).read_bytes()
                                       for f in ("probabilities.npy", "predictions.csv"))
    base = next(r for r in rows if r["job"] == "--cluster local:1")["images_per_s"]
    for r in rows:
        r["vs_local_1"] = r["images_per_s"] / base
    return rows


def render(rows: list[dict]) -> str:
    w = max(len(r["engine"]) for r in rows)
    lines = [f"{'engine':<{w}}  {'ms / 10k':>10}  {'images/s':>13}  {'time vs gpu-mdf':>15}  {'max|diff|':>9}",
             "-" * (w + 56)]
    for r in rows:
        d = "" if r["max_abs_diff_vs_gpu_mdf"] is None else f"{r['max_abs_diff_vs_gpu_mdf']:.1e}"
        lines.append(f"{r['engine']:<{w}}  {r['seconds'] * 1e3:>10.2f}  {r['images_per_s']:>13,.0f}  "
                     f"{r['time_vs_gpu_mdf']:>14.2f}x  {d:>9}")
    return "\n".join(lines)


def main(mdf_file, keras_model, repeats, stream, skip, json_out, echo=print, cluster_scaling_n=0):
    if mdf_file is None and keras_model is None:
        raise GpuMdfError("give an MDF file (and --keras-model for the TensorFlow baselines)")
    if mdf_file is None:  # convert the given Keras model
        from .convert import keras_to_mdf, load_keras_model, save_mdf
        tmp = Path(tempfile.mkdtemp()) / "bench.json"
        mdf_file = save_mdf(keras_to_mdf(load_keras_model(keras_model), normalize="l2"), tmp)
    echo(f"benchmark: {mdf_file}, 10,000 MNIST test images, median of {repeats} after warm-ups")
    rows = run_table(mdf_file, keras_model, repeats, skip, echo)
    echo("")
    echo(render(rows))
    result = {"rows": rows}
    if stream:
        s = stream_case(mdf_file, stream, None)
        result["stream"] = s
        echo("")
        echo(f"stream: {s['images']:,} images from a .npy file on {s['device']} in {s['seconds']:.2f} s = "
             f"{s['images_per_s']:,.0f} images/s; batch {s['batch_size']}; peak RSS {s['peak_rss_mb']:.0f} MB; "
             f"TensorFlow imported: {s['tf_imported']}")
    if cluster_scaling_n:
        echo("")
        echo(f"Dask scaling: a {cluster_scaling_n:,}-image job (a .npy file, batch 32768), chunk phase, "
             "best of 2 runs each")
        rows = cluster_scaling(mdf_file, cluster_scaling_n, echo=echo)
        result["cluster_scaling"] = rows
        echo(f"{'job':<20} {'seconds':>8} {'images/s':>12} {'vs local:1':>10}  identical files")
        for r in rows:
            echo(f"{r['job']:<20} {r['seconds']:>8.2f} {r['images_per_s']:>12,.0f} {r['vs_local_1']:>9.2f}x  "
                 f"{r['identical_files']}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result
