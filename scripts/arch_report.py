#!/usr/bin/env python
"""Architecture report (issue 19): the package-level import graph and the functions with many parameters.

    python scripts/arch_report.py            # both sections
    python scripts/arch_report.py --max-params 6

(1) Every edge between two top-level parts of ``ml_backend`` (a subpackage or a top-level module), with how many
imports make it and how many of those sit inside a function; an edge that goes up the layers of the
``[tool.importlinter]`` layers contract in ``pyproject.toml`` is marked ``BACK``. (2) Every function or method in
``ml_backend`` with more than ``--max-params`` parameters (``self``/``cls`` not counted); one whose docstring states
why, in a line starting with ``Parameters:``, is listed apart, "with a stated reason" (issue 19: no function with
more than 8 parameters without one). Only ``ast``: nothing is imported or run.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ml_backend"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str | None:
    """The top-level part of ``ml_backend`` a module belongs to (``ml_backend.queue.keys`` -> ``queue``)."""
    bits = module.split(".")
    if bits[0] != PACKAGE or len(bits) < 2:
        return None
    return bits[1]


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(tree: ast.AST, module: str, is_package: bool):
    """(imported module, line, inside a function) for every import in the tree."""
    found = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, local) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child, module, is_package)
                # "from ml_backend import queue" imports the subpackage queue
                for alias in child.names:
                    found.append((f"{target}.{alias.name}" if target == PACKAGE else target, child.lineno, local))
            visit(child, inner)

    visit(tree, False)
    return found


def layers_from_pyproject() -> list[tuple[list[str], bool]]:
    """The layers contract's layers, top first: (parts, independent). ``a | b`` are independent siblings (neither
    may import the other), ``a : b`` siblings that may."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for contract in config.get("tool", {}).get("importlinter", {}).get("contracts", []):
        if contract.get("type") == "layers":
            result = []
            for layer in contract["layers"]:
                names = [n.strip().strip("()") for n in layer.replace(":", "|").split("|")]
                result.append(([n.removeprefix(PACKAGE + ".") for n in names if n], "|" in layer))
            return result
    return []


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    if in_class and names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names)


REASON_PREFIX = "Parameters:"


def stated_reason(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The docstring line that says why the function takes its many parameters (``Parameters: ...``), if any."""
    for line in (ast.get_docstring(fn) or "").splitlines():
        if line.strip().startswith(REASON_PREFIX):
            return line.strip()
    return None


def long_signatures(tree: ast.AST, limit: int):
    """(qualified name, line, parameter count, stated reason or None) of every function over ``limit``."""
    found = []

    def visit(node: ast.AST, scope: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{scope}{child.name}"
                n = parameter_count(child, in_class)
                if n > limit:
                    found.append((name, child.lineno, n, stated_reason(child)))
                visit(child, name + ".", False)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{scope}{child.name}.", True)
            else:
                visit(child, scope, in_class)

    visit(tree, "", False)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-params", type=int, default=8, help="list functions with more parameters than this")
    args = parser.parse_args(argv)

    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    edges: dict[tuple[str, str], list[tuple[str, int, bool]]] = defaultdict(list)
    signatures = []
    for path in files:
        module = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        source = part_of(module)
        for target, line, local in imports(tree, module, path.name == "__init__.py"):
            dest = part_of(target)
            if source and dest and dest != source:
                edges[(source, dest)].append((f"{path.relative_to(ROOT)}:{line}", line, local))
        signatures += [(path.relative_to(ROOT), *row) for row in long_signatures(tree, args.max_params)]

    layers = layers_from_pyproject()
    rank = {name: i for i, (layer, _) in enumerate(layers) for name in layer}  # 0 = top

    def back(a: str, b: str) -> bool:
        # a back-edge imports a higher layer, or a sibling of an independent layer ("a | b")
        if a not in rank or b not in rank:
            return False
        return rank[b] < rank[a] or (rank[b] == rank[a] and layers[rank[a]][1])

    print("# Package-level import graph of ml_backend")
    print("layers (top first, from pyproject.toml [tool.importlinter]):")
    for layer, independent in layers:
        print("  " + (" | " if independent else " : ").join(layer))
    unlayered = sorted({p for e in edges for p in e} - set(rank))
    if unlayered:
        print("not in any layer: " + ", ".join(unlayered))
    print()
    print(f"{'from':<16} {'to':<16} {'imports':>7} {'local':>5}  back-edge")
    n_back = 0
    for (a, b), where in sorted(edges.items()):
        local = sum(1 for *_, loc in where if loc)
        mark = back(a, b)
        n_back += mark
        places = ", ".join(dict.fromkeys(w for w, *_ in where))
        print(f"{a:<16} {b:<16} {len(where):>7} {local:>5}  {'BACK: ' + places if mark else ''}")
    total = sum(len(w) for w in edges.values())
    local = sum(1 for w in edges.values() for *_, loc in w if loc)
    print(f"\n{len(edges)} edges, {n_back} back-edges; {total} cross-part imports, {local} of them inside functions")

    signatures.sort(key=lambda r: (-r[3], str(r[0]), r[2]))
    unexplained = [r for r in signatures if r[4] is None]
    explained = [r for r in signatures if r[4] is not None]
    print(f"\n# Functions in ml_backend with more than {args.max_params} parameters")
    for path, name, line, n, _ in unexplained:
        print(f"{n:>3}  {path}:{line}  {name}")
    if explained:
        print(f"\n# ... with a stated reason (a docstring line starting with {REASON_PREFIX!r})")
        for path, name, line, n, reason in explained:
            print(f"{n:>3}  {path}:{line}  {name}  -- {reason}")
    print(
        f"\n{len(unexplained)} functions with more than {args.max_params} parameters without a stated reason, "
        f"{len(explained)} with one"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
