#!/usr/bin/env python
"""Make the files the GPU check needs, on a machine with TensorFlow (the GPU machine
may have none): trained reference and CNN models converted to MDF.

    python scripts/prepare_gpu_check.py [OUT_DIR=gpu_check_bundle] [--quick]

--quick trains on 5,000 images for one epoch (enough to test agreement).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv):
    quick = "--quick" in argv
    args = [a for a in argv if not a.startswith("--")]
    out = Path(args[0] if args else "gpu_check_bundle")
    out.mkdir(parents=True, exist_ok=True)
    from gpu_mdf.config import load_config, override
    from gpu_mdf.convert import keras_to_mdf, save_mdf
    from gpu_mdf.train import train

    for name, cfg_path in (("reference", "configs/mnist_dense.yaml"), ("cnn", "configs/mnist_cnn.yaml")):
        cfg = load_config(cfg_path)
        if quick:
            cfg = override(cfg, train__epochs=1, data__train_limit=5000)
        res = train(cfg, out / f"{name}_train", log=lambda *_: None)
        import keras
        model = keras.models.load_model(res.model_path, compile=False)
        path = save_mdf(keras_to_mdf(model, normalize=cfg.data.normalize, model_id=name),
                        out / f"{name}.mdf.json")
        print(f"{path}: Keras test accuracy {res.test_accuracy:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
