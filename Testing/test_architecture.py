"""The library's layer rule, read from every import statement (including those inside functions).

Layers, lowest first: errors < data < models < engines < evaluation < serving < commands.
A module may import its own layer and the layers below it, never above; no import cycles.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "SAM3DSegmentLib"
PACKAGE = "SAM3DSegmentLib"
LAYERS = ("errors", "data", "models", "engines", "training", "evaluation", "serving", "commands")


def library_modules() -> dict[str, Path]:
    """Dotted module name (without the package prefix) -> file, for every module of the library."""
    modules = {}
    for path in sorted(LIB.rglob("*.py")):
        parts = path.relative_to(LIB).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = library_modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imported_modules(name: str) -> set[str]:
    """The library modules that module ``name`` imports anywhere in its file."""
    package = name.split(".") if is_package(name) else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module[len(PACKAGE) + 1 :]
            else:
                continue
            for alias in node.names:  # "from .pkg import module" imports the module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1 :])
    found.discard(name)
    return found


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    return -1 if top == "" else LAYERS.index(top)


def test_every_module_belongs_to_a_known_layer():
    for name in MODULES:
        if name:
            top = name.split(".")[0]
            assert top in LAYERS, f"{name}: put it in one of the layers {LAYERS} (or add the layer here and in docs)"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n), ids=str)
def test_module_imports_only_its_own_layer_and_below(name):
    for target in imported_modules(name):
        assert target in MODULES, f"{name} imports {target!r}, which is not a library module"
        assert layer_of(target) <= layer_of(name), (
            f"{name} (layer {name.split('.')[0]}) imports {target} (layer {target.split('.')[0]}), a higher layer"
        )


def test_no_import_cycles():
    graph = {name: imported_modules(name) for name in MODULES}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target] if target in path else [node, target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_layer_rule_sees_lazy_imports():
    """The checker must see imports inside functions, or the rule could rot unnoticed."""
    assert "engines.sam_slice_predictor" in imported_modules("engines.choice")  # imported in open_session
    assert "models.checkpoint_cache" in imported_modules("engines.choice")


def test_no_slicer_or_qt_in_the_library():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            roots = []
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                roots = [node.module.split(".")[0]]
            for root in roots:
                assert root not in ("slicer", "qt", "ctk", "vtk", "SAM3DSegmentSlicerLogic"), f"{name} imports {root}"


def test_each_layer_package_says_what_it_holds_and_may_import():
    for layer in LAYERS:
        if layer in MODULES and is_package(layer):
            doc = ast.get_docstring(ast.parse(MODULES[layer].read_text(encoding="utf-8"))) or ""
            assert len(doc.split()) >= 30, f"{layer}/__init__.py needs a paragraph: what it holds, what it may import"
            assert "import" in doc.lower(), f"{layer}/__init__.py should say which layers it may import"


def _differ_by_one_letter(a: str, b: str) -> bool:
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def test_no_two_module_names_differ_by_one_letter():
    stems = sorted({name.split(".")[-1] for name in MODULES if name})
    close = [(a, b) for a, b in itertools.combinations(stems, 2) if _differ_by_one_letter(a, b)]
    assert not close, f"module names too alike: {close}"
