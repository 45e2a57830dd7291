"""The examples, the notebooks and the model card, as users meet them, in their tiny offline form (KLDB_EXAMPLES_TINY=1)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from kldb import demo, digits, examples_support
from kldb.demo import tiny_digits_pipeline
from kldb.examples_support import TINY_ENV, tiny_mode
from kldb.hub import CARD_REPO_ID, MODEL_CARD_PATH, export_folder

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))
EXPECTED_EXAMPLES = {
    "paper_sd14_resnet50", "hf_classifier_three_classes", "custom_classifier", "digits_offline",
    "real_image_to_boundary",
}  # fmt: skip
TIMEOUT_S = 600  # the machine is shared; each tiny example takes seconds to a minute here


def offline_env(tmp_path: Path, tiny: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TINY_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if tiny:
        env[TINY_ENV] = "1"
    return env


def test_every_example_is_tested():
    assert {p.stem for p in EXAMPLES} == EXPECTED_EXAMPLES
    assert {p.name for p in NOTEBOOKS} == {"quickstart_digits.ipynb", "paper_experiment_gpu.ipynb"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_header_says_what_it_needs(example):
    header = example.read_text(encoding="utf-8").split('"""')[1]
    assert "Needs:" in header and "Time:" in header and f"{TINY_ENV}=1 python examples/{example.name}" in header


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_in_tiny_form(example, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / example.stem
    if example.stem == "real_image_to_boundary":  # a strength x alpha search from one photo (kldb.counterfactual)
        record = json.loads((out / "counterfactual.json").read_text())
        assert len(record["candidates"]) == 3 and (out / "input.png").is_file() and "tiny random" in proc.stdout
        assert all((out / name).is_file() for name in record["files"]["candidates"])
        return
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"prompt_only", "guided"}
    for row in results["rows"].values():
        assert all(k >= 0 for k in row["kldb"]) and len(row["kldb"]) == len(row["predicted"]) >= 1
    assert (out / "grid.png").is_file() and list((out / "images").glob("guided_*.png"))
    assert "median KLDB" in proc.stdout and "tiny random" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (digits.WORLD_PATH / "model_index.json").is_file(), reason="the digits world is not trained")
def test_digits_example_runs_on_the_trained_world(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_offline.py")],
        cwd=tmp_path,
        env=offline_env(tmp_path, tiny=False),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "digits_offline" / "results.json").read_text())
    from kldb.presets import QUICK_START

    assert len(results["rows"]["guided"]["kldb"]) == QUICK_START["num_images"] == 16
    assert results["settings"]["step_control"] == "backtracking"
    assert "images moved toward the boundary" in proc.stdout  # the per-seed line of format_summary


# ----------------------------------------------------------------------------------------------------------------------
# Notebooks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert "widgets" not in nb.metadata


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_tiny_form(notebook, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and {"image/png", "image/jpeg"} & set(o.data)]
    assert len(images) == (3 if notebook.stem == "quickstart_digits" else 1)  # the grids are shown inline
    if notebook.stem == "paper_experiment_gpu":
        tables = [o for o in outputs if o.output_type == "display_data" and "text/markdown" in o.data]
        assert tables and "| beta | alpha | median KLDB |" in tables[0].data["text/markdown"]


# ----------------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------------


def card_metadata(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "the model card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def test_model_card_metadata_parses():
    text = MODEL_CARD_PATH.read_text(encoding="utf-8")
    metadata = card_metadata(text)
    assert metadata["library_name"] == "diffusers"
    assert metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "text-to-image"
    assert {"diffusers", "community-pipeline", "decision-boundary"} <= set(metadata["tags"])
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    for section in ("## Method", "## How to load", "## Parameters and defaults", "## Schedulers", "## Limitations"):
        assert section in text
    assert (
        "trust_remote_code=True" in text
        and "custom_revision" in text
        and "examples/community/kldb_boundary.py" in text
    )
    assert "@misc" in text and "Stress Testing Classifiers around the Decision Boundary with Latent Diffusion" in text


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_model_card_snippet_runs_in_tiny_form(tmp_path, monkeypatch):
    """The card's loading snippet, with the repo id pointing at an exported tiny folder and fewer steps."""
    folder = export_folder(tiny_digits_pipeline(), tmp_path / "repo")
    snippet = python_blocks((folder / "README.md").read_text(encoding="utf-8"))[0]
    assert f'"{CARD_REPO_ID}"' in snippet and "num_inference_steps=40" in snippet
    snippet = snippet.replace(f'"{CARD_REPO_ID}"', repr(str(folder)))
    snippet = snippet.replace("num_inference_steps=40", "num_inference_steps=5").replace(
        "num_images_per_prompt=4", "num_images_per_prompt=2"
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "model_card.md", "exec"), namespace)
    out = namespace["out"]
    assert type(namespace["pipe"]).__name__ == "KLDBBoundaryPipeline"
    assert out.kldb.shape == (2,) and out.guided_updates == 2
    assert (tmp_path / "boundary.png").is_file()


def test_model_card_gpu_snippet_uses_the_papers_settings():
    """The card's SD v1.4 + ResNet-50 snippet needs downloads; its settings match the example that CI runs tiny."""
    gpu = python_blocks(MODEL_CARD_PATH.read_text(encoding="utf-8"))[1]
    example = (ROOT / "examples" / "paper_sd14_resnet50.py").read_text(encoding="utf-8")
    compile(gpu, "model_card.md", "exec")
    for setting in (
        'timestep_spacing="trailing", use_karras_sigmas=True',
        '"blurry, deformed, low quality, watermark, text, extra limbs, ugly"',
        '["Chihuahua", "papillon"]',
        "guidance_rescale=0.7",
        "ResNet50_Weights.IMAGENET1K_V2",
    ):
        assert setting in gpu and setting in example, setting
    assert "num_inference_steps=40" in gpu and "STEPS, INTERVAL = 40, 5" in example
    assert "guidance_scale=6.0" in gpu and "BETA, ALPHA = 6.0, 0.1" in example
    assert "manual_seed(28)" in gpu and "SEED = 28" in example


# ----------------------------------------------------------------------------------------------------------------------
# The examples' plumbing
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_switch(monkeypatch):
    monkeypatch.delenv(TINY_ENV, raising=False)
    assert not tiny_mode()
    for value, expected in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(TINY_ENV, value)
        assert tiny_mode() is expected
    monkeypatch.setenv(TINY_ENV, "maybe")
    with pytest.raises(
        ValueError, match=r"Expected the environment variable `KLDB_EXAMPLES_TINY` to be one of .* but got 'maybe'"
    ):
        tiny_mode()


def test_gpu_examples_say_so_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU and none is visible. Set KLDB_EXAMPLES_TINY=1"):
        examples_support.cuda_device()


def test_digits_example_without_the_world(monkeypatch, tmp_path):
    monkeypatch.setattr(digits, "WORLD_PATH", tmp_path / "world")
    with pytest.raises(FileNotFoundError, match=r"The digits world is not trained yet .* or set KLDB_EXAMPLES_TINY=1"):
        demo.digits_pipeline(tiny=False)


def test_label_names(tiny_pipe, brightness_classifier):
    assert examples_support.label_names(tiny_pipe) == ["zero", "one", "two", "three"]
    assert examples_support.label_names(tiny_digits_pipeline())[8] == "eight"
    unlabeled = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Expected the classifier to have label names but it has none"):
        examples_support.label_names(tiny_pipe, classifier=unlabeled)
    assert examples_support.label_names(tiny_pipe, classifier=brightness_classifier) == ["dark", "bright"]
