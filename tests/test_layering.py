"""Imports go one way: common/ ← torch_impl/, jax_impl/ ← parity/, bench/, and no module imports itself back.

Read from the source with ast (nothing is imported): every `import` and `from … import` anywhere in a
module counts, those inside functions too, since a deferred import is still a dependency. Backends that
common/ needs are found by name at run time (common/portable.py), which is no import edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"common": 0, "torch_impl": 1, "jax_impl": 1, "parity": 2, "bench": 2}
SIBLINGS = {frozenset({"torch_impl", "jax_impl"})}  # same layer, yet never importing each other
# parity/bench.py and parity/profile.py import each other; their split by job (bench/) removes the cycle.
# Delete this entry when it lands: the test then holds the whole tree to the rule.


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the modules of the layered packages it imports}, for every .py file under them."""
    files = {module_name(root, p): p for pkg in LAYERS if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every backward edge (to a higher layer or between sibling packages) and every import cycle."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = source.split(".")[0], target.split(".")[0]
            if LAYERS[b] > LAYERS[a] or frozenset({a, b}) in SIBLINGS:
                found.append(f"backward import: {source} imports {target}")
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append("import cycle: " + " → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_tree_imports_one_way_without_cycles():
    graph = import_graph(ROOT)
    assert {"common.loop", "torch_impl.train", "jax_impl.train", "parity.check"} <= set(graph)
    assert "common.checkpoints" in graph["common.loop"] and "torch_impl.checkpoint" in graph["torch_impl.train"]
    assert violations(graph) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_backward_import_and_a_cycle_are_caught(tmp_path):
    clean = {"common/__init__.py": "", "common/a.py": "import json\nfrom common import b\n", "common/b.py": "",
             "torch_impl/__init__.py": "", "torch_impl/train.py": "from common.a import x\n",
             "jax_impl/__init__.py": "", "jax_impl/train.py": "import common.b\n",
             "parity/__init__.py": "", "parity/check.py": "from torch_impl import train\nimport jax_impl.train\n"}
    assert violations(import_graph(write(tmp_path / "clean", clean))) == []
    planted = {**clean,
               "common/b.py": "def f():\n    from parity.check import run\n",  # deferred, still an edge
               "jax_impl/train.py": "from torch_impl.train import BACKEND\n",
               "torch_impl/train.py": "from . import dist\n", "torch_impl/dist.py": "from torch_impl import train\n"}
    assert violations(import_graph(write(tmp_path / "planted", planted))) == [
        "backward import: common.b imports parity.check",
        "backward import: jax_impl.train imports torch_impl.train",
        "import cycle: torch_impl.train → torch_impl.dist → torch_impl.train",
    ]
