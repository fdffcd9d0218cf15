"""The GPU check's bundle (made by scripts/prepare_gpu_check.py): its models and their data."""

import json
from pathlib import Path

import numpy as np

from gpu_mdf.engine import compile, load_constants


def models(folder) -> list[dict]:
    """One entry per model: name, path, constants (or None), data kind ("mnist" | "random")."""
    folder = Path(folder)
    meta = json.loads((folder / "bundle.json").read_text())
    out = []
    for name, m in meta.items():
        consts = load_constants(folder / m["constants"]) if m.get("constants") else None
        out.append({"name": name, "path": folder / name, "constants": consts, "data": m["data"]})
    return out


def data(entry, prog, n: int, seed: int = 0) -> np.ndarray:
    """n host items for the program: uint8 MNIST pixels, or random float32 of its input shape."""
    item = tuple(prog.primary_input.shape[1:])
    if entry["data"] == "mnist":
        from gpu_mdf.data import open_dataset
        x = open_dataset().read(0, min(n, 10000))
        return np.resize(x, (n,) + x.shape[1:]).reshape((n,) + item)
    return np.random.default_rng(seed).standard_normal((n,) + item).astype(np.float32)


def compiled(entry, device, optimize=True, precision=None, cuda_graphs=False):
    return compile(entry["path"], device=device, constants=entry["constants"], optimize=optimize,
                   precision=precision, cuda_graphs=cuda_graphs)
