"""The package's floors, checked from the source: imports only go down, and there is no import cycle.

Every `import` / `from ... import` in every module counts, also the ones inside functions (a lazy import that
dodges a circle is still a circle). Floors, bottom to top (minialign/*/__init__.py say what each holds):

    0 errors   1 models   2 data, task   3 training   4 algorithms   5 evaluation   6 experiments, walkthrough
    7 pipeline
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "minialign"
FLOORS = {"errors": 0, "models": 1, "data": 2, "task": 2, "training": 3, "algorithms": 4, "evaluation": 5, "experiments": 6,
          "walkthrough": 6, "pipeline": 7}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The minialign modules `path` imports (anywhere in the file), resolved to module names in `known`."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import module`
        else:
            continue
        for n in names:
            if n in known:
                out.add(n)
    return out - {me}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle({m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph().items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_sits_on_a_floor():
    loose = [m for m in modules() if m != "minialign" and floor(m) is None]
    assert not loose, f"modules outside the floors: {loose}"


def test_imports_only_go_down():
    upward = [f"{m} (floor {floor(m)}) imports {n} (floor {floor(n)})"
              for m, deps in graph().items() for n in deps
              if floor(m) is not None and floor(n) is not None and floor(n) > floor(m)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("folder", ["minialign", "examples"])
def test_scripts_are_imported_by_nothing_but_tests(folder):
    """The package and the examples never import a train_*.py: script internals are not an API. The tests and
    the benchmarks do (bench/ times the scripts' own step functions, so a benchmark measures what a run runs)."""
    scripts = {p.stem for p in ROOT.glob("train_*.py")}
    found = []
    for p in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"{p.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in scripts]
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("run_path", "spec_from_file_location"):
                found += [f"{p.relative_to(ROOT)} loads a script by path ({ast.unparse(node)[:60]})"
                          for a in node.args if "train_" in ast.unparse(a)]
    assert not found, "\n".join(found)
