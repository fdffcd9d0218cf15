"""Write gpu_mdf/engine/ops/versions.py: the opset versions of every ONNX op the engine claims.

    python scripts/make_op_versions.py

The engine needs them without the onnx package (the core install has no onnx): an op
written at opset N follows the schema version ``max(v for v in SINCE[op] if v <= N)``,
and a kernel declares the versions whose semantics it implements. tests/test_ops.py
checks the table against the installed onnx.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def since_versions(names) -> dict[str, tuple[int, ...]]:
    import onnx.defs
    hist = collections.defaultdict(set)
    for s in onnx.defs.get_all_schemas_with_history():
        if s.domain == "":
            hist[s.name].add(s.since_version)
    return {n: tuple(sorted(hist[n])) for n in sorted(names) if n in hist}


def main():
    sys.path.insert(0, str(ROOT))
    import onnx.defs

    from gpu_mdf.engine.ops import OPS
    table = since_versions(k.split("::")[1] for k in OPS if k.startswith("onnx::"))
    lines = [f'    "{n}": {v},' for n, v in table.items()]
    text = (f'"""ONNX schema versions (opsets at which each op changed) of the ops the engine claims,\n'
            f'from onnx {onnx.__version__} (opsets up to {onnx.defs.onnx_opset_version()}). Written by\n'
            f'scripts/make_op_versions.py; tests/test_ops.py checks it against the installed onnx."""\n\n'
            f"MAX_OPSET = {onnx.defs.onnx_opset_version()}\n\nSINCE = {{\n" + "\n".join(lines) + "\n}\n")
    (ROOT / "gpu_mdf" / "engine" / "ops" / "versions.py").write_text(text)
    print(f"{len(table)} ops, opsets up to {onnx.defs.onnx_opset_version()}")


if __name__ == "__main__":
    main()
