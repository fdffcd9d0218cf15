"""``gpu-mdf info``: versions, the GPUs TensorFlow and CuPy see, and why a GPU is not used."""

from __future__ import annotations

import importlib.metadata as md
import platform

from . import __version__
from .engine.backend import probe_gpu


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def collect(with_tensorflow: bool = True) -> dict:
    info = {"gpu_mdf": __version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {d: _version(d) for d in ("numpy", "tensorflow", "keras", "jax", "modeci-mdf",
                                                  "onnxruntime", "cupy-cuda12x", "cupy-cuda13x",
                                                  "cupy", "click")}}
    probe = probe_gpu()
    info["cupy"] = {"usable": probe.usable, "reason": probe.reason, "devices": probe.devices,
                    "cuda_runtime": probe.runtime_version, "cuda_driver": probe.driver_version}
    if with_tensorflow and info["versions"]["tensorflow"]:
        try:
            from .tfquiet import tensorflow
            tf = tensorflow()
            gpus = tf.config.list_physical_devices("GPU")
            build = tf.sysconfig.get_build_info()
            info["tensorflow"] = {"gpus": [g.name for g in gpus],
                                  "built_with_cuda": bool(build.get("is_cuda_build")),
                                  "cuda_version": build.get("cuda_version")}
        except Exception as e:  # report, never crash the diagnostics
            info["tensorflow"] = {"error": f"{type(e).__name__}: {e}"}
    info["inference_device"] = "gpu:0" if probe.usable else "cpu"
    info["why"] = probe.reason
    return info


def describe_model(path, normalize: str | None = None, opset: int | None = None) -> dict:
    """What a model file (MDF, or ONNX converted through the cache) takes and gives."""
    from .convert.sources import model_kind, resolve_model
    from .engine import compile
    from .mdf import GraphMeta, load_mdf, select_graph
    kind = model_kind(path)
    mdf_path = resolve_model(path, normalize)
    _, _, graph = select_graph(load_mdf(mdf_path))
    meta = GraphMeta.of(graph)
    prog = compile(mdf_path, device="cpu", opset=opset)
    ops = sorted({st.spec.name for st in prog.plan.steps if getattr(st, "spec", None) is not None})
    return {"file": str(path), "kind": kind, "model": prog.model_id, "graph": prog.graph_id,
            "opset": prog.plan.meta.opset or opset, "normalize": meta.normalize if meta.recorded else None,
            "inputs": [p.describe() for p in prog.inputs], "outputs": [o.describe() for o in prog.outputs],
            "steps": len(prog.plan.steps), "ops": ops, "compute_dtype": str(prog.dtype)}


def render_model(m: dict) -> str:
    norm = m["normalize"] or "not recorded: integer pixels are fed as they are (give --normalize to choose)"
    return "\n".join([f"{m['file']}: {m['kind']} model {m['model']} (graph {m['graph']})",
                      f"  opset {m['opset'] or '17 (the file does not say; --opset to choose)'}; "
                      f"computes in {m['compute_dtype']}; {m['steps']} steps",
                      f"  inputs:  {', '.join(m['inputs']) or 'none (a closed graph)'}",
                      f"  outputs: {', '.join(m['outputs'])}",
                      f"  normalisation of integer pixels: {norm}",
                      f"  ops: {', '.join(o.split('::')[-1] for o in m['ops'])}"])


def render(info: dict) -> str:
    lines = [f"gpu-mdf {info['gpu_mdf']} on Python {info['python']} ({info['platform']})"]
    for k, v in info["versions"].items():
        if v:
            lines.append(f"  {k:<14} {v}")
    c = info["cupy"]
    lines.append(f"CuPy: {'usable' if c['usable'] else 'not usable'}: {c['reason']}")
    if c["cuda_runtime"] or c["cuda_driver"]:
        lines.append(f"  CUDA runtime {c['cuda_runtime']}, driver {c['cuda_driver']}")
    for d in c["devices"]:
        lines.append(f"  gpu:{d['index']} {d['name']} (cc {d['compute_capability']}), "
                     f"{d['memory_free'] / 2**30:.1f} of {d['memory_total'] / 2**30:.1f} GiB free")
    tf = info.get("tensorflow")
    if tf:
        if "error" in tf:
            lines.append(f"TensorFlow: failed to start ({tf['error']})")
        else:
            lines.append(f"TensorFlow: GPUs {tf['gpus'] or 'none'}; CUDA build: {tf['built_with_cuda']}"
                         + (f" (CUDA {tf['cuda_version']})" if tf.get("cuda_version") else ""))
    lines.append(f"Inference runs on: {info['inference_device']} ({info['why']})")
    return "\n".join(lines)
