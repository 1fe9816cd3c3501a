"""The code's arrows point one way (DESIGN §10): no import cycles among adapterctl's modules, counting
imports inside functions too (only `if TYPE_CHECKING:` blocks are left out), and no string dispatch."""

from __future__ import annotations

import ast
from pathlib import Path

import adapterctl

ROOT = Path(adapterctl.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("adapterctl"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            if base.startswith("adapterctl"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in _imports(p, m) if i in mods and i != m} for m, p in mods.items()}


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_adapterctl_modules():
    g = graph()
    # a package importing its own submodules (adapterctl -> adapterctl.cli) is not an arrow back up
    for m in g:
        g[m] = {i for i in g[m] if not (m == "adapterctl" and i.startswith("adapterctl."))}
    assert _cycles(g) == []


def test_the_executor_is_small_and_dispatches_on_types_not_strings():
    text = (ROOT / "execute.py").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 450
    assert 'getattr(self, "do_"' not in text and "getattr(" not in text
