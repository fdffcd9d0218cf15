"""Big models: what converting and loading cost, against Keras loading the same file.

For each keras.applications family (weights=None, live random weights, small input)
it saves the model as .keras once, then times, each ``--repeat`` times (medians):

  keras load      keras.models.load_model(file, compile=False)  -- the baseline
  convert         what ``gpu-mdf convert`` does: load the .keras file, translate, save the MDF
  load+compile    gpu_mdf.engine.compile(MDF file), ready to run

and prints each as seconds and as a ratio to the Keras load of the same run. Run it with
the OpenBLAS variables unset (see README), e.g.:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python scripts/bench_big_models.py \\
        --formats bson json --models VGG16 ResNet50
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = ["ConvNeXtTiny", "DenseNet121", "EfficientNetB0", "EfficientNetV2B0", "InceptionV3", "InceptionResNetV2",
            "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "NASNetMobile", "ResNet50",
            "ResNet50V2", "VGG16", "Xception"]


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        out = None
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=FAMILIES, choices=FAMILIES, metavar="NAME")
    ap.add_argument("--formats", nargs="+", default=["bson"], choices=["bson", "json"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from test_convert import application, smallest_input

    from gpu_mdf.convert import keras_to_mdf, load_keras_model, save_mdf
    from gpu_mdf.engine import compile
    from gpu_mdf.tfquiet import keras as _keras
    keras = _keras("the benchmark")

    cols = ["model", "params", "keras load s"]
    for f in args.formats:
        cols += [f"{f} MB", f"{f} convert s (x keras)", f"{f} load+compile s (x keras)"]
    cols.append("max abs diff / scale")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            size = smallest_input(name)
            model = application(name)
            src = Path(tmp) / f"{name}.keras"
            model.save(src)
            x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype("float32")
            want = model.predict(x, verbose=0)
            del model
            base, _ = timed(lambda s=src: keras.models.load_model(s, compile=False), args.repeat)
            row = [name, f"{sum(int(np.prod(w.shape)) for w in load_keras_model(src).weights) / 1e6:.1f} M",
                   f"{base:.2f}"]
            diff = 0.0
            for fmt in args.formats:
                dst = Path(tmp) / f"{name}.mdf.{fmt}"
                conv, _ = timed(lambda s=src, d=dst: save_mdf(keras_to_mdf(load_keras_model(s)), d), args.repeat)
                load, prog = timed(lambda d=dst: compile(d, device="cpu"), args.repeat)
                diff = max(diff, float(np.abs(prog.run(x) - want).max()))
                row += [f"{dst.stat().st_size / 1e6:.0f}", f"{conv:.2f} ({conv / base:.1f}x)",
                        f"{load:.2f} ({load / base:.1f}x)"]
                dst.unlink()
            row.append(f"{diff:.1e} / {float(np.abs(want).max()):.2g}")
            print("| " + " | ".join(row) + " |", flush=True)
            keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
