"""A small vision transformer on MNIST, trained, converted to MDF and run by gpu-mdf.

7x7 patches by a strided Conv2D, a learned position embedding
(``gpu_mdf.layers.PositionEmbedding``), pre-norm MultiHeadAttention and GELU MLP
blocks, mean pooling, a softmax head: a few hundred steps on the bundled MNIST, then
the saved ``.keras`` file is converted like any other and the MDF graph is evaluated
on the test set by gpu-mdf's engine; both accuracies and their agreement are printed.

    .venv/bin/python examples/mnist_vit.py --out runs/vit [--steps 1500]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def build(keras, dim=32, heads=4, depth=2, mlp=64, patch=7):
    from keras import layers

    from gpu_mdf.layers import PositionEmbedding
    inp = keras.Input((28, 28, 1), name="pixels")
    n = (28 // patch) ** 2
    x = layers.Reshape((n, dim))(layers.Conv2D(dim, patch, strides=patch, name="patches")(inp))
    x = layers.Add()([x, PositionEmbedding(n, name="position")(x)])
    for i in range(depth):
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        x = layers.Add()([x, layers.MultiHeadAttention(heads, dim // heads, name=f"attention_{i}")(h, h)])
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        h = layers.Dense(dim, name=f"mlp_out_{i}")(layers.Dense(mlp, activation="gelu", name=f"mlp_in_{i}")(h))
        x = layers.Add()([x, h])
    x = layers.GlobalAveragePooling1D()(layers.LayerNormalization(epsilon=1e-6)(x))
    return keras.Model(inp, layers.Dense(10, activation="softmax", name="digits")(x), name="mnist_vit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vit"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    from gpu_mdf.convert import convert_files
    from gpu_mdf.data import load_mnist
    from gpu_mdf.engine import compile
    from gpu_mdf.tfquiet import keras as _keras
    keras = _keras("the ViT example")

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_mnist()
    x_train = (x_train[: args.steps * args.batch] / 255.0).astype("float32")[..., None]
    y_train = y_train[: args.steps * args.batch]
    model = build(keras)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    t = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch, epochs=1, verbose=2)
    print(f"trained {args.steps} steps in {time.perf_counter() - t:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / "mnist_vit.keras"
    model.save(src)

    result = convert_files([src], args.out, normalize="scale")[0]
    if not result.ok:
        raise SystemExit(f"conversion failed: {result.line()}")
    mdf = result.outputs[0]
    keras_probs = model.predict((x_test / 255.0).astype("float32")[..., None], batch_size=1000, verbose=0)
    prog = compile(mdf, device="auto")
    t = time.perf_counter()
    mdf_probs = np.concatenate([prog.run(x_test[i:i + 2000, :, :, None]) for i in range(0, len(x_test), 2000)])
    seconds = time.perf_counter() - t
    keras_pred, mdf_pred = keras_probs.argmax(1), mdf_probs.argmax(1)
    print(f"MDF file: {mdf} ({mdf.stat().st_size / 1e6:.2f} MB, {result.nodes} nodes)")
    print(f"test accuracy: Keras {np.mean(keras_pred == y_test):.4f}, MDF {np.mean(mdf_pred == y_test):.4f}; "
          f"agreement {np.mean(keras_pred == mdf_pred):.4f}; max |probability difference| "
          f"{np.abs(keras_probs - mdf_probs).max():.1e}; gpu-mdf {len(x_test) / seconds:,.0f} images/s "
          f"on {prog.backend.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
