"""Pictures: Keras model plot, MDF graph (modeci_mdf's Graphviz exporter), a digit with
its prediction, training curves, a gallery of misclassified digits, a confusion matrix.
matplotlib runs headless (Agg)."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shutil
from pathlib import Path

import numpy as np

from .errors import GpuMdfError
from .extras import hint, installed, require
from .io import atomic_path

GRAPHVIZ_HINT = "install Graphviz's dot (apt-get install graphviz, or conda install graphviz)"


class PictureSkipped(Exception):
    """A picture that cannot be drawn here; the message says how to get it."""


def _plt():
    matplotlib = require("matplotlib", "drawing pictures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _need_dot():
    if shutil.which("dot") is None:
        raise PictureSkipped(f"Graphviz's 'dot' is not on PATH: {GRAPHVIZ_HINT}")


def plot_keras_model(model, path: Path) -> Path:
    _need_dot()
    from .tfquiet import keras as _keras
    keras = _keras()
    path = Path(path)
    with atomic_path(path) as tmp:
        named = tmp.with_name(tmp.name + ".png")
        try:
            keras.utils.plot_model(model, to_file=str(named), show_shapes=True, show_layer_names=True,
                                   show_layer_activations=True)
        except ImportError as e:
            raise PictureSkipped(f"plot_model needs pydot: {e}") from None
        named.replace(tmp)
    return path


def plot_digit(image: np.ndarray, predicted: int, true: int | None, path: Path,
               probability: float | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3, 3.3), dpi=100)
    ax.imshow(np.asarray(image).reshape(28, 28) if np.asarray(image).size == 784 else image,
              cmap=plt.cm.binary)
    title = f"predicted {predicted}"
    if probability is not None:
        title += f" ({probability:.1%})"
    if true is not None:
        title += f", true {true}"
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return _save_fig(fig, path)


def plot_pairs(images: np.ndarray, reconstructions: np.ndarray, path: Path, title: str) -> Path:
    """Input images (top row) over the model's reconstructions (bottom row)."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8), dpi=100, squeeze=False)
    for i in range(n):
        for row, img in enumerate((images[i], reconstructions[i])):
            a = np.asarray(img, np.float32)
            side = int(round(np.sqrt(a.size)))
            axes[row][i].imshow(a.reshape(side, side) if side * side == a.size else a.squeeze(), cmap=plt.cm.binary)
            axes[row][i].axis("off")
    axes[0][0].set_title("input", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    return _save_fig(fig, path)


def plot_history(history: dict, path: Path, title: str = "Training") -> Path:
    """Loss and each metric per epoch (``history.json``: Keras's ``History.history``),
    the validation curve beside its training curve where there is one."""
    plt = _plt()
    metrics = [k for k in history if not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], metrics):
        epochs = range(1, len(history[k]) + 1)
        ax.plot(epochs, history[k], marker="o", label="training")
        if f"val_{k}" in history:
            ax.plot(epochs, history[f"val_{k}"], marker="s", label="validation")
            ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(k, fontsize=10)
        ax.set_xticks(list(epochs))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_gallery(images: np.ndarray, true: np.ndarray, predicted: np.ndarray, probability: np.ndarray,
                 path: Path, title: str, columns: int = 8) -> Path:
    """Digits in a grid, each titled with its true and predicted class and the
    prediction's probability (misclassified test images)."""
    plt = _plt()
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.55 * rows + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, t, p, prob in zip(axes.ravel(), images, true, predicted, probability):
        a = np.asarray(img, np.float32)
        side = int(round(np.sqrt(a.size)))
        ax.imshow(a.reshape(side, side) if side * side == a.size else a.squeeze(), cmap=plt.cm.binary)
        ax.set_title(f"true {int(t)}\npred {int(p)} ({float(prob):.0%})", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_confusion(cm: np.ndarray, path: Path, title: str = "Confusion matrix") -> Path:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    n = cm.shape[0]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    hi = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > hi else "black")
    fig.tight_layout()
    return _save_fig(fig, path)


def _save_fig(fig, path: Path) -> Path:
    plt = _plt()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_mdf(mdf_path: str | Path, out_dir: str | Path, levels=(1, 3)) -> list[Path]:
    """Render the MDF graph with modeci_mdf's Graphviz exporter (level 1 overview,
    level 3 detail). Returns the PNG paths."""
    if not installed("modeci_mdf"):          # the extra first: it is what a slim install lacks
        raise PictureSkipped(hint("modeci_mdf", "drawing MDF graphs"))
    _need_dot()
    from modeci_mdf.interfaces.graphviz.exporter import mdf_to_graphviz

    mdf_path, out_dir = Path(mdf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        model = modeci_model(mdf_path)
        _summarise_arrays(model)
        for level in levels:
            root = out_dir / f"mdf_graph_level{level}"
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress
                mdf_to_graphviz(model.graphs[0], view_on_render=False, level=level,
                                filename_root=str(root), output_format="png")
            Path(str(root)).unlink(missing_ok=True)  # keep the picture, not the .gv source
            written.append(Path(f"{root}.png"))
    except Exception as e:          # modeci_mdf's own refusal of a graph gpu-mdf runs: one line, not a trace
        if isinstance(e, GpuMdfError):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise PictureSkipped(f"{mdf_path.name}: modeci_mdf cannot draw this graph ({type(e).__name__}: {first})") \
            from None
    return written


def modeci_model(mdf_path: str | Path, free: int = -1):
    """modeci_mdf's ``Model`` of any MDF file gpu-mdf reads (JSON, YAML, BSON). Sizes
    modeci_mdf cannot read back (the symbolic ``"n"`` its own ONNX importer writes for
    a free batch axis, a shape written as a string) are given as ``free`` (-1 to draw
    it; the batch size to run it)."""
    from modeci_mdf.mdf import Model

    from .mdf import load_mdf
    return Model.from_dict(_plain_shapes(copy.deepcopy(load_mdf(mdf_path)), free))


def _plain_shapes(d, free: int):
    """``d`` with every ``shape`` a list of integers (anything else in it: ``free``)."""
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "shape" and isinstance(v, (list, tuple, str)):
                parts = re.findall(r"[^\s,()\[\]]+", v) if isinstance(v, str) else v
                d[k] = [int(p) if isinstance(p, int) or (isinstance(p, str) and p.lstrip("-").isdigit())
                        else free for p in parts]
            else:
                _plain_shapes(v, free)
    elif isinstance(d, list):
        for v in d:
            _plain_shapes(v, free)
    return d


def _summarise_arrays(model, limit: int = 16):
    """Replace large parameter arrays by a short description: the level-3 view would
    otherwise print every weight (and Graphviz refuses labels over 16 KB)."""
    for graph in model.graphs:
        for node in graph.nodes:
            for p in node.parameters:
                a = np.asarray(p.value) if isinstance(p.value, (list, np.ndarray)) else None
                if a is not None and a.size > limit:
                    p.value = f"array{tuple(a.shape)} float32"
            for f in node.functions:
                for k, v in list((f.args or {}).items()):
                    if isinstance(v, (list, np.ndarray)) and np.asarray(v).size > limit:
                        f.args[k] = f"array{tuple(np.asarray(v).shape)}"
