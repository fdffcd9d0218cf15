"""The one-command pipeline: train -> save -> convert -> infer -> compare with Keras -> report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .io import write_json


@dataclass
class RunSummary:
    out_dir: Path
    keras_accuracy: float | None        # None for an autoencoder
    mdf_accuracy: float | None
    max_abs_diff: float
    argmax_agreement: float | None
    images_per_s: float
    device: str
    seconds: float
    jobs_ok: bool = True
    keras_mse: float | None = None      # reconstruction error of an autoencoder
    mdf_mse: float | None = None

    def rows(self) -> list[tuple[str, str]]:
        if self.keras_mse is not None:
            first = [("Keras reconstruction MSE", f"{self.keras_mse:.6f}"),
                     ("MDF reconstruction MSE", f"{self.mdf_mse:.6f}")]
        else:
            first = [("Keras test accuracy", f"{self.keras_accuracy:.4f}"),
                     ("MDF test accuracy", f"{self.mdf_accuracy:.4f}")]
        rows = first + [("max |MDF - Keras|", f"{self.max_abs_diff:.3g}")]
        if self.argmax_agreement is not None:
            rows.append(("argmax agreement", f"{self.argmax_agreement:.2%}"))
        return rows + [("MDF throughput", f"{self.images_per_s:,.0f} images/s on {self.device}"),
                       ("total time", f"{self.seconds:.1f} s"), ("run folder", str(self.out_dir))]

    def text(self) -> str:
        w = max(len(k) for k, _ in self.rows())
        return "\n".join([f"{k:<{w}} : {v}" for k, v in self.rows()]
                         + ([] if self.jobs_ok else ["some job items failed: see the lines above"]))


def run_pipeline(cfg: Config, out_dir: str | Path, device: str = "auto", log=print,
                 progress: bool = True) -> RunSummary:
    from . import report, viz
    from .batch import run_inference
    from .convert import keras_to_mdf, save_mdf
    from .train import prepare_images, train

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr = train(cfg, out, log=log)

    from .tfquiet import keras
    model = keras("the pipeline").models.load_model(tr.model_path, compile=False, safe_mode=True)
    log("converting to MDF")
    mdf = keras_to_mdf(model, normalize=cfg.data.normalize, model_id=cfg.name)
    mdf_paths = []
    if cfg.infer.format in ("json", "both"):
        mdf_paths.append(save_mdf(mdf, out / "model.mdf.json"))
    if cfg.infer.format in ("yaml", "both"):
        mdf_paths.append(save_mdf(mdf, out / "model.mdf.yaml"))
    mdf_path = mdf_paths[0]
    pictures = []
    try:
        pictures = viz.plot_mdf(mdf_path, out, levels=(1, 3))
    except viz.PictureSkipped as e:
        tr.skipped.append(("MDF graph", str(e)))
        log(f"skipped MDF graph pictures: {e}")

    log("bulk inference with the MDF engine")
    source = cfg.data.source
    res = run_inference(mdf_path, out / "inference", source=source, device=device,
                        batch_size=cfg.infer.batch_size, on_error=cfg.infer.on_error, log=log,
                        progress=progress)

    # agreement with Keras on the same test set
    from .data import open_dataset
    ds = open_dataset(source)
    pixels = ds.read()
    xk = prepare_images(pixels, cfg)
    keras_probs = model.predict(xk, batch_size=10000, verbose=0)
    mdf_probs = np.load(res.files[f"output:{res.metrics['output']['name']}"], mmap_mode="r")
    valid = ~np.isnan(np.asarray(mdf_probs).reshape(len(mdf_probs), -1)).any(axis=1)
    diff = float(np.abs(mdf_probs[valid] - keras_probs[valid]).max())
    recon = cfg.train.target == "input"
    keras_mse = mdf_mse = agree = None
    if recon:       # an autoencoder: how well each reproduces the input
        target = xk.reshape(keras_probs.shape)
        keras_mse = float(np.mean((keras_probs - target) ** 2))
        mdf_mse = float(np.mean((mdf_probs[valid] - target[valid]) ** 2))
        viz.plot_pairs(pixels[:8], mdf_probs[:8], out / "reconstructions.png",
                       "MDF reconstructions of the first test images")
    else:
        agree = float((mdf_probs[valid].argmax(1) == keras_probs[valid].argmax(1)).mean())
        if ds.labels is not None:
            _misclassified(out / "misclassified.png", pixels, ds.labels, np.asarray(mdf_probs), valid, ds.name)
    cm = np.array(res.metrics["confusion_matrix"]) if "confusion_matrix" in res.metrics else None
    if cm is not None:
        viz.plot_confusion(cm, out / "confusion_matrix.png", f"MDF on {ds.name}")
    jobs_ok = True
    if cfg.jobs:  # more data sources / models, in this process, each model compiled once
        from .batch import run_jobs
        log(f"{len(cfg.jobs)} job item(s)")
        jobs_ok = run_jobs(cfg.jobs, out / "jobs", default_model=mdf_path, device=device,
                           batch_size=cfg.infer.batch_size, on_error=cfg.infer.on_error, log=log,
                           echo=log, progress=progress, cluster=cfg.infer.cluster)
    summary = RunSummary(out, tr.test_accuracy, None if recon else (res.accuracy or float("nan")), diff, agree,
                         res.images_per_s, res.device, time.perf_counter() - t0, jobs_ok, keras_mse, mdf_mse)
    write_json(out / "summary.json", {
        "keras_test_accuracy": tr.test_accuracy, "mdf_test_accuracy": None if recon else res.accuracy,
        "keras_reconstruction_mse": keras_mse, "mdf_reconstruction_mse": mdf_mse,
        "max_abs_diff": diff, "argmax_agreement": agree, "images_per_s": res.images_per_s,
        "device": res.device, "train_device": tr.device, "seconds": summary.seconds,
        "mdf_file": str(mdf_path), "mdf_bytes": mdf_path.stat().st_size, "skipped_pictures": tr.skipped})
    report.write_report(out, cfg, tr, res, summary, mdf_paths, pictures)
    return summary


def _misclassified(path: Path, pixels: np.ndarray, labels: np.ndarray, probs: np.ndarray, valid: np.ndarray,
                   name: str, shown: int = 24) -> Path | None:
    """A gallery of the first misclassified test images, with their true and predicted classes."""
    from . import viz
    predicted = np.where(valid, np.nan_to_num(probs).argmax(axis=1), -1)
    wrong = np.flatnonzero(valid & (labels >= 0) & (predicted != labels))
    if not len(wrong):
        return None
    first = wrong[:shown]
    return viz.plot_gallery(pixels[first], labels[first], predicted[first], probs[first].max(axis=1), path,
                            f"{len(wrong)} of {int(valid.sum())} images of {name} misclassified; "
                            f"the first {len(first)}")
