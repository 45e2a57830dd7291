"""Classifier adapters: torchvision, transformers and plain modules, all differentiable down to the latents."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import MeanBrightnessClassifier, gen
from torchvision.models import ResNet18_Weights, resnet18

from kldb import ImageClassifier, KLDBBoundaryPipeline, as_image_classifier
from pipeline_kldb_boundary import kldb_guidance_gradient


def decode_with(pipe):
    def decode(x0):
        return pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample

    return decode


def assert_gradient_reaches_latents(pipe, classifier, classes):
    z = torch.randn(2, 4, 16, 16, generator=gen(0))
    eps = torch.randn(2, 4, 16, 16, generator=gen(1))
    grad, kldb = kldb_guidance_gradient(z, 2.0, classes, decode_with(pipe), classifier, eps=eps)
    assert grad.shape == z.shape
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).norm(dim=1) > 0).all()
    assert torch.isfinite(kldb).all() and kldb.shape == (2,)


@pytest.fixture(scope="module")
def torchvision_classifier():
    torch.manual_seed(0)
    weights = ResNet18_Weights.IMAGENET1K_V1  # only its transforms and metadata: nothing is downloaded
    return ImageClassifier.from_torchvision(resnet18(weights=None).eval(), weights), weights


def test_torchvision_preprocessing_matches_torchvision(torchvision_classifier):
    classifier, weights = torchvision_classifier
    assert classifier.labels[151] == "Chihuahua" and classifier.labels[157] == "papillon"
    assert classifier.num_classes == 1000
    images = torch.rand(2, 3, 300, 260, generator=gen(0))
    expected = weights.transforms()(images)
    torch.testing.assert_close(classifier.preprocess(images), expected, rtol=1e-4, atol=1e-4)


def test_torchvision_gradient_reaches_latents(tiny_pipe, torchvision_classifier):
    classifier, _ = torchvision_classifier
    assert_gradient_reaches_latents(tiny_pipe, classifier, [151, 157])


def test_torchvision_classifier_in_the_pipeline(tiny_pipe, torchvision_classifier):
    classifier, _ = torchvision_classifier
    out = tiny_pipe(
        classes=["Chihuahua", "papillon"], classifier=classifier, num_inference_steps=4, kldb_guidance_interval=2,
        generator=gen(0), output_type="pt",
    )  # fmt: skip
    assert out.probabilities.shape == (1, 1000) and out.guided_updates == 2 and out.skipped_updates == 0


def test_transformers_adapter_reads_the_processor(tiny_pipe):
    classifier = as_image_classifier(tiny_pipe.classifier, tiny_pipe.classifier_processor)
    assert classifier.resize == (16, 16) and classifier.crop is None
    assert classifier.mean.flatten().tolist() == [0.5] * 3 and classifier.labels == ["zero", "one", "two", "three"]
    images = torch.rand(3, 3, 32, 32, generator=gen(0))
    expected_input = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True) * 2 - 1
    torch.testing.assert_close(classifier.preprocess(images), expected_input)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), tiny_pipe.classifier(expected_input).logits)
    assert_gradient_reaches_latents(tiny_pipe, classifier, [1, 3])


def test_transformers_adapter_with_crop_pct():
    # ConvNext/ResNet-50 processors: shortest edge 224 with crop_pct 0.875 -> resize to 256, crop 224
    from transformers import ConvNextImageProcessor

    from kldb.testing import tiny_classifier

    model, _ = tiny_classifier()
    processor = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    classifier = ImageClassifier.from_transformers(model, processor)
    assert classifier.resize == 256 and classifier.crop == (224, 224)
    assert classifier.preprocess(torch.rand(1, 3, 64, 80)).shape == (1, 3, 224, 224)
    # processors with a separate crop size (CLIP-style)
    classifier = ImageClassifier.from_transformers(
        model,
        {"size": {"shortest_edge": 40}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
         "image_mean": [0.4], "image_std": [0.2], "resample": 3},
    )  # fmt: skip
    assert classifier.resize == 40 and classifier.crop == (32, 32) and classifier.interpolation == "bicubic"
    assert classifier.mean.flatten().tolist() == pytest.approx([0.4] * 3)


def test_transformers_adapter_without_processor_warns(caplog):
    from kldb.testing import tiny_classifier

    model, _ = tiny_classifier()
    with caplog.at_level(logging.WARNING):
        classifier = as_image_classifier(model)
    assert "No image processor given" in caplog.text
    assert classifier.resize is None and classifier.mean is None


def test_plain_module(tiny_pipe):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    classifier = ImageClassifier(module, resize=(8, 8), mean=[0.5] * 3, std=[0.25] * 3, labels=list("abcde"))
    images = torch.rand(2, 3, 32, 32, generator=gen(0))
    small = torch.nn.functional.interpolate(images, size=(8, 8), mode="bilinear", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), module((small - 0.5) / 0.25))
    assert_gradient_reaches_latents(tiny_pipe, classifier, [0, 4])


def test_plain_callable_is_used_as_is(tiny_pipe):
    classifier = as_image_classifier(MeanBrightnessClassifier())
    assert classifier.labels == ["dark", "bright"] and classifier.resize is None and classifier.mean is None
    assert_gradient_reaches_latents(tiny_pipe, classifier, [0, 1])


def test_adapter_puts_a_training_model_in_eval_mode(caplog):
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(1), torch.nn.LazyLinear(2)
    )
    module(torch.rand(2, 3, 8, 8))
    module.train()
    with caplog.at_level(logging.WARNING):
        ImageClassifier(module)
    assert not module.training and "eval mode" in caplog.text


def test_classifier_on_another_dtype_is_fed_its_dtype():
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).double()
    logits = ImageClassifier(module)(torch.rand(2, 3, 4, 4))
    assert logits.dtype == torch.float32 and logits.shape == (2, 3)


def test_probabilities_instead_of_logits_warn(tiny_pipe, caplog):
    def softmax_classifier(images):
        return torch.softmax(MeanBrightnessClassifier()(images), dim=-1)

    with caplog.at_level(logging.WARNING):
        tiny_pipe(
            classes=[0, 1], classifier=softmax_classifier, prompt="three", num_inference_steps=2,
            kldb_guidance_scale=0.0, output_type="pt", generator=gen(0),
        )  # fmt: skip
    assert "seems to return probabilities" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Half precision: the preprocessing runs in float32, then casts to the model's dtype
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_preprocessing_of_a_half_precision_model_runs_in_float32(dtype):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).to(dtype)
    classifier = ImageClassifier(module, resize=8, crop=(8, 8), mean=[0.5] * 3, std=[0.25] * 3)
    images = torch.rand(2, 3, 30, 34, generator=gen(0))
    reference = ImageClassifier(torch.nn.Identity(), resize=8, crop=(8, 8), mean=[0.5] * 3, std=[0.25] * 3)
    expected = reference.preprocess(images)  # float32 throughout
    assert expected.dtype == torch.float32
    for given in (images, images.to(dtype)):  # float32 images, or half images from a half-precision VAE
        got = classifier.preprocess(given)
        assert got.dtype == dtype
        torch.testing.assert_close(got, reference.preprocess(given.float()).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(classifier.preprocess(images), expected.to(dtype), rtol=0, atol=0)
    with torch.no_grad():
        logits = classifier(images.to(dtype))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_with_a_classifier_on_cpu(dtype):
    """The pipeline with its classifier runs in bfloat16 and float16 on CPU, unguided (the images of a plain
    StableDiffusionPipeline with the same parts) and guided."""
    from diffusers import StableDiffusionPipeline

    from kldb.testing import tiny_components

    components = tiny_components(seed=0)
    pipe = KLDBBoundaryPipeline(**components).to(dtype=dtype)
    sd = StableDiffusionPipeline(**{k: v for k, v in components.items() if not k.startswith("classifier")})
    kwargs = {"prompt": "three and two", "num_inference_steps": 4, "output_type": "pt"}
    for p in (pipe, sd):
        p.set_progress_bar_config(disable=True)
    unguided = pipe(**kwargs, classes=[3, 2], kldb_guidance_scale=0.0, generator=gen(0))
    assert unguided.images.dtype == dtype and torch.isfinite(unguided.kldb).all()
    assert torch.equal(unguided.images, sd(**kwargs, generator=gen(0)).images)  # sd shares the (cast) modules
    guided = pipe(**kwargs, classes=[3, 2], kldb_guidance_scale=0.5, kldb_guidance_interval=2, generator=gen(0))
    assert guided.guided_updates == 2 and guided.skipped_updates == 0
    assert torch.isfinite(guided.kldb).all() and not torch.equal(guided.images, unguided.images)
