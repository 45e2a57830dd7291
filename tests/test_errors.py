"""Every error the pipeline file raises, matched by its message."""

from __future__ import annotations

import pytest
import torch
from conftest import MeanBrightnessClassifier, gen
from diffusers import DDIMScheduler
from torchvision.models import resnet18

from kldb import ImageClassifier, KLDBGuidanceCallback, as_image_classifier
from kldb.testing import sd_scheduler
from pipeline_kldb_boundary import kldb_guidance_gradient, resolve_classes


def call(pipe, **kwargs):
    defaults = {"prompt": "three", "num_inference_steps": 4, "kldb_guidance_interval": 2, "output_type": "pt"}
    return pipe(**{"generator": gen(0), **defaults, **kwargs})


# --- ImageClassifier ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": 3}, TypeError, r"Expected argument `model` to be a callable returning logits but got <class 'int'>"),
        ({"interpolation": "nearest"}, ValueError, r"`interpolation` to be 'bilinear' or 'bicubic' but got 'nearest'"),
        ({"mean": [0.5] * 3}, ValueError, r"`mean` and `std` to be given together"),
        ({"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, ValueError, r"std > 0 but got \[0.5, 0.5, 0.5\] and \[0.5, 0.0"),
        ({"mean": [0.5], "std": [0.5]}, ValueError, r"`mean` and `std` to hold 3 values"),
        ({"resize": (3, 4, 5)}, ValueError, r"Expected argument `resize` to be an int or a \(height, width\) pair but got \(3, 4, 5\)"),
        ({"resize": 0}, ValueError, r"Expected argument `resize` to be positive but got 0"),
        ({"crop": "big"}, ValueError, r"Expected argument `crop` to be an int or a \(height, width\) pair but got 'big'"),
    ],
)
def test_image_classifier_arguments(kwargs, error, match):
    kwargs = {"model": MeanBrightnessClassifier(), **kwargs}
    with pytest.raises(error, match=match):
        ImageClassifier(kwargs.pop("model"), **kwargs)


def test_from_torchvision_needs_a_weights_enum():
    with pytest.raises(TypeError, match=r"`weights` to be a torchvision weights enum .* but got 'IMAGENET1K_V1'"):
        ImageClassifier.from_torchvision(resnet18(weights=None), "IMAGENET1K_V1")


def test_classifier_output_of_wrong_shape():
    classifier = ImageClassifier(lambda images: images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"Expected the classifier to return logits of shape \[B, n\] but it returned \(2,\)"):
        classifier(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"but it returned str"):
        ImageClassifier(lambda images: "cat")(torch.rand(2, 3, 8, 8))


def test_bare_torchvision_model_is_refused():
    with pytest.raises(TypeError, match=r"`classifier` is a bare torchvision ResNet; wrap it as `ImageClassifier.from_torchvision"):
        as_image_classifier(resnet18(weights=None))


def test_non_callable_classifier_is_refused():
    with pytest.raises(TypeError, match=r"Expected argument `classifier` to be an ImageClassifier, .* but got dict"):
        as_image_classifier({"weights": 1})


# --- classes ---------------------------------------------------------------------------------------------------------


def test_class_names_without_labels():
    with pytest.raises(ValueError, match=r"`classes` were given by name \(\['cat'\]\) but the classifier has no label names"):
        resolve_classes(["cat"], None, 4)


def test_unknown_class_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"`classes` contains 'chihuahuaa', which is not among the classifier's labels. Close matches: \['chihuahua'\]"):
        resolve_classes(["chihuahuaa"], ["chihuahua", "papillon"], 2)
    with pytest.raises(ValueError, match=r"contains 'zebra', which is not among the classifier's labels.$"):
        resolve_classes("zebra", ["chihuahua", "papillon"], 2)


def test_mixed_names_and_indices():
    with pytest.raises(TypeError, match=r"Expected argument `classes` to be a non-empty sequence of distinct ints in \[0, 2\) but got \['papillon', 0\]"):
        resolve_classes(["papillon", 0], ["chihuahua", "papillon"], 2)


# --- guidance internals -------------------------------------------------------------------------------------------------


def test_gradient_needs_exactly_one_noise_source():
    with pytest.raises(ValueError, match=r"Pass exactly one of `eps` \(detached noise prediction\) and `predict_eps`"):
        kldb_guidance_gradient(torch.zeros(1, 4, 2, 2), 1.0, [0], lambda x: x, lambda x: x)


def test_callback_gradient_mode():
    with pytest.raises(ValueError, match=r"`kldb_gradient` has to be one of \('unet', 'detached'\) but is 'both'"):
        KLDBGuidanceCallback(MeanBrightnessClassifier(), [0, 1], gradient="both")


