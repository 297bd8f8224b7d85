"""The import graph between kvfx packages is one-way (DESIGN.md, "Layers and what each owns"):
no module imports another that (transitively) imports it back, at package granularity, counting
imports inside functions too; ``kvfx/methods`` imports nothing from ``kvfx/runtime``, and neither
``kvfx/policy`` nor ``kvfx/methods`` knows torch.fx or Triton."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kvfx"


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def import_graph() -> dict[str, set[str]]:
    """{kvfx package: kvfx packages it imports} (``kvfx.backend``, ``kvfx.runtime``, ...)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        src = _package(module)
        deps = graph.setdefault(src, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: inside the package
                continue
            for n in names:
                if n.startswith("kvfx.") and _package(n) != src and (ROOT.parent / n.replace(".", "/")).exists() \
                        or (n.startswith("kvfx.") and (ROOT.parent / (n.replace(".", "/") + ".py")).exists()
                            and _package(n) != src):
                    deps.add(_package(n))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    out, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                out.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return out


def module_graph() -> dict[str, set[str]]:
    """{kvfx module: kvfx modules it imports}, imports inside functions included (``from pkg
    import sub`` counts as importing the submodule)."""
    mods = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}
    graph = {}
    for m, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                names = subs if len(subs) == len(node.names) else [node.module] + subs
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n not in (m, "kvfx"):
                    deps.add(n)
        graph[m] = deps
    return graph


def test_no_import_cycles_between_kvfx_modules():
    assert _cycles(module_graph()) == [], _cycles(module_graph())


def test_no_import_cycles_between_kvfx_packages():
    graph = import_graph()
    assert graph["kvfx.runtime"] and graph["kvfx.passes"]
    assert _cycles(graph) == [], _cycles(graph)


def test_layers_import_only_downward():
    graph = import_graph()
    assert "kvfx.runtime" not in graph["kvfx.methods"], graph["kvfx.methods"]
    # the policy schema is generated from the scorer registry (kvfx.methods.registry); methods never
    # import the policy package back (the cycle check above)
    assert not graph["kvfx.policy"] & {"kvfx.passes", "kvfx.runtime", "kvfx.templates"}
    assert "kvfx.policy" not in graph["kvfx.methods"]
    assert not graph["kvfx.methods"] & {"kvfx.passes", "kvfx.templates", "kvfx.backend"}
    assert not graph["kvfx.runtime"] & {"kvfx.passes", "kvfx.backend"}, graph["kvfx.runtime"]
    for pkg in ("methods", "policy"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(m == "triton" or m.startswith(("triton.", "torch.fx")) for m in mods), path
