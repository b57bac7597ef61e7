"""The committed notebooks are thin: outputs stripped, a parameters cell first, only cltlab and stdlib imports."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def code_cells(path: Path) -> list[dict]:
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_ordered_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:4] == ["01_harvest", "02_train", "03_features", "04_replacement"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    for cell in code_cells(path):
        assert cell.get("outputs", []) == [] and cell.get("execution_count") is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin(path):
    cells = code_cells(path)
    assert "CLTLAB_PROFILE" in source(cells[0])  # the parameters cell comes first
    assert "profile, paths = cltlab.notebook()" in source(cells[0])  # one preamble, in cltlab
    for cell in cells:
        tree = ast.parse(source(cell))
        for node in ast.walk(tree):
            assert not isinstance(node, ast.FunctionDef | ast.ClassDef), f"{path.name} defines {node.name}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert all(n.split(".")[0] in ("cltlab", "os", "pathlib") for n in names), names
        assert source(cell).count("\n") < 12  # a few lines per cell
