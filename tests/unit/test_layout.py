"""Keeps the architecture's promises: the model is single-device math, hydra stays at the edge."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "moe_train"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_model_imports_nothing_distributed():
    for path in (PACKAGE / "model").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith("torch.distributed")}
        assert not bad, f"{path.name} imports {bad}"


def test_only_the_tools_import_hydra():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "tools":
            continue
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "hydra"}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The moe_train modules `path` imports anywhere (functions and TYPE_CHECKING blocks too):
    `from package import name` counts as the submodule where `name` is one."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def test_no_file_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"a file this long holds two things: {long}"


def test_no_import_cycles():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: project_imports(p, set(paths)) - {m} for m, p in paths.items()}
    done, stack = set(), []

    def visit(m):  # depth-first; a module met again on the current path closes a cycle
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m) :] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_parallel_uses_only_the_models_public_names_and_the_dispatcher_contract():
    import moe_train.model
    import moe_train.model.moe
    import moe_train.model.moe.dispatch

    allowed = {
        "moe_train.model": set(moe_train.model.__all__),
        "moe_train.model.moe": set(moe_train.model.moe.__all__),
        "moe_train.model.moe.dispatch": set(moe_train.model.moe.dispatch.__all__),
    }
    for path in (PACKAGE / "parallel").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_train.model"):
                names = {a.name for a in node.names}
                assert node.module in allowed, f"{path.name} imports from {node.module}"
                assert names <= allowed[node.module], f"{path.name}: {names - allowed[node.module]}"