# --- the call ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kldb_guidance_scale": -0.1, "classes": [0, 1]}, ValueError, r"`kldb_guidance_scale` has to be finite and >= 0 but is -0.1"),
        ({"kldb_guidance_scale": float("nan"), "classes": [0, 1]}, ValueError, r"`kldb_guidance_scale` has to be finite and >= 0 but is nan"),
        ({"kldb_guidance_scale": float("inf"), "classes": [0, 1]}, ValueError, r"finite and >= 0 but is inf"),
        ({"kldb_guidance_scale": "0.1", "classes": [0, 1]}, TypeError, r"`kldb_guidance_scale` has to be a float but is str"),
        ({"kldb_guidance_scale": True, "classes": [0, 1]}, TypeError, r"`kldb_guidance_scale` has to be a float but is bool"),
        ({"kldb_gradient": "full", "classes": [0, 1]}, ValueError, r"`kldb_gradient` has to be one of \('unet', 'detached'\) but is 'full'"),
        ({"kldb_guidance_interval": 0, "classes": [0, 1]}, ValueError, r"`kldb_guidance_interval` has to be an integer in \[1, num_inference_steps=4\] but is 0"),
        ({"kldb_guidance_interval": 5, "classes": [0, 1]}, ValueError, r"in \[1, num_inference_steps=4\] but is 5"),
        ({"kldb_guidance_interval": 2.0, "classes": [0, 1]}, ValueError, r"but is 2.0"),
        ({"num_inference_steps": 0, "classes": [0, 1]}, ValueError, r"`num_inference_steps` has to be a positive integer but is 0"),
        ({"num_images_per_prompt": 0, "classes": [0, 1]}, ValueError, r"`num_images_per_prompt` has to be a positive integer but is 0"),
        ({"num_images_per_prompt": 0}, ValueError, r"`num_images_per_prompt` has to be a positive integer but is 0"),
        ({"prompt": [], "classes": [0, 1]}, ValueError, r"`prompt` has to be a string or a non-empty list of strings but is \[\]"),
        ({"latents": torch.zeros(1, 4, 8, 8), "classes": [0, 1]}, ValueError, r"`latents` have to be a tensor of shape \(1, 4, 16, 16\) .* for 1 images of 32x32 but are \(1, 4, 8, 8\)"),
        ({"latents": torch.zeros(2, 4, 16, 16), "classes": [0, 1]}, ValueError, r"`latents` have to be a tensor of shape \(1, 4, 16, 16\) .* but are \(2, 4, 16, 16\)"),
        ({"classes": [0, 7]}, ValueError, r"distinct ints in \[0, 4\) but got \[0, 7\]"),
        ({"classes": ["seven"]}, ValueError, r"`classes` contains 'seven', which is not among the classifier's labels"),
        ({"height": 33, "width": 32, "classes": [0, 1]}, ValueError, r"`height` and `width` have to be divisible by the VAE factor 2 but are 33 and 32"),
        ({"height": 36, "width": 32, "classes": [0, 1]}, ValueError, r"`height` and `width` have to be divisible by 8 but are 36 and 32"),
        ({"prompt": ["three", "two"], "negative_prompt": ["a", "b", "c"], "classes": [0, 1]}, ValueError, r"`negative_prompt`: \['a', 'b', 'c'\] has batch size 3, but `prompt`:"),
        ({"prompt": ["three", "two"], "generator": [gen(0)], "classes": [0, 1]}, ValueError, r"You have passed a list of generators of length 1, but requested an effective batch size of 2"),
        ({"prompt": 3, "classes": [0, 1]}, ValueError, r"`prompt` has to be of type `str` or `list` but is <class 'int'>"),
    ],
)
def test_bad_call_arguments(tiny_pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        call(tiny_pipe, **kwargs)


def test_classes_without_classifier():
    from kldb.testing import tiny_pipeline

    pipe = tiny_pipeline(with_classifier=False)
    with pytest.raises(ValueError, match=r"`classes` were given but the pipeline has no classifier: pass `classifier=`"):
        call(pipe, classes=[0, 1])


def test_non_lms_scheduler_is_refused_at_call_time(tiny_pipe):
    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match=r"KLDB guidance needs the deterministic k-LMS step, but `scheduler` is DDIMScheduler"):
            call(tiny_pipe, classes=[0, 1])
    finally:
        tiny_pipe.scheduler = original


def test_v_prediction_is_refused(tiny_pipe):
    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = sd_scheduler(prediction_type="v_prediction")
    try:
        with pytest.raises(ValueError, match=r"needs an epsilon-prediction model, but the scheduler's `prediction_type` is 'v_prediction'"):
            call(tiny_pipe, classes=[0, 1])
    finally:
        tiny_pipe.scheduler = original


def test_labels_that_do_not_match_the_output_width(tiny_pipe):
    classifier = ImageClassifier(MeanBrightnessClassifier(), labels=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"The classifier returns 2 logits but has 3 labels; they have to match"):
        call(tiny_pipe, classes=[0, 1], classifier=classifier)


def test_prompt_cannot_be_built_without_label_names(tiny_pipe):
    classifier = ImageClassifier(MeanBrightnessClassifier())
    with pytest.raises(ValueError, match=r"`prompt` was not given and the classifier has no label names to build it from"):
        call(tiny_pipe, prompt=None, classes=[0, 1], classifier=classifier)


def test_unet_gradient_refuses_ip_adapter_inputs(tiny_pipe):
    with pytest.raises(ValueError, match=r"`kldb_gradient='unet'` does not support IP-Adapter inputs; use 'detached'"):
        call(tiny_pipe, classes=[0, 1], ip_adapter_image_embeds=[torch.zeros(1, 1, 4)])
