"""ImageClassifier as a pipeline component: it saves (config, safetensors, its file) and loads as diffusers expects.

Round trips for a torchvision ResNet, a transformers classifier and the digits world's classifier: the same logits to
1e-6, and the same KLDB for a whole guided call after the pipeline is saved and loaded again, by the pipeline class and
by diffusers (which rebuilds the classifier from the copy of the pipeline file in its folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MeanBrightnessClassifier, gen
from diffusers import DiffusionPipeline
from torchvision.models import ResNet18_Weights, resnet18

import pipeline_kldb_boundary
from kldb.testing import tiny_classifier, tiny_components
from pipeline_kldb_boundary import ImageClassifier, KLDBBoundaryPipeline, as_image_classifier, is_image_classifier

IMAGES = torch.rand(3, 3, 32, 32, generator=gen(5))


@pytest.fixture(scope="module")
def torchvision_adapter() -> ImageClassifier:
    torch.manual_seed(0)
    weights = ResNet18_Weights.IMAGENET1K_V1  # only its transforms and metadata: nothing is downloaded
    return ImageClassifier.from_torchvision(resnet18(weights=None).eval(), weights)


@pytest.fixture(scope="module")
def digits_classifier():
    from transformers import AutoImageProcessor, ResNetForImageClassification

    from kldb.digits import WORLD_PATH

    model = ResNetForImageClassification.from_pretrained(WORLD_PATH / "classifier", use_safetensors=True).eval()
    return model, AutoImageProcessor.from_pretrained(WORLD_PATH / "classifier_processor")


def logits(classifier, images=IMAGES) -> torch.Tensor:
    with torch.no_grad():
        return classifier(images)


def round_trip(adapter: ImageClassifier, folder: Path) -> ImageClassifier:
    adapter.save_pretrained(folder)
    return ImageClassifier.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------------
# The component on its own
# ----------------------------------------------------------------------------------------------------------------------


def test_torchvision_round_trip(torchvision_adapter, tmp_path):
    loaded = round_trip(torchvision_adapter, tmp_path / "classifier")
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "pipeline_kldb_boundary.py",  # diffusers' convention: a custom component's code lies in its folder
    ]
    source = Path(pipeline_kldb_boundary.__file__).read_text(encoding="utf-8")
    assert (tmp_path / "classifier" / "pipeline_kldb_boundary.py").read_text(encoding="utf-8") == source
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["architecture"] == {"library": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 1000}}
    assert config["resize"] == 256 and config["crop"] == [224, 224] and config["interpolation"] == "bilinear"
    assert config["mean"] == pytest.approx([0.485, 0.456, 0.406]) and config["labels"][151] == "Chihuahua"
    assert type(loaded.model).__name__ == "ResNet"
    torch.testing.assert_close(logits(loaded), logits(torchvision_adapter), rtol=0, atol=1e-6)


def test_torchvision_architecture_found_from_class_and_shapes(tmp_path):
    torch.manual_seed(0)
    adapter = ImageClassifier(resnet18(weights=None, num_classes=7).eval(), labels=list("abcdefg"))
    assert adapter.config["architecture"] is None  # found when it is saved
    assert adapter.architecture_config() == {
        "library": "torchvision",
        "name": "resnet18",
        "kwargs": {"num_classes": 7},
    }
    loaded = round_trip(adapter, tmp_path / "classifier")
    torch.testing.assert_close(logits(loaded), logits(adapter), rtol=0, atol=1e-6)


def test_explicit_architecture(tmp_path):
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=3).eval()
    adapter = ImageClassifier(model, architecture={"library": "torchvision", "name": "resnet18",
                                                   "kwargs": {"num_classes": 3}})  # fmt: skip
    torch.testing.assert_close(logits(round_trip(adapter, tmp_path / "ok")), logits(adapter), rtol=0, atol=1e-6)
    wrong = ImageClassifier(model, architecture="resnet34")
    with pytest.raises(
        ValueError, match=r"`architecture` to rebuild the classifier's network \(ResNet\) but .*resnet34"
    ):
        wrong.save_pretrained(tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_transformers_round_trip(tmp_path):
    adapter = ImageClassifier.from_transformers(*tiny_classifier(seed=0))
    loaded = round_trip(adapter, tmp_path / "classifier")
    architecture = json.loads((tmp_path / "classifier" / "config.json").read_text())["architecture"]
    assert architecture["library"] == "transformers" and architecture["class"] == "ResNetForImageClassification"
    assert "_name_or_path" not in architecture["config"]
    assert type(loaded.model).__name__ == "ResNetForImageClassification"
    assert loaded.labels == ["zero", "one", "two", "three"] and loaded.resize == (16, 16)
    torch.testing.assert_close(logits(loaded), logits(adapter), rtol=0, atol=1e-6)


def test_digits_classifier_round_trip(digits_classifier, tmp_path):
    adapter = ImageClassifier.from_transformers(*digits_classifier)
    loaded = round_trip(adapter, tmp_path / "classifier")
    assert loaded.labels[3] == "three"
    torch.testing.assert_close(logits(loaded), logits(adapter), rtol=0, atol=1e-6)


def test_a_module_that_cannot_be_rebuilt_is_refused_at_save_time(tmp_path):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2)).eval()
    message = r"cannot be rebuilt from a config, so it cannot be saved\. Wrap a torchvision model .* or pass"
    with pytest.raises(ValueError, match=message):
        ImageClassifier(module).save_pretrained(tmp_path / "classifier")
    assert not (tmp_path / "classifier").exists()
    # in a pipeline: refused before anything is written (not saved as `[null, null]`, which reloads as None)
    pipe = KLDBBoundaryPipeline(**tiny_components(with_classifier=False), classifier=MeanBrightnessClassifier())
    with pytest.raises(ValueError, match=message):
        pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    pipe.register_modules(classifier=None)  # what the message offers: save without it
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["classifier"] == [None, None]


def test_a_classifier_set_around_the_adapter_is_refused_at_save_time(tiny_pipe, tmp_path):
    pipe = KLDBBoundaryPipeline(**tiny_components(with_classifier=False))
    pipe.classifier = MeanBrightnessClassifier()  # bypasses the constructor, which would wrap it
    with pytest.raises(TypeError, match=r"`classifier` to be an ImageClassifier or a transformers model to save it"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize(
    ("architecture", "error", "message"),
    [
        ("no_such_net", ValueError, r"torchvision classification builder name .* 'no_such_net' is not one of them"),
        ({"library": "torchvision", "name": "resnet18", "kwargs": {"weights": "DEFAULT"}}, ValueError,
         r"`architecture\['kwargs'\]` to be a dict of builder arguments without \['weights'"),
        ({"library": "transformers", "class": "AutoConfig", "config": {}}, ValueError,
         r"'AutoConfig' is not a transformers model class"),
        ({"library": "transformers", "class": "ResNetForImageClassification"}, ValueError,
         r"'config' has to be a dict"),
        ({"library": "timm", "name": "resnet18"}, ValueError, r"Expected argument `architecture` to be"),
        (18, TypeError, r"Expected argument `architecture` to be .* but got 18"),
    ],
    ids=["unknown-builder", "weights", "not-a-model", "no-config", "library", "type"],
)  # fmt: skip
def test_architecture_errors(architecture, error, message):
    with pytest.raises(error, match=message):
        ImageClassifier(architecture=architecture)


def test_neither_model_nor_architecture():
    with pytest.raises(
        TypeError, match=r"`model` \(a classifier\) or `architecture` \(to build one\) but got neither"
    ):
        ImageClassifier()


def test_built_from_architecture_alone():
    adapter = ImageClassifier(
        architecture={"library": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 5}}
    )
    assert type(adapter.model).__name__ == "ResNet" and not adapter.model.training
    assert logits(adapter).shape == (3, 5)


# ----------------------------------------------------------------------------------------------------------------------
# In the pipeline: a whole guided call before and after saving
# ----------------------------------------------------------------------------------------------------------------------


def guided(pipe, classes):
    pipe.set_progress_bar_config(disable=True)
    return pipe(classes=classes, prompt="three and two", num_inference_steps=4, kldb_guidance_interval=2,
                kldb_guidance_scale=0.5, output_type="pt", generator=gen(0))  # fmt: skip


CLASSIFIERS = {
    "torchvision": (lambda adapter, _: {"classifier": adapter}, ["Chihuahua", "papillon"]),
    "transformers (wrapped)": (
        lambda _, __: {"classifier": ImageClassifier.from_transformers(*tiny_classifier(seed=0))},
        [3, 2],
    ),
    "transformers (as it is)": (
        lambda _, __: dict(zip(("classifier", "classifier_processor"), tiny_classifier(seed=0))),
        [3, 2],
    ),
    "digits (wrapped)": (lambda _, digits: {"classifier": ImageClassifier.from_transformers(*digits)}, [3, 8]),
}


@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_a_guided_call_gives_the_same_kldb_after_save_and_load(kind, torchvision_adapter, digits_classifier, tmp_path):
    make, classes = CLASSIFIERS[kind]
    components = {**tiny_components(seed=0, with_classifier=False), **make(torchvision_adapter, digits_classifier)}
    pipe = KLDBBoundaryPipeline(**components)
    before = guided(pipe, classes)
    assert before.guided_updates == 2 and before.skipped_updates == 0
    pipe.save_pretrained(tmp_path / "saved")
    # weights read into fresh memory: memory-mapped ones lie at other alignments, where CPU kernels may round the last
    # bit differently, and the normalised gradient step of a guided call amplifies such differences
    ours = KLDBBoundaryPipeline.from_pretrained(tmp_path / "saved", disable_mmap=True)
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True, disable_mmap=True)
    assert type(ours.classifier) is type(pipe.classifier)  # our own class again, not a copy loaded from the folder
    torch.testing.assert_close(logits(ours.classifier), logits(pipe.classifier), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(theirs.classifier), logits(pipe.classifier), rtol=0, atol=1e-6)
    after, dynamic = guided(ours, classes), guided(theirs, classes)
    assert torch.equal(after.kldb, before.kldb) and torch.equal(after.images, before.images)
    assert torch.equal(dynamic.kldb, before.kldb) and torch.equal(dynamic.images, before.images)


def test_a_classifier_loaded_from_a_folder_is_recognised_not_wrapped_again(tmp_path):
    adapter = ImageClassifier.from_transformers(*tiny_classifier(seed=0))
    KLDBBoundaryPipeline(**tiny_components(with_classifier=False), classifier=adapter).save_pretrained(tmp_path / "s")
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "s", trust_remote_code=True)
    copy = theirs.classifier
    assert type(copy) is not ImageClassifier and type(copy).__name__ == "ImageClassifier"  # another class object
    assert is_image_classifier(copy) and as_image_classifier(copy) is copy
    assert KLDBBoundaryPipeline(**theirs.components).classifier is copy
    theirs.save_pretrained(tmp_path / "again")  # saved under the file's name, not the copy's module path
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["classifier"] == ["pipeline_kldb_boundary", "ImageClassifier"]
    torch.testing.assert_close(
        logits(KLDBBoundaryPipeline.from_pretrained(tmp_path / "again").classifier), logits(adapter), rtol=0, atol=1e-6
    )
