"""`.ci/floors.py`, which writes the pip constraints of `make test-compat` from pyproject.toml's floors."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "floors.py"

_spec = importlib.util.spec_from_file_location("ci_floors", SCRIPT)
floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floors)


def pyproject_with(dependencies: list[str], extras: dict[str, list[str]] | None = None) -> dict:
    return {"project": {"dependencies": dependencies, "optional-dependencies": extras or {}}}


def test_constraints_hold_each_package_at_its_declared_floor():
    """The real pyproject.toml, read with packaging's parser as the reference."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    reference = {}
    for line in itertools.chain(project["dependencies"], *project["optional-dependencies"].values()):
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                reference[canonicalize_name(requirement.name)] = spec.version
    lines = floors.constraints(pyproject)
    assert [Requirement(line).name for line in lines] == [canonicalize_name(name) for name in floors.AT_FLOOR]
    for line in lines:
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==" and spec.version == reference[requirement.name], line


def test_floors_are_read_from_extras_and_with_markers_and_upper_bounds():
    pyproject = pyproject_with(
        ["Diffusers[torch] >= 0.38.0, <1", "huggingface_hub>=1.5.0,<3 ; python_version >= '3.10'", "numpy"],
        {"audit": ["accelerate>=0.30.0,<2"], "test": ["kldb-boundary[audit]"]},
    )
    assert floors.declared_floors(pyproject) == {
        "diffusers": "0.38.0",
        "huggingface-hub": "1.5.0",
        "accelerate": "0.30.0",
    }
    assert floors.constraints(pyproject, ("huggingface_hub", "accelerate")) == [
        "huggingface-hub==1.5.0",
        "accelerate==0.30.0",
    ]


def test_a_package_without_a_floor_is_refused():
    with pytest.raises(
        ValueError, match=r"Expected `safetensors` to have a `>=` floor in pyproject.toml but it has none"
    ):
        floors.constraints(pyproject_with(["safetensors<1"]), ("safetensors",))


def test_a_package_with_two_floors_is_refused():
    pyproject = pyproject_with(["accelerate>=0.30.0"], {"audit": ["accelerate>=1.0"]})
    with pytest.raises(
        ValueError, match=r"`accelerate` is declared with two floors in pyproject.toml: 0.30.0 and 1.0"
    ):
        floors.declared_floors(pyproject)


def test_a_line_that_is_not_a_requirement_is_refused():
    with pytest.raises(ValueError, match=r"Expected a PEP 508 requirement in pyproject.toml but got '>=1.0'"):
        floors.declared_floors(pyproject_with([">=1.0"]))


def test_the_script_prints_pip_constraints_as_make_test_compat_runs_it(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["diffusers>=0.38.0,<1", "transformers>=5.6.0", "safetensors>=0.8.0",\n'
        '  "huggingface_hub>=1.5.0"]\n[project.optional-dependencies]\naudit = ["accelerate>=0.30.0"]\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "pyproject.toml")], capture_output=True, text=True, check=True
    )
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert lines == [
        "diffusers==0.38.0",
        "transformers==5.6.0",
        "huggingface-hub==1.5.0",
        "accelerate==0.30.0",
        "safetensors==0.8.0",
    ]
