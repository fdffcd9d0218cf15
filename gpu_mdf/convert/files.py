"""Many model files to MDF files, one failure never stopping the others (``gpu-mdf convert``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GpuMdfError
from ..mdf import mdf_graph, save_mdf
from .keras import keras_to_mdf, load_keras_model
from .keras.loading import KERAS_SUFFIXES, keras_module

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

    def line(self) -> str:
        if not self.ok:
            return f"FAIL {self.source}: {self.error}"
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in self.outputs)
        return (f"ok   {self.source}: {self.nodes} nodes, {self.params:,} parameters, {sizes} "
                f"({self.seconds:.2f} s)")


def _expand(sources) -> list[Path]:
    """The model files named: files as they are, folders by their model files, sorted."""
    files = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in KERAS_SUFFIXES)
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
                  on_result=None, log=None) -> list[ConvertResult]:
    """Convert many model files; one failure never stops the others."""
    keras_module()   # a missing Keras is one error for the whole call, not one per file
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GpuMdfError(f"{out_dir}: a file, not a folder; give --out a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    suffixes = FORMAT_SUFFIXES[fmt]
    files = _expand(sources)
    stems, notes = output_names(files, suffixes)
    for note in notes:
        (log or print)(note)
    results = []
    for src, stem in zip(files, stems):
        r = _convert_file(src, out_dir, stem, suffixes, normalize)
        results.append(r)
        if on_result:
            on_result(r)
    return results


def _convert_file(src: Path, out_dir: Path, stem: str, suffixes: list[str], normalize: str | None) -> ConvertResult:
    t0 = time.perf_counter()
    try:
        model = load_keras_model(src)
        mdf = keras_to_mdf(model, normalize=normalize, model_id=stem)
        outs = [save_mdf(mdf, out_dir / f"{stem}.mdf{sfx}") for sfx in suffixes]
        params = int(sum(np.prod(w.shape) for w in model.weights))
        return ConvertResult(src, True, outs, len(mdf_graph(mdf)["nodes"]), params, time.perf_counter() - t0)
    except GpuMdfError as e:
        return ConvertResult(src, False, [], error=str(e).removeprefix(f"{src}: "))
    except Exception as e:  # a translator bug must not stop the batch either
        return ConvertResult(src, False, [], error=f"internal error {type(e).__name__}: {e}")
