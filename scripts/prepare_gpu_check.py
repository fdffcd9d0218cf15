#!/usr/bin/env python
"""Make the files the GPU check needs, on a machine with TensorFlow (the GPU machine
may have none):

* ``reference.mdf.json``, ``cnn.mdf.json``: the two configs, trained, converted;
* ``mobilenetv2.mdf.json``: keras.applications.MobileNetV2 (32x32x3, alpha 0.35,
  random weights), converted;
* ``onnx_mobilenet.mdf.json`` + ``.constants.npz``: a MobileNet-style ONNX graph
  imported by modeci_mdf's ``onnx_to_mdf`` (weights as ports, bound at compile time);
* ``pytorch_cnn.mdf.json`` + ``.constants.npz``: a CNN in modeci_mdf's PyTorch-exporter
  conventions;
* ``bundle.json``: each model's input shape and data kind (MNIST pixels or random).

    python scripts/prepare_gpu_check.py [OUT_DIR=gpu_check_bundle] [--quick]

--quick trains on 5,000 images for one epoch (enough to test agreement).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))      # the ONNX/PyTorch-style fixtures of the interop tests


def main(argv):
    quick = "--quick" in argv
    args = [a for a in argv if not a.startswith("--")]
    out = Path(args[0] if args else "gpu_check_bundle")
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np

    from gpu_mdf.config import load_config, override
    from gpu_mdf.convert import keras_to_mdf, save_mdf
    from gpu_mdf.train import train

    bundle = {}
    for name, cfg_path in (("reference", "configs/mnist_dense.yaml"), ("cnn", "configs/mnist_cnn.yaml")):
        cfg = load_config(ROOT / cfg_path)
        if quick:
            cfg = override(cfg, train__epochs=1, data__train_limit=5000)
        res = train(cfg, out / f"{name}_train", log=lambda *_: None)
        import keras
        model = keras.models.load_model(res.model_path, compile=False, safe_mode=True)
        path = save_mdf(keras_to_mdf(model, normalize=cfg.data.normalize, model_id=name), out / f"{name}.mdf.json")
        bundle[path.name] = {"data": "mnist"}
        print(f"{path}: Keras test accuracy {res.test_accuracy:.4f}")

    import keras
    keras.utils.set_random_seed(0)
    mnv2 = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    rng = np.random.default_rng(0)
    for v in mnv2.weights:
        a = rng.standard_normal(v.shape).astype("float32") * 0.5
        v.assign(np.abs(a) + 0.5 if "variance" in v.path else a)
    path = save_mdf(keras_to_mdf(mnv2, model_id="mobilenetv2"), out / "mobilenetv2.mdf.json")
    bundle[path.name] = {"data": "random"}
    print(f"{path}: MobileNetV2 (32x32x3, alpha 0.35), random weights")

    import mdf_fixtures as fx
    for name, (mdf, weights) in {
            "onnx_mobilenet": fx.import_onnx(fx.mobilenet_style_cnn(batch=1))[0:2],
            "pytorch_cnn": fx.pytorch_style(fx.cnn_pool(batch=1))[0:2]}.items():
        d = mdf.to_dict() if hasattr(mdf, "to_dict") else mdf
        (out / f"{name}.mdf.json").write_text(json.dumps(d))
        np.savez(out / f"{name}.constants.npz", **weights)
        bundle[f"{name}.mdf.json"] = {"data": "random", "constants": f"{name}.constants.npz"}
        print(f"{out / name}.mdf.json (+ constants): {name.replace('_', ' ')} interop export")
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
