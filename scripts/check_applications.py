"""Every model in the installed ``keras.applications`` (not one per family, as the tests do):
built with weights=None at its smallest input and live random weights, converted in
memory, compiled and compared with ``model.predict`` (logits; within 1e-4 of their scale).

    .venv/bin/python scripts/check_applications.py [--only ResNet101 VGG19]

Prints one table row per model and exits non-zero if any fails to convert or match.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME")
    args = ap.parse_args()

    from test_convert import application, smallest_input

    from gpu_mdf.convert import keras_to_mdf
    from gpu_mdf.engine import compile
    from gpu_mdf.tfquiet import keras as _keras
    keras = _keras("the check")

    names = args.only or sorted(n for n in dir(keras.applications) if n[:1].isupper())
    print("| model | input | params | nodes | convert s | compile s | max abs diff / logit scale | |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for name in names:
        size = smallest_input(name)
        try:
            model = application(name)
            x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype("float32")
            want = model.predict(x, verbose=0)
            t = time.perf_counter()
            mdf = keras_to_mdf(model)
            t_conv = time.perf_counter() - t
            t = time.perf_counter()
            prog = compile(mdf, device="cpu")
            t_comp = time.perf_counter() - t
            got = prog.run(x)
            scale = float(np.abs(want).max())
            diff = float(np.abs(got - want).max())
            ok = 1e-3 < scale < 1e6 and diff <= 1e-4 * scale
            nodes = len(next(iter(next(iter(mdf.values()))["graphs"].values()))["nodes"])
            print(f"| {name} | {size} | {model.count_params() / 1e6:.1f} M | {nodes} | {t_conv:.2f} | {t_comp:.2f} "
                  f"| {diff:.1e} / {scale:.2g} | {'ok' if ok else 'MISMATCH'} |", flush=True)
        except Exception as e:   # report and go on: the table is the point
            ok = False
            print(f"| {name} | {size} | | | | | | FAILED: {type(e).__name__}: {str(e)[:150]} |", flush=True)
        failed += not ok
        model = mdf = prog = None
        keras.backend.clear_session()
        gc.collect()
    print(f"{len(names) - failed} of {len(names)} match")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
