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
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture")} for i in threadpool_info()
            if i.get("user_api") == "blas"]
    return {"numpy": np.__version__, "machine": platform.machine(), "blas": blas}


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
    args = ap.parse_args(argv)
    out = Path(args.out)
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


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} in an MDF document")


if __name__ == "__main__":
    main()
