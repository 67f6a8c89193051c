"""The package's import structure, read from the source: no import cycle between elflm modules,
no elflm module imported inside a function (only optional third-party packages are), and no
private (``_name``) function or class of one module used by another."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "elflm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (``from .x import y`` in ``elflm.a`` → ``elflm.x``)."""
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path):
    """``(line, target module, imported names, at module level)`` of every elflm import in ``path``;
    a ``from package import name`` that names a submodule counts as importing that submodule."""
    name = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names if a.name.split(".")[0] == "elflm"]
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(node, name, path.name == "__init__.py")
            if mod.split(".")[0] != "elflm":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            targets = [(s, []) for s in subs] + [
                (mod, [a.name for a in node.names if f"{mod}.{a.name}" not in MODULES])
            ]
        else:
            continue
        for target, names in targets:
            if target in MODULES:
                yield node.lineno, target, names, id(node) in top


def packages_of(target: str, importer: str) -> set[str]:
    """Importing ``elflm.a.b`` first runs the ``__init__`` of ``elflm.a`` (unless the importer is
    inside ``elflm.a``, which is then already loading); the top package is left out."""
    parts = target.split(".")
    pkgs = {".".join(parts[:i]) for i in range(2, len(parts))}
    return {p for p in pkgs if p != importer and not importer.startswith(p + ".")}


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for _, t, _, top in imports(p):
            if top and t != m and not (MODULES[t].name == "__init__.py" and m.startswith(t + ".")):
                graph[m] |= {t} | packages_of(t, m)
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycle = path[path.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_function_level_imports_of_elflm_modules():
    found = [
        f"{module_name(p)}:{line} imports {t}" for p in MODULES.values() for line, t, _, top in imports(p) if not top
    ]
    assert not found, "import elflm modules at module level:\n" + "\n".join(found)


def test_no_private_names_across_modules():
    found = []
    for path in MODULES.values():
        here = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for line, target, names, _ in imports(path):
            found += [
                f"{here}:{line} imports {target}.{n}"
                for n in names
                if n.startswith("_") and not n.startswith("__") and target != here
            ]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = resolve(node, here, path.name == "__init__.py")
                aliases.update(
                    {a.asname or a.name: f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
                )
        for node in ast.walk(tree):
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            if private and isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.append(f"{here}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)
