"""The shape of the code: packages depend one way, no module imports itself back (lazy imports count),
the library ships without the demo, and no function in the library or the demo runs past 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# who may import whom, and why (README, "Layout"): core is the ground every stage stands on; training
# and proxy stand on core only; eval measures both; the demo uses the library as a user does (and no
# library module knows it exists); scripts drive everything
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "proxy": {"core"},
    "eval": {"core", "training", "proxy"},
    "demo": {"core", "training", "proxy", "eval"},
    "scripts": {"core", "training", "proxy", "eval", "demo"},
}
LIBRARY = ("core", "proxy", "training", "eval")
SHORT_FUNCTIONS = (*LIBRARY, "demo")
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for package in ALLOWED for p in (ROOT / package).rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports anywhere in it (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, set(mods)) - {name} for name, path in mods.items()}


def test_packages_depend_one_way():
    wrong = sorted((m, d) for m, deps in graph().items() for d in deps
                   if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not wrong, wrong


def test_no_module_imports_itself_back():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_the_checks_above_see_a_cycle_and_a_wrong_direction():
    """Guards the two tests above against an import reader that finds nothing."""
    g = graph()
    assert "core.errors" in g["proxy.engine"] and "proxy.build" in g["eval.run"]
    assert "proxy.parallel" in g["proxy.engine"]  # a lazy import, inside a method
    assert "demo.family" in g["demo.job"] and "demo.world" in g["demo.family"]


def test_the_library_ships_its_packages_and_not_the_demo():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == sorted(f"{package}*" for package in LIBRARY)


def test_no_function_in_the_library_or_the_demo_runs_past_80_lines():
    long = []
    for package in SHORT_FUNCTIONS:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
