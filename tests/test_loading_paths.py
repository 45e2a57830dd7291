"""Every documented way to load a saved or exported pipeline, from a folder and by Hub repo id, and passed components.

The Hub is a local stand-in: :class:`LocalHub` takes ``kldb.hub.publish``'s upload and lays the files out as the
Hugging Face cache holds a downloaded repo (``models--<ns>--<name>/snapshots/<commit>/`` and ``refs/main``), which
diffusers and huggingface_hub read by repo id with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import gen
from diffusers import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    ViTImageProcessor,
)

import pipeline_kldb_boundary
from kldb import cli
from kldb.hub import export_folder, list_files, publish
from kldb.loading import load_pipeline
from kldb.testing import tiny_classifier, tiny_components, tiny_guidance_vae
from pipeline_kldb_boundary import ImageClassifier, KLDBBoundaryPipeline

KWARGS = {"classes": [3, 2], "num_inference_steps": 4, "kldb_guidance_interval": 2, "output_type": "pt"}
REPO_ID = "someone/kldb-tiny"

#: The calls the documentation shows, for a folder. Each takes the folder and returns a pipeline.
FOLDER_CALLS = {
    "DiffusionPipeline, trust_remote_code": lambda f: DiffusionPipeline.from_pretrained(f, trust_remote_code=True),
    "custom_pipeline='kldb_boundary'": lambda f: DiffusionPipeline.from_pretrained(
        f, custom_pipeline="kldb_boundary", trust_remote_code=True
    ),
    "custom_pipeline=<folder>": lambda f: DiffusionPipeline.from_pretrained(
        f, custom_pipeline=str(f), trust_remote_code=True
    ),
    "custom_pipeline=<folder>/pipeline.py": lambda f: DiffusionPipeline.from_pretrained(
        f, custom_pipeline=str(Path(f) / "pipeline.py"), trust_remote_code=True
    ),
    "KLDBBoundaryPipeline.from_pretrained": lambda f: KLDBBoundaryPipeline.from_pretrained(f),
    "kldb.loading.load_pipeline": lambda f: load_pipeline(str(f)),
}
#: The same calls by Hub repo id (``custom_pipeline=<repo id>`` reads the repo's ``pipeline.py``).
HUB_CALLS = {
    "DiffusionPipeline, trust_remote_code": lambda r: DiffusionPipeline.from_pretrained(r, trust_remote_code=True),
    "custom_pipeline='kldb_boundary'": lambda r: DiffusionPipeline.from_pretrained(
        r, custom_pipeline="kldb_boundary", trust_remote_code=True
    ),
    "custom_pipeline=<repo id>": lambda r: DiffusionPipeline.from_pretrained(
        r, custom_pipeline=r, trust_remote_code=True
    ),
    "KLDBBoundaryPipeline.from_pretrained": lambda r: KLDBBoundaryPipeline.from_pretrained(r),
    "kldb.loading.load_pipeline": lambda r: load_pipeline(r),
}
#: Calls that return this module's own class rather than a copy loaded from the folder's file.
OWN_CLASS = ("KLDBBoundaryPipeline.from_pretrained", "kldb.loading.load_pipeline")


class LocalHub:
    """A stand-in for ``huggingface_hub.HfApi`` whose uploads land where a download would leave them.

    ``upload_folder`` copies the allowed files into the Hugging Face cache layout under ``cache``:
    ``models--<ns>--<name>/snapshots/<commit>/`` and ``refs/<branch>``. With ``tree_listing``, it also writes the
    repo's file listing (``trees/<commit>.json``, the documented format of huggingface_hub's tree cache), as an online
    ``snapshot_download`` leaves it; diffusers then resolves the pipeline class as it does online.
    """

    def __init__(self, cache: Path, tree_listing: bool = False):
        self.cache = cache
        self.tree_listing = tree_listing

    def create_repo(self, repo_id: str, **kwargs) -> str:
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, **kwargs) -> None:
        pass

    def upload_folder(self, repo_id: str, folder_path: str, allow_patterns: list[str], revision=None, **kwargs):
        files = [path for path, _ in list_files(folder_path) if path in set(allow_patterns)]
        blobs = {path: (Path(folder_path) / path).read_bytes() for path in files}
        commit = hashlib.sha1(b"".join(path.encode() + blob for path, blob in blobs.items())).hexdigest()
        storage = self.cache / f"models--{repo_id.replace('/', '--')}"
        for path, blob in blobs.items():
            (storage / "snapshots" / commit / path).parent.mkdir(parents=True, exist_ok=True)
            (storage / "snapshots" / commit / path).write_bytes(blob)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / (revision or "main")).write_text(commit)
        if self.tree_listing:
            listing = {
                path: {"size": len(blob), "blob_id": hashlib.sha1(f"blob {len(blob)}\0".encode() + blob).hexdigest()}
                for path, blob in blobs.items()
            }
            (storage / "trees").mkdir(exist_ok=True)
            (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
        return commit


def images(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=gen(0), **KWARGS).images


def load_all(calls: dict, source, reference: torch.Tensor) -> dict[str, str]:
    """Run every call on ``source``; what went wrong, by call (it must return the right class and ``reference``)."""
    problems = {}
    for name, call in calls.items():
        try:
            pipe = call(source)
        except Exception as error:  # report every call that fails, not only the first
            problems[name] = f"{type(error).__name__}: {error}"[:300]
            continue
        if type(pipe).__name__ != "KLDBBoundaryPipeline":
            problems[name] = f"returned {type(pipe)}"
        elif (type(pipe) is KLDBBoundaryPipeline) != (name in OWN_CLASS):
            problems[name] = f"returned {type(pipe)} from module {type(pipe).__module__}"
        elif not torch.equal(images(pipe), reference):
            problems[name] = "other images for the same seed"
    return problems


def generate_with_the_cli(spec: str, out: Path) -> None:
    """``kldb generate --pipeline <spec>``: one image, written with its record."""
    argv = ["generate", "--out", str(out), "--pipeline", spec, "--classes", "three", "two", "--steps", "4",
            "--interval", "2", "--num-images", "1", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 1


@pytest.fixture(scope="module")
def exported(tiny_pipe, tmp_path_factory) -> Path:
    return export_folder(tiny_pipe, tmp_path_factory.mktemp("paths") / "export", repo_id=REPO_ID)


@pytest.fixture(scope="module")
def reference(exported, tiny_pipe) -> torch.Tensor:
    """The images every call has to give: the reloaded pipeline's, which equal the saved one's up to rounding."""
    loaded = images(KLDBBoundaryPipeline.from_pretrained(exported))
    torch.testing.assert_close(loaded, images(tiny_pipe), rtol=0, atol=1e-5)
    return loaded


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub (and so diffusers) reads by default, offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


# ----------------------------------------------------------------------------------------------------------------------
# The layout
# ----------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_hub_layout_of_a_custom_pipeline(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["kldb_boundary", "KLDBBoundaryPipeline"]
    source = Path(pipeline_kldb_boundary.__file__).read_text(encoding="utf-8")
    assert (tmp_path / "saved" / "kldb_boundary.py").read_text(encoding="utf-8") == source
    assert index["classifier"] == ["transformers", "ResNetForImageClassification"]  # kept in its own format


def test_exported_folder_layout(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["kldb_boundary", "KLDBBoundaryPipeline"]
    source = Path(pipeline_kldb_boundary.__file__).read_text(encoding="utf-8")
    for name in ("kldb_boundary.py", "pipeline.py"):
        assert (exported / name).read_text(encoding="utf-8") == source


def test_export_brings_a_folder_saved_in_the_old_layout_to_the_hub_layout(tiny_pipe, reference, tmp_path):
    """A folder saved before model_index.json named the pipeline file: the export names it and loads every way."""
    tiny_pipe.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "kldb_boundary.py").unlink()
    index = json.loads((tmp_path / "old" / "model_index.json").read_text())
    (tmp_path / "old" / "model_index.json").write_text(json.dumps({**index, "_class_name": "KLDBBoundaryPipeline"}))
    folder = export_folder(tmp_path / "old", tmp_path / "export")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == [
        "kldb_boundary",
        "KLDBBoundaryPipeline",
    ]
    assert load_all(FOLDER_CALLS, folder, reference) == {}


def test_export_refreshes_the_classifier_file_of_a_saved_folder(tmp_path):
    adapter = ImageClassifier.from_transformers(*tiny_classifier(seed=0))
    KLDBBoundaryPipeline(**tiny_components(with_classifier=False), classifier=adapter).save_pretrained(tmp_path / "s")
    (tmp_path / "s" / "classifier" / "pipeline_kldb_boundary.py").write_text("# an older copy\n")
    folder = export_folder(tmp_path / "s", tmp_path / "export")
    source = Path(pipeline_kldb_boundary.__file__).read_text(encoding="utf-8")
    assert (folder / "classifier" / "pipeline_kldb_boundary.py").read_text(encoding="utf-8") == source
    theirs = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(theirs.classifier).__name__ == "ImageClassifier" and theirs.classifier.labels == adapter.labels


# ----------------------------------------------------------------------------------------------------------------------
# Every documented call, from a folder and by repo id
# ----------------------------------------------------------------------------------------------------------------------


def test_every_documented_call_loads_an_exported_folder(exported, reference, tmp_path):
    assert load_all(FOLDER_CALLS, exported, reference) == {}
    generate_with_the_cli(str(exported), tmp_path / "run")


def test_every_documented_call_loads_a_saved_folder(tiny_pipe, reference, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "saved")  # save_pretrained alone: no pipeline.py
    calls = {name: call for name, call in FOLDER_CALLS.items() if "pipeline.py" not in name}
    calls["custom_pipeline=<this file>"] = lambda f: DiffusionPipeline.from_pretrained(
        f, custom_pipeline=pipeline_kldb_boundary.__file__, trust_remote_code=True
    )
    assert load_all(calls, tmp_path / "saved", reference) == {}


def test_every_documented_call_loads_a_published_repo_by_id(exported, reference, hub_cache):
    result = publish(exported, REPO_ID, api=LocalHub(hub_cache))
    assert (hub_cache / "models--someone--kldb-tiny" / "refs" / "main").read_text() == result.commit
    assert load_all(HUB_CALLS, REPO_ID, reference) == {}
    generate_with_the_cli(REPO_ID, hub_cache.parent / "run")


def test_the_pipeline_class_loads_a_repo_without_its_code(exported, reference, hub_cache):
    """With the repo's file listing cached (as after an online download), diffusers' own download resolves the class
    from the repo's pipeline file, which takes trust_remote_code; the pipeline class loads the repo without it."""
    publish(exported, REPO_ID, api=LocalHub(hub_cache, tree_listing=True))
    pipe = KLDBBoundaryPipeline.from_pretrained(REPO_ID)
    assert type(pipe) is KLDBBoundaryPipeline and pipe.name_or_path == REPO_ID
    assert torch.equal(images(pipe), reference)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(REPO_ID)  # diffusers asks before it runs the repo's file


