"""The import tree of mcr_kernels and mcr, read from the sources (ast, module-level imports only).

mcr_kernels' rule: public front ends (mcr_kernels/<op>.py, integrations/) check arguments and
register backends; a backend (triton/, blockwise/, native/) imports neither another backend
nor a front end, only its own folder, the registry (backend.py), the reference oracle and the
private shared modules (mcr_kernels/_<name>.py), which themselves import no backend or front
end. No module of either package takes part in an import cycle.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"mcr_kernels": ROOT / "kernels" / "mcr_kernels", "mcr": ROOT / "mcr"}
EXTENSIONS = {"mcr_kernels._C"}  # compiled by kernels/setup.py; no source to read
BACKEND_FOLDERS = ("triton", "blockwise", "native")
SHARED = ("mcr_kernels.backend", "mcr_kernels.reference")  # what every backend may import


def module_files():
    """{dotted module name: path} of every .py file of both packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def top_level_imports(tree):
    """Import nodes that run when the module is imported: not inside a function body."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def imported_modules(name, path):
    """The modules of both packages (or EXTENSIONS) that `name` imports at module level."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in top_level_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES | dict.fromkeys(EXTENSIONS)
                       else base for alias in node.names]
        found.update(t for t in targets if t in MODULES or t in EXTENSIONS)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def kind(module):
    """("backend", folder) | ("shared", None) | ("private", None) | ("front", None) | ("other", None)."""
    parts = module.split(".")
    if parts[0] != "mcr_kernels":
        return "other", None
    if len(parts) > 1 and parts[1] in BACKEND_FOLDERS:
        return "backend", parts[1]
    if module in SHARED or module in EXTENSIONS:
        return "shared", None
    if len(parts) == 2 and parts[1].startswith("_") or module == "mcr_kernels.compile_check":
        return "private", None
    return "front", None


def test_the_graph_sees_every_package_and_its_backends():
    assert {"mcr_kernels.attention", "mcr_kernels.triton.attention", "mcr_kernels.blockwise.attention",
            "mcr_kernels.native.patch_drop", "mcr.train"} <= set(MODULES)
    assert "mcr_kernels.blockwise.attention" in GRAPH["mcr_kernels.attention"]
    assert "mcr_kernels.native" in GRAPH["mcr_kernels.native.patch_drop"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if kind(m)[0] in ("backend", "private")))
def test_backends_and_shared_modules_import_no_other_backend_nor_a_front_end(module):
    own_kind, folder = kind(module)
    for target in sorted(GRAPH[module]):
        target_kind, target_folder = kind(target)
        if target_kind == "front":
            pytest.fail(f"{module} imports the front end {target}")
        if target_kind == "backend" and (own_kind == "private" or target_folder != folder):
            pytest.fail(f"{module} imports the {target_folder} backend {target}")


def find_cycle(graph):
    """One import cycle [a, b, ..., a] of graph {module: imported modules}, or None."""
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
