"""The layout stays readable: no module of the project imports one that imports it back (directly or through
others), counting imports inside functions too."""
from __future__ import annotations

import ast

from conftest import ROOT


def project_imports() -> dict[str, set[str]]:
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[name] = (found & modules) - {name}
    return graph


def test_no_import_cycles():
    graph = project_imports()
    assert {"backends", "metrics"} <= set(graph)

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen
    cycles = sorted(m for m in graph if m in reach(m))
    assert cycles == [], f"modules in an import cycle: {cycles}: {({m: sorted(graph[m]) for m in cycles})}"


def test_metrics_are_pure_and_backends_import_no_script():
    graph = project_imports()
    assert graph["metrics"] <= {"dataset"}                  # numbers in, numbers out (class names from dataset)
    assert graph["backends"] <= {"dataset"}                 # no predict / export_onnx / train