@pytest.mark.slow
def test_the_digits_world_loads_every_documented_way():
    from kldb import digits

    world = digits.WORLD_PATH
    assert json.loads((world / "model_index.json").read_text())["_class_name"] == [
        "kldb_boundary",
        "KLDBBoundaryPipeline",
    ]
    # one source file: the world's pipeline file is the repository's (a link in the source tree)
    assert (world / "kldb_boundary.py").read_bytes() == Path(pipeline_kldb_boundary.__file__).read_bytes()
    calls = {name: call for name, call in FOLDER_CALLS.items() if "pipeline.py" not in name}
    calls["kldb.digits.load_pipeline"] = lambda f: digits.load_pipeline(f)
    reference = None
    for name, call in calls.items():
        pipe = call(world)
        assert type(pipe).__name__ == "KLDBBoundaryPipeline", name
        pipe.set_progress_bar_config(disable=True)
        out = pipe(classes=["three", "eight"], num_inference_steps=2, kldb_guidance_interval=2, output_type="pt",
                   generator=gen(0)).images  # fmt: skip
        reference = out if reference is None else reference
        assert torch.equal(out, reference), name


# ----------------------------------------------------------------------------------------------------------------------
# Passed components win on every path
# ----------------------------------------------------------------------------------------------------------------------


