"""The dependency rule of docs/architecture.md, read from the real import statements (ast, lazy imports
inside functions included): each layer imports only layers below it, and no module imports itself back
through others (no import cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layer of each top-level unit of the package (adapters/ is installed as sae_hooks.adapters). A unit
#: may import units of a strictly lower layer only.
LAYERS: dict[str, int] = {
    "errors": 0,
    "_atomic": 1, "_files": 1, "config": 1,
    "saes": 2, "sites": 2,
    "native": 3, "encoders": 3,
    "hub": 4,
    "intervene": 5, "train": 5,
    "eval": 6,
    "adapters": 7,
    "app": 8,  # the CLI runs models through the adapters (train --framework)
    "sae_hooks": 9,  # the package's __init__: the public names
}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for base, package in ((ROOT / "sae_hooks", "sae_hooks"), (ROOT / "adapters", "sae_hooks.adapters")):
        for path in base.rglob("*.py"):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return found


def _imports(name: str, path: Path, is_package: bool) -> set[str]:
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {  # imports under ``if TYPE_CHECKING:`` never run
        id(n) for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from X import a``: the module X.a when there is one, else X itself
            out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in _MODULE_NAMES else target for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {t for t in out if t == "sae_hooks" or t.startswith("sae_hooks.")}


_MODULE_NAMES = set(_modules())


def _unit(module: str) -> str:
    parts = module.split(".")
    return "sae_hooks" if len(parts) == 1 else parts[1]


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYERS), f"units without a layer in docs/architecture.md and LAYERS: {sorted(units - set(LAYERS))}"


def test_each_layer_imports_only_lower_layers():
    bad = []
    for name, (path, is_package) in _modules().items():
        src = _unit(name)
        for target in _imports(name, path, is_package):
            dst = _unit(target)
            if dst != src and dst in LAYERS and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{name} imports {target} ({src} is layer {LAYERS[src]}, {dst} is layer {LAYERS[dst]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        # an import of a name inside a module counts as an import of that module
        graph[name] = {t if t in modules else t.rsplit(".", 1)[0] for t in _imports(name, path, is_package)} & set(modules)
        # importing a module first imports its parent packages, which are being imported already
        graph[name] -= {name} | {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
