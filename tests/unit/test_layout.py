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