def tiny_safety_checker(seed: int) -> StableDiffusionSafetyChecker:
    torch.manual_seed(seed)
    vision = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
              "image_size": 32, "patch_size": 16}  # fmt: skip
    text = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    return StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()


def tiny_image_encoder(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                              image_size=32, patch_size=16, projection_dim=8)  # fmt: skip
    return CLIPVisionModelWithProjection(config).eval()


def optional_components(seed: int) -> dict:
    """One of each optional component; ``seed`` makes another set of weights (and processor settings)."""
    return {
        "safety_checker": tiny_safety_checker(seed),
        "feature_extractor": CLIPImageProcessor(crop_size=32 + seed, size=32 + seed),
        "image_encoder": tiny_image_encoder(seed),
        "classifier": tiny_classifier(seed=seed)[0],
        "classifier_processor": ViTImageProcessor(size={"height": 16 + seed, "width": 16 + seed}),
        "guidance_vae": tiny_guidance_vae(seed),
    }


@pytest.fixture(scope="module")
def full_folder(tmp_path_factory) -> Path:
    """A saved pipeline that holds every optional component."""
    pipe = KLDBBoundaryPipeline(**{**tiny_components(seed=0), **optional_components(0)})
    folder = tmp_path_factory.mktemp("full") / "saved"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert all(index[name][0] is not None for name in optional_components(0))
    return folder


