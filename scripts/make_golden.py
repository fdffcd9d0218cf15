"""Write the golden corpus: MDF files and the outputs the engine gives them.

    python scripts/make_golden.py [--out tests/golden]

Each case is an MDF file (``<name>.mdf.json``) beside an ``.npz`` holding its inputs
(``in:<name>``), the constants bound with ``constants=`` (``const:<port>``) and the
outputs (``out:<name>``) of ``compile(..., device="cpu")`` with single-threaded BLAS.
``tests/test_golden.py`` recompiles every file and compares: a refactoring must give
the same bits. The corpus: ``examples/``, the converter's layer, activation and
recurrent cases (random non-zero weights), the ONNX fixtures imported by modeci_mdf's
``onnx_to_mdf`` and in PyTorch-exporter conventions, and hand-written MDF.

Needs the dev install (Keras, onnx, modeci-mdf). Rewriting the corpus is a deliberate
act: do it only when a change is meant to change numbers, and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from gpu_mdf.engine import compile  # noqa: E402


def fingerprint() -> dict:
    """What decides the bits of a float computation on this machine."""
    from threadpoolctl import threadpool_info
    np_dir = Path(np.__file__).parent
    # NumPy's own BLAS (another package's, loaded or not, does not touch these products)
    libs = str(np_dir) + ".libs"
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture")} for i in threadpool_info()
            if i.get("user_api") == "blas" and str(i.get("filepath", "")).startswith(libs)]
    from gpu_mdf.engine.ops import cpu
    return {"numpy": np.__version__, "machine": platform.machine(), "blas": blas, "simd": _simd(),
            "cpu_kernels": cpu.describe()}        # numba's kernels (or NumPy's forms) sum in their own order


def _simd() -> list:
    """The SIMD targets NumPy dispatches its ufuncs (exp, tanh, ...) to on this CPU: an
    AVX-512 machine rounds ``np.exp`` differently from an AVX2 one with the same NumPy."""
    try:
        from numpy._core import _multiarray_umath as m
    except ImportError:  # NumPy 1.x
        from numpy.core import _multiarray_umath as m
    features = m.__cpu_features__
    return [t for t in m.__cpu_dispatch__ if features.get(t)]


def run_case(mdf, feeds, constants=None):
    from threadpoolctl import threadpool_limits
    prog = compile(mdf, device="cpu", constants=constants, optimize=False)
    with threadpool_limits(1, user_api="blas"):
        out = prog.run(feeds if feeds else None)
    if not isinstance(out, dict):
        out = {prog.outputs[0].name: out}
    return out


def keras_cases():
    import keras
    import test_convert as T

    from gpu_mdf.convert import keras_to_mdf
    R = np.random.default_rng(1)
    cases = {}
    for table, batch in ((T.LAYER_CASES, 3), (T.NEW_LAYER_CASES, 3), (T.MORE_LAYER_CASES, 2)):
        for name, (shape, ls) in table.items():
            cases[f"keras-{name}"] = (T.seq(shape, *ls),
                                      R.standard_normal((batch,) + shape).astype("float32"))
    for name in sorted(T.ACTIVATIONS):
        cases[f"keras-activation-{name}"] = (T.seq((8,), keras.layers.Dense(6, activation=name)),
                                             (R.standard_normal((3, 8)) * 2).astype("float32"))
    for name, ls in T.RNN_CASES.items():
        cases[f"keras-rnn-{name}"] = (T.seq(T.SEQ, *ls),
                                      R.standard_normal((2,) + T.SEQ).astype("float32"))
    for name, (model, x) in cases.items():
        d = keras_to_mdf(model)
        port = next(iter(next(iter(d.values()))["graphs"].values()))["metadata"]["gpu_mdf"]["inputs"][0]
        yield name, d, {port: x}, None


def onnx_cases():
    import mdf_fixtures as F
    R = np.random.default_rng(2)
    for name, make in F.MODELS.items():
        model = make()
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = R.standard_normal(shape).astype(np.float32)
        mdf, weights = F.import_onnx(model)
        yield f"onnx_to_mdf-{name}", mdf.to_dict(), {"x": x}, weights
        d, weights, _ = F.pytorch_style(model)
        yield f"pytorch-style-{name}", d, {"input1": x}, weights


def hand_cases():
    import test_interop as T
    for name, d in (("simple", T.SIMPLE), ("arrays", T.ARRAYS), ("abcd-v0.1", T.ABCD_V01),
                    ("parameters-functions", T.PARAMS_FUNCS)):
        yield f"hand-{name}", d, {}, None


def example_cases():
    from gpu_mdf.data import load_mnist
    (_, _), (xte, _) = load_mnist()
    for p in sorted((ROOT / "examples").glob("*.mdf.json")):
        d = json.loads(p.read_text())
        graph = next(iter(next(iter(d.values()))["graphs"].values()))
        port = graph["metadata"]["gpu_mdf"]["inputs"][0]
        yield f"example-{p.name.removesuffix('.mdf.json')}", d, {port: xte[:16]}, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "golden"))
    ap.add_argument("--rerecord", action="store_true",
                    help="keep the corpus's files and inputs; record this machine's outputs, after "
                         "checking each agrees with the recorded one within float32 rounding (for a "
                         "new machine whose SIMD or BLAS rounds differently, not for a change of numbers)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rerecord:
        return rerecord(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.mdf.json")) + list(out.glob("*.npz")):
        old.unlink()
    names = []
    for gen in (example_cases, hand_cases, onnx_cases, keras_cases):
        for name, d, feeds, consts in gen():
            outs = run_case(d, feeds, consts)
            (out / f"{name}.mdf.json").write_text(json.dumps(d, separators=(",", ":"), default=_jsonable))
            arrays = {f"in:{k}": np.asarray(v) for k, v in feeds.items()}
            arrays.update({f"const:{k}": np.asarray(v) for k, v in (consts or {}).items()})
            arrays.update({f"out:{k}": np.asarray(v) for k, v in outs.items()})
            np.savez_compressed(out / f"{name}.npz", **arrays)
            names.append(name)
            print(f"{name}: {', '.join(f'{k} {np.shape(v)}' for k, v in outs.items())}")
    (out / "fingerprint.json").write_text(json.dumps({"cases": len(names), **fingerprint()}, indent=1) + "\n")
    print(f"{len(names)} golden cases in {out}")


def rerecord(out: Path) -> int:
    names = sorted(p.name.removesuffix(".mdf.json") for p in out.glob("*.mdf.json"))
    moved = 0
    for name in names:
        with np.load(out / f"{name}.npz") as z:
            arrays = {k: z[k] for k in z.files}
        feeds = {k[3:]: v for k, v in arrays.items() if k.startswith("in:")}
        consts = {k[6:]: v for k, v in arrays.items() if k.startswith("const:")} or None
        outs = run_case(out / f"{name}.mdf.json", feeds, consts)
        for k, v in outs.items():
            w = arrays[f"out:{k}"]
            v = np.asarray(v)
            assert v.dtype == w.dtype and v.shape == w.shape, (name, k, v.dtype, v.shape, w.dtype, w.shape)
            np.testing.assert_allclose(v, w, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(w).max())),
                                       err_msg=f"{name} output {k}: more than float32 rounding")
            moved += int(not np.array_equal(v, w, equal_nan=True))
            arrays[f"out:{k}"] = v
        np.savez_compressed(out / f"{name}.npz", **arrays)
    (out / "fingerprint.json").write_text(json.dumps({"cases": len(names), **fingerprint()}, indent=1) + "\n")
    print(f"{len(names)} golden cases re-recorded in {out}; {moved} outputs changed in the last bits")
    return 0


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} in an MDF document")


if __name__ == "__main__":
    sys.exit(main())
