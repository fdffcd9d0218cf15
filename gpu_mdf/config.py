"""Run configuration: a YAML file validated into dataclasses, unknown keys refused.

Every section maps onto CLI options; the CLI overrides what the file says.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    source: str = "mnist"          # embedded MNIST, or a path any reader accepts
    normalize: str = "l2"          # l2 (the seed's keras.utils.normalize axis=1) | scale | none
    train_limit: int | None = None  # use only the first N training images (quick runs)


REFERENCE_LAYERS = [  # the seed's model
    {"type": "Flatten"},
    {"type": "Dense", "units": 128, "activation": "relu"},
    {"type": "Dense", "units": 128, "activation": "relu"},
    {"type": "Dense", "units": 10, "activation": "softmax"},
]


@dataclass
class ModelConfig:
    input_shape: list[int] = field(default_factory=lambda: [28, 28])
    layers: list[dict] = field(default_factory=lambda: [dict(layer) for layer in REFERENCE_LAYERS])


@dataclass
class TrainConfig:
    optimizer: str = "adam"
    learning_rate: float = 0.001
    loss: str = "sparse_categorical_crossentropy"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    epochs: int = 3
    batch_size: int = 32
    validation_split: float = 0.0
    target: str = "labels"         # labels (a classifier) | input (an autoencoder: it reproduces its input)


@dataclass
class InferConfig:
    device: str = "auto"
    batch_size: int | None = None
    format: str = "json"           # MDF format written by convert: json | yaml | both
    on_error: str = "fail"         # fail | skip
    cluster: str | None = None     # Dask: local[:N] | cuda | tcp://host:port (None: this process)
    cluster_timeout: float = 10.0  # seconds to reach a scheduler
    min_confidence: float = 0.7    # predictions under this probability are flagged (chosen on MNIST's test set: README)


@dataclass
class JobItem:
    """One item of a multi-item job (``jobs:`` in a config)."""
    model: str | None = None       # an MDF file (infer) ; None = the run's own model
    data: str | None = None
    name: str | None = None


@dataclass
class Config:
    name: str = "mnist_dense"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    jobs: list[JobItem] = field(default_factory=list)
    source: str = field(default="<defaults>", init=False)   # where it was read from (not a key)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def from_mapping(cls, raw: Any, where: str):
    """Validate a mapping (read from YAML) into the dataclass ``cls``, driven by its type
    annotations: unknown keys and wrong types are refused with a ConfigError naming
    ``where`` and the key; nested dataclasses and lists of them are built the same way;
    ``None`` gives the defaults. Used for the run configuration and for a served model's
    ``config.yaml`` (:class:`gpu_mdf.serve.repository.ServingConfig`)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        want, sub = hints[name], f"{where}.{name}"
        item = (typing.get_args(want) or (None,))[0]
        if dataclasses.is_dataclass(want):
            kwargs[name] = from_mapping(want, value, sub)
        elif typing.get_origin(want) is list and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(f"{sub}: expected a list of mappings with keys "
                                  f"{sorted(f.name for f in dataclasses.fields(item))}")
            kwargs[name] = [from_mapping(item, v, f"{sub}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = _check_value(want, name, value, sub)
    return cls(**kwargs)


_CHOICES = {"normalize": ("l2", "scale", "none"), "format": ("json", "yaml", "both"),
            "on_error": ("fail", "skip"), "target": ("labels", "input")}


def _runtime_types(t) -> tuple[type, ...]:
    """Classes a value of annotation ``t`` may have (ints are fine where floats are)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(t) for c in _runtime_types(a))
    if t is float:
        return (float, int)
    return (typing.get_origin(t) or t,)


def _check_value(want, name, value, where):
    accepted = _runtime_types(want)
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        names = " or ".join(c.__name__ for c in accepted)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{where}: {value!r} is not one of {_CHOICES[name]}")
    if name == "layers":
        if not value:
            raise ConfigError(f"{where}: no layers; give at least one (or leave model out for the reference)")
        for i, layer in enumerate(value):
            if not isinstance(layer, dict) or "type" not in layer:
                raise ConfigError(f"{where}[{i}]: each layer is a mapping with a 'type' key")
    return value


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a config file; ``None`` gives the reference model's config."""
    if path is None:
        path = CONFIG_DIR / "mnist_dense.yaml"
        if not path.exists():  # installed without the repo's configs/: built-in defaults
            return reference_config()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    cfg = from_mapping(Config, raw or {}, path.name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.name) or ".." in cfg.name:
        raise ConfigError(f"{path.name}.name: {cfg.name!r} is not a plain name (letters, digits, . _ -): "
                          f"it names the run folder runs/<name>")
    cfg.source = str(path)
    return cfg


def reference_config() -> Config:
    """The seed's model: Flatten -> Dense 128 relu -> Dense 128 relu -> Dense 10 softmax."""
    return Config()


def override(cfg: Config, **options) -> Config:
    """Apply CLI options (``section__key=value``; ``None`` means not given)."""
    for key, value in options.items():
        if value is None:
            continue
        section, _, name = key.partition("__")
        target = getattr(cfg, section) if name else cfg
        attr = name or section
        if not hasattr(target, attr):
            raise ConfigError(f"unknown option {key}")
        setattr(target, attr, value)
    return cfg
