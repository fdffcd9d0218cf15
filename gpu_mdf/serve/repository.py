"""The model repository: Triton's layout, MDF models.

    DIR/<model>/config.yaml              optional (keys below)
    DIR/<model>/<version>/model.mdf.json (or .yaml, .bson, or model.onnx); versions are positive integers

``config.yaml`` keys (:class:`ServingConfig`; unknown keys and wrong types are refused,
naming the key):

    max_batch_size: 256        items per device batch
    max_queue_delay_ms: 5      how long a batch waits for more requests after its first
    max_queue_size: 256        requests waiting; over it, 503
    max_queue_mb: 256          bytes waiting; over it, 503
    dynamic_batching: true     false: every request runs alone
    device: auto               auto | cpu | gpu | gpu:N (default: the server's --device)
    normalize: l2              override the pixel normalisation the graph records
    constants: weights.npz     weights bound to input ports (path inside the model folder)
    outputs: [probabilities]   served names of the graph's outputs, in order (or a mapping)

Every version of a model is compiled once, at load; a request without a version goes to
the highest loaded one. A ``model.onnx`` is converted to MDF by the sandboxed converter
(once per content: the result is cached). A model that fails to load is UNAVAILABLE with
its reason; the others serve. A reload compiles the new versions while the old ones
serve, then swaps them in; requests that raced the swap run on the new versions.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import from_mapping
from ..errors import ConfigError, GpuMdfError
from ..io import atomic_path, safe_join
from .batcher import Batcher
from .errors import NotFound, NotReady, scrub_paths

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_FILES = ("model.mdf.json", "model.mdf.yaml", "model.mdf.bson", "model.onnx")


class RepositoryError(GpuMdfError):
    pass


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
        raise RepositoryError(f"model name {name!r}: use letters, digits, '_', '.', '-' (up to 128)")
    return name


@dataclass
class ServingConfig:
    """A model's ``config.yaml`` (the keys in this module's docstring), validated by the
    run configuration's own :func:`gpu_mdf.config.from_mapping`."""
    max_batch_size: int = 256
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256
    max_queue_mb: float = 256.0
    dynamic_batching: bool = True
    device: str | None = None        # None: the server's --device
    normalize: str | None = None     # None: what the graph records
    constants: str | None = None
    outputs: list | dict | None = None

    @classmethod
    def load(cls, model_dir: Path) -> ServingConfig:
        path = model_dir / "config.yaml"
        if not path.exists():
            return cls()
        import yaml
        try:
            doc = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        cfg = from_mapping(cls, doc or {}, str(path))
        for k in ("max_batch_size", "max_queue_size"):
            if getattr(cfg, k) < 1:
                raise ConfigError(f"{path}: {k} must be at least 1")
        if cfg.max_queue_delay_ms < 0 or cfg.max_queue_mb <= 0:
            raise ConfigError(f"{path}: max_queue_delay_ms must be >= 0 and max_queue_mb > 0")
        return cfg


@dataclass
class Version:
    """One loaded model version: its program, its served names, its batcher."""
    model: str
    version: str
    path: Path
    program: object
    input_names: dict[str, bool]           # served input name -> required
    output_names: dict[str, str]           # served output name -> graph output name
    batcher: Batcher
    config: ServingConfig

    def __post_init__(self):
        from .protocol import HeaderCache
        self.specs = {spec.name: spec for spec in self.program.inputs}
        self.headers = HeaderCache()

    def metadata(self) -> dict:
        p = self.program
        ins = [{"name": s.name, "datatype": _datatype(s.dtype), "shape": _shape(s.shape)} for s in p.inputs]
        by_graph = {g: s for s, g in self.output_names.items()}
        outs = [{"name": by_graph[o.name], "datatype": _datatype(o.dtype or p.dtype), "shape": _shape(o.shape)}
                for o in p.outputs]
        return {"name": self.model, "versions": [self.version], "platform": "gpu-mdf_mdf",
                "inputs": ins, "outputs": outs,
                "parameters": {"normalize": p.normalize, "device": p.backend.describe(),
                               "max_batch_size": self.config.max_batch_size,
                               "dynamic_batching": self.config.dynamic_batching,
                               "integer_inputs": "pixels, normalised by the model ('normalize')",
                               "float_inputs": "taken as already normalised"}}

    def triton_config(self) -> dict:
        """Triton's model configuration (``GET .../config``)."""
        meta, cfg = self.metadata(), self.config
        return {"name": self.model, "platform": meta["platform"], "backend": "gpu-mdf",
                "max_batch_size": cfg.max_batch_size,
                "input": _triton_tensors(meta["inputs"]), "output": _triton_tensors(meta["outputs"]),
                "dynamic_batching": ({"max_queue_delay_microseconds": int(cfg.max_queue_delay_ms * 1000)}
                                     if cfg.dynamic_batching else None)}


