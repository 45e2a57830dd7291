"""Ready for diffusers' community folder: `kldb export --community`, diffusers' lint settings, custom_revision rules."""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline_kldb_boundary
from kldb import cli
from kldb.community import (
    COMMUNITY_FILE,
    EXAMPLE_CODE,
    README_ROW_FILE,
    README_SECTION_FILE,
    readme_row,
    write_community_files,
)
from kldb.hub import pipeline_source
from pipeline_kldb_boundary import KLDBBoundaryPipeline, KLDBBoundaryPipelineOutput

ROOT = Path(__file__).resolve().parents[1]
DIFFUSERS_RUFF = ROOT / "tests" / "diffusers_ruff.toml"


def ruff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The venv's ruff (a test dependency), run in ``cwd`` with no cache."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def community(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("community") / "proposal"
    status = cli.main(["export", "--community", str(folder), "--author", "Jane Doe", "--author-url",
                       "https://github.com/janedoe"])  # fmt: skip
    assert status == 0
    return folder


def test_export_community_writes_the_pipeline_file_and_readme_entries(community):
    assert sorted(p.name for p in community.iterdir()) == [README_ROW_FILE, README_SECTION_FILE, COMMUNITY_FILE]
    assert COMMUNITY_FILE == "kldb_boundary.py"  # the name custom_pipeline="kldb_boundary" resolves to
    source = Path(pipeline_kldb_boundary.__file__).read_text(encoding="utf-8")
    assert (community / COMMUNITY_FILE).read_text(encoding="utf-8") == source == pipeline_source()

    row = (community / README_ROW_FILE).read_text(encoding="utf-8")
    assert row.endswith("\n") and row.count("\n") == 1
    # diffusers' table: | Example | Description | Code Example | Colab | Author |
    cells = [cell.strip() for cell in row.strip().split("|")[1:-1]]
    assert len(cells) == 5
    example, description, code_example, colab, author = cells
    assert example == "KLDB Decision Boundary Guidance"
    assert "*Stress Testing Classifiers around the Decision Boundary with Latent Diffusion*" in description
    assert code_example == "[KLDB Decision Boundary Guidance](#kldb-decision-boundary-guidance)"
    assert colab == "-"
    assert author == "[Jane Doe](https://github.com/janedoe)"

    section = (community / README_SECTION_FILE).read_text(encoding="utf-8")
    assert section.startswith("### KLDB Decision Boundary Guidance\n")  # GitHub's anchor of this heading is the link
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert code is not None and code.group(1) == EXAMPLE_CODE
    assert 'custom_revision="main"' in section  # until the first diffusers release after the merge


def test_community_example_calls_only_real_arguments():
    """Every keyword of the README example is an argument of the pipeline, and every output it reads exists."""
    tree = ast.parse(EXAMPLE_CODE)
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id: node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
    }
    loading = {k.arg: k.value for k in calls["from_pretrained"].keywords}
    assert ast.literal_eval(loading.pop("custom_pipeline")) == "kldb_boundary"
    loading.pop("torch_dtype")
    components = set(inspect.signature(KLDBBoundaryPipeline.__init__).parameters)
    assert set(loading) <= components, set(loading) - components
    assert {"classifier", "classifier_processor"} <= set(loading)

    call_arguments = set(inspect.signature(KLDBBoundaryPipeline.__call__).parameters)
    used = {k.arg for k in calls["pipe"].keywords}
    assert used <= call_arguments, used - call_arguments
    scheduler = {k.arg for k in calls["set_lms_scheduler"].keywords}
    assert scheduler <= {"timestep_spacing", "use_karras_sigmas"}
    assert callable(KLDBBoundaryPipeline.set_lms_scheduler)

    fields = set(KLDBBoundaryPipelineOutput.__dataclass_fields__)
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "out"}  # fmt: skip
    assert read and read <= fields, read - fields


def test_diffusers_ruff_settings_are_diffusers_own(tmp_path):
    """The settings file enforces what diffusers' does: isort with diffusers first-party and two lines after imports."""
    good = (
        'import torch\n\nfrom diffusers import DiffusionPipeline\n\n\nlogger = "x"\nprint(torch, DiffusionPipeline)\n'
    )
    one_block = (
        'import torch\nfrom diffusers import DiffusionPipeline\n\n\nlogger = "x"\nprint(torch, DiffusionPipeline)\n'
    )
    one_line = (
        'import torch\n\nfrom diffusers import DiffusionPipeline\n\nlogger = "x"\nprint(torch, DiffusionPipeline)\n'
    )
    for name, text in (("good", good), ("one_block", one_block), ("one_line", one_line)):
        (tmp_path / f"{name}.py").write_text(text)
    assert ruff("check", "--config", str(DIFFUSERS_RUFF), "good.py", cwd=tmp_path).returncode == 0
    for name in ("one_block", "one_line"):
        result = ruff("check", "--config", str(DIFFUSERS_RUFF), f"{name}.py", cwd=tmp_path)
        assert result.returncode == 1 and "I001" in result.stdout, (name, result.stdout)
    long_line = "x = 1\n" + "y = [" + ", ".join(["1000"] * 30) + "]\n"  # 158 characters: the formatter splits it
    (tmp_path / "long.py").write_text(long_line)
    assert ruff("format", "--check", "--config", str(DIFFUSERS_RUFF), "long.py", cwd=tmp_path).returncode == 1
    text = DIFFUSERS_RUFF.read_text()
    assert "line-length = 119" in text and 'select = ["C", "E", "F", "I", "W"]' in text


