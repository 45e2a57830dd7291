"""Weights only through safetensors; no pickle loading anywhere in the project."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kldb import KLDBBoundaryPipeline

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for p in [ROOT / "pipeline_kldb_boundary.py", *ROOT.glob("kldb/**/*.py"), *ROOT.glob("examples/**/*.py"),
              *ROOT.glob("benchmarks/**/*.py")]
    if p.is_file()
)  # fmt: skip


def unsafe_calls(path: Path) -> list[str]:
    """Imports of pickle-like modules, and torch.load / numpy.load calls without their safe flags."""
    findings = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            findings += [f"import {n}" for n in names if n and n.split(".")[0] in {"pickle", "dill", "joblib", "cloudpickle"}]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if owner == "torch" and keywords.get("weights_only") != "True":
                findings.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner in {"np", "numpy"} and keywords.get("allow_pickle") not in (None, "False"):
                findings.append(f"line {node.lineno}: numpy.load with allow_pickle")
    return findings


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_loading(path):
    assert unsafe_calls(path) == []


def test_scanner_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('w.pt')\ny = torch.load('w.pt', weights_only=True)\n")
    assert unsafe_calls(bad) == ["import pickle", "line 3: torch.load without weights_only=True"]


def test_from_pretrained_refuses_pickled_weights(tmp_path):
    from kldb.testing import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path, safe_serialization=False)
    assert list(tmp_path.glob("unet/*.bin")) and not list(tmp_path.glob("unet/*.safetensors"))
    with pytest.raises(Exception, match=r"(?i)safetensors"):
        KLDBBoundaryPipeline.from_pretrained(tmp_path)
