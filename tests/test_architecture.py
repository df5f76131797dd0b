"""The package's shape: layers that only import downwards, no import cycles, small modules with docstrings,
and DVC stages whose deps cover every module their command imports.

These are checked on the source text (``ast``), so the rules hold for lazy imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "xrdvision"
MAX_LINES = 450

# Lowest first. A module may import from its own layer or any layer below, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("xrdvision.errors",),
    ("xrdvision.crystal",),
    ("xrdvision.config",),
    ("xrdvision.formats",),
    ("xrdvision.data",),
    ("xrdvision.tracking",),
    ("xrdvision.models",),
    ("xrdvision.serve",),
    ("xrdvision.cli", "xrdvision"),
)


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imported_modules(tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """Every ``xrdvision`` module an AST imports, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] != "xrdvision":
                continue
            if name in known:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = all_modules()
    return {m: imported_modules(ast.parse(p.read_text()), known) - {m} for m, p in known.items()}


def layer_of(module: str) -> int:
    best = -1
    best_len = -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_module_is_in_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_module_imports_from_a_layer_above_it():
    wrong = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in import_graph().items()
        for d in sorted(deps)
        if layer_of(d) > layer_of(m) and d != "xrdvision"
    ]
    assert not wrong, "\n".join(wrong)


def test_import_graph_has_no_cycles():
    graph = {m: {d for d in deps if d != "xrdvision"} for m, deps in import_graph().items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_module_is_small_and_says_why(path: Path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: over {MAX_LINES} lines"
    assert ast.get_docstring(ast.parse(text)), f"{path.name}: no module docstring saying its one job"


def closure(start: set[str], graph: dict[str, set[str]]) -> set[str]:
    """Modules loaded when ``start`` is imported: their imports, transitively, and every parent package.

    The CLI module is a leaf here: a stage runs only its own ``cmd_`` function's imports, not the others'.
    """
    seen: set[str] = set()
    todo = list(start)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        if m != "xrdvision.cli":
            todo.extend(graph.get(m, ()))
    return seen


def stage_commands() -> dict[str, set[str]]:
    """Modules each ``cmd_<stage>`` function of the CLI imports, plus the CLI's own module-level imports."""
    known = all_modules()
    tree = ast.parse((PKG / "cli.py").read_text())
    top = {
        n.module
        for n in tree.body
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("xrdvision")
    }
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
            out[node.name.removeprefix("cmd_")] = (
                imported_modules(node, known) | {"xrdvision.cli"} | (top & set(known))
            )
    return out


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_dvc_stage_deps_cover_every_module_the_stage_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    known = all_modules()
    graph = import_graph()
    commands = stage_commands()
    problems = []
    for name, stage in stages.items():
        cmd = stage["cmd"].split()
        assert cmd[:1] == ["xrdvision"], f"{name}: command is not an xrdvision subcommand"
        sub = cmd[1]
        assert sub in commands, f"{name}: cli.py has no cmd_{sub}"
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        for module in sorted(closure(commands[sub], graph)):
            module_path = PKG / "__init__.py" if module == "xrdvision" else known[module]
            if not covered(module_path, deps):
                problems.append(f"{name}: {module_path.relative_to(ROOT)} is imported but not a dep")
        loaded = {
            known[m] if m != "xrdvision" else PKG / "__init__.py" for m in closure(commands[sub], graph)
        }
        for dep in deps:
            if not dep.startswith("src/"):
                continue
            files = [ROOT / dep] if dep.endswith(".py") else sorted((ROOT / dep).rglob("*.py"))
            assert files and all(f.exists() for f in files), f"{name}: dep {dep} does not exist"
            unused = [f.relative_to(ROOT).as_posix() for f in files if f not in loaded]
            if unused:
                problems.append(
                    f"{name}: dep {dep} covers {', '.join(unused)}, which the stage never imports"
                )
    assert not problems, "\n".join(problems)


def print_stage_closures() -> None:  # pragma: no cover - a helper for writing dvc.yaml deps
    """``python tests/test_architecture.py``: the modules each stage's command loads."""
    graph, commands = import_graph(), stage_commands()
    for sub, start in sorted(commands.items()):
        print(sub)
        for m in sorted(closure(start, graph)):
            print("   ", m)


if __name__ == "__main__":  # pragma: no cover
    print_stage_closures()