LOAD_PATHS = {
    "DiffusionPipeline": lambda folder, **kw: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **kw),
    "custom_pipeline='kldb_boundary'": lambda folder, **kw: DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="kldb_boundary", trust_remote_code=True, **kw
    ),
    "KLDBBoundaryPipeline": lambda folder, **kw: KLDBBoundaryPipeline.from_pretrained(folder, **kw),
}


@pytest.mark.parametrize("name", sorted(optional_components(0)))
def test_a_passed_optional_component_wins_on_every_path(full_folder, name):
    passed = optional_components(1)[name]
    # StableDiffusionPipeline refuses a safety checker without its feature extractor
    without = {name: None, **({"safety_checker": None} if name == "feature_extractor" else {})}
    for path, load in LOAD_PATHS.items():
        assert getattr(load(full_folder, **{name: passed}), name) is passed, path
        assert getattr(load(full_folder, **without), name) is None, path


def test_saved_optional_components_load_when_none_is_passed(full_folder):
    for path, load in LOAD_PATHS.items():
        pipe = load(full_folder)
        for name, component in optional_components(0).items():
            loaded = getattr(pipe, name)
            assert type(loaded).__name__ == type(component).__name__, (path, name)
            if isinstance(component, torch.nn.Module):
                for key, value in component.state_dict().items():
                    assert torch.equal(loaded.state_dict()[key], value), (path, name, key)
            else:
                assert loaded.to_dict() == component.to_dict(), (path, name)


def test_a_passed_component_of_another_kind_than_the_saved_one(tiny_pipe, tmp_path):
    """The pipeline class takes any classifier; diffusers' dynamic path checks it against the saved kind, and fails."""
    tiny_pipe.save_pretrained(tmp_path / "saved")  # a transformers classifier
    adapter = ImageClassifier.from_transformers(*tiny_classifier(seed=1))
    assert KLDBBoundaryPipeline.from_pretrained(tmp_path / "saved", classifier=adapter).classifier is adapter
    with pytest.raises(ValueError, match=r"is of type: .*ImageClassifier'>, but should be .*PreTrainedModel"):
        DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True, classifier=adapter)


def test_a_passed_classifier_replaces_a_saved_image_classifier(tmp_path):
    saved = ImageClassifier.from_transformers(*tiny_classifier(seed=0))
    KLDBBoundaryPipeline(**tiny_components(with_classifier=False), classifier=saved).save_pretrained(tmp_path / "s")
    passed = ImageClassifier.from_transformers(*tiny_classifier(seed=1))
    for path, load in LOAD_PATHS.items():
        assert load(tmp_path / "s", classifier=passed).classifier is passed, path
    model, _ = tiny_classifier(seed=1)
    assert KLDBBoundaryPipeline.from_pretrained(tmp_path / "s", classifier=model).classifier is model
    with pytest.raises(ValueError, match=r"ResNetForImageClassification'>, but should be .*ModelMixin"):
        DiffusionPipeline.from_pretrained(tmp_path / "s", trust_remote_code=True, classifier=model)


def test_from_pipe_of_a_plain_stable_diffusion_pipeline(tiny_pipe):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**{k: v for k, v in tiny_components().items() if not k.startswith("classifier")})
    pipe = KLDBBoundaryPipeline.from_pipe(sd, classifier=tiny_pipe.classifier)
    assert pipe.classifier is tiny_pipe.classifier and pipe.classifier_processor is None and pipe.guidance_vae is None
    assert pipe.unet is sd.unet
    assert KLDBBoundaryPipeline.from_pipe(sd).classifier is None


# ----------------------------------------------------------------------------------------------------------------------
# Weights from safetensors only
# ----------------------------------------------------------------------------------------------------------------------


def test_a_saved_image_classifier_loads_from_safetensors_only_on_every_path(tmp_path):
    """A folder whose classifier weights are a pickle file only: no path unpickles it."""
    adapter = ImageClassifier.from_transformers(*tiny_classifier(seed=0))
    folder = tmp_path / "saved"
    KLDBBoundaryPipeline(**tiny_components(with_classifier=False), classifier=adapter).save_pretrained(folder)
    weights = folder / "classifier" / "diffusion_pytorch_model.safetensors"
    torch.save(adapter.state_dict(), weights.with_suffix(".bin"))
    weights.unlink()
    for load in LOAD_PATHS.values():
        with pytest.raises(OSError, match=r"diffusion_pytorch_model\.safetensors"):
            load(folder)
