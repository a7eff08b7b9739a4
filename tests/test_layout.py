"""The layout the README describes: which part may import which, no import cycles, one definition per
shared constant. A newcomer relies on these; a change that breaks them fails here, not in review."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "server", "client")

# Layers, from the bottom up. A module belongs to the first layer whose prefix it starts with.
LAYERS = [
    ("program", ("model.train", "model.generate", "model.evaluate", "model.benchmark", "model.corpus",
                 "model.tokenizer.__main__")),
    ("runtime", ("model.runtime", "model.timebase")),
    ("core", ("model.midi", "model.tokenizer", "model.fm", "model.sampling", "model.generation",
              "model.checkpoint", "model.keys")),
    ("training", ("model.training",)),
    ("evaluation", ("model.evaluation",)),
    ("research", ("model.research",)),
    ("server", ("server",)),
    ("client", ("client",)),
]
# What each layer may import (besides itself).
ALLOWED = {
    "runtime": set(),
    "core": {"runtime"},
    "evaluation": {"core", "runtime"},
    "training": {"core", "runtime", "evaluation"},
    "program": {"core", "runtime", "evaluation", "training"},
    "research": {"core", "runtime", "evaluation", "training"},
    "server": {"core", "runtime"},
    "client": {"server"},  # the wire protocol's message models only, see below
}


def layer_of(module: str) -> str:
    if module in PACKAGES:  # the packages' own __init__: a docstring
        return "runtime"
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} belongs to no layer of the README's Layout table")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported project module, line) of every import, skipping ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, node.lineno)]
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]  # a submodule
    known = modules()
    return [(m, line) for m, line in found if m in known]


def test_every_module_imports_only_the_layers_below_it():
    wrong = []
    for module, path in modules().items():
        layer = layer_of(module)
        for target, line in imports(path):
            other = layer_of(target)
            if other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {layer} module {module} imports {other} module {target}")
    assert not wrong, "\n".join(wrong)


def test_clients_use_only_the_wire_protocol_of_the_server():
    wrong = [f"{path.relative_to(REPO)}:{line}: {target}"
             for module, path in modules().items() if module.startswith("client")
             for target, line in imports(path) if target.startswith("server") and target != "server.protocol"]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    graph = {module: {target for target, _ in imports(path) if target != module}
             for module, path in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("pattern, home", [
    (r"\b480\b", "model/timebase.py"),  # ticks per beat of the files the project writes
    (r"^DNA_FLOATS = ", "model/tokenizer/dna.py"),
    (r"^TICKS_PER_BEAT = ", "model/timebase.py"),
    (r"^(MIN_BPM|DEFAULT_BPM)\b", "server/protocol.py"),
], ids=["480", "DNA_FLOATS", "TICKS_PER_BEAT", "bpm-range"])
def test_a_shared_constant_has_one_definition(pattern: str, home: str):
    places = [f"{path.relative_to(REPO)}:{n}" for path in modules().values()
              for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert places and {p.split(":")[0] for p in places} == {home}, places


def test_no_module_edits_sys_path():
    offenders = [str(p.relative_to(REPO)) for p in modules().values() if "sys.path" in p.read_text()]
    offenders += [str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*.py")
                  if "sys.path." in p.read_text() and p.name != "test_layout.py"]
    assert not offenders
