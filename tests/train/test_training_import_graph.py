"""The SAE and training layers import downwards only: ``saes/`` never imports ``train/``, ``hub/``,
``intervene/``, ``eval/``, ``app/`` or the native format module, and no import cycle (static imports,
lazy ones inside functions included) passes through ``saes/`` or ``train/``."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "sae_hooks"


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_saes_imports_nothing_above_it() -> None:
    graph = _graph()
    forbidden = ("sae_hooks.train", "sae_hooks.hub", "sae_hooks.intervene", "sae_hooks.eval", "sae_hooks.app",
                 "sae_hooks.native", "sae_hooks.adapters")
    bad = [(m, t) for m, ts in graph.items() if m.startswith("sae_hooks.saes") for t in ts if t.startswith(forbidden)]
    assert not bad, bad


def test_no_import_cycle_through_saes_or_train() -> None:
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages work, not a cycle between layers
    pruned = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    bad = [c for c in _cycles(pruned) if any(m.startswith(("sae_hooks.saes", "sae_hooks.train")) for m in c)]
    assert not bad, bad
