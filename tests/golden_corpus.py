"""The golden corpus (``tests/golden``, written by ``scripts/make_golden.py``), read in one
place: each case is an MDF file beside an ``.npz`` of its inputs (``in:``), the constants
bound with ``constants=`` (``const:``) and the recorded outputs (``out:``)."""

from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name.removesuffix(".mdf.json") for p in GOLDEN.glob("*.mdf.json"))


def path(name: str) -> Path:
    return GOLDEN / f"{name}.mdf.json"


def load(name: str) -> tuple[Path, dict, dict | None, dict]:
    """(MDF path, inputs by name, constants by port or None, recorded outputs by name)."""
    with np.load(GOLDEN / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    feeds = {k[3:]: v for k, v in arrays.items() if k.startswith("in:")}
    consts = {k[6:]: v for k, v in arrays.items() if k.startswith("const:")} or None
    outs = {k[4:]: v for k, v in arrays.items() if k.startswith("out:")}
    return path(name), feeds, consts, outs
