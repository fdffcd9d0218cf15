"""The package's shape: its module import graph (cycles named) and its longest functions.

    python scripts/architecture.py [--longest 15] [--graph] [--layout]

Reads the source with :mod:`ast` (imports nothing). Imports inside functions count
(lazy imports are still dependencies); ``if TYPE_CHECKING`` blocks do not.
"""

from __future__ import annotations

import argparse
import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gpu_mdf"


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports (a package import counts as its __init__)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith(PACKAGE):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (a package's __init__ importing its own submodules,
    which import it back for shared names, is the usual shape of a package and is left out)."""
    found = []
    g = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    while True:
        try:
            list(TopologicalSorter(g).static_order())
            return found
        except CycleError as e:
            cyc = e.args[1]            # each node an immediate predecessor of the next: imported by it
            found.append(cyc)
            g[cyc[-1]].discard(cyc[-2])


def longest_functions(root: Path = ROOT, n: int = 15) -> list[tuple[int, str, str]]:
    rows = []
    for path in modules(root).values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno}", node.name))
    return sorted(rows, reverse=True)[:n]


def summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = next((i + 1 for i in range(len(para)) if para[i] == "." and (i + 1 == len(para) or para[i + 1] == " ")),
               len(para))
    return para[:end].rstrip(":.")


def layout(root: Path = ROOT) -> str:
    """The README's Layout list: every module of the package with its docstring's first sentence."""
    lines = []
    for mod, path in modules(root).items():
        if mod == PACKAGE or path.name == "__main__.py":
            continue
        rel = path.relative_to(root)
        parts = rel.parts[:-1] if path.name == "__init__.py" else rel.parts
        depth = len(parts) - 2
        shown = ("/".join(parts) if depth == 0 else parts[-1]) + ("/" if path.name == "__init__.py" else "")
        lines.append(f"{'  ' * depth}* `{shown}`: {summary(path)}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--longest", type=int, default=15)
    ap.add_argument("--graph", action="store_true", help="print every module's imports")
    ap.add_argument("--layout", action="store_true", help="print the README's Layout list and stop")
    args = ap.parse_args(argv)
    if args.layout:
        print(layout())
        return
    graph = imports()
    if args.graph:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    cyc = cycles(graph)
    print(f"{len(graph)} modules; import cycles: {len(cyc)}")
    for c in cyc:
        print("  cycle: " + " -> ".join(c))
    print("longest functions (lines):")
    for length, where, name in longest_functions(n=args.longest):
        print(f"  {length:4d}  {name}  ({where})")


if __name__ == "__main__":
    main()