def _triton_tensors(tensors: list[dict]) -> list[dict]:
    return [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"][1:]} for t in tensors]


def _datatype(dtype) -> str:
    from .protocol import DATATYPE_OF
    try:
        return DATATYPE_OF[np.dtype(dtype or "float32")]
    except TypeError:
        return "FP32"


def _shape(shape) -> list[int]:
    return [-1] if shape is None else [int(d) for d in shape]


@dataclass
class ModelState:
    name: str
    versions: dict[str, Version] = field(default_factory=dict)
    state: str = "UNAVAILABLE"       # READY | UNAVAILABLE | UNLOADED
    reason: str = ""

    def version_names(self) -> list[str]:
        return sorted(self.versions, key=int)


class Repository:
    """The models of a repository folder, loaded and unloaded by name."""

    def __init__(self, root: str | Path, device: str = "auto", metrics=None, log=print):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: no such model repository folder")
        self.device, self.metrics, self.log = device, metrics, log
        self.models: dict[str, ModelState] = {}
        self.converter = None            # for model.onnx: set by the server (a .conversion.Converter)
        self._loading: set[str] = set()  # names being loaded that serve nothing yet
        self._lock = threading.RLock()

    def exists(self, name: str) -> bool:
        return name in self.models or (self.root / name).exists()

    def loading_count(self) -> int:
        """Models found at start-up or loaded by request that are neither ready nor failed."""
        return len(self._loading)

    def names_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME.fullmatch(p.name))

    def load_all(self) -> None:
        for name in self.names_on_disk():
            self.load(name)

    def index(self) -> list[dict]:
        with self._lock:
            names = sorted(set(self.names_on_disk()) | set(self.models))
            rows = []
            for n in names:
                m = self.models.get(n)
                if m is None:
                    rows.append({"name": n, "state": "UNAVAILABLE", "reason": "not loaded"})
                    continue
                for v in m.version_names() or [None]:
                    row = {"name": n, "state": m.state, "reason": m.reason}
                    if v is not None:
                        row["version"] = v
                    rows.append(row)
            return rows

    def get(self, name: str, version: str | None = None) -> Version:
        """The version to serve (``None``: the highest); NotFound for an unknown model or
        version, NotReady for a model that failed to load or was unloaded."""
        m = self.models.get(name)
        if m is None:
            raise NotFound(f"unknown model {name!r}")
        if m.state != "READY":
            raise NotReady(f"model {name!r} is not ready ({m.state.lower()}{': ' + m.reason if m.reason else ''})")
        versions = m.versions
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version!r} (loaded: {m.version_names()})")
        return versions[version]

    def load(self, name: str) -> ModelState:
        """(Re)load a model from disk: every version compiled, then swapped in at once; the
        old batchers finish their queues. A failure leaves the model UNAVAILABLE with the
        reason (the old versions go on serving on a failed reload); a name with no folder
        is NotFound and leaves no trace."""
        check_name(name)
        if not (self.root / name).exists() and not (self.root / name).is_symlink():
            raise NotFound(f"no model {name!r} in the repository")
        with self._lock:
            old = self.models.get(name)
            fresh = old is None or old.state != "READY"
            if fresh:
                self._loading.add(name)
        try:
            state = self._compile_model(name)
            with self._lock:
                if state.state == "READY" or fresh:
                    self.models[name] = state
            if state.state == "READY" and old:
                for v in old.versions.values():
                    v.batcher.close(wait=False)
            return state
        finally:
            with self._lock:
                self._loading.discard(name)

    def _compile_model(self, name: str) -> ModelState:
        try:
            model_dir = safe_join(self.root, name, "model folder")
            cfg = ServingConfig.load(model_dir)
            vdirs = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0),
                           key=lambda p: int(p.name))
            if not vdirs:
                raise RepositoryError(f"{model_dir}: no version folder (1/, 2/, ...)")
            versions = {}
            for vd in vdirs:
                versions[str(int(vd.name))] = self._load_version(name, str(int(vd.name)), vd, model_dir, cfg)
            self.log(f"loaded {name} (versions {', '.join(versions)}) on "
                     f"{next(iter(versions.values())).program.backend.describe()}")
            return ModelState(name, versions, "READY", "")
        except (GpuMdfError, OSError) as e:
            reason = scrub_paths(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                                 str(self.root.resolve()))
            self.log(f"failed to load {name}: {reason}")
            return ModelState(name, {}, "UNAVAILABLE", reason)

    def unload(self, name: str) -> None:
        check_name(name)
        with self._lock:
            m = self.models.get(name)
            if m is None:
                raise NotFound(f"unknown model {name!r}")
            self.models[name] = ModelState(name, {}, "UNLOADED", "unloaded by request")
        for v in m.versions.values():
            v.batcher.close(wait=False)
        self.log(f"unloaded {name}")

    def close(self) -> None:
        with self._lock:
            models = list(self.models.values())
        for m in models:
            for v in m.versions.values():
                v.batcher.close(wait=True)

    def add(self, name: str, mdf: bytes) -> tuple[str, ModelState]:
        """Write ``mdf`` (MDF JSON) as the model's next version on disk, then (re)load the
        model; the new version's name and the model's state."""
        model_dir = safe_join(self.root, check_name(name))
        have = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] \
            if model_dir.is_dir() else []
        version = str(max(have, default=0) + 1)
        target = model_dir / version / "model.mdf.json"
        target.parent.mkdir(parents=True, exist_ok=False)
        with atomic_path(target) as tmp:
            tmp.write_bytes(mdf)
        return version, self.load(name)

    # -- internals ------------------------------------------------------------------ #
    def _load_version(self, name, version, vdir: Path, model_dir: Path, cfg: ServingConfig) -> Version:
        from ..engine import compile, load_constants
        files = [vdir / f for f in MODEL_FILES if (vdir / f).is_file()]
        if len(files) != 1:
            raise RepositoryError(f"{vdir}: expected one of {' or '.join(MODEL_FILES)}, found "
                                  f"{[f.name for f in files] or 'none'}")
        consts = load_constants(safe_join(model_dir, cfg.constants)) if cfg.constants else None
        source = files[0]
        if source.name == "model.onnx":
            if self.converter is None:
                raise RepositoryError(f"{source}: ONNX models need the server's converter")
            from ..mdf.text import parse_json
            source = parse_json(self.converter.convert_file(source, cfg.normalize, name).decode())
        prog = compile(source, device=cfg.device or self.device, normalize=cfg.normalize, constants=consts)
        if not prog.inputs:
            raise RepositoryError(f"{files[0]}: a closed graph (no input) cannot serve requests")
        outputs = _output_names(prog, cfg, files[0])
        label = f"{name}/{version}"

        def on_batch(items, requests, seconds):
            if self.metrics:
                self.metrics.batch(name, version, items, requests, seconds)
        batcher = Batcher(lambda feeds: _run(prog, feeds, outputs), label, cfg.max_batch_size,
                          cfg.max_queue_delay_ms / 1000, cfg.max_queue_size, int(cfg.max_queue_mb * 2**20),
                          cfg.dynamic_batching, on_batch)
        return Version(name, version, files[0], prog, {p.name: p.default is None for p in prog.inputs},
                       outputs, batcher, cfg)


