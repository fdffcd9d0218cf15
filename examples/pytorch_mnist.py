"""From PyTorch to gpu-mdf: train a small CNN on the bundled MNIST, export it to ONNX, then
``gpu-mdf convert`` and ``gpu-mdf infer`` it, and check that gpu-mdf predicts what PyTorch does.

    pip install torch==2.13.0          # the CPU build; gpu-mdf itself never needs PyTorch
    python examples/pytorch_mnist.py --out runs/pytorch_mnist [--epochs 1] [--train-limit 60000]

The two gpu-mdf commands it runs are the whole route for a PyTorch user:

    gpu-mdf convert runs/pytorch_mnist/cnn.onnx --normalize scale --out runs/pytorch_mnist
    gpu-mdf infer runs/pytorch_mnist/cnn.mdf.json --data mnist --out runs/pytorch_mnist/infer

(the network is trained on x / 255, hence ``--normalize scale``: gpu-mdf normalises the uint8
pixels on the device). Prints PyTorch's and gpu-mdf's test accuracy and how many of the
10,000 predictions agree; exits 1 unless they all do.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build():
    from torch import nn
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


def train(model, x, y, epochs: int, seed: int = 0):
    import torch
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt = torch.from_numpy(x[:, None].astype(np.float32) / 255)
    yt = torch.from_numpy(y.astype(np.int64))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def gpu_mdf(*args: str) -> None:
    """Run a gpu-mdf command as a user would (this Python's gpu-mdf)."""
    cmd = [sys.executable, "-m", "gpu_mdf", *args]
    print("$ gpu-mdf " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def predictions(infer_dir: Path) -> np.ndarray:
    """The predicted classes ``gpu-mdf infer`` wrote, in item order."""
    with open(Path(infer_dir) / "predictions.csv") as f:
        return np.array([int(r["predicted"]) for r in csv.DictReader(f)])


def convert_infer_compare(out: Path, onnx_path: Path, framework: str, framework_pred, labels,
                          convert_args=(), **extra) -> int:
    """The user's route (``gpu-mdf convert`` of the ONNX file, ``gpu-mdf infer`` on MNIST),
    then the framework's and gpu-mdf's accuracy and how many predictions agree, written to
    ``out/summary.json``; 0 when all agree."""
    gpu_mdf("convert", str(onnx_path), *convert_args, "--normalize", "scale", "--out", str(out))
    gpu_mdf("infer", str(out / f"{onnx_path.stem}.mdf.json"), "--data", "mnist", "--out", str(out / "infer"),
            "--overwrite", "--no-progress")
    agree = int((predictions(out / "infer") == framework_pred).sum())
    summary = {f"{framework}_accuracy": float((framework_pred == labels).mean()),
               "gpu_mdf_accuracy": json.loads((out / "infer" / "metrics.json").read_text())["accuracy"],
               "agreeing_predictions": agree, "images": len(labels), **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{framework} test accuracy {summary[f'{framework}_accuracy']:.4f}, gpu-mdf "
          f"{summary['gpu_mdf_accuracy']:.4f}; {agree} of {len(labels)} predictions agree")
    return 0 if agree == len(labels) else 1


def main(argv=None) -> int:
    import torch

    from gpu_mdf.data import load_mnist
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/pytorch_mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=60000)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (xtr, ytr), (xte, yte) = load_mnist()
    t0 = time.perf_counter()
    net = train(build(), xtr[:args.train_limit], ytr[:args.train_limit], args.epochs)
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    model = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()          # class probabilities out
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(xte[:, None].astype(np.float32) / 255)).argmax(1).numpy()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(out / "cnn.onnx"), opset_version=17, dynamo=False,
                      input_names=["pixels"], output_names=["probabilities"],
                      dynamic_axes={"pixels": {0: "N"}, "probabilities": {0: "N"}})
    return convert_infer_compare(out, out / "cnn.onnx", "pytorch", torch_pred, yte)


if __name__ == "__main__":
    sys.exit(main())
