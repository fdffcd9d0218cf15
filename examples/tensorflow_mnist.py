"""From TensorFlow to gpu-mdf through ONNX: a Keras CNN trained with TensorFlow on the bundled
MNIST, exported with tf2onnx, then ``gpu-mdf convert`` and ``gpu-mdf infer``.

    pip install tf2onnx               # gpu-mdf itself never needs tf2onnx
    python examples/tensorflow_mnist.py --out runs/tensorflow_mnist [--epochs 1] [--train-limit 60000]

(A Keras model converts directly too: ``gpu-mdf convert model.keras``; this is the route for
TensorFlow models that exist as ONNX, or for checking that both routes agree.) The network
is trained on x / 255: ``--normalize scale``. Prints Keras's and gpu-mdf's test accuracy and
how many predictions agree; exits 1 unless they all do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pytorch_mnist import convert_infer_compare  # noqa: E402


def main(argv=None) -> int:
    from gpu_mdf.data import load_mnist
    from gpu_mdf.tfquiet import keras as _keras
    from gpu_mdf.tfquiet import tensorflow as _tf
    keras, tf = _keras("this example"), _tf("this example")
    import onnx
    import tf2onnx
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tensorflow_mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=60000)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (xtr, ytr), (xte, yte) = load_mnist()
    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(8, 3, activation="relu"), L.MaxPooling2D(),
                              L.Conv2D(16, 3, activation="relu"), L.MaxPooling2D(), L.Flatten(),
                              L.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    x = xtr[:args.train_limit, ..., None].astype("float32") / 255
    model.fit(x, ytr[:args.train_limit], epochs=args.epochs, batch_size=64, verbose=0)
    keras_pred = model.predict(xte[..., None].astype("float32") / 255, verbose=0, batch_size=1000).argmax(1)
    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="pixels"),)
    onnx_model, _ = tf2onnx.convert.from_function(tf.function(lambda t: model(t, training=False)),
                                                   input_signature=spec, opset=17)
    onnx.save(onnx_model, out / "cnn.onnx")
    return convert_infer_compare(out, out / "cnn.onnx", "keras", keras_pred, yte)


if __name__ == "__main__":
    sys.exit(main())
