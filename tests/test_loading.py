"""Loading as users do: custom_pipeline by file, by name inside a model folder, and a Hub-style repo folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import gen
from diffusers import DiffusionPipeline

import pipeline_kldb_boundary
from kldb import write_pipeline_folder

KWARGS = {"classes": [3, 2], "num_inference_steps": 4, "kldb_guidance_interval": 2, "output_type": "pt"}


def run(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=gen(0), **KWARGS)


def test_written_folder_layout(tiny_pipe, tmp_path):
    folder = write_pipeline_folder(tiny_pipe, tmp_path / "repo")
    names = {p.name for p in folder.iterdir()}
    assert {"model_index.json", "kldb_boundary.py", "pipeline.py", "unet", "vae", "classifier"} <= names
    source = Path(pipeline_kldb_boundary.__file__).read_text(encoding="utf-8")
    assert (folder / "kldb_boundary.py").read_text(encoding="utf-8") == source
    assert (folder / "pipeline.py").read_text(encoding="utf-8") == source
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["kldb_boundary", "KLDBBoundaryPipeline"]  # the file that defines the class
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_rewriting_a_folder_replaces_it(tiny_pipe, tmp_path):
    write_pipeline_folder(tiny_pipe, tmp_path / "repo")
    (tmp_path / "repo" / "stale.txt").write_text("old")
    write_pipeline_folder(tiny_pipe, tmp_path / "repo")
    assert not (tmp_path / "repo" / "stale.txt").exists()


def test_custom_pipeline_by_name_in_model_folder(tiny_pipe, tmp_path):
    folder = write_pipeline_folder(tiny_pipe, tmp_path / "repo")
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="kldb_boundary", trust_remote_code=True)
    assert type(pipe).__name__ == "KLDBBoundaryPipeline"
    torch.testing.assert_close(run(pipe).images, tiny_pipe(generator=gen(0), **KWARGS).images, rtol=0, atol=1e-5)


def test_custom_pipeline_as_hub_style_folder(tiny_pipe, tmp_path):
    folder = write_pipeline_folder(tiny_pipe, tmp_path / "repo")
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(pipe).__name__ == "KLDBBoundaryPipeline"
    assert run(pipe).kldb.shape == (1,)


def test_custom_pipeline_as_python_file(tiny_pipe, tmp_path):
    # weights that name no pipeline file, as Stable Diffusion's repos: `custom_pipeline` says where the code is
    tiny_pipe.save_pretrained(tmp_path / "weights")
    (tmp_path / "weights" / "kldb_boundary.py").unlink()
    index = json.loads((tmp_path / "weights" / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (tmp_path / "weights" / "model_index.json").write_text(json.dumps(index))
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "weights", custom_pipeline=pipeline_kldb_boundary.__file__, trust_remote_code=True
    )
    assert type(pipe).__name__ == "KLDBBoundaryPipeline"
    torch.testing.assert_close(run(pipe).images, tiny_pipe(generator=gen(0), **KWARGS).images, rtol=0, atol=1e-5)


def test_load_classifier_reads_a_saved_image_classifier(tmp_path):
    from kldb.loading import is_saved_image_classifier, load_classifier
    from kldb.testing import tiny_classifier
    from pipeline_kldb_boundary import ImageClassifier

    adapter = ImageClassifier.from_transformers(*tiny_classifier(seed=0))
    adapter.save_pretrained(tmp_path / "classifier")
    assert is_saved_image_classifier(str(tmp_path / "classifier"))
    assert not is_saved_image_classifier(str(tmp_path / "missing"))
    loaded = load_classifier(str(tmp_path / "classifier"))
    assert type(loaded) is ImageClassifier and loaded.labels == adapter.labels
    images = torch.rand(2, 3, 32, 32, generator=gen(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), adapter(images), rtol=0, atol=1e-6)


def test_every_spec_casts_each_component_to_the_dtype(tiny_pipe, tmp_path):
    """One loading behaviour: a factory, a folder and the digits loader all end with every module in `dtype`."""
    from kldb import digits
    from kldb.loading import load_pipeline

    pipe = load_pipeline("sweep_fixtures:half_precision_unet_pipeline", dtype="float32")
    assert {name: m.dtype for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)} == {
        "vae": torch.float32, "text_encoder": torch.float32, "unet": torch.float32, "classifier": torch.float32
    }  # fmt: skip
    folder = write_pipeline_folder(tiny_pipe, tmp_path / "saved")
    by_spec = load_pipeline(str(folder), dtype="bfloat16", local_files_only=True)
    by_world_loader = digits.load_pipeline(folder, torch_dtype=torch.bfloat16)
    for loaded in (by_spec, by_world_loader):
        modules = {name: m for name, m in loaded.components.items() if isinstance(m, torch.nn.Module)}
        assert set(modules) == {"vae", "text_encoder", "unet", "classifier"}
        assert all(p.dtype == torch.bfloat16 for m in modules.values() for p in m.parameters())
    for name in ("vae", "unet", "classifier"):
        for a, b in zip(by_spec.components[name].parameters(), by_world_loader.components[name].parameters()):
            assert torch.equal(a, b)
