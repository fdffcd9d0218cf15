"""From scikit-learn to gpu-mdf through ONNX: an MLPClassifier trained on the bundled MNIST,
exported with skl2onnx, then ``gpu-mdf convert --outputs probabilities`` and ``gpu-mdf infer``.

    pip install scikit-learn skl2onnx          # gpu-mdf itself never needs them
    python examples/sklearn_mnist.py --out runs/sklearn_mnist [--train-limit 60000]

skl2onnx writes a classifier's label through ``ArrayFeatureExtractor`` of the ``ai.onnx.ml``
domain, which the engine does not run: ``--outputs probabilities`` converts only what the
probabilities need (the label is their argmax, which ``gpu-mdf infer`` writes anyway). A
``LogisticRegression`` is one ``ai.onnx.ml.LinearClassifier``: ``gpu-mdf convert`` refuses it
by name, and the example shows that refusal. The network sees x / 255 flattened to 784
values: ``--normalize scale`` (infer brings (N, 28, 28) images to that layout). Exits 1 unless
every gpu-mdf prediction agrees with scikit-learn's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pytorch_mnist import convert_infer_compare  # noqa: E402


def export(model, path: Path) -> None:
    import numpy as np
    from skl2onnx import to_onnx
    onx = to_onnx(model, np.zeros((1, 784), np.float32), options={id(model): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())


def main(argv=None) -> int:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from gpu_mdf.data import load_mnist
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sklearn_mnist")
    ap.add_argument("--train-limit", type=int, default=60000)
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (xtr, ytr), (xte, yte) = load_mnist()
    x = xtr[:args.train_limit].reshape(-1, 784).astype("float32") / 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=args.iterations, random_state=0).fit(x, ytr[:len(x)])
        logreg = LogisticRegression(max_iter=args.iterations).fit(x[:2000], ytr[:2000])
    sk_pred = mlp.predict_proba(xte.reshape(-1, 784).astype("float32") / 255).argmax(1)
    export(mlp, out / "mlp.onnx")
    export(logreg, out / "logreg.onnx")
    refused = subprocess.run([sys.executable, "-m", "gpu_mdf", "convert", str(out / "logreg.onnx"), "--normalize",
                              "scale", "--out", str(out)], capture_output=True, text=True)
    print(refused.stdout.strip())
    return convert_infer_compare(out, out / "mlp.onnx", "sklearn", sk_pred, yte,
                                 convert_args=("--outputs", "probabilities"),
                                 logistic_regression=refused.stdout.strip().splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
