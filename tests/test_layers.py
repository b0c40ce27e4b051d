"""The package's layers, read from its source (ast; the package is not imported).

Bottom to top (README, "Layout"): numerics -> kernels -> ops -> quantizers -> qconfig -> nn
-> flow -> tools and the package's front door. A module may import its own layer and the
layers below; the import graph has no circle; an import inside a function may only load the
kernels (Triton is optional and slow to import) or a third-party package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "triton_qat"

# First matching prefix decides (longest first); the number is the layer.
LAYERS = {
    "triton_qat.numerics": 1,
    "triton_qat.kernels": 2,
    "triton_qat.ops": 3,
    "triton_qat.quantizers": 4,
    "triton_qat.fake_quantize": 4,  # torch.ao's module name, an alias of quantizers
    "triton_qat.qconfig": 5,
    "triton_qat.nn": 6,
    "triton_qat.flow": 7,
    "triton_qat.tools": 8,
    "triton_qat.__main__": 8,
    "triton_qat": 8,  # the package's front door (__init__): public names
}
MAX_LINES = 700
# One kernel family each: a Triton GEMM with its launchers and autograd-free glue.
KERNEL_FAMILIES = {"kernels/fq_matmul.py", "kernels/int_matmul.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to README's Layout")


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    """(imported triton_qat module, inside a function, line) of every import in `path`."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(child, module, path.name == "__init__.py")
                for alias in child.names:
                    # `from pkg import sub` imports the module pkg.sub when there is one.
                    sub = f"{target}.{alias.name}"
                    found.append((sub if _is_module(sub) else target, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return [(name, inner, line) for name, inner, line in found if _ours(name)]


def _ours(name: str) -> bool:
    return name == "triton_qat" or name.startswith("triton_qat.")


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (
        PACKAGE.parent / rel / "__init__.py"
    ).exists()


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    for name in package_modules():
        layer_of(name)


def test_no_import_goes_up_a_layer():
    bad = []
    for name, path in package_modules().items():
        for target, _, line in imports_of(path):
            if layer_of(target) > layer_of(name):
                bad.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({layer_of(name)}) "
                    f"imports {target} ({layer_of(target)})"
                )
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_imports_inside_functions_only_load_the_kernels():
    bad = []
    for path in package_modules().values():
        for target, inner, line in imports_of(path):
            if inner and layer_of(target) != LAYERS["triton_qat.kernels"]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not bad, "imports inside functions (move them to the top):\n" + "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in imports_of(path):
            # Importing pkg.sub runs pkg/__init__ first: an edge to each enclosing package.
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    graph[name].add(prefix)
    return graph


def test_no_import_circle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layer_checks_catch_an_upward_import(tmp_path):
    # The checks read files; a kernel importing the ops layer must be reported.
    fake = tmp_path / "triton_qat" / "kernels"
    fake.mkdir(parents=True)
    (tmp_path / "triton_qat" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from triton_qat.ops import functional\n")
    (tmp_path / "triton_qat" / "ops").mkdir()
    (tmp_path / "triton_qat" / "ops" / "__init__.py").write_text("")
    (tmp_path / "triton_qat" / "ops" / "functional.py").write_text("")
    globals()["PACKAGE"], old = tmp_path / "triton_qat", PACKAGE
    try:
        with pytest.raises(AssertionError, match="go up a layer"):
            test_no_import_goes_up_a_layer()
        with pytest.raises(AssertionError, match="inside functions"):
            test_imports_inside_functions_only_load_the_kernels()
    finally:
        globals()["PACKAGE"] = old


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_files_stay_small(path: Path):
    rel = str(path.relative_to(PACKAGE))
    lines = len(path.read_text().splitlines())
    if rel in KERNEL_FAMILIES:
        return
    assert lines <= MAX_LINES, f"{rel} has {lines} lines (at most {MAX_LINES}): split it"
