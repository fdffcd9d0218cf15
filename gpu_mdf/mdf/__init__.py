"""The MDF document: read and written as JSON, YAML or BSON; its graphs and metadata.

An MDF document here is the plain dict ``{model_id: {"format": ..., "graphs": {...}}}``
that ``modeci_mdf``'s ``Model.to_dict()`` gives and ``modeci_mdf.utils.load_mdf`` reads.
Both the converters (which write it) and the engine (which runs it) use this package;
it evaluates nothing.

    doc = load_mdf("model.mdf.json")                  # .json, .yaml/.yml, .bson, a dict, a modeci Model
    model_id, graph_id, graph = select_graph(doc)
    meta = GraphMeta.of(graph)                        # outputs, batch axis, normalisation, opset
    save_mdf(doc, "copy.mdf.yaml")                    # atomic; weights exact
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GpuMdfError, ModelFileError
from ..io import atomic_path
from .text import load_text, mdf_text, parse_json

MDF_FORMAT = "ModECI MDF v0.4"
SUFFIXES = (".json", ".yaml", ".yml", ".bson")
NORMALIZATIONS = ("l2", "scale", "none")   # how integer pixels are brought to the model's floats


def safe_id(name: str) -> str:
    """``name`` as an MDF id: letters, digits and underscores, not starting with a digit
    (ids are names in expressions, and modeci_mdf evaluates them as Python names)."""
    s = re.sub(r"\W", "_", str(name))
    return s if re.match(r"[A-Za-z_]", s) else f"n_{s}"


def unique_id(base: str, taken: set) -> str:
    """``base``, or ``base_2``, ``base_3``... whichever is not in ``taken`` (which gets it)."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def items(d) -> list[tuple[str, dict]]:
    """MDF collections are dicts keyed by id (files) or lists with 'id' (to_dict)."""
    if d is None:
        return []
    if isinstance(d, dict):
        return [(k, v if v is not None else {}) for k, v in d.items()]
    return [(v["id"], v) for v in d]


# --------------------------------------------------------------------------- #
# Loading and saving
# --------------------------------------------------------------------------- #
def load_mdf(source) -> dict:
    """Return the MDF model as a plain dict ``{model_id: {...}}``.

    ``source`` is a path (``.json``, ``.yaml``/``.yml``, ``.bson``), a dict, or a
    ``modeci_mdf.mdf.Model``.
    """
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict") and hasattr(source, "graphs"):   # modeci_mdf.mdf.Model
        return source.to_dict()                                   # already {model_id: {...}}
    path = Path(source)
    if not path.exists():
        raise ModelFileError(f"{path}: no such MDF file")
    if path.is_dir():
        raise ModelFileError(f"{path}: a folder, not an MDF file")
    d = _load_bson(path) if path.suffix.lower() == ".bson" else load_text(path)
    if not isinstance(d, dict) or len(d) != 1 or not isinstance(next(iter(d.values())), dict) \
            or "graphs" not in next(iter(d.values())):
        raise ModelFileError(f"{path}: not an MDF model (expected {{model_id: {{graphs: ...}}}})")
    return d


def _load_bson(path: Path) -> dict:
    """modelspec's BSON form of MDF (what ``modeci_mdf``'s ``Model.to_bson_file`` writes):
    arrays of doubles come back as float64 arrays, decoded by NumPy (:mod:`gpu_mdf.mdf.bson`)."""
    from .bson import BSONError, decode
    try:
        return decode(path.read_bytes())
    except OSError as e:
        raise ModelFileError(f"{path}: not readable ({e.strerror})") from None
    except BSONError as e:
        raise ModelFileError(f"{path}: not a readable BSON MDF file ({e})") from None