def _output_names(prog, cfg: ServingConfig, path) -> dict[str, str]:
    graph = [o.name for o in prog.outputs]
    if cfg.outputs is None:
        return {g: g for g in graph}
    if isinstance(cfg.outputs, list):
        if len(cfg.outputs) != len(graph) or not all(isinstance(n, str) for n in cfg.outputs):
            raise RepositoryError(f"{path}: config outputs lists {len(cfg.outputs)} names; the graph has "
                                  f"{len(graph)} outputs {graph}")
        served = dict(zip(cfg.outputs, graph))
    else:
        unknown = [g for g in cfg.outputs if g not in graph]
        if unknown:
            raise RepositoryError(f"{path}: config outputs name unknown graph output(s) {unknown}; "
                                  f"the graph has {graph}")
        served = {cfg.outputs.get(g, g): g for g in graph}
    if len(served) != len(graph):
        raise RepositoryError(f"{path}: config outputs gives two outputs one name")
    return served


NONFINITE = "\0nonfinite"      # the batch's per-item non-finite mask, split with the outputs


def _run(prog, feeds: dict, outputs: dict[str, str]) -> dict[str, np.ndarray]:
    """One batch through the program; outputs by served name (host arrays), and under
    NONFINITE the items whose outputs hold NaN or Inf, when any does."""
    from ..engine import run_batch
    spec = prog.primary_input
    batch = feeds[spec.name] if spec is not None and list(feeds) == [spec.name] else feeds
    result = run_batch(prog, batch, check=False)
    served = {s: result.outputs[g] for s, g in outputs.items()}
    if result.nonfinite is not None:
        served[NONFINITE] = result.nonfinite
    return served
