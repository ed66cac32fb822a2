"""The package's import graph flows one way (docs/development.md, "Layout and reading order"): data
→ model → memory → objectives → jobs → pipelines → CLI. Walks the source of the *installed* package, so
a wheel is checked too."""

from __future__ import annotations

import ast
from pathlib import Path

import trime

# Each module may import modules of its own level or of lower levels, never higher ones.
LEVELS = {
    "trime": 0,  # the package itself (__version__)
    "trime.errors": 0,
    "trime.config": 0,
    "trime.io": 0,
    "trime.hf_cache": 0,
    "trime.device": 0,
    "trime.distributed": 0,
    "trime.optim": 0,
    "trime.data": 1,
    "trime.model": 2,
    "trime.checkpoint": 2,
    "trime.memory": 3,
    "trime.losses": 4,
    "trime.jobs": 4,
    "trime.train": 5,
    "trime.evaluate": 5,
    "trime.datastore_build": 5,
    "trime.generate": 5,
    "trime.mt_generate": 5,
    "trime.translation": 5,
    "trime.explain": 6,
    "trime.pipelines": 6,
    "trime.cli": 7,
    "trime.__main__": 7,
}
ROOT = Path(trime.__file__).parent


def level(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LEVELS:
            return LEVELS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no level in tests/test_imports.py: place it in the flow")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def trime_imports(tree: ast.Module, known: set[str]) -> list[tuple[str, ast.AST]]:
    """(imported trime module, node) for every import statement of trime modules in the file."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "trime"
        ):
            for alias in node.names:  # `from trime import config` imports a module, `from trime.x import f` a name
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in known else node.module, node))
        elif isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.split(".")[0] == "trime"]
    return found


def top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes at module level or under a module-level ``if TYPE_CHECKING:``."""
    ok = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            ok |= {id(n) for n in ast.walk(node)}
        ok.add(id(node))
    return ok


def test_imports_point_down_the_flow_and_sit_at_the_top():
    mods = modules()
    graph: dict[str, set[str]] = {}
    problems = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        top = top_level_nodes(tree)
        graph[name] = set()
        for target, node in trime_imports(tree, set(mods)):
            if id(node) not in top:
                problems.append(f"{name}: imports {target} inside a function (only optional dependencies may)")
            if level(target) > level(name):
                problems.append(f"{name} (level {level(name)}) imports {target} (level {level(target)})")
            if target != name and target in mods:
                graph[name].add(target)
    assert not problems, "\n".join(problems)
    # no cycles, also between modules of one level
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, n]))
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_presets_ship_inside_the_package():
    names = {p.stem for p in (ROOT / "configs").glob("*.toml")}
    assert {"tiny", "micro", "wt103_247m_trime"} <= names
