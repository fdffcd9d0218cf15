"""Training station: build the Keras model from a config, fit, save, summarise, plot.

TensorFlow is imported here (lazily), never on the inference path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config
from .data import normalize, open_dataset
from .errors import ConfigError, DataError
from .io import atomic_path, write_json, write_text


def _tf():
    from .tfquiet import tensorflow
    return tensorflow("training")


def _keras():
    """Keras on TensorFlow: training runs through TensorFlow (on its GPU when it sees one)."""
    from .tfquiet import keras
    _tf()
    k = keras("training")
    if k.backend.backend() != "tensorflow":
        raise ConfigError(f"training runs on Keras's TensorFlow backend, but KERAS_BACKEND is "
                          f"{k.backend.backend()!r}: unset it")
    return k


def tf_device() -> str:
    """'GPU:0 (name)' when TensorFlow sees a GPU, else 'CPU'."""
    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU:0 ({details.get('device_name', gpus[0].name)})"
    return "CPU"


def build_model(cfg: Config):
    """Keras model from ``cfg.model``; unknown layer types or arguments are ConfigErrors.
    (Any Keras backend builds it; :func:`train` needs TensorFlow.)"""
    from .tfquiet import keras as _any_keras
    keras = _any_keras("building models")

    layers = [keras.Input(shape=tuple(cfg.model.input_shape), name="pixels")]
    for i, spec in enumerate(cfg.model.layers):
        spec = dict(spec)
        kind = spec.pop("type")
        cls = getattr(keras.layers, kind, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, keras.layers.Layer):
            raise ConfigError(f"{cfg.source}: model.layers[{i}].type: unknown Keras layer {kind!r}")
        act = spec.get("activation")
        if act is not None:
            try:
                keras.activations.get(act)
            except (ValueError, TypeError):
                raise ConfigError(f"{cfg.source}: model.layers[{i}].activation: unknown activation "
                                  f"{act!r}") from None
        try:
            layers.append(cls(**spec))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{cfg.source}: model.layers[{i}] ({kind}): {e}") from None
    model = keras.Sequential(layers, name=cfg.name)
    t = cfg.train
    try:
        opt = keras.optimizers.get({"class_name": t.optimizer, "config": {"learning_rate": t.learning_rate}})
    except (ValueError, TypeError):
        raise ConfigError(f"{cfg.source}: train.optimizer: unknown optimizer {t.optimizer!r}") from None
    try:
        model.compile(optimizer=opt, loss=t.loss, metrics=list(t.metrics))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.source}: train: {e}") from None
    return model


def reconstruction_target(x: np.ndarray, model, cfg: Config) -> np.ndarray:
    """The input as the model's output shape: what an autoencoder is trained to give."""
    out = tuple(model.output_shape[1:])
    if None in out or int(np.prod(out)) != int(np.prod(x.shape[1:])):
        raise ConfigError(f"{cfg.source}: train.target: input needs a model whose output has as many values "
                          f"as its input ({tuple(x.shape[1:])}); it gives {out}")
    return x.reshape((len(x),) + out)


def prepare_images(x: np.ndarray, cfg: Config) -> np.ndarray:
    """Normalise pixels and shape them as the model's input (adds a channel axis if needed)."""
    x = normalize(x, cfg.data.normalize)
    shape = tuple(cfg.model.input_shape)
    if x.shape[1:] != shape:
        if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise DataError(f"images are {x.shape[1:]}, the model takes {shape}")
        x = x.reshape((len(x),) + shape)
    return x


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    h5_path: Path
    test_loss: float
    test_accuracy: float | None      # None for an autoencoder (target: input)
    device: str
    seconds: float
    files: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)   # (picture, reason)


def train(cfg: Config, out_dir: str | Path, log=print) -> TrainResult:
    """Train ``cfg``'s model on its data and write every artifact to ``out_dir``."""
    keras = _keras()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    device = tf_device()
    log(f"training {cfg.name} on {device}")

    tr, te = open_dataset(cfg.data.source, "train"), open_dataset(cfg.data.source, "test")
    xtr, ytr, pixels_te, yte = tr.read(), tr.labels, te.read(), te.labels
    if ytr is None or yte is None:
        raise DataError(f"{cfg.data.source}: training needs labels")
    if cfg.data.train_limit:
        xtr, ytr = xtr[:cfg.data.train_limit], ytr[:cfg.data.train_limit]
    xtr, xte = prepare_images(xtr, cfg), prepare_images(pixels_te, cfg)

    model = build_model(cfg)
    recon = cfg.train.target == "input"
    if recon:       # an autoencoder learns to give back its (normalised) input
        ytr, yte = reconstruction_target(xtr, model, cfg), reconstruction_target(xte, model, cfg)
    t0 = time.perf_counter()
    hist = model.fit(xtr, ytr, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                     validation_split=cfg.train.validation_split, verbose=2)
    seconds = time.perf_counter() - t0
    scores = np.atleast_1d(model.evaluate(xte, yte, verbose=0))
    loss = float(scores[0])
    acc = None if recon else float(scores[1])
    log(f"test loss {loss:.4f}, " + (f"test accuracy {acc:.4f}" if acc is not None else "an autoencoder")
        + f" ({seconds:.1f} s training)")

    files = {}
    files["model"] = _save(model, out / "model.keras")
    files["model_h5"] = _save(model, out / "model.h5")
    lines: list[str] = []
    model.summary(print_fn=lambda s, **_: lines.append(s))
    files["summary"] = write_text(out / "summary.txt", "\n".join(lines) + "\n")
    history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
    files["history"] = write_json(out / "history.json", history)
    probs = model.predict(xte[:8 if recon else 1], verbose=0)
    metrics = {"test_loss": float(loss), "test_accuracy": acc, "device": device,
               "train_seconds": seconds, "epochs": cfg.train.epochs, "seed": cfg.seed,
               "train_images": int(len(xtr)), "config": cfg.to_dict()}
    files["metrics"] = write_json(out / "train_metrics.json", metrics)

    from . import viz
    skipped = []
    try:
        files["model_plot"] = viz.plot_keras_model(model, out / "model_plot.png")
    except viz.PictureSkipped as e:
        skipped.append(("model_plot.png", str(e)))
        log(f"skipped model_plot.png: {e}")
    files["curves"] = viz.plot_history(history, out / "training_curves.png", f"Training {cfg.name}")
    if recon:
        files["reconstructions"] = viz.plot_pairs(pixels_te[:8], probs[:8], out / "reconstructions.png",
                                                  "Keras reconstructions of the first test images")
    else:
        files["digit"] = viz.plot_digit(pixels_te[0], int(np.argmax(probs[0])), int(yte[0]),
                                        out / "digit.png", float(np.max(probs[0])))
    return TrainResult(out, files["model"], files["model_h5"], float(loss), acc, device,
                       seconds, files, skipped)


def _save(model, path: Path) -> Path:
    """Save atomically (Keras picks the format from the suffix, so keep it)."""
    with atomic_path(path) as tmp:
        named = tmp.with_name(tmp.name + path.suffix)
        try:
            model.save(named)
            named.replace(tmp)
        finally:
            if named.exists():
                named.unlink()
    return path
