"""The packages import each other in one direction: cli -> legende -> training -> evaluation ->
decoder -> featurize -> store, and cli -> prepare -> store; and no training phase imports another.
A cycle between top-level packages fails here, so the rule holds by itself."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("store", "prepare", "featurize", "decoder", "evaluation", "training", "legende")
# Each package may import only those below it; `cli.py`, `bench/` and `tests/` sit above all of them.
LAYER = {
    "store": 0,
    "prepare": 1,
    "featurize": 1,
    "decoder": 2,
    "evaluation": 3,
    "training": 4,
    "legende": 5,
    "cli": 6,
}
PHASES = ROOT / "training" / "phases"


def imported_modules(path: Path) -> list[str]:
    """The dotted names of the modules a file imports, those inside functions included (a lazy
    import is still a dependency)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """{package: the other top-level packages it imports}, from every import statement in its modules."""
    graph: dict[str, set[str]] = {}
    sources = [(p, f) for p in packages for f in sorted((root / p).rglob("*.py"))]
    if (root / "cli.py").is_file():
        sources.append(("cli", root / "cli.py"))
    for package, path in sources:
        targets = graph.setdefault(package, set())
        tops = {name.split(".")[0] for name in imported_modules(path)}
        targets.update(top for top in tops if top in graph or top in packages)
        targets.discard(package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of packages that import each other in a loop (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    graph = import_graph(ROOT)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_every_package_imports_only_packages_below_it():
    for package, targets in import_graph(ROOT).items():
        upward = sorted(t for t in targets if LAYER[t] >= LAYER[package])
        assert not upward, f"{package} imports {upward}, which are not below it"


def test_no_phase_imports_another():
    """What two phases share lives below them (training/cached_features.py, training/skeleton.py)."""
    phases = {p.stem for p in PHASES.glob("*.py")} - {"__init__"}
    for phase in sorted(phases):
        others = {f"training.phases.{p}" for p in phases - {phase}}
        imported = sorted(others.intersection(imported_modules(PHASES / f"{phase}.py")))
        assert not imported, f"training/phases/{phase}.py imports {imported}"


def test_a_reintroduced_cycle_is_found(tmp_path):
    """The check parses real files: a lazy import from store back up into decoder is a cycle."""
    for package, body in {
        "store": "def f():\n    from decoder.model import PooledCaptioner\n",
        "featurize": "from store import files\n",
        "decoder": "import featurize.crops\nfrom store.files import safe_write\n",
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "m.py").write_text(body)
    cycle = find_cycle(import_graph(tmp_path, ("store", "featurize", "decoder")))
    assert cycle is not None and cycle[0] == cycle[-1] and {"store", "decoder"} <= set(cycle)
