"""torchvision's classification models through ONNX into gpu-mdf, against ONNX Runtime.

    python scripts/check_torchvision.py [--models resnet18 vit_b_16 ...] [--size 224] [--batch 8]
                                        [--repeats 5] [--standin] [--json out.json]

Each model is built with every parameter and running statistic random and non-zero
(torchvision's own init leaves some heads at zero, where any comparison passes), put in
eval mode, exported with ``torch.onnx.export(..., opset_version=17, dynamo=False)`` with a
dynamic batch, converted by gpu-mdf's importer and compiled; the same batch runs through
ONNX Runtime on the exported file. A model passes when every output is within 1e-4 x
max|ORT output|; a model gpu-mdf cannot take is refused naming the op. Printed per model:
parameters, the MDF file sizes (JSON and BSON), the time to convert and compile against
ONNX Runtime's ``onnx.load`` + session creation, the run time against ONNX Runtime's (same
batch, medians, alternating), and with ``--standin`` the device->host copies per batch on
the strict CuPy stand-in beyond the result. Needs torch and torchvision (the CPU build:
``pip install torch==2.13.0 torchvision==0.28.0``); never a dependency of gpu-mdf itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
          "densenet121", "shufflenet_v2_x1_0", "squeezenet1_0", "googlenet", "vgg16", "vit_b_16", "swin_t"]


def import_torchvision():
    """torchvision, also where its C extension cannot load: the wheel here is built for CUDA
    torch, and on the CPU build of torch its operator library is missing. The two operators
    its import registers fake kernels for (nms, qnms) are declared first; the classification
    models never call them."""
    import torch
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.keep = lib                 # the library must outlive this call
    import torchvision
    return torchvision


def randomised(model, seed: int = 0):
    """Every parameter and running statistic random and non-zero, scaled so activations stay
    in range through deep stacks; eval mode."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(1 + 0.1 * torch.rand(b.shape, generator=g))
    return model.eval()


def export(name: str, path: Path, size: int = 224, seed: int = 0):
    """Build torchvision's ``name`` with random weights and export it (opset 17, dynamic batch)."""
    import torch
    tv = import_torchvision()
    model = randomised(getattr(tv.models, name)(weights=None), seed)
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return sum(p.numel() for p in model.parameters())


@dataclass
class Row:
    model: str
    params: int = 0
    status: str = ""                 # pass | wrong | refused: <reason>
    max_abs_diff: float | None = None
    max_abs_ort: float | None = None
    json_mb: float | None = None
    bson_mb: float | None = None
    convert_s: float | None = None   # onnx.load + importer
    compile_s: float | None = None
    ort_load_s: float | None = None  # onnx.load + InferenceSession
    run_s: float | None = None
    ort_run_s: float | None = None
    standin_syncs: int | None = None
    notes: list = field(default_factory=list)


def check(name: str, size: int = 224, batch: int = 8, repeats: int = 5, standin: bool = False,
          seed: int = 0) -> Row:
    import onnx
    import onnxruntime as ort

    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    from gpu_mdf.engine import compile
    from gpu_mdf.errors import GpuMdfError
    from gpu_mdf.mdf import save_mdf
    row = Row(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        row.params = export(name, path, size, seed)
        t0 = time.perf_counter()
        try:
            doc = onnx_to_mdf_doc(onnx.load(str(path)), model_id=name)
            row.convert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            prog = compile(doc, device="cpu")
            row.compile_s = time.perf_counter() - t0
        except GpuMdfError as e:
            row.status = f"refused: {e}"
            return row
        row.json_mb = save_mdf(doc, Path(tmp) / "m.json").stat().st_size / 1e6
        row.bson_mb = save_mdf(doc, Path(tmp) / "m.bson").stat().st_size / 1e6
        t0 = time.perf_counter()
        sess = ort.InferenceSession(onnx.load(str(path)).SerializeToString(), providers=["CPUExecutionProvider"])
        row.ort_load_s = time.perf_counter() - t0
        x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
        want = sess.run(None, {"x": x})[0]
        got = prog.run(x)
        row.max_abs_diff, row.max_abs_ort = float(np.abs(got - want).max()), float(np.abs(want).max())
        row.status = "pass" if row.max_abs_diff <= 1e-4 * row.max_abs_ort else "wrong"
        row.run_s, row.ort_run_s = _alternating(lambda: prog.run(x), lambda: sess.run(None, {"x": x}), repeats)
        if standin:
            row.standin_syncs = standin_syncs(doc, x[:2])
    return row


def _alternating(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, timed in alternation after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def standin_syncs(doc, x) -> int:
    """Device->host copies of a steady-state batch on the strict CuPy stand-in, beyond the result's."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_cupy
    from pytest import MonkeyPatch

    from gpu_mdf.engine import compile
    from gpu_mdf.engine.backend import Backend
    with MonkeyPatch.context() as mp:
        fake_cupy.install(mp)
        prog = compile(doc, device=Backend("cupy", fake_cupy, "gpu:0", "strict CuPy stand-in", 0))
        prog.run(x)
        fake_cupy.COUNT.reset()
        prog.run(x)
        return fake_cupy.COUNT.d2h_syncs - len(prog.outputs)


def table(rows: list[Row]) -> str:
    head = ("| model | params | status | max abs diff / max abs ORT | MDF JSON MB | BSON MB | convert + compile s "
            "| ORT load s | run ms | ORT ms | run / ORT |")
    lines = [head, "|---" * 11 + "|"]
    for r in rows:
        if not r.status.startswith(("pass", "wrong")):
            lines.append(f"| {r.model} | {r.params / 1e6:.1f} M | {r.status} |" + " |" * 8)
            continue
        lines.append(f"| {r.model} | {r.params / 1e6:.1f} M | {r.status} | {r.max_abs_diff:.1e} / {r.max_abs_ort:.2f} "
                     f"| {r.json_mb:.0f} | {r.bson_mb:.0f} | {r.convert_s:.2f} + {r.compile_s:.2f} "
                     f"| {r.ort_load_s:.2f} "
                     f"| {r.run_s * 1e3:.0f} | {r.ort_run_s * 1e3:.0f} | {r.run_s / r.ort_run_s:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--standin", action="store_true", help="count device->host copies on the strict CuPy stand-in")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = []
    for name in args.models:
        r = check(name, args.size, args.batch, args.repeats, args.standin)
        print(f"{name}: {r.status}" + (f", {r.run_s / r.ort_run_s:.2f}x ORT" if r.run_s else ""), flush=True)
        rows.append(r)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
