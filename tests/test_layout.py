"""The package's import structure: the library never imports its experiment harness, and no module imports itself
back through others (README.md's "Layout": each module imports only from the ones listed above it)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fusednoise"
# The command-line front ends, listed below the harness: the only modules outside it allowed to import it.
FRONT_ENDS = {"fusednoise.cli", "fusednoise.check", "fusednoise.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Every fusednoise module ``path`` imports, at module level or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update((alias.name, ()) for alias in node.names if alias.name.startswith("fusednoise"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("fusednoise"):
                continue
            found.add((module, tuple(alias.name for alias in node.names)))
    return found


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(path):
            submodules = {f"{module}.{n}" for n in names} & set(modules)  # "from . import hype": the module hype
            targets |= submodules or ({module} & set(modules))
        graph[name] = targets - {name}
    return graph


def test_the_library_never_imports_the_harness():
    offenders = sorted((name, target) for name, targets in _graph().items() for target in targets
                       if target.startswith("fusednoise.experiments") and not name.startswith("fusednoise.experiments")
                       and name not in FRONT_ENDS)
    assert not offenders, offenders


def test_no_import_cycle():
    # A package importing its own submodules (``fusednoise/__init__.py`` re-exporting the ops) is how packages work:
    # only imports between modules count.
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in _graph().items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