def test_community_file_passes_diffusers_lint(community):
    """The exported kldb_boundary.py passes `ruff check` and `ruff format --check` with diffusers' settings.

    To fix a failure in the pipeline file itself:
        ruff check --fix --config tests/diffusers_ruff.toml pipeline_kldb_boundary.py
        ruff format --config tests/diffusers_ruff.toml pipeline_kldb_boundary.py
    """
    check = ruff("check", "--config", str(DIFFUSERS_RUFF), COMMUNITY_FILE, cwd=community)
    assert check.returncode == 0, (
        "pipeline_kldb_boundary.py does not pass diffusers' lint settings; run\n"
        "  ruff check --fix --config tests/diffusers_ruff.toml pipeline_kldb_boundary.py\n" + check.stdout[:3000]
    )
    fmt = ruff("format", "--check", "--diff", "--config", str(DIFFUSERS_RUFF), COMMUNITY_FILE, cwd=community)
    assert fmt.returncode == 0, (
        "pipeline_kldb_boundary.py is not formatted as diffusers formats it; run\n"
        "  ruff format --config tests/diffusers_ruff.toml pipeline_kldb_boundary.py\n" + fmt.stdout[:3000]
    )


def test_community_export_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / COMMUNITY_FILE).write_text("old")
    write_community_files(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / COMMUNITY_FILE).read_text(encoding="utf-8") == pipeline_source()
    assert readme_row().endswith("| - | kldb-boundary developers |")


def run_export(capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(["export", *argv])
    return status, capsys.readouterr().err


def test_community_export_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"Expected argument `author` to be a non-empty name without '\|'"):
        write_community_files(tmp_path / "a", author="Jane | Doe")
    with pytest.raises(ValueError, match=r"Expected argument `author_url` to be None or an https:// address"):
        write_community_files(tmp_path / "a", author_url="http://example.com/jane")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"Expected argument `folder` to be a folder \(new or existing\) but got"):
        write_community_files(tmp_path / "file")
    assert not (tmp_path / "a").exists()

    status, err = run_export(capsys, "--community", str(tmp_path / "c"), "--repo-id", "me/x")
    assert status == cli.EXIT_USAGE
    assert "Expected `--repo-id` only with SOURCE and OUT: `--community DIR` alone exports no weights." in err
    status, err = run_export(capsys, "--community", str(tmp_path / "c"), "--license", "mit", "--no-model-card")
    assert status == cli.EXIT_USAGE and "Expected `--license`, `--no-model-card` only with SOURCE and OUT" in err
    status, err = run_export(capsys, "digits", str(tmp_path / "out"), "--author", "Jane")
    assert status == cli.EXIT_USAGE and "Expected `--author` and `--author-url` only with `--community`" in err
    status, err = run_export(capsys)
    assert status == cli.EXIT_USAGE and "Expected the arguments SOURCE and OUT" in err
    status, err = run_export(capsys, "digits", "--community", str(tmp_path / "c"))
    assert status == cli.EXIT_USAGE and "Expected the arguments SOURCE and OUT" in err
    status, err = run_export(capsys, "digits", str(tmp_path / "c" / "out"), "--community", str(tmp_path / "c"))
    assert status == cli.EXIT_USAGE and "Expected `--community` and OUT to be separate folders" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# How diffusers resolves custom_pipeline="kldb_boundary" from its community mirror (what docs/hub.md states)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def community_mirror(monkeypatch, tmp_path):
    """diffusers' community-mirror lookup, with PyPI's release list and the mirror download replaced by local ones."""
    import diffusers
    from diffusers.utils import dynamic_modules_utils

    releases = ["0.41.0", ".".join(diffusers.__version__.split(".")[:3])]  # the installed one is a release
    requested: list[str] = []
    mirror_file = tmp_path / "mirror" / COMMUNITY_FILE
    mirror_file.parent.mkdir()
    shutil.copy(pipeline_kldb_boundary.__file__, mirror_file)

    def download(repo_id, filename, **kwargs):
        assert (repo_id, kwargs.get("repo_type")) == ("diffusers/community-pipelines-mirror", "dataset")
        requested.append(filename)
        return str(mirror_file)

    monkeypatch.setattr(dynamic_modules_utils, "get_diffusers_versions", lambda: releases)
    monkeypatch.setattr(dynamic_modules_utils, "hf_hub_download", download)
    return requested


def test_custom_revision_takes_a_released_version_or_main(community_mirror):
    import diffusers
    from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module

    def load(revision):
        # what DiffusionPipeline.from_pretrained(..., custom_pipeline="kldb_boundary", custom_revision=revision) calls
        # when the weights do not carry kldb_boundary.py
        return get_class_from_dynamic_module("kldb_boundary", module_file="pipeline.py", revision=revision)

    installed = "v" + ".".join(diffusers.__version__.split(".")[:3])
    assert load(None).__name__ == "KLDBBoundaryPipeline"
    assert load("0.41.0").__name__ == "KLDBBoundaryPipeline"
    assert load("main").__name__ == "KLDBBoundaryPipeline"
    # by default the folder of the installed release, which holds only what was merged before that release
    assert community_mirror == [f"{installed}/kldb_boundary.py", "v0.41.0/kldb_boundary.py", "main/kldb_boundary.py"]
    for refused in (installed, "0123456789abcdef0123456789abcdef01234567", "my-branch"):
        with pytest.raises(ValueError, match=rf"`custom_revision`: {refused} does not exist"):
            load(refused)
