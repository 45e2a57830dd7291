"""Plumbing shared by ``examples/`` and ``examples/notebooks/``: the tiny switch and stand-in models.

Set ``KLDB_EXAMPLES_TINY=1`` and every example runs on the CPU in seconds, offline: Stable Diffusion is replaced by
:func:`kldb.testing.tiny_components` (same architecture, toy sizes, random weights), the classifiers by
same-architecture models with random weights (torchvision's ResNet-50 with its real ``IMAGENET1K_V2`` transforms and
label names, a two-layer transformers ViT with ImageNet label names), and the step counts are cut. That is how CI
keeps the examples' code paths from rotting; the images are then noise. The digits world (or its tiny stand-in) and
the prompt-only against guided comparison the examples save are those of :mod:`kldb.demo`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from pipeline_kldb_boundary import KLDBBoundaryPipeline

#: The environment switch of the tiny, offline form of the examples.
TINY_ENV = "KLDB_EXAMPLES_TINY"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def tiny_mode() -> bool:
    """Whether ``KLDB_EXAMPLES_TINY`` asks for the tiny, offline form of the examples."""
    value = os.environ.get(TINY_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(
            f"Expected the environment variable `{TINY_ENV}` to be one of {_TRUE + _FALSE} but got {value!r}."
        )
    return value in _TRUE


def cuda_device() -> tuple[str, torch.dtype]:
    """``("cuda", torch.float16)``, or a clear error when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"This example needs a CUDA GPU and none is visible. Set {TINY_ENV}=1 to run its tiny CPU form instead "
            "(random weights, images are noise)."
        )
    return "cuda", torch.float16


def tiny_stable_diffusion(**components: Any) -> KLDBBoundaryPipeline:
    """A Stable-Diffusion-shaped :class:`KLDBBoundaryPipeline` at toy size, random weights; ``components`` override."""
    from kldb.testing import tiny_components

    pipe = KLDBBoundaryPipeline(**{**tiny_components(with_classifier=False), **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names, in index order, as torchvision ships them (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def tiny_vit_classifier(labels: Sequence[str], image_size: int = 32, seed: int = 0) -> tuple[Any, Any]:
    """A two-layer transformers ViT image classifier with the given label names and its image processor.

    The processor normalises like ``google/vit-base-patch16-224`` (mean 0.5, std 0.5) at ``image_size``.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    processor = ViTImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return ViTForImageClassification(config).eval(), processor


def label_names(pipe: KLDBBoundaryPipeline, classifier: Any = None) -> list[str]:
    """The label names of the classifier a call uses (``classifier`` or the pipeline's)."""
    from pipeline_kldb_boundary import as_image_classifier

    adapter = as_image_classifier(classifier if classifier is not None else pipe.classifier, pipe.classifier_processor)
    if adapter.labels is None:
        raise ValueError("Expected the classifier to have label names but it has none; pass `labels=`.")
    return adapter.labels
