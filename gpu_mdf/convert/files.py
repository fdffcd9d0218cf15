"""Many model files to MDF files, one failure never stopping the others (``gpu-mdf convert``).

Keras (``.keras``, ``.h5``) and ONNX (``.onnx``) files, told apart by their bytes, in any mix
and in folders. The pixel normalisation is never guessed: ``normalize`` when given, else what
the model states (:func:`~gpu_mdf.convert.sources.recorded_normalization`), else the file
fails with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GpuMdfError
from ..extras import require
from ..mdf import mdf_graph, save_mdf
from .keras import keras_to_mdf, load_keras_model
from .keras.loading import keras_module
from .sources import MODEL_SUFFIXES, NORMALIZE_HINT, model_kind, recorded_normalization

FORMAT_SUFFIXES = {"json": [".json"], "yaml": [".yaml"], "both": [".json", ".yaml"], "bson": [".bson"]}


@dataclass
class ConvertResult:
    """One model file's conversion: the files written, or the one-line reason it failed."""
    source: Path
    ok: bool
    outputs: list[Path]
    nodes: int = 0
    params: int = 0
    seconds: float = 0.0
    error: str = ""
    normalize: str = ""
    normalize_why: str = ""          # where a normalisation the user did not give came from

    def line(self) -> str:
        if not self.ok:
            return f"FAIL {self.source}: {self.error}"
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in self.outputs)
        why = f" (normalize={self.normalize}: {self.normalize_why})" if self.normalize_why else ""
        return (f"ok   {self.source}: {self.nodes} nodes, {self.params:,} parameters, {sizes} "
                f"({self.seconds:.2f} s){why}")


def _expand(sources) -> list[Path]:
    """The model files named: files as they are, folders by their model files, sorted."""
    files = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in MODEL_SUFFIXES)
        else:
            files.append(p)
    return files


def output_names(files: list[Path], suffixes: list[str]) -> tuple[list[str], list[str]]:
    """``<stem>.mdf.json`` for each model (the name ``gpu-mdf run`` writes); two models
    with one stem (``dense.keras`` and ``dense.h5``) get distinct names (the native
    ``.keras`` keeps the plain one), and each such renaming is reported."""
    taken: set[str] = set()
    names: list[str | None] = [None] * len(files)
    notes = []
    order = sorted(range(len(files)), key=lambda i: (files[i].suffix != ".keras", i))
    for i in order:
        f = files[i]
        stem = f.stem
        if stem in taken:
            alt, n = f"{stem}-{f.suffix.lstrip('.')}", 2
            while alt in taken:
                alt, n = f"{stem}-{f.suffix.lstrip('.')}{n}", n + 1
            notes.append(f"note: {f} is written as {alt}.mdf{suffixes[0]} ({stem}.mdf{suffixes[0]} is another model's)")
            stem = alt
        taken.add(stem)
        names[i] = stem
    return names, notes


def convert_files(sources, out_dir: str | Path, fmt: str = "json", normalize: str | None = None,
                  on_result=None, log=None, outputs: list[str] | None = None) -> list[ConvertResult]:
    """Convert many model files; one failure never stops the others. ``outputs``: of an ONNX
    model, convert only what these outputs need (a classifier's probabilities without the
    label post-processing of another domain, say)."""
    files = _expand(sources)
    if any(f.suffix.lower() != ".onnx" for f in files):
        keras_module()   # a missing Keras is one error for the whole call, not one per file
    if any(f.suffix.lower() == ".onnx" for f in files):
        require("onnx", "converting ONNX models")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GpuMdfError(f"{out_dir}: a file, not a folder; give --out a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    suffixes = FORMAT_SUFFIXES[fmt]
    stems, notes = output_names(files, suffixes)
    for note in notes:
        (log or print)(note)
    results = []
    for src, stem in zip(files, stems):
        r = _convert_file(src, out_dir, stem, suffixes, normalize, outputs)
        results.append(r)
        if on_result:
            on_result(r)
    return results


def _convert_file(src: Path, out_dir: Path, stem: str, suffixes: list[str], normalize: str | None,
                  outputs: list[str] | None = None) -> ConvertResult:
    t0 = time.perf_counter()
    try:
        kind = model_kind(src)
        if kind == "onnx":
            mdf, params, why = _from_onnx(src, stem, normalize, outputs)
        elif outputs:
            raise GpuMdfError(f"{src}: --outputs selects the outputs of ONNX models; a Keras model converts whole")
        elif kind in ("keras", "h5"):
            mdf, params, why = _from_keras(src, stem, normalize)
        else:
            raise GpuMdfError(f"{src}: an MDF file already")
        outs = [save_mdf(mdf, out_dir / f"{stem}.mdf{sfx}") for sfx in suffixes]
        graph = mdf_graph(mdf)
        return ConvertResult(src, True, outs, len(graph["nodes"]), params, time.perf_counter() - t0,
                             normalize=graph["metadata"]["gpu_mdf"]["normalize"], normalize_why=why)
    except GpuMdfError as e:
        return ConvertResult(src, False, [], error=str(e).removeprefix(f"{src}: "))
    except Exception as e:  # a translator bug must not stop the batch either
        return ConvertResult(src, False, [], error=f"internal error {type(e).__name__}: {e}")


def _normalization(src: Path, normalize: str | None, keras_model=None) -> tuple[str, str]:
    """(normalisation, why it was not the user's) or a refusal saying what to give."""
    if normalize:
        return normalize, ""
    stated = recorded_normalization(src, keras_model)
    if stated is None:
        raise GpuMdfError(f"{src}: the model does not say how its input was normalised; {NORMALIZE_HINT}")
    return stated


def _from_keras(src: Path, stem: str, normalize: str | None):
    model = load_keras_model(src)
    norm, why = _normalization(src, normalize, model)
    params = int(sum(np.prod(w.shape) for w in model.weights))
    return keras_to_mdf(model, normalize=norm, model_id=stem), params, why


def _from_onnx(src: Path, stem: str, normalize: str | None, outputs: list[str] | None = None):
    from .onnx import load_onnx, onnx_to_mdf_doc, select_outputs
    model = load_onnx(src)
    if outputs:
        model = select_outputs(model, outputs)
    norm, why = _normalization(src, normalize)
    params = int(sum(np.prod(t.dims) for t in model.graph.initializer))
    return onnx_to_mdf_doc(model, model_id=stem, normalize=norm), params, why
