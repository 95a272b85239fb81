"""The structure drawn from the code: no import cycle in `services`, and no import that runs back up.

Every `import` counts, those inside functions too (a function-local import does not hide a cycle from here).
Layers, lowest first; a package imports only packages of a lower layer (siblings of one layer stay apart):

    core                                        settings, logging, envelope, topics, buses, errors
    tracker                                     the ledger (every stage records into it)
    validator, router, delivery, dlq            the worker stages
    http                                        what both HTTP fronts share (responses, tokens, reloads)
    ingress, ops                                the two fronts, APIRouters that know nothing of each other
    app, workerhttp, keyrotation, send          HTTP apps (ingress+ops, a worker's probes); key and send tools
    launcher, supervisor                        process assembly
    cli                                         the `relais` command
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [
    {"services", "core"},
    {"tracker"},
    {"validator", "router", "delivery", "dlq"},
    {"http"},
    {"ingress", "ops"},
    {"app", "workerhttp", "keyrotation", "send"},
    {"launcher", "supervisor"},
    {"cli"},
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "services").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the `services` modules it imports (anywhere in its body)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                wanted = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            out |= {r for w in wanted if w.startswith("services") and (r := resolve(w)) and r != name}
        graph[name] = out
    return graph


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "services"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer() -> None:
    assert {package(m) for m in modules()} <= set(RANK), "place the new package in LAYERS (this file's docstring)"


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_imports_only_run_down() -> None:
    upward = sorted(f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
                    if package(m) != package(t) and RANK[package(t)] >= RANK[package(m)])
    assert upward == []


def test_a_cycle_and_an_upward_import_are_seen() -> None:
    # The checks can fail: a made-up graph with both faults.
    graph = {"services.ingress.a": {"services.ops.b"}, "services.ops.b": {"services.ingress.a"}}
    assert cycles(graph) == [["services.ingress.a", "services.ops.b"]]
    assert RANK[package("services.ops.b")] >= RANK[package("services.ingress.a")]


def test_the_product_never_imports_the_development_tools_at_load_time() -> None:
    # devtools/ is not in the wheel: only the CLI reaches it, inside the sub-commands that need it.
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] == "devtools"], name