def save_mdf(mdf, path: str | Path) -> Path:
    """Write MDF as JSON, YAML or BSON (by suffix), atomically and compactly.

    ``mdf`` is a document (or a modeci_mdf ``Model``, through its ``to_dict()``); weight
    arrays are written as flow lists of the shortest decimal text that reads back to the
    same float32 (bit for bit), one array per line; BSON holds them as doubles.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise GpuMdfError(f"{path}: MDF files end in {', '.join(SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix == ".bson":
            with open(tmp, "wb") as f:
                write_bson(mdf, f)
        else:
            tmp.write_text(mdf_text(mdf, "json" if suffix == ".json" else "yaml"))
    return path


def write_bson(mdf, f) -> None:
    """The MDF document as BSON to the binary file ``f``: modelspec's binary form
    (``modeci_mdf`` loads ``.bson`` with ``load_mdf``), weights as arrays of doubles
    (float32 values, exact), byte for byte what pymongo writes (:mod:`gpu_mdf.mdf.bson`)."""
    from .bson import BSONError, write
    try:
        write(mdf if isinstance(mdf, dict) else mdf.to_dict(), f)
    except BSONError as e:
        raise GpuMdfError(f"cannot write the model as BSON: {e}") from None


def load_constants(path) -> dict:
    """Values for a graph's unconnected input ports (weights an exporter wrote as ports)
    from a ``.npz`` file keyed by port id (or ``node.port``)."""
    import numpy as np
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such constants file")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise ModelFileError(f"{p}: not a readable .npz of constants ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- #
# Graphs and their metadata
# --------------------------------------------------------------------------- #
def select_graph(doc: dict, graph: str | None = None) -> tuple[str, str, dict]:
    """``(model_id, graph_id, graph)``: the graph named ``graph``, or the only one."""
    from ..errors import CompileError
    model_id, mdict = next(iter(doc.items()))
    graphs = items(mdict.get("graphs"))
    if not graphs:
        raise CompileError(f"model {model_id} has no graph")
    if graph is None and len(graphs) > 1:
        raise CompileError(f"model {model_id} has graphs {[g for g, _ in graphs]}: choose one")
    gid, g = next(((k, v) for k, v in graphs if graph in (None, k)), (None, None))
    if g is None:
        raise CompileError(f"model {model_id} has no graph {graph!r}")
    return model_id, gid, g


def mdf_graph(doc: dict) -> dict:
    """The (only) graph of a document."""
    return select_graph(doc)[2]


@dataclass
class GraphMeta:
    """What gpu-mdf records about a graph, under its ``metadata.gpu_mdf``.

    ``recorded`` says whether the graph carries this metadata at all (a file gpu-mdf
    wrote); the other fields are None where it does not say.
    """

    inputs: list[str] | None = None       # the graph inputs, in the source model's order
    outputs: list[str] | None = None      # the output ports, in the source model's order
    normalize: str | None = None          # how integer pixels become the model's floats
    batch_axis: int | None = None
    opset: int | None = None              # the ONNX opset the graph's onnx:: functions were written in
    recorded: bool = False
    extra: dict = field(default_factory=dict)   # other keys, kept as they are

    KEY = "gpu_mdf"

    @classmethod
    def of(cls, graph: dict) -> GraphMeta:
        d = dict((graph.get("metadata") or {}).get(cls.KEY) or {})
        if not d:
            return cls()
        known = {k: d.pop(k, None) for k in ("inputs", "outputs", "normalize", "batch_axis", "opset")}
        return cls(**known, recorded=True, extra=d)

    def to_dict(self) -> dict:
        d = {"inputs": self.inputs, "outputs": self.outputs}
        if self.normalize is not None:          # absent: not stated (integer pixels are fed as they are)
            d["normalize"] = self.normalize
        d["batch_axis"] = self.batch_axis
        if self.opset is not None:
            d["opset"] = self.opset
        return {**d, **self.extra}


__all__ = ["MDF_FORMAT", "NORMALIZATIONS", "GraphMeta", "items", "load_constants", "load_mdf", "mdf_graph",
           "mdf_text", "parse_json", "safe_id", "save_mdf", "select_graph", "unique_id", "write_bson"]
