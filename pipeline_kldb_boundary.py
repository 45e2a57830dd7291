# Copyright 2026 The kldb-boundary developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""KLDB-guided latent diffusion: images on a classifier's decision boundary for any class subset.

Implements "Stress Testing Classifiers around the Decision Boundary with Latent Diffusion" (KLDB guidance):
Stable Diffusion sampled with the deterministic k-LMS scheduler, classifier-free guidance for the prompt, and every
``k`` steps a correction of the latent along the normalised gradient of the KL divergence from the uniform
distribution over the chosen classes to the classifier's softmax.

This file is self-contained on purpose: diffusers loads it alone as a community pipeline
(``custom_pipeline="kldb_boundary"``). It imports torch, diffusers and transformers; torchvision only lazily.
"""

import difflib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedModel

from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    LMSDiscreteScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

GRADIENT_MODES = ("unet", "detached")
#: How the size of each guided step is chosen (``kldb_step_control``): the paper's fixed ``alpha`` or a control.
STEP_CONTROLS = ("fixed", "backtracking", "kldb_scaled", "trust_region")
#: ``kldb_guidance_scale="auto"``: the log grid of alphas its pilot tries, and the pilot's seeds (never those of the
#: returned images: see :meth:`KLDBBoundaryPipeline.choose_guidance_scale`).
AUTO_GRID = (0.01, 0.03, 0.1, 0.3)
AUTO_SEEDS = (1_000_003, 1_000_033, 1_000_037, 1_000_039)
#: Which autoencoder's decoder the guidance backpropagates through (``kldb_guidance_decoder``).
GUIDANCE_DECODERS = ("auto", "vae", "guidance_vae")
AUTOCAST_DTYPES = (None, torch.float16, torch.bfloat16)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from transformers import AutoImageProcessor, AutoModelForImageClassification

        >>> classifier = AutoModelForImageClassification.from_pretrained("microsoft/resnet-50")
        >>> processor = AutoImageProcessor.from_pretrained("microsoft/resnet-50")
        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "CompVis/stable-diffusion-v1-4",
        ...     custom_pipeline="path/to/pipeline_kldb_boundary.py",  # "kldb_boundary" once in diffusers' community
        ...     classifier=classifier,
        ...     classifier_processor=processor,
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")
        >>> pipe.set_lms_scheduler(timestep_spacing="trailing", use_karras_sigmas=True)  # Lin et al. (2024)
        >>> out = pipe(
        ...     classes=["Chihuahua", "papillon"],  # prompt defaults to "Chihuahua and papillon"
        ...     kldb_guidance_scale=0.1,
        ...     num_inference_steps=40,
        ...     guidance_scale=6.0,
        ...     guidance_rescale=0.7,
        ...     negative_prompt="blurry, deformed, low quality, watermark, text, extra limbs, ugly",
        ...     generator=torch.Generator("cuda").manual_seed(28),
        ... )
        >>> out.images[0].save("boundary.png")
        >>> print(out.kldb, out.probabilities[:, out.classes])

        >>> # from a photo instead of noise: the last int(40 * strength) steps run from it (sizes divisible by 8)
        >>> from diffusers.utils import load_image

        >>> photo = load_image("my_dog.png").resize((512, 512))
        >>> edit = pipe(image=photo, strength=0.5, classes=["Chihuahua", "papillon"], kldb_guidance_scale=0.1)
        >>> print(edit.kldb_start, edit.kldb, edit.pixel_l2, edit.predicted_class_start, edit.predicted_class)
        ```
"""


# ----------------------------------------------------------------------------------------------------------------------
# The metric (Equation 1)
# ----------------------------------------------------------------------------------------------------------------------


def check_classes(classes: Any, num_classes: int) -> list[int]:
    """Validate a class-index subset and return it as a list of Python ints.

    Raises:
        TypeError: if ``classes`` is not a sequence of integers.
        ValueError: if it is empty, has duplicates, or an index outside ``[0, num_classes)``.
    """
    template = "Expected argument `classes` to be a non-empty sequence of distinct ints in [0, {n}) but got {got!r}."
    if isinstance(classes, (torch.Tensor, np.ndarray)):
        classes = classes.tolist()
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(template.format(n=num_classes, got=classes))
    indices = []
    for c in classes:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise TypeError(template.format(n=num_classes, got=list(classes)))
        indices.append(int(c))
    if not indices or len(set(indices)) != len(indices) or any(not 0 <= c < num_classes for c in indices):
        raise ValueError(template.format(n=num_classes, got=indices))
    return indices


def _check_logits(logits: Any) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"Expected argument `logits` to be a floating-point tensor of shape [B, n] but got {got}.")
    # float16/bfloat16 logits are scored in float32: the log-probabilities of rare classes need the range
    return logits if logits.dtype == torch.float64 else logits.float()


def checked_logits(logits: Any, batch: int, name: str = "classifier") -> torch.Tensor:
    """``logits`` if it is a floating-point ``[batch, n]`` tensor; otherwise an error that names ``name``.

    A classifier that returns logits for fewer (or more) images than it was given would otherwise be scored against
    the wrong images, or broadcast silently.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected the `{name}` to return floating-point logits of shape [B, n] but it returned {got}."
        )
    if logits.shape[0] != batch:
        raise ValueError(
            f"Expected the `{name}` to return logits for each of the {batch} images it was given but it returned "
            f"{logits.shape[0]} rows."
        )
    return logits


def kldb_score(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    r"""KL divergence to the decision boundary (KLDB) of the classes ``classes``, per image (Equation 1).

    .. math::
        \mathrm{KLDB}(x) = \sum_{i \in C} \tfrac{1}{|C|} \log \frac{1/|C|}{p_i(x)}
                         = -\log|C| - \tfrac{1}{|C|} \sum_{i \in C} \log \mathrm{softmax}(f(x))_i

    Computed from logits with ``log_softmax`` so that it stays finite and differentiable when some :math:`p_i`
    underflows. Natural log; 0 exactly when the classes in :math:`C` share all the probability mass equally.

    Args:
        logits: ``[B, n]`` classifier logits.
        classes: the class subset :math:`C`, distinct ints in ``[0, n)``.

    Returns:
        ``[B]`` KLDB in nats (float32, or float64 for float64 logits).

    Example:
        >>> import torch
        >>> kldb_score(torch.tensor([[2.0, 2.0, -1.0], [4.0, 0.0, 0.0]]), [0, 1]).round(decimals=4)
        tensor([0.0246, 1.3428])
    """
    logits = _check_logits(logits)
    indices = check_classes(classes, logits.shape[-1])
    log_probs = torch.log_softmax(logits, dim=-1)[:, indices]  # (B, |C|)
    log_size = torch.log(torch.tensor(float(len(indices)), dtype=logits.dtype, device=logits.device))
    # -(log p_i + log|C|) averaged, rather than -log|C| - mean(log p_i): at exact uniformity every term is 0 before
    # the average, so the score is exactly 0 and not a rounding of log|C| minus itself
    score = -(log_probs + log_size).mean(dim=-1)
    # mathematically >= 0: the clamp removes float rounding below zero from the value only, so that the gradient
    # (softmax - uniform over C) is kept right at the boundary, where the value rounds to 0
    return score + (score.clamp_min(0.0) - score).detach()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Shannon entropy of the full softmax, in nats, per image.

    .. math::
        H(x) = -\sum_{i=1}^{n} p_i \log p_i, \qquad p = \mathrm{softmax}(f(x))

    Args:
        logits: ``[B, n]`` classifier logits.

    Returns:
        ``[B]`` entropy in nats.

    Example:
        >>> import torch
        >>> entropy(torch.zeros(1, 4)).item() == torch.log(torch.tensor(4.0)).item()
        True
    """
    logits = _check_logits(logits)
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    # p log p -> 0 as p -> 0: an exact zero (a -inf logit) gives 0, not nan; nan logits stay nan
    return -torch.where(probs == 0, torch.zeros_like(probs), probs * log_probs).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Classifier adapters: images (B, 3, H, W) in [0, 1] -> logits (B, n), differentiable preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def _pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"Expected argument `{name}` to be an int or a (height, width) pair but got {size!r}.")


#: Stem of the copy of this file in the folder of a saved :class:`ImageClassifier`, as diffusers' convention for custom
#: components wants (``model_index.json`` names it: ``"classifier": ["pipeline_kldb_boundary", "ImageClassifier"]``).
#: It is this module's name when installed, which is what diffusers records for the class.
CLASSIFIER_FILE_STEM = "pipeline_kldb_boundary"
#: Builder arguments an ``architecture`` may not set: the network is built with random weights, then loaded.
_RESERVED_BUILDER_ARGUMENTS = ("weights", "progress", "pretrained")
_ARCHITECTURE_TEMPLATE = (
    "Expected argument `architecture` to be a torchvision classification builder name (e.g. 'resnet50') or a dict "
    "{{'library': 'torchvision', 'name': ..., 'kwargs': {{...}}}} or {{'library': 'transformers', 'class': ..., "
    "'config': {{...}}}} but got {got!r}."
)


def is_image_classifier(obj: Any) -> bool:
    """Whether ``obj`` is an :class:`ImageClassifier`, also one whose class was loaded from a Hub folder's copy of
    this file (a different class object with the same marker)."""
    return bool(getattr(type(obj), "_is_kldb_image_classifier", False))


def _check_architecture(architecture: Any) -> dict[str, Any]:
    """``architecture`` as a dict ``{"library": ..., ...}``, or an error naming what is wrong."""
    if isinstance(architecture, str):
        architecture = {"library": "torchvision", "name": architecture}
    if not isinstance(architecture, dict):
        raise TypeError(_ARCHITECTURE_TEMPLATE.format(got=architecture))
    library = architecture.get("library")
    if library == "torchvision":
        import torchvision.models

        name, kwargs = architecture.get("name"), architecture.get("kwargs") or {}
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(_ARCHITECTURE_TEMPLATE.format(got=architecture) + f" {name!r} is not one of them.")
        if not isinstance(kwargs, dict) or any(key in kwargs for key in _RESERVED_BUILDER_ARGUMENTS):
            raise ValueError(
                f"Expected `architecture['kwargs']` to be a dict of builder arguments without "
                f"{list(_RESERVED_BUILDER_ARGUMENTS)} (weights are loaded from the saved file) but got {kwargs!r}."
            )
        return {"library": "torchvision", "name": name, "kwargs": dict(kwargs)}
    if library == "transformers":
        import transformers

        model_class = getattr(transformers, str(architecture.get("class")), None)
        if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
            raise ValueError(
                _ARCHITECTURE_TEMPLATE.format(got=architecture)
                + f" {architecture.get('class')!r} is not a transformers model class."
            )
        if not isinstance(architecture.get("config"), dict):
            raise ValueError(_ARCHITECTURE_TEMPLATE.format(got=architecture) + " 'config' has to be a dict.")
        return {"library": "transformers", "class": model_class.__name__, "config": dict(architecture["config"])}
    raise ValueError(_ARCHITECTURE_TEMPLATE.format(got=architecture))


def _build_network(architecture: dict[str, Any]) -> torch.nn.Module:
    """The network an ``architecture`` (checked by :func:`_check_architecture`) describes, with random weights."""
    if architecture["library"] == "torchvision":
        import torchvision.models

        return torchvision.models.get_model(architecture["name"], weights=None, **architecture["kwargs"])
    import transformers

    model_class = getattr(transformers, architecture["class"])
    return model_class(model_class.config_class.from_dict(architecture["config"]))


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _same_torchvision_network(model: torch.nn.Module, name: str, kwargs: dict[str, Any]) -> bool:
    """Whether torchvision's builder ``name(**kwargs)`` makes a network of ``model``'s class and parameter shapes."""
    import torchvision.models

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        try:
            candidate = torchvision.models.get_model(name, weights=None, **kwargs)
        except (TypeError, ValueError):
            return False
    return type(candidate) is type(model) and _shapes(candidate) == _shapes(model)


def _torchvision_builder_of_weights(weights: Any) -> str | None:
    """The torchvision builder whose weights enum ``weights`` belongs to (``ResNet50_Weights`` -> ``"resnet50"``)."""
    import torchvision.models

    for name in torchvision.models.list_models(module=torchvision.models):
        if torchvision.models.get_model_weights(name) is type(weights):
            return name
    return None


class ImageClassifier(ModelMixin, ConfigMixin):
    """Adapter giving any image classifier the contract KLDB guidance needs; a pipeline component that saves and loads.

    ``forward`` maps images ``(B, 3, H, W)`` with values in ``[0, 1]`` to logits ``(B, n)`` in float32, applying the
    model's own preprocessing (resize, center crop, normalisation) in torch so that gradients reach the images. The
    preprocessing runs in float32 (or float64) and its result is cast to the model's dtype, so a float16 or bfloat16
    model works on any device.

    It saves like any diffusers model (``save_pretrained``: ``config.json`` with the preprocessing, the labels and how
    to rebuild the network, safetensors weights, and this file, so that a Hub download rebuilds it with
    ``trust_remote_code=True``) and loads with ``ImageClassifier.from_pretrained``; in a pipeline it is saved and
    loaded with the other components. The network is rebuilt from ``architecture``: torchvision classifiers by their
    builder name, transformers classifiers from their config. A module that cannot be rebuilt from a config is refused
    at save time.

    Args:
        model: a ``torch.nn.Module`` or callable returning logits, a tuple whose first item is the logits, or an
            object with a ``logits`` attribute (transformers outputs). ``None`` builds the network from
            ``architecture`` with random weights (what ``from_pretrained`` does before it loads the weights).
        architecture: how to rebuild ``model``: the name of a torchvision classification builder (``"resnet50"``), a
            dict ``{"library": "torchvision", "name": "resnet50", "kwargs": {"num_classes": 10}}``, or
            ``{"library": "transformers", "class": "ResNetForImageClassification", "config": {...}}``. By default it is
            found when the classifier is saved (see :meth:`architecture_config`).
        resize: ``int`` to resize the shorter edge to that length (torchvision / ``shortest_edge`` semantics), a
            ``(height, width)`` pair to resize to exactly that size, or ``None`` for no resize.
        crop: ``(height, width)`` (or ``int``) center crop after the resize, or ``None``.
        mean, std: per-channel normalisation after resize and crop, or ``None`` for none.
        labels: class names in index order (used to resolve ``classes`` given by name and to build prompts).
        interpolation: ``"bilinear"`` or ``"bicubic"`` (antialiased, as torchvision's tensor transforms).
    """

    # a copy of this class loaded from a saved folder's file is another class object: recognised by this marker
    _is_kldb_image_classifier = True

    def __init__(
        self,
        model: torch.nn.Module | Callable[[torch.Tensor], Any] | None = None,
        *,
        architecture: str | dict[str, Any] | None = None,
        resize: int | Sequence[int] | None = None,
        crop: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
        interpolation: str = "bilinear",
    ):
        super().__init__()
        architecture = _check_architecture(architecture) if architecture is not None else None
        if model is None:
            if architecture is None:
                raise TypeError(
                    "Expected argument `model` (a classifier) or `architecture` (to build one) but got neither."
                )
            model = _build_network(architecture).eval()
        if not callable(model):
            raise TypeError(f"Expected argument `model` to be a callable returning logits but got {type(model)}.")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"Expected argument `interpolation` to be 'bilinear' or 'bicubic' but got {interpolation!r}."
            )
        if (mean is None) != (std is None):
            raise ValueError("Expected arguments `mean` and `std` to be given together but got only one of them.")
        if std is not None and (len(std) != 3 or len(mean) != 3 or any(s <= 0 for s in std)):
            raise ValueError(f"Expected `mean` and `std` to hold 3 values with std > 0 but got {mean!r} and {std!r}.")
        self.model = model
        self.resize = resize if isinstance(resize, int) or resize is None else _pair(resize, "resize")
        if isinstance(self.resize, int) and self.resize <= 0:
            raise ValueError(f"Expected argument `resize` to be positive but got {resize!r}.")
        self.crop = _pair(crop, "crop")
        self.interpolation = interpolation
        self.labels = list(labels) if labels is not None else None
        # plain float32 tensors, not buffers: they stay float32 when the model is cast, as the preprocessing does
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) if mean is not None else None
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) if std is not None else None
        self.register_to_config(
            architecture=architecture,
            resize=self.resize,
            crop=self.crop,
            mean=[float(m) for m in mean] if mean is not None else None,
            std=[float(s) for s in std] if std is not None else None,
            labels=self.labels,
            interpolation=interpolation,
        )
        if isinstance(model, torch.nn.Module) and model.training:
            logger.warning(f"Putting classifier {type(model).__name__} in eval mode (it was in training mode).")
            model.eval()

    # --- factories ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_torchvision(
        cls, model: torch.nn.Module, weights: Any, architecture: str | dict[str, Any] | None = None
    ) -> "ImageClassifier":
        """Wrap a torchvision classifier with the preprocessing and label names of its weights enum.

        Example: ``ImageClassifier.from_torchvision(resnet50(weights=w), w)`` with
        ``w = ResNet50_Weights.IMAGENET1K_V2``. The builder that rebuilds the network when it is saved is the one the
        weights enum belongs to (``"resnet50"``), unless ``architecture`` names another.
        """
        if not hasattr(weights, "transforms") or not hasattr(weights, "meta"):
            raise TypeError(
                f"Expected argument `weights` to be a torchvision weights enum (e.g. ResNet50_Weights.IMAGENET1K_V2) "
                f"but got {weights!r}."
            )
        preset = weights.transforms()
        interpolation = getattr(getattr(preset, "interpolation", None), "value", "bilinear")
        resize = list(preset.resize_size)
        labels = list(weights.meta["categories"])
        if architecture is None:
            name = _torchvision_builder_of_weights(weights)
            architecture = (
                {"library": "torchvision", "name": name, "kwargs": {"num_classes": len(labels)}} if name else None
            )
        return cls(
            model,
            architecture=architecture,
            resize=resize[0] if len(resize) == 1 else tuple(resize),
            crop=tuple(preset.crop_size) if len(preset.crop_size) == 2 else preset.crop_size[0],
            mean=list(preset.mean),
            std=list(preset.std),
            labels=labels,
            interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
        )

    @classmethod
    def from_transformers(cls, model: torch.nn.Module, image_processor: Any = None) -> "ImageClassifier":
        """Wrap a transformers image-classification model; resize/crop/normalise from its image-processor config.

        ``image_processor`` is the model's ``AutoImageProcessor`` (or its config as a dict). Images given to the
        adapter are already in ``[0, 1]``, so the processor's ``rescale_factor`` is not applied again.
        """
        config = getattr(model, "config", None)
        id2label = getattr(config, "id2label", None) or {}
        labels = [id2label[i] for i in sorted(id2label)] if id2label else None
        if image_processor is None:
            logger.warning(
                f"No image processor given for classifier {type(model).__name__}: images are passed at their own "
                "size without normalisation. Pass `classifier_processor` (its AutoImageProcessor) to match training."
            )
            return cls(model, labels=labels)
        proc = image_processor if isinstance(image_processor, dict) else image_processor.to_dict()
        size = proc.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        resize: int | tuple[int, int] | None = None
        crop: tuple[int, int] | None = None
        if proc.get("do_resize", True) and size:
            if "height" in size and "width" in size:
                resize = (int(size["height"]), int(size["width"]))
            elif "shortest_edge" in size:
                edge = int(size["shortest_edge"])
                crop_pct = proc.get("crop_pct")
                if crop_pct is not None and edge < 384:
                    # ConvNeXt/ResNet processors: resize the short edge to edge / crop_pct, then crop edge x edge
                    resize, crop = int(edge / crop_pct), (edge, edge)
                elif crop_pct is not None:
                    resize = (edge, edge)
                else:
                    resize = edge
        if proc.get("do_center_crop") and proc.get("crop_size"):
            crop_size = proc["crop_size"]
            crop = (
                (int(crop_size["height"]), int(crop_size["width"]))
                if isinstance(crop_size, dict)
                else _pair(crop_size, "crop_size")
            )
        mean = std = None
        if proc.get("do_normalize", True) and proc.get("image_mean") is not None:
            mean, std = list(proc["image_mean"]), list(proc["image_std"])
            if len(mean) == 1:
                mean, std = mean * 3, std * 3
        resample = proc.get("resample", 2)
        return cls(
            model,
            resize=resize,
            crop=crop,
            mean=mean,
            std=std,
            labels=labels,
            interpolation="bicubic" if resample == 3 else "bilinear",
        )

    # --- the contract ------------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int | None:
        """Number of classes, from the labels or the model config; ``None`` when neither says."""
        if self.labels is not None:
            return len(self.labels)
        num_labels = getattr(getattr(self.model, "config", None), "num_labels", None)
        return int(num_labels) if num_labels is not None else None

    def _param(self) -> torch.Tensor | None:
        if isinstance(self.model, torch.nn.Module):
            return next(self.model.parameters(), None)
        return None

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (CPU for a parameter-free callable), as diffusers components have."""
        param = self._param()
        return (
            param.device if param is not None else self.mean.device if self.mean is not None else torch.device("cpu")
        )

    @property
    def dtype(self) -> torch.dtype:
        param = self._param()
        return param.dtype if param is not None else torch.float32

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize, center crop and normalise ``(B, 3, H, W)`` images in ``[0, 1]``, differentiably.

        The arithmetic runs in float32 (float64 for float64 images or model): antialiased resizing has no float16 or
        bfloat16 kernel on CPU, and rounding there would blur what the classifier sees. The result is cast to the
        model's dtype (a parameter-free callable gets the dtype of ``images``).
        """
        param = self._param()
        target = param.dtype if param is not None else images.dtype
        x = images.to(torch.promote_types(torch.promote_types(images.dtype, target), torch.float32))
        if self.resize is not None:
            h, w = x.shape[-2:]
            if isinstance(self.resize, int):
                scale = self.resize / min(h, w)
                size = (self.resize, max(1, int(w * scale))) if h <= w else (max(1, int(h * scale)), self.resize)
            else:
                size = self.resize
            if tuple(size) != (h, w):
                x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        if self.crop is not None:
            h, w = x.shape[-2:]
            ch, cw = self.crop
            if ch > h or cw > w:
                x = F.interpolate(x, size=(max(ch, h), max(cw, w)), mode=self.interpolation, align_corners=False)
                h, w = x.shape[-2:]
            top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
            x = x[..., top : top + ch, left : left + cw]
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)
        return x.to(target)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = self._param()  # a parameter-free callable gets the images where they are
        x = images if param is None else images.to(device=param.device)
        out = self.model(self.preprocess(x))
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"Expected the classifier to return logits of shape [B, n] but it returned {got}.")
        return out.float()

    # --- saving and loading ------------------------------------------------------------------------------------------

    def architecture_config(self) -> dict[str, Any]:
        """How to rebuild the network from a config, as saved in ``config.json`` under ``architecture``.

        The ``architecture`` given at construction (a torchvision one is checked against the network's class and
        parameter shapes), else one found from the network: a transformers model by its class and config, a
        torchvision model by its class and parameter shapes among torchvision's classification builders.

        Raises:
            ValueError: if the network cannot be rebuilt from a config; the message says what to do instead.
        """
        model, given = self.model, self.config["architecture"]
        if given is not None:
            if given["library"] == "torchvision" and not (
                isinstance(model, torch.nn.Module) and _same_torchvision_network(model, given["name"], given["kwargs"])
            ):
                raise ValueError(
                    f"Expected argument `architecture` to rebuild the classifier's network ({type(model).__name__}) "
                    f"but torchvision's {given['name']}(**{given['kwargs']}) has another class or other parameter "
                    "shapes; name the builder and arguments that made the network."
                )
            return given
        import transformers

        if isinstance(model, PreTrainedModel) and getattr(transformers, type(model).__name__, None) is type(model):
            config = model.config.to_dict()
            config.pop("_name_or_path", None)  # where it was loaded from: not part of the architecture
            return {"library": "transformers", "class": type(model).__name__, "config": config}
        if isinstance(model, torch.nn.Module) and type(model).__module__.startswith("torchvision.models"):
            import torchvision.models

            linear = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
            sizes = dict.fromkeys([*([len(self.labels)] if self.labels else []), *linear[-1:], None])
            for name in torchvision.models.list_models(module=torchvision.models):
                if torchvision.models.get_model_builder(name).__module__ != type(model).__module__:
                    continue
                for size in sizes:
                    kwargs = {"num_classes": size} if size is not None else {}
                    if _same_torchvision_network(model, name, kwargs):
                        return {"library": "torchvision", "name": name, "kwargs": kwargs}
        raise ValueError(
            f"The classifier's network ({type(model).__name__}) cannot be rebuilt from a config, so it cannot be "
            "saved. Wrap a torchvision model with `ImageClassifier.from_torchvision(model, weights)` or pass "
            "`ImageClassifier(model, architecture='<torchvision builder name>', ...)`; give a transformers model as "
            "it is or through `ImageClassifier.from_transformers`. Otherwise save the pipeline without it "
            "(`pipe.register_modules(classifier=None)` before `save_pretrained`) and pass it again with "
            "`from_pretrained(..., classifier=...)` or per call (`pipe(..., classifier=...)`)."
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """As :meth:`ModelMixin.save_pretrained`, with this file beside the weights so that a Hub download rebuilds it.

        Refused (before anything is written) when the network cannot be rebuilt: see :meth:`architecture_config`.
        """
        self.register_to_config(architecture=self.architecture_config())
        os.makedirs(save_directory, exist_ok=True)
        source = Path(inspect.getfile(type(self))).read_text(encoding="utf-8")
        Path(save_directory, f"{CLASSIFIER_FILE_STEM}.py").write_text(source, encoding="utf-8")
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "ImageClassifier":
        """As :meth:`ModelMixin.from_pretrained`: the network is rebuilt from ``architecture``, then its weights are
        read from safetensors (only, unless ``use_safetensors=False`` is passed), also when a pipeline loads it."""
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def _is_transformers_classifier(model: Any) -> bool:
    return isinstance(model, PreTrainedModel) and hasattr(getattr(model, "config", None), "id2label")


def as_image_classifier(classifier: Any, image_processor: Any = None) -> ImageClassifier:
    """Turn what a user passes as ``classifier`` into an :class:`ImageClassifier`.

    Accepts an :class:`ImageClassifier` (returned as is, also a copy of the class loaded from a saved folder), a
    transformers image-classification model (preprocessing from ``image_processor``), or any other module/callable
    mapping ``[0, 1]`` images to logits (no preprocessing). A bare torchvision model is refused: it needs its weights'
    normalisation, see :meth:`ImageClassifier.from_torchvision`.
    """
    if is_image_classifier(classifier):
        return classifier
    if _is_transformers_classifier(classifier):
        return ImageClassifier.from_transformers(classifier, image_processor)
    if type(classifier).__module__.startswith("torchvision.models"):
        raise TypeError(
            f"`classifier` is a bare torchvision {type(classifier).__name__}; wrap it as "
            "`ImageClassifier.from_torchvision(model, weights)` so that its resize, crop and normalisation are applied."
        )
    if not callable(classifier):
        raise TypeError(
            "Expected argument `classifier` to be an ImageClassifier, a transformers image-classification model or a "
            f"callable mapping images in [0, 1] to logits, but got {type(classifier).__name__}."
        )
    return ImageClassifier(classifier, labels=getattr(classifier, "labels", None))


def resolve_classes(classes: Any, labels: Sequence[str] | None, num_classes: int) -> list[int]:
    """Map ``classes`` (indices, or label names) to validated indices into the classifier's output."""
    if isinstance(classes, str):
        classes = [classes]
    if isinstance(classes, Sequence) and classes and all(isinstance(c, str) for c in classes):
        if labels is None:
            raise ValueError(
                f"`classes` were given by name ({list(classes)!r}) but the classifier has no label names; pass "
                "indices, or labels through `ImageClassifier(..., labels=...)`."
            )
        exact = {name: i for i, name in enumerate(labels)}
        folded = {name.casefold(): i for i, name in enumerate(labels)}
        indices = []
        for name in classes:
            if name in exact:
                indices.append(exact[name])
            elif name.casefold() in folded:
                indices.append(folded[name.casefold()])
            else:
                close = difflib.get_close_matches(name, labels, n=3)
                hint = f" Close matches: {close}." if close else ""
                raise ValueError(f"`classes` contains {name!r}, which is not among the classifier's labels.{hint}")
        classes = indices
    return check_classes(classes, num_classes)


def class_prompt(labels: Sequence[str], classes: Sequence[int]) -> str:
    """The paper's prompt for a class subset: the label names joined with " and " (e.g. "chihuahua and papillon").

    Example:
        >>> class_prompt(["zero", "one", "two", "three"], [3, 2])
        'three and two'
    """
    return " and ".join(labels[i] for i in classes)


# ----------------------------------------------------------------------------------------------------------------------
# Image-to-image: how far an edited image moved from its input
# ----------------------------------------------------------------------------------------------------------------------

#: diffusers' ``StableDiffusionImg2ImgPipeline`` default share of the schedule an image-to-image call runs.
DEFAULT_STRENGTH = 0.8
#: Highest order of the k-LMS multistep (``LMSDiscreteScheduler.step``'s default ``order``).
LMS_MAX_ORDER = 4


def pixel_l2(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    r"""Euclidean distance between images and their references, per image, over all pixel values in ``[0, 1]``.

    .. math:: d(x, x_{\mathrm{ref}}) = \lVert x - x_{\mathrm{ref}} \rVert_2

    Args:
        images, references: ``[B, 3, H, W]`` in ``[0, 1]``.

    Returns:
        ``[B]`` float32.

    Example:
        >>> import torch
        >>> pixel_l2(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
        tensor([3.4641])
    """
    if images.shape != references.shape or images.ndim != 4:
        raise ValueError(
            f"Expected arguments `images` and `references` to be tensors of one shape [B, 3, H, W] but got "
            f"{tuple(images.shape)} and {tuple(references.shape)}."
        )
    return (images.float() - references.float()).flatten(1).norm(dim=1)


def structural_similarity(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor | None:
    """SSIM (Wang et al. 2004) of each image to its reference, by torchmetrics' implementation; ``None`` without it.

    torchmetrics' ``structural_similarity_index_measure`` with its defaults (Gaussian window 11, sigma 1.5) and data
    range 1 (images in ``[0, 1]``), per image (``reduction="none"``); 1 for identical images. torchmetrics is optional
    here (this file needs only torch, diffusers and transformers): without it the result is ``None`` and a warning
    says how to install it.

    Args:
        images, references: ``[B, 3, H, W]`` in ``[0, 1]``.

    Returns:
        ``[B]`` float32, or ``None`` when torchmetrics is not installed.
    """
    if images.shape != references.shape or images.ndim != 4:
        raise ValueError(
            f"Expected arguments `images` and `references` to be tensors of one shape [B, 3, H, W] but got "
            f"{tuple(images.shape)} and {tuple(references.shape)}."
        )
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        logger.warning(
            "The SSIM of each image to its input needs torchmetrics, which is not installed: `ssim` is None. Install "
            "it with `pip install torchmetrics` (or `pip install kldb-boundary[audit]`)."
        )
        return None
    score = structural_similarity_index_measure(
        images.float(), references.float().to(images.device), data_range=1.0, reduction="none"
    )
    return score.float()


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading in the Hub layout of a custom pipeline
# ----------------------------------------------------------------------------------------------------------------------

#: Stem of this file in a saved folder: ``model_index.json`` names the pipeline ``["kldb_boundary",
#: "KLDBBoundaryPipeline"]`` and ``kldb_boundary.py`` lies beside it, the layout diffusers documents for custom
#: pipelines on the Hub. It is also the name under which diffusers' community folder would hold this file.
PIPELINE_FILE_STEM = "kldb_boundary"
#: Weight files that may hold pickles: never downloaded while weights are read from safetensors only.
_PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]


def _source_of(cls: type) -> str:
    """The text of the file that defines ``cls`` (this file, or the copy diffusers loaded it from)."""
    return Path(inspect.getfile(cls)).read_text(encoding="utf-8")


def _names_image_classifier(entry: Any) -> bool:
    """Whether a ``model_index.json`` entry is a saved :class:`ImageClassifier` (a custom component)."""
    return (
        isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] == "ImageClassifier"
    )


def _signature_with_required_components(init: Callable[..., None], components: Sequence[str]) -> inspect.Signature:
    """The signature of ``init`` with ``components`` declared without a default.

    That is how diffusers tells a component from a config value. Parameters after the first one that keeps a default
    become keyword-only, so that the signature stays valid.
    """
    parameters, keyword_only = [], False
    for parameter in inspect.signature(init).parameters.values():
        if parameter.name in components:
            parameter = parameter.replace(default=inspect.Parameter.empty)
        elif parameter.default is not inspect.Parameter.empty:
            keyword_only = True
        if keyword_only and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            parameter = parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        parameters.append(parameter)
    return inspect.Signature(parameters)


# ----------------------------------------------------------------------------------------------------------------------
# The guidance step (Equation 2)
# ----------------------------------------------------------------------------------------------------------------------


def lms_scale_model_input(z: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """k-LMS input scaling of the UNet, ``z / sqrt(sigma^2 + 1)`` (Karras et al. 2022, Table 1, c_in)."""
    return z / ((sigma**2 + 1) ** 0.5)


@torch.enable_grad()
def kldb_guidance_gradient(
    z: torch.Tensor,
    sigma: float,
    classes: Sequence[int],
    decode: Callable[[torch.Tensor], torch.Tensor],
    classify: Callable[[torch.Tensor], torch.Tensor],
    eps: torch.Tensor | None = None,
    predict_eps: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the batch-summed KLDB of the predicted clean image with respect to the latent ``z``.

    Follows the authors' code: ``x0 = z - sigma * eps`` (the predicted clean latent), decode, map to ``[0, 1]``,
    classify, KLDB summed over the batch, gradient with respect to ``z``. ``eps`` given: a detached noise prediction
    (the gradient reaches ``z`` through ``x0 = z - sigma * eps`` only). ``predict_eps`` given instead: the noise is
    predicted from ``z`` with gradients on, so the gradient also flows through the UNet.

    ``loss_scale`` multiplies the loss before the backward pass, as mixed-precision training does, so that small
    gradients do not underflow in float16; the returned gradient is scaled by it (the normalisation cancels it).

    Returns:
        ``(grad, kldb)``: ``grad`` like ``z``; ``kldb`` ``[B]`` of the predicted clean images (detached).
    """
    if (eps is None) == (predict_eps is None):
        raise ValueError("Pass exactly one of `eps` (detached noise prediction) and `predict_eps` (through the UNet).")
    if eps is not None and eps.shape != z.shape:
        raise ValueError(
            f"Expected argument `eps` to have the shape of `z` {tuple(z.shape)} but got {tuple(eps.shape)}."
        )
    z = z.detach().requires_grad_(True)
    eps = predict_eps(z) if eps is None else eps.detach()
    x0 = z - sigma * eps  # (B, c, h, w) predicted clean latent
    return kldb_backward(x0, z, classes, decode, classify, loss_scale)


def kldb_backward(
    x0: torch.Tensor,
    wrt: torch.Tensor,
    classes: Sequence[int],
    decode: Callable[[torch.Tensor], torch.Tensor],
    classify: Callable[[torch.Tensor], torch.Tensor],
    loss_scale: float = 1.0,
    retain_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient with respect to ``wrt`` of the batch-summed KLDB of the predicted clean latent ``x0``.

    ``x0`` ``(B, c, h, w)`` is a function of ``wrt`` (``B`` rows, sample ``i`` of ``x0`` depending on row ``i`` of
    ``wrt`` only). Decodes, maps to ``[0, 1]``, classifies. A sample whose KLDB is not finite gets a nan gradient and
    does not touch the others'. ``retain_graph`` keeps the graph up to ``x0`` for another backward pass.

    Returns:
        ``(grad, kldb)``: ``grad`` like ``wrt`` (scaled by ``loss_scale``); ``kldb`` ``[B]`` (detached).
    """
    with torch.enable_grad():
        image = (decode(x0) / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        loss = kldb_score(classify(image), classes)  # (B,)
        # a non-finite loss of one image must not poison the others' gradients through the sum
        finite = torch.isfinite(loss)
        total = torch.where(finite, loss, torch.zeros_like(loss)).sum()
        if not total.requires_grad:  # every loss non-finite, or a classifier cut from the graph
            return torch.zeros_like(wrt), loss.detach()
        (grad,) = torch.autograd.grad(total * loss_scale, wrt, retain_graph=retain_graph)
    grad = torch.where(finite.view(-1, *[1] * (grad.ndim - 1)), grad, torch.full_like(grad, float("nan")))
    return grad, loss.detach()


def normalize_guidance_gradient(grad: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-sample normalised gradient :math:`\nabla^* = \nabla / \lVert\nabla\rVert_2 \cdot \lVert z\rVert_2`.

    Following Sehwag et al. (2022) as the paper does. Samples whose gradient is zero or not finite get a zero update.

    Returns:
        ``(g_star, ok)``: ``g_star`` like ``grad``; ``ok`` ``[B]`` bool, False where the update is skipped.
    """
    if grad.shape != z.shape:
        raise ValueError(
            f"Expected argument `grad` to have the shape of `z` {tuple(z.shape)} but got {tuple(grad.shape)}."
        )
    grad_norm = grad.detach().flatten(1).float().norm(dim=1)  # (B,)
    z_norm = z.detach().flatten(1).float().norm(dim=1)  # (B,)
    ok = torch.isfinite(grad_norm) & (grad_norm > 0) & torch.isfinite(z_norm)
    scale = torch.where(ok, z_norm / torch.where(ok, grad_norm, torch.ones_like(grad_norm)), torch.zeros_like(z_norm))
    shape = (-1, *[1] * (grad.ndim - 1))
    g_star = torch.where(ok.view(shape), grad.float() * scale.view(shape), torch.zeros_like(grad, dtype=torch.float32))
    return g_star.to(grad.dtype), ok


#: An updated latent whose RMS exceeds this many noise standard deviations is refused: nothing the model has seen is
#: that far out, and the UNet and decoder overflow to nan not far beyond (a huge ``kldb_guidance_scale`` gets there).
MAX_LATENT_STDS = 1e4


def latents_are_usable(latents: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[B]`` bool: finite, and with an RMS below ``MAX_LATENT_STDS`` times the k-LMS latent scale ``sqrt(sigma^2 + 1)``."""
    flat = latents.detach().flatten(1).float()
    rms = flat.pow(2).mean(dim=1).sqrt()
    return torch.isfinite(flat).all(dim=1) & (rms <= MAX_LATENT_STDS * (sigma**2 + 1) ** 0.5)


def check_step_control(step_control: Any, max_halvings: Any, trust_radius: Any, step_temperature: Any) -> None:
    """Check the step-size control arguments (``kldb_step_control`` and its parameters), one clear error each."""
    if step_control not in STEP_CONTROLS:
        raise ValueError(f"`kldb_step_control` has to be one of {STEP_CONTROLS} but is {step_control!r}.")
    if isinstance(max_halvings, bool) or not isinstance(max_halvings, int) or max_halvings < 0:
        raise ValueError(f"`kldb_max_halvings` has to be a non-negative integer but is {max_halvings!r}.")
    for name, value in (("kldb_trust_radius", trust_radius), ("kldb_step_temperature", step_temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"`{name}` has to be a positive finite number but is {value!r}.")


def _select_rows(value: Any, rows: slice, total: int) -> Any:
    """``value`` restricted to the batch rows ``rows`` wherever it is batched (a leading dimension of ``total``)."""
    if torch.is_tensor(value):
        return value[rows] if value.ndim > 0 and value.shape[0] == total else value
    if isinstance(value, dict):
        return {key: _select_rows(item, rows, total) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select_rows(item, rows, total) for item in value)
    return value


def _begin_index(scheduler: Any) -> int:
    """The scheduler index of the first step a sampling call runs: 0, or where an image-to-image call starts.

    diffusers' image-to-image pipelines start the schedule part-way and say where with ``scheduler.set_begin_index``;
    the guidance counts its steps from there (step ``s`` of a call is schedule index ``begin + s - 1``).
    """
    return getattr(scheduler, "begin_index", None) or 0


def _noise_prediction(output: Any) -> torch.Tensor:
    """The noise prediction of a UNet call, returned as a tuple (``return_dict=False``) or an output dataclass."""
    return output[0] if isinstance(output, (tuple, list)) else output.sample


@dataclass
class _UNetCall:
    """One UNet call of a guided step, as :class:`KLDBUNetHook` saw it: what the step-end correction needs.

    ``sample`` is the scaled UNet input of all batch rows, ``kwargs`` the call's other arguments, ``forward`` the
    UNet's forward below the hook, ``prediction`` the (detached) noise prediction of all rows, and ``shared`` the
    conditional rows' input (with ``requires_grad``) and noise prediction with its graph, when the call was split.
    """

    step_index: int | None
    sample: torch.Tensor  # (R, c, h, w)
    timestep: Any
    kwargs: dict[str, Any]
    forward: Callable[..., Any]
    prediction: torch.Tensor  # (R, c, h, w)
    rows: slice | None = None
    shared: tuple[torch.Tensor, torch.Tensor] | None = None
    latents: torch.Tensor | None = None  # (B, c, h, w) the step's input latent, when it is known exactly


@dataclass
class _CallState:
    """What a :class:`KLDBGuidanceCallback` keeps during one sampling call; replaced when a call starts."""

    guided_updates: int = 0
    skipped_updates: int = 0
    shared_forwards: int = 0
    batch: int | None = None  # latents per step, seen at the last step end
    negative_prompt_embeds: torch.Tensor | None = None  # seen at the last step end
    latents: torch.Tensor | None = None  # returned at the last step end
    record: _UNetCall | None = None  # the UNet call of the current guided step
    # per sample: guided steps taken (at some step size), step halvings, steps rejected by the step control
    accepted: torch.Tensor | None = None
    halvings: torch.Tensor | None = None
    rejected: torch.Tensor | None = None
    started_by_hook: bool = False


# Design notes: how the guidance sees the sampling loop.
# - The correction needs, at a guided step, the latent the step started from, the conditional rows' inputs and (in
#   "unet" mode) the graph of their noise prediction. diffusers' public interfaces give the step-end callback only the
#   tensors named in `_callback_tensor_inputs`, none of which is the noise prediction. Reading more through that list
#   (`noise_pred`, `noise_pred_text`) would depend on `__call__`'s local variable names, which change between releases.
# - So the UNet call itself is observed with a diffusers model hook (`diffusers.hooks.ModelHook.new_forward` in the
#   UNet's `HookRegistry`): the mechanism diffusers uses for its own offloading, layerwise casting and caches, which
#   composes with them and with accelerate's hooks. It is registered once when the pipeline is built, so offloading
#   enabled later wraps it and keeps it when diffusers re-installs its offload hooks after each call; it passes calls
#   through unchanged while no guidance is attached.
# - The conditional rows are told apart from the unconditional ones by content (the half equal to the step's
#   `negative_prompt_embeds`), not by assuming diffusers' (uncond, cond) batch order.
# - The step's input latent is the last step end's latents when the UNet input is exactly those scaled (else the UNet
#   input scaled back): the gradient is taken where the step really started, also when a user's callback changed it.
# - All of it is per call: nothing carries over from one call to the next.
class KLDBUNetHook(ModelHook):
    """A diffusers model hook on the UNet that lets a :class:`KLDBGuidanceCallback` see the sampling loop's UNet calls.

    Registered through diffusers' :class:`~diffusers.hooks.HookRegistry` under the name ``"kldb_guidance"``, so it
    composes with diffusers' and accelerate's own hooks (offloading, layerwise casting, caching). While no guidance is
    attached it only passes the call through.
    """

    name = "kldb_guidance"

    def __init__(self) -> None:
        super().__init__()
        self.guidance: KLDBGuidanceCallback | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if self.guidance is None:
            return forward(*args, **kwargs)
        return self.guidance.unet_forward(forward, args, kwargs)

    @classmethod
    def on(cls, unet: torch.nn.Module) -> "KLDBUNetHook":
        """The hook registered on ``unet``, registering it first if it is not there yet."""
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        hook = registry.get_hook(cls.name)
        if hook is None:
            hook = cls()
            registry.register_hook(hook, cls.name)
        return hook


class KLDBGuidanceCallback(PipelineCallback):
    r"""Step-end callback applying KLDB guidance (Equation 2) around the k-LMS step.

    At a guided step ``s`` (1-based, ``s % interval == 0``, counted from the first step the call runs: an
    image-to-image call that starts the schedule part-way counts from there) with input latent :math:`z_t` and
    noise level :math:`\sigma_t`, the paper and the authors' code compute

    .. math::
        z_{t-1} = \mathrm{LMSStep}(z_t, \epsilon^{\mathrm{CFG}}(z_t)) - \alpha \nabla^*_{z_t} \mathrm{KLDB}(z_t)

    (the sign descends KLDB). For k-LMS with an epsilon model, adding the correction to :math:`z_t` before the step
    (with the step's noise prediction taken at the uncorrected :math:`z_t`) equals adding it after. This callback
    therefore runs at the end of step ``s`` and subtracts :math:`\alpha\nabla^*` from the latent the step produced.

    It sees the step's own UNet call through a diffusers model hook (:class:`KLDBUNetHook`, registered on the UNet
    through ``diffusers.hooks.HookRegistry``), which gives it :math:`z_t` (the UNet input times
    :math:`\sqrt{\sigma_t^2 + 1}`), the conditional rows' inputs and their noise prediction: nothing is read from the
    pipeline's local variables. The conditional rows are told apart from the unconditional ones by comparing the
    call's ``encoder_hidden_states`` with the step's ``negative_prompt_embeds``. In ``"detached"`` mode the step's
    own conditional noise prediction is reused: guidance costs one decoder and classifier forward/backward and no
    UNet call. In ``"unet"`` mode the guided step's conditional rows run their UNet forward with gradients on, and
    the correction backpropagates through that graph: a UNet backward but no extra forward (except where the rows
    cannot be told apart before the call, e.g. a guided first step, or under ``autocast_dtype``: then the
    conditional prediction is computed again at the step's end).

    Use it alone on a ``StableDiffusionPipeline`` with a k-LMS scheduler::

        guidance = KLDBGuidanceCallback(classifier, [3, 8], guidance_scale=0.1, interval=5)
        with guidance.attached(pipe):  # optional: without it, the hook is attached at the end of step 1
            pipe("three and eight", callback_on_step_end=guidance)

    All state is per call: it is reset when a call starts, so one instance can be reused.

    Args:
        classifier: maps images ``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, n)``.
        classes: validated class indices.
        guidance_scale: :math:`\alpha`.
        interval: :math:`k`, guidance at steps ``k, 2k, ...`` (1-based).
        gradient: ``"unet"`` (the authors' code: gradient through the noise prediction) or ``"detached"``.
        autocast_dtype: run the guidance pass under ``torch.autocast`` in this dtype (``torch.float16`` or
            ``torch.bfloat16``); ``None`` runs it in the components' own dtype.
        decoder: the autoencoder whose ``decode`` the guidance backpropagates through (a small stand-in for the
            pipeline's VAE such as diffusers' ``AutoencoderTiny``; it gets ``x0 / decoder.config.scaling_factor``);
            ``None`` uses ``pipeline.vae``. The returned images are always decoded by the pipeline's VAE.
    """

    tensor_inputs = ["latents", "negative_prompt_embeds"]

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        classes: Sequence[int],
        guidance_scale: float = 0.1,
        interval: int = 5,
        gradient: str = "unet",
        autocast_dtype: torch.dtype | None = None,
        decoder: torch.nn.Module | None = None,
        step_control: str = "fixed",
        max_halvings: int = 3,
        trust_radius: float = 0.1,
        step_temperature: float = 0.5,
    ):
        super().__init__(cutoff_step_ratio=1.0)
        check_step_control(step_control, max_halvings, trust_radius, step_temperature)
        if not callable(classifier):
            raise TypeError(
                f"Expected argument `classifier` to be a callable mapping images to logits but got "
                f"{type(classifier).__name__}."
            )
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"`kldb_gradient` has to be one of {GRADIENT_MODES} but is {gradient!r}.")
        if autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(
                f"`kldb_autocast_dtype` has to be None, torch.float16 or torch.bfloat16 but is {autocast_dtype!r}."
            )
        if decoder is not None and not callable(getattr(decoder, "decode", None)):
            raise TypeError(
                f"`decoder` has to be an autoencoder with a `decode` method (e.g. AutoencoderTiny) but is "
                f"{type(decoder).__name__}."
            )
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Expected argument `interval` to be a positive integer but got {interval!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"Expected argument `guidance_scale` to be a float but got {guidance_scale!r}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"Expected argument `guidance_scale` to be finite and >= 0 but got {guidance_scale}.")
        if (
            isinstance(classes, (str, bytes))
            or not isinstance(classes, Sequence)
            or not classes
            or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise ValueError(
                f"Expected argument `classes` to be a non-empty sequence of distinct class indices but got {classes!r}."
            )
        self.classifier = classifier
        self.classes = [int(c) for c in classes]
        self.guidance_scale = float(guidance_scale)
        self.interval = interval
        self.gradient = gradient
        self.autocast_dtype = autocast_dtype
        self.decoder = decoder
        self.step_control = step_control
        self.max_halvings = max_halvings
        self.trust_radius = float(trust_radius)
        self.step_temperature = float(step_temperature)
        self._state = _CallState()
        self._pipeline: Any = None  # the pipeline whose UNet the hook is attached to
        self._auto_attached = False

    # --- read-outs of the current (or last) call ---------------------------------------------------------------------

    @property
    def guided_updates(self) -> int:
        """Per-sample guidance updates applied in the current (or last) call."""
        return self._state.guided_updates

    @property
    def skipped_updates(self) -> int:
        """Per-sample updates skipped in the current (or last) call: zero or non-finite gradient, or an updated
        latent that would not stay finite (see :func:`latents_are_usable`)."""
        return self._state.skipped_updates

    @property
    def step_counts(self) -> dict[str, torch.Tensor] | None:
        """Per sample, in the current (or last) call: ``"accepted"`` guided steps taken (at ``alpha`` or a smaller
        size), ``"halvings"`` of the step size, ``"rejected"`` guided steps the step control refused (no update);
        ``None`` before the first guided step."""
        state = self._state
        if state.accepted is None:
            return None
        return {"accepted": state.accepted, "halvings": state.halvings, "rejected": state.rejected}

    @property
    def shared_forwards(self) -> int:
        """Guided steps of the current (or last) call whose conditional UNet forward the gradient reused."""
        return self._state.shared_forwards

    @property
    def shares_unet_forward(self) -> bool:
        """Whether guided steps reuse their own conditional UNet forward: ``"unet"`` mode without autocast."""
        return self.gradient == "unet" and self.autocast_dtype is None

    def is_guided(self, step: int) -> bool:
        """Whether the 1-based step ``step`` is a guided step."""
        return step % self.interval == 0

    # --- the hook ----------------------------------------------------------------------------------------------------

    @contextmanager
    def attached(self, pipeline: Any) -> Iterator["KLDBGuidanceCallback"]:
        """Within the block, the UNet hook of ``pipeline`` reports the sampling loop's UNet calls to this callback.

        :class:`KLDBBoundaryPipeline` does this for every guided call. Used alone, the callback attaches itself at
        the end of the first step and detaches at the end of the last; attaching beforehand lets a guided first step
        reuse its own UNet forward.
        """
        hook = KLDBUNetHook.on(pipeline.unet)
        if hook.guidance is not None and hook.guidance is not self:
            if not hook.guidance._auto_attached:
                raise ValueError("Another KLDBGuidanceCallback is already attached to this pipeline's UNet.")
            hook.guidance._detach()
        hook.guidance, self._pipeline, self._auto_attached = self, pipeline, False
        try:
            yield self
        finally:
            self._detach()

    def _detach(self) -> None:
        if self._pipeline is not None:
            hook = KLDBUNetHook.on(self._pipeline.unet)
            if hook.guidance is self:
                hook.guidance = None
        self._pipeline, self._auto_attached = None, False
        self._state.record = None  # an unused graph is not kept alive

    def unet_forward(self, forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """A UNet call of the sampling loop, seen through :class:`KLDBUNetHook`; returns what ``forward`` returns.

        At a guided step it keeps the call for the step-end correction, and in ``"unet"`` mode, when the conditional
        rows are known, it runs them with gradients on (the other rows as usual) and returns the same prediction.
        """
        scheduler = getattr(self._pipeline, "scheduler", None)
        step_index = getattr(scheduler, "step_index", None)
        if step_index is not None:  # counted from the first step the call runs, as the step-end callback counts
            step_index -= _begin_index(scheduler)
        if step_index == 0:  # a new sampling call starts
            if self._auto_attached:  # attached by the last call's callback, not by this call
                self._detach()
                return forward(*args, **kwargs)
            self._state = _CallState(started_by_hook=True)
        if step_index is None or not self.is_guided(step_index + 1) or len(args) > 3:
            return forward(*args, **kwargs)
        call = dict(kwargs)
        call.update(zip(("sample", "timestep", "encoder_hidden_states"), args))
        if "sample" not in call or "timestep" not in call:
            return forward(*args, **kwargs)
        sample, timestep = call.pop("sample"), call.pop("timestep")
        state = self._state
        rows = self._conditional_rows(call.get("encoder_hidden_states"), state.negative_prompt_embeds, state.batch)
        total = sample.shape[0]
        latents = self._step_input(scheduler, sample, timestep)
        if (
            rows is None
            or not self.shares_unet_forward
            or call.get("return_dict", True) is not False
            or (torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.numel() > 1)
        ):
            output = forward(sample, timestep, **call)
            prediction = _noise_prediction(output).detach()
            state.record = _UNetCall(step_index, sample, timestep, call, forward, prediction, latents=latents)
            return output
        cond_input = sample[rows].detach().requires_grad_(True)
        with torch.enable_grad():
            eps = forward(cond_input, timestep, **_select_rows(call, rows, total))[0]
        parts = [eps.detach()]
        if rows.start > 0:  # the unconditional rows come first
            parts.insert(
                0, forward(sample[: rows.start], timestep, **_select_rows(call, slice(0, rows.start), total))[0]
            )
        elif rows.stop < total:
            parts.append(
                forward(sample[rows.stop :], timestep, **_select_rows(call, slice(rows.stop, total), total))[0]
            )
        prediction = torch.cat(parts) if len(parts) > 1 else parts[0]
        state.record = _UNetCall(
            step_index, sample, timestep, call, forward, prediction, rows, (cond_input, eps), latents
        )
        state.shared_forwards += 1
        return (prediction,)

    def _step_input(self, scheduler: Any, sample: torch.Tensor, timestep: Any) -> torch.Tensor | None:
        """The latent the step started from, exactly: the one the last step end returned, if every block of rows of
        the UNet input is that latent scaled as the scheduler scales it (else ``None``: a user's callback changed it
        after ours, or it is the first step)."""
        latents = self._state.latents
        if latents is None or sample.shape[0] % latents.shape[0] or sample.shape[1:] != latents.shape[1:]:
            return None
        scaled = scheduler.scale_model_input(latents, timestep).to(sample.dtype)
        blocks = sample.split(latents.shape[0])
        return latents if all(torch.equal(block, scaled) for block in blocks) else None

    @staticmethod
    def _conditional_rows(embeds: Any, negative: Any, batch: int | None) -> slice | None:
        """The rows of a UNet call's batch that hold the conditional (prompt) inputs, or ``None`` if unknown.

        With ``batch`` latents, a call of ``batch`` rows is conditional only (no classifier-free guidance); a call of
        ``2 * batch`` rows holds the unconditional and the conditional halves, told apart by which half equals
        ``negative`` (the step's ``negative_prompt_embeds``).
        """
        if not torch.is_tensor(embeds) or batch is None:
            return None
        total = embeds.shape[0]
        if total == batch:
            return slice(0, total)
        if total != 2 * batch or not torch.is_tensor(negative) or negative.shape != embeds[:batch].shape:
            return None
        negative = negative.to(device=embeds.device, dtype=embeds.dtype)
        if torch.equal(embeds[:batch], negative):
            return slice(batch, total)
        if torch.equal(embeds[batch:], negative):
            return slice(0, batch)
        return None

    # --- the correction ----------------------------------------------------------------------------------------------

    def correction(
        self, pipeline: Any, step_index: int, record: _UNetCall, rows: slice, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(-alpha * g*, ok, rejected)`` for the latent that step ``step_index`` (0-based, counted from the first step
        the call runs) started from, in ``dtype``.

        ``ok`` is False where the gradient is not usable, ``rejected`` True where the step control found no step size
        (both ``[B]``; such samples get no update). ``alpha`` is per sample: the paper's fixed value, or chosen by
        ``step_control``. ``record`` is the step's UNet call and ``rows`` its conditional rows. In float16 (a float16
        VAE, or
        ``autocast_dtype=torch.float16``) the loss is scaled by 2^16 so that small gradients do not flush to zero;
        samples whose scaled gradient overflows are redone at 2^8, then 1.
        """
        sigma = float(pipeline.scheduler.sigmas[_begin_index(pipeline.scheduler) + step_index])
        c = (sigma**2 + 1) ** 0.5  # k-LMS input scaling: the UNet got z / c
        vae = self.decoder if self.decoder is not None else pipeline.vae

        def decode(x0: torch.Tensor) -> torch.Tensor:
            return vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]

        def classify(images: torch.Tensor) -> torch.Tensor:
            return checked_logits(self.classifier(images), images.shape[0], "classifier")

        total = record.sample.shape[0]
        # (B, c, h, w) the latent the step started from: known exactly, or the UNet input scaled back
        z = record.latents.to(dtype) if record.latents is not None else record.sample[rows].detach().to(dtype) * c
        half = (self.autocast_dtype or vae.dtype) == torch.float16
        autocast = torch.autocast(z.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        scaled = eps = None
        if self.gradient == "unet":
            if record.shared is not None and record.rows == rows:
                scaled, eps = record.shared
            else:  # the conditional prediction again, with gradients
                scaled = record.sample[rows].detach().requires_grad_(True)
                with torch.enable_grad(), autocast:
                    kwargs = _select_rows(record.kwargs, rows, total)
                    eps = _noise_prediction(record.forward(scaled, record.timestep, **kwargs))
        g_star = torch.zeros_like(z, dtype=torch.float32)
        ok = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        kldb = torch.full((z.shape[0],), float("nan"), device=z.device)
        todo = torch.ones_like(ok)
        for loss_scale in (2.0**16, 2.0**8, 1.0) if half else (1.0,):
            idx = todo.nonzero().flatten()
            with autocast:
                if eps is None:  # detached: the step's own conditional noise prediction, without its Jacobian
                    grad, loss = kldb_guidance_gradient(
                        z[idx], sigma, self.classes, decode, classify, eps=record.prediction[rows][idx].to(dtype),
                        loss_scale=loss_scale,
                    )  # fmt: skip
                else:  # x0 = c * s - sigma * eps(s) with s = z / c the scaled UNet input, and d/dz = (d/ds) / c
                    with torch.enable_grad():
                        x0 = (scaled.to(dtype) * c - sigma * eps.to(dtype))[idx]
                    grad, loss = kldb_backward(
                        x0, scaled, self.classes, decode, classify, loss_scale, retain_graph=half
                    )
                    grad = grad[idx].to(dtype) / c
            g, g_ok = normalize_guidance_gradient(grad.float(), z[idx].float())
            g_star[idx], ok[idx], kldb[idx] = g, g_ok, loss.float()
            # only an overflow (non-finite gradient) is worth another try at a smaller scale
            todo[idx] = ~torch.isfinite(grad.flatten(1)).all(dim=1)
            if not todo.any():
                break
        alpha = torch.full_like(kldb, self.guidance_scale)  # (B,) the step size of each sample
        rejected = torch.zeros_like(ok)
        if self.step_control == "kldb_scaled":
            alpha = alpha * (kldb / self.step_temperature).clamp(max=1.0).nan_to_num(1.0)
        elif self.step_control in ("backtracking", "trust_region"):
            x0 = (z - sigma * record.prediction[rows].to(dtype)).detach()  # the step's predicted clean latent
            with autocast:
                alpha, accepted = self._searched_step_sizes(x0, g_star.to(dtype), kldb, ok, alpha, decode, classify)
            rejected = ok & ~accepted
        return -alpha.view(-1, *[1] * (z.ndim - 1)) * g_star, ok, rejected

    @torch.no_grad()
    def _searched_step_sizes(
        self,
        x0: torch.Tensor,
        g_star: torch.Tensor,
        kldb: torch.Tensor,
        ok: torch.Tensor,
        alpha: torch.Tensor,
        decode: Callable[[torch.Tensor], torch.Tensor],
        classify: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample step sizes by halving ``alpha`` up to ``max_halvings`` times, and which samples found one.

        A try moves the predicted clean latent to ``x0 - alpha * g*``: the step's own noise prediction is reused
        rather than predicted again at the moved latent (exact for ``"detached"``, first order in ``alpha`` for
        ``"unet"``), so a try costs one decoder and classifier forward and no UNet call. ``"backtracking"`` accepts a
        try whose KLDB is lower than at ``x0``; ``"trust_region"`` one whose class probabilities moved by at most
        ``trust_radius`` in total variation. Halvings are counted in the call's state.
        """
        state = self._state
        done = ~ok  # samples without a usable gradient are not tried (they are skipped and counted elsewhere)
        accepted = torch.zeros_like(ok)
        if self.step_control == "trust_region":
            reference = torch.softmax(classify((decode(x0) / 2 + 0.5).clamp(0, 1)).float(), dim=-1)
        for attempt in range(self.max_halvings + 1):
            idx = (~done).nonzero().flatten()
            if idx.numel() == 0:
                break
            moved = x0[idx] - alpha[idx].view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype) * g_star[idx]
            logits = classify((decode(moved) / 2 + 0.5).clamp(0, 1)).float()
            if self.step_control == "backtracking":
                good = kldb_score(logits, self.classes) < kldb[idx]
            else:
                change = 0.5 * (torch.softmax(logits, dim=-1) - reference[idx]).abs().sum(dim=-1)
                good = change <= self.trust_radius
            accepted[idx[good]] = True
            done[idx[good]] = True
            if attempt < self.max_halvings:
                alpha[idx[~good]] = alpha[idx[~good]] / 2
                state.halvings[idx[~good]] += 1
        return alpha, accepted

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        if step_index == 0:
            if not self._state.started_by_hook:  # the hook did not see this call start: reset here
                self._state = _CallState()
            self._state.started_by_hook = False
            if self._pipeline is None:  # used alone: see the UNet calls from the next step on
                hook = KLDBUNetHook.on(pipeline.unet)
                if hook.guidance is None or hook.guidance._auto_attached:
                    hook.guidance, self._pipeline, self._auto_attached = self, pipeline, True
        state = self._state
        latents = callback_kwargs["latents"]  # (B, c, h, w), the input of the next step
        record, state.record = state.record, None
        state.batch, state.negative_prompt_embeds = latents.shape[0], callback_kwargs.get("negative_prompt_embeds")
        if self.is_guided(step_index + 1):
            rows = None
            if record is not None and record.step_index == step_index:
                rows = record.rows or self._conditional_rows(
                    record.kwargs.get("encoder_hidden_states"), state.negative_prompt_embeds, state.batch
                )
            if rows is None:
                logger.warning(
                    f"KLDB guidance at step {step_index + 1} skipped: the step's UNet call was not seen, or its "
                    "conditional rows could not be told apart (pass `negative_prompt_embeds` as a callback tensor "
                    "input). Attach the callback with `guidance.attached(pipe)` to guide the first step."
                )
                state.skipped_updates += latents.shape[0]
            else:
                if state.accepted is None:
                    state.accepted, state.halvings, state.rejected = (
                        torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device) for _ in range(3)
                    )
                delta, ok, rejected = self.correction(pipeline, step_index, record, rows, latents.dtype)
                updated = latents + delta.to(latents.dtype)
                next_sigma = pipeline.scheduler.sigmas[_begin_index(pipeline.scheduler) + step_index + 1]
                ok = ok & latents_are_usable(updated, float(next_sigma))
                applied = ok & ~rejected
                callback_kwargs["latents"] = torch.where(applied.view(-1, *[1] * (latents.ndim - 1)), updated, latents)
                state.skipped_updates += int((~ok).sum())
                state.guided_updates += int(applied.sum())
                state.accepted += applied.long()
                state.rejected += (ok & rejected).long()
        state.latents = callback_kwargs["latents"]
        if self._auto_attached and step_index + 1 >= getattr(pipeline, "num_timesteps", step_index + 1):
            self._detach()
        return callback_kwargs


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class KLDBBoundaryPipelineOutput(BaseOutput):
    """Output of :class:`KLDBBoundaryPipeline`.

    Args:
        images: the generated images (PIL list, ``np.ndarray`` ``(B, H, W, 3)`` or ``torch.Tensor`` ``(B, 3, H, W)``
            in ``[0, 1]``, by ``output_type``), or latents for ``output_type="latent"``.
        nsfw_content_detected: per image, whether the safety checker flagged it (``None`` without a checker).
        kldb: ``[B]`` KLDB of each returned image for ``classes`` (``None`` without classes or classifier).
        entropy: ``[B]`` Shannon entropy (nats) of the classifier's softmax on each returned image.
        probabilities: ``[B, n]`` the classifier's softmax on each returned image.
        predicted_class: ``[B]`` arg-max class index.
        classes: the class subset, as indices.
        skipped_updates: per-sample guidance updates skipped: zero or non-finite gradient, or an updated latent
            that would not stay finite (see :func:`latents_are_usable`).
        guided_updates: per-sample guidance updates applied.
        accepted_steps: ``[B]`` guided steps each image took (``None`` without guidance).
        step_halvings: ``[B]`` step-size halvings of each image (``kldb_step_control`` "backtracking" or
            "trust_region").
        rejected_steps: ``[B]`` guided steps the step control refused for each image (no update there).
        auto_guidance: with ``kldb_guidance_scale="auto"``, the pilot's record: the alpha chosen, the grid and its
            median KLDB, the pilot's seeds and its seconds (see :meth:`KLDBBoundaryPipeline.choose_guidance_scale`).
        kldb_start: with ``image``, ``[B]`` KLDB of each image's input (the preprocessed input image the row started
            from) for ``classes``.
        probabilities_start: with ``image``, ``[B, n]`` the classifier's softmax on each row's input image.
        predicted_class_start: with ``image``, ``[B]`` the arg-max class of each row's input image.
        pixel_l2: with ``image``, ``[B]`` Euclidean distance of each returned image to its input over all pixel
            values in ``[0, 1]`` (see :func:`pixel_l2`).
        ssim: with ``image``, ``[B]`` SSIM of each returned image to its input (torchmetrics; ``None`` without it, see
            :func:`structural_similarity`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    kldb: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None
    predicted_class: torch.Tensor | None = None
    classes: list[int] | None = None
    skipped_updates: int = 0
    guided_updates: int = 0
    accepted_steps: torch.Tensor | None = None
    step_halvings: torch.Tensor | None = None
    rejected_steps: torch.Tensor | None = None
    auto_guidance: dict[str, Any] | None = None
    kldb_start: torch.Tensor | None = None
    probabilities_start: torch.Tensor | None = None
    predicted_class_start: torch.Tensor | None = None
    pixel_l2: torch.Tensor | None = None
    ssim: torch.Tensor | None = None


class KLDBBoundaryPipeline(StableDiffusionPipeline):
    r"""Stable Diffusion with KLDB classifier guidance toward the decision boundary of a class subset.

    Everything :class:`~diffusers.StableDiffusionPipeline` does, plus an image classifier and, per call, a class
    subset ``classes``, the guidance strength ``kldb_guidance_scale`` (:math:`\alpha`) and interval
    ``kldb_guidance_interval`` (:math:`k`). Guidance needs the deterministic k-LMS step; without guidance the pipeline
    samples as :class:`~diffusers.StableDiffusionPipeline` does, with any scheduler.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder:
            as in :class:`~diffusers.StableDiffusionPipeline`. Guided calls need the scheduler to be
            :class:`~diffusers.LMSDiscreteScheduler` (see :meth:`set_lms_scheduler`); calls without guidance take any.
        requires_safety_checker: as in :class:`~diffusers.StableDiffusionPipeline` (and with its default): a loaded
            repo's safety checker is used, and leaving it out while this is ``True`` logs diffusers' warning.
        classifier: optional default classifier: a transformers image-classification model, an
            :class:`ImageClassifier`, or a callable mapping ``[0, 1]`` images to logits. Can be given per call.
        classifier_processor: the transformers image processor of ``classifier``, for its preprocessing.
        guidance_vae: optional small autoencoder on the same latents (diffusers' ``AutoencoderTiny``: TAESD
            ``"madebyollin/taesd"`` for Stable Diffusion v1; the digits world ships its own) whose decoder the
            guidance backpropagates through instead of the VAE's (``kldb_guidance_decoder``). Images are always
            decoded by ``vae``.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = [
        "safety_checker",
        "feature_extractor",
        "image_encoder",
        "classifier",
        "classifier_processor",
        "guidance_vae",
    ]
    # used inside the denoising loop next to the UNet: kept on the device rather than offloaded and reloaded per step
    _exclude_from_cpu_offload = ["safety_checker", "classifier", "guidance_vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: LMSDiscreteScheduler,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = True,
        classifier: Any = None,
        classifier_processor: Any = None,
        guidance_vae: Any = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        if unet is not None:
            # the guidance's hook goes on now, before any offloading hooks: those then wrap it and keep it across the
            # re-installation diffusers' model CPU offload does at the end of each call. It passes calls through
            # while no guidance is attached.
            KLDBUNetHook.on(unet)
        self.register_modules(
            classifier=self._as_component(classifier),
            classifier_processor=classifier_processor,
            guidance_vae=guidance_vae,
        )

    # diffusers tells a component from a config value by the parameter's default: without one it is a component (as
    # StableDiffusionPipeline declares `safety_checker`); with one, only if the class lists it in
    # `_optional_components`. But `DiffusionPipeline.from_pretrained`, when it loads this class from its file, reads
    # that list from `DiffusionPipeline` (where it is empty): a component passed there by keyword would count as a
    # config value, and the one saved in the folder would replace it. The signature diffusers reads therefore declares
    # the optional components without a default. Python calls may still leave them out: they default to None.
    __init__.__signature__ = _signature_with_required_components(__init__, _optional_components)

    @staticmethod
    def _as_component(classifier: Any) -> Any:
        """A transformers classifier is kept as is (saved in its own format); anything else becomes an ImageClassifier.

        An ImageClassifier is kept as is, also one whose class was loaded from a saved folder's copy of this file.
        """
        if classifier is None or _is_transformers_classifier(classifier) or is_image_classifier(classifier):
            return classifier
        return as_image_classifier(classifier)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> "KLDBBoundaryPipeline":
        """As :meth:`DiffusionPipeline.from_pretrained`, returning this class with no code run from the folder or repo.

        - ``classifier`` (any kind :func:`as_image_classifier` takes, or ``None``) replaces the saved one, whatever
          kind that is. A saved :class:`ImageClassifier` is loaded with this file's class: no ``trust_remote_code``.
        - Weights are read from safetensors only (``use_safetensors=True`` unless you pass otherwise): no pickle is
          unpickled.
        - A repo id is downloaded as :meth:`download` does.
        """
        kwargs.setdefault("use_safetensors", True)
        source = os.fspath(pretrained_model_name_or_path)
        folder = source if os.path.isdir(source) else cls.download(source, **kwargs)
        own_classifier = "classifier" in kwargs
        classifier = kwargs.get("classifier")
        if not own_classifier and _names_image_classifier(cls.load_config(folder).get("classifier")):
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if isinstance(dtype, dict):
                dtype = dtype.get("classifier", dtype.get("default"))
            options = {key: kwargs[key] for key in ("disable_mmap", "low_cpu_mem_usage", "variant") if key in kwargs}
            classifier = ImageClassifier.from_pretrained(
                os.path.join(folder, "classifier"),
                torch_dtype=dtype,
                use_safetensors=kwargs["use_safetensors"],
                **options,
            )
            own_classifier = True
        if own_classifier:
            kwargs["classifier"] = None  # diffusers neither loads the saved one nor checks this one against its class
        pipe = super().from_pretrained(folder, **kwargs)
        if own_classifier:
            pipe.register_modules(classifier=cls._as_component(classifier))
        if folder != source:
            pipe.register_to_config(_name_or_path=source)
        return pipe

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str:
        """As :meth:`DiffusionPipeline.download`, without running the repo's code when it is not asked for.

        diffusers reads a repo whose ``model_index.json`` names its pipeline file (``["kldb_boundary",
        "KLDBBoundaryPipeline"]``) by importing that file, which takes ``trust_remote_code=True``. This class needs no
        code from the repo: such a repo is fetched as its index and the component folders it lists (not those passed
        as arguments), without pickle files unless ``use_safetensors=False``. Other repos (Stable Diffusion's) and
        calls with ``trust_remote_code`` or ``custom_pipeline`` go to diffusers as they are.
        """
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") is not None:
            return super().download(pretrained_model_name, **kwargs)
        from huggingface_hub import hf_hub_download, snapshot_download

        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision")
            if kwargs.get(key) is not None
        }
        index_file = hf_hub_download(pretrained_model_name, cls.config_name, **hub_kwargs)
        index = json.loads(Path(index_file).read_text(encoding="utf-8"))
        if not isinstance(index.get("_class_name"), list):
            return super().download(pretrained_model_name, **kwargs)
        folders = [
            name
            for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None and name not in kwargs
        ]
        return snapshot_download(
            pretrained_model_name,
            allow_patterns=[cls.config_name, *(f"{name}/*" for name in folders)],
            ignore_patterns=[] if kwargs.get("use_safetensors") is False else _PICKLE_PATTERNS,
            **hub_kwargs,
        )

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`ConfigMixin.load_config`; a ``_class_name`` ``[file stem, this class's name]`` reads as this class.

        Saved folders name the pipeline by its file (see :meth:`save_pretrained`), so that
        ``DiffusionPipeline.from_pretrained`` loads the class from there. Loading through this class already has the
        class, and then needs no code from the folder.
        """
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return loaded

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> "KLDBBoundaryPipeline":
        """As :meth:`DiffusionPipeline.from_pipe`; optional components that ``pipeline`` lacks (a plain
        StableDiffusionPipeline has no classifier) are ``None`` unless passed."""
        for name in cls._optional_components:
            if name not in kwargs and name not in pipeline.components:
                kwargs[name] = None
        return super().from_pipe(pipeline, **kwargs)

    def enable_guidance_checkpointing(self) -> None:
        """Gradient checkpointing in the VAE decoder and the UNet; it acts only in the guidance pass.

        diffusers checkpoints a module only while gradients are enabled, i.e. here in the KLDB backward pass, never in
        the no-grad sampling steps. Peak memory of guidance drops (activations are recomputed) at some extra time.
        """
        self.vae.enable_gradient_checkpointing()
        self.unet.enable_gradient_checkpointing()
        if self.guidance_vae is not None:
            self.guidance_vae.enable_gradient_checkpointing()

    def disable_guidance_checkpointing(self) -> None:
        """Undo :meth:`enable_guidance_checkpointing`."""
        self.vae.disable_gradient_checkpointing()
        self.unet.disable_gradient_checkpointing()
        if self.guidance_vae is not None:
            self.guidance_vae.disable_gradient_checkpointing()

    def resolve_guidance_decoder(self, choice: str = "auto") -> str:
        """The component (``"vae"`` or ``"guidance_vae"``) whose decoder ``kldb_guidance_decoder=choice`` uses."""
        if choice == "guidance_vae" or (choice == "auto" and self.guidance_vae is not None):
            return "guidance_vae"
        return "vae"

    def guidance_decoder(self, choice: str = "auto") -> torch.nn.Module:
        """The autoencoder whose decoder the guidance uses for ``kldb_guidance_decoder=choice``."""
        return getattr(self, self.resolve_guidance_decoder(choice))

    def set_lms_scheduler(self, **overrides: Any) -> None:
        """Rebuild the k-LMS scheduler from its config with ``overrides``.

        The paper follows Lin et al. (2024): ``set_lms_scheduler(timestep_spacing="trailing")``; the authors also used
        ``use_karras_sigmas=True``. (Zero-terminal-SNR rescaling does not apply to LMS with an epsilon model.)
        """
        self.scheduler = LMSDiscreteScheduler.from_config(self.scheduler.config, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """As :meth:`DiffusionPipeline.save_pretrained`, in the Hub layout of a custom pipeline.

        ``model_index.json`` names the pipeline ``["kldb_boundary", "KLDBBoundaryPipeline"]`` and this file lies beside
        it as ``kldb_boundary.py``. The folder, and a Hub repo made from it, then loads with
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` as well as with this class. An
        :class:`ImageClassifier` is saved as a custom component (its config, safetensors weights and this file in its
        folder); one that cannot be rebuilt from a config is refused before anything is written.
        """
        classifier = self.classifier
        if is_image_classifier(classifier):
            classifier.architecture_config()  # raises, saying what to do, when it cannot be saved
        elif classifier is not None and not _is_transformers_classifier(classifier):
            raise TypeError(
                "Expected the pipeline's `classifier` to be an ImageClassifier or a transformers model to save it "
                f"but got {type(classifier).__name__}; set it with "
                "`pipe.register_modules(classifier=as_image_classifier(c))` or leave it out with "
                "`pipe.register_modules(classifier=None)`."
            )
        os.makedirs(save_directory, exist_ok=True)
        Path(save_directory, f"{PIPELINE_FILE_STEM}.py").write_text(_source_of(type(self)), encoding="utf-8")
        super().save_pretrained(save_directory, *args, **kwargs)

    def to_json_string(self) -> str:
        """The config as ``model_index.json`` holds it: the pipeline named by its file, ``["kldb_boundary", class]``,
        and an :class:`ImageClassifier` by the copy of this file in its folder, ``["pipeline_kldb_boundary",
        "ImageClassifier"]`` (diffusers' convention for custom components)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = [PIPELINE_FILE_STEM, type(self).__name__]
        if is_image_classifier(getattr(self, "classifier", None)) and isinstance(config.get("classifier"), list):
            config["classifier"] = [CLASSIFIER_FILE_STEM, "ImageClassifier"]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # --- inputs ------------------------------------------------------------------------------------------------------

    def check_kldb_inputs(
        self,
        kldb_guidance_scale: Any,
        kldb_guidance_interval: Any,
        kldb_gradient: Any,
        num_inference_steps: Any,
        has_classifier: bool,
        classes: Any,
        timesteps: Any = None,
        sigmas: Any = None,
        height: int | None = None,
        width: int | None = None,
        kldb_guidance_decoder: Any = "auto",
        num_images_per_prompt: Any = 1,
        prompt: Any = None,
    ) -> None:
        """Check the KLDB arguments, and the scheduler when guidance runs, with one clear error each.

        Guidance runs when ``classes`` are given and ``kldb_guidance_scale`` > 0; only then must the scheduler be the
        deterministic k-LMS step with an epsilon-prediction model. Otherwise the pipeline samples exactly as
        :class:`~diffusers.StableDiffusionPipeline` with whatever scheduler it has (and scores the images when it has
        a classifier).
        """
        if isinstance(kldb_guidance_scale, bool) or not isinstance(kldb_guidance_scale, (int, float)):
            raise TypeError(f"`kldb_guidance_scale` has to be a float but is {type(kldb_guidance_scale).__name__}.")
        if not math.isfinite(kldb_guidance_scale) or kldb_guidance_scale < 0:
            raise ValueError(f"`kldb_guidance_scale` has to be finite and >= 0 but is {kldb_guidance_scale}.")
        if kldb_gradient not in GRADIENT_MODES:
            raise ValueError(f"`kldb_gradient` has to be one of {GRADIENT_MODES} but is {kldb_gradient!r}.")
        if kldb_guidance_decoder not in GUIDANCE_DECODERS:
            raise ValueError(
                f"`kldb_guidance_decoder` has to be one of {GUIDANCE_DECODERS} but is {kldb_guidance_decoder!r}."
            )
        if kldb_guidance_decoder == "guidance_vae" and self.guidance_vae is None:
            raise ValueError(
                "`kldb_guidance_decoder='guidance_vae'` needs the pipeline's `guidance_vae` component, which is None: "
                "pass `guidance_vae=` to `from_pretrained` or the constructor (e.g. "
                "`AutoencoderTiny.from_pretrained('madebyollin/taesd')` for Stable Diffusion v1)."
            )
        if num_images_per_prompt is not None and (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"`num_images_per_prompt` has to be a positive integer but is {num_images_per_prompt!r}.")
        if isinstance(prompt, list) and (not prompt or not all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"`prompt` has to be a string or a non-empty list of strings but is {prompt!r}.")
        steps = len(timesteps) if timesteps is not None else len(sigmas) if sigmas is not None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`num_inference_steps` has to be a positive integer but is {steps!r}.")
        guiding = kldb_guidance_scale > 0 and classes is not None
        if (
            isinstance(kldb_guidance_interval, bool)
            or not isinstance(kldb_guidance_interval, int)
            or kldb_guidance_interval < 1
            or (guiding and kldb_guidance_interval > steps)
        ):
            raise ValueError(
                f"`kldb_guidance_interval` has to be an integer in [1, num_inference_steps={steps}] but is "
                f"{kldb_guidance_interval!r}."
            )
        if (
            height is not None
            and width is not None
            and (height % self.vae_scale_factor or width % self.vae_scale_factor)
        ):
            raise ValueError(
                f"`height` and `width` have to be divisible by the VAE factor {self.vae_scale_factor} but are {height} "
                f"and {width}."
            )
        if classes is not None and not has_classifier:
            raise ValueError(
                "`classes` were given but the pipeline has no classifier: pass `classifier=` to the call, the "
                "constructor or `from_pretrained`."
            )
        if guiding and not isinstance(self.scheduler, LMSDiscreteScheduler):
            raise ValueError(
                f"KLDB guidance needs the deterministic k-LMS step, but `scheduler` is {type(self.scheduler).__name__}."
                " Use `pipe.set_lms_scheduler()` or `LMSDiscreteScheduler.from_config(pipe.scheduler.config)`, or "
                "`kldb_guidance_scale=0` for sampling without guidance."
            )
        if guiding and self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"KLDB guidance needs an epsilon-prediction model, but the scheduler's `prediction_type` is "
                f"{self.scheduler.config.prediction_type!r}."
            )

    def _check_latents(self, latents: Any, batch: int, height: int, width: int) -> None:
        """``latents`` given by the user have to be the shape the pipeline samples: one per image, at this size."""
        if latents is None:
            return
        expected = (
            batch,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"`latents` have to be a tensor of shape {expected} (images, channels, height / {self.vae_scale_factor}"
                f", width / {self.vae_scale_factor}) for {batch} images of {height}x{width} but are {got}."
            )

    def check_image_inputs(
        self,
        image: Any,
        strength: Any,
        height: int | None,
        width: int | None,
        latents: Any,
        steps: int,
    ) -> torch.Tensor:
        """Check ``image`` and ``strength`` of an image-to-image call; return the images as the VAE takes them.

        ``image`` is a PIL image (converted to RGB), a float ``np.ndarray`` ``(H, W, 3)`` / ``(B, H, W, 3)`` or a
        float ``torch.Tensor`` ``(3, H, W)`` / ``(B, 3, H, W)`` with values in ``[0, 1]``, or a list of one of these,
        all of one size. The size has to be divisible by the VAE factor: images are not resized (resize or crop them
        first). ``height`` and ``width``, when given, have to be the images' size. ``strength`` is in ``(0, 1]`` and
        has to leave at least one of the ``steps`` to run (diffusers' img2img rule: ``int(steps * strength)`` steps
        run).

        Returns:
            ``(N, 3, H, W)`` in ``[-1, 1]``: the images preprocessed by the pipeline's ``VaeImageProcessor``.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"`strength` has to be a number in (0, 1] but is {strength!r}.")
        if int(steps * strength) < 1:
            raise ValueError(
                f"`strength` * `num_inference_steps` has to leave at least one step to run (img2img runs "
                f"int(num_inference_steps * strength) steps) but is {strength} * {steps}."
            )
        if latents is not None:
            raise ValueError(
                "`latents` and `image` were both given: an image-to-image call makes its starting latents from `image`."
            )
        template = (
            "Expected argument `image` to be a PIL image, a float np.ndarray (H, W, 3) or (B, H, W, 3) or a float "
            "torch.Tensor (3, H, W) or (B, 3, H, W) in [0, 1], or a non-empty list of one of these, but got {got}."
        )
        items = image if isinstance(image, list) else [image]
        if not items or not all(isinstance(item, type(items[0])) for item in items):
            raise TypeError(template.format(got=f"a list of {sorted({type(item).__name__ for item in items})}"))
        sizes = []
        for item in items:
            if isinstance(item, PIL.Image.Image):
                sizes.append((item.height, item.width))
                continue
            if not isinstance(item, (np.ndarray, torch.Tensor)):
                raise TypeError(template.format(got=type(item).__name__))
            is_float = item.is_floating_point() if torch.is_tensor(item) else np.issubdtype(item.dtype, np.floating)
            channels = (item.shape[-1] if isinstance(item, np.ndarray) else item.shape[-3]) if item.ndim >= 3 else None
            if item.ndim not in (3, 4) or channels != 3 or not is_float:
                got = f"{type(item).__name__} of shape {tuple(item.shape)} and dtype {item.dtype}"
                raise ValueError(template.format(got=got))
            low, high = float(item.min()), float(item.max())
            if not (low >= 0.0 and high <= 1.0):  # also refuses nan
                raise ValueError(f"Expected argument `image` to hold values in [0, 1] but they span [{low}, {high}].")
            sizes.append(tuple(item.shape[-3:-1] if isinstance(item, np.ndarray) else item.shape[-2:]))
        if len(set(sizes)) > 1:
            raise ValueError(
                f"Expected argument `image` to hold images of one size but got sizes {sorted(set(sizes))}."
            )
        h, w = sizes[0]
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(
                f"Expected argument `image` to have a height and width divisible by the VAE factor "
                f"{self.vae_scale_factor} but it is {h}x{w} (height x width); images are not resized: resize or crop "
                "them first."
            )
        if (height is not None and height != h) or (width is not None and width != w):
            raise ValueError(
                f"`height` and `width` have to be the size of `image` ({h}x{w}) or None but are {height} and {width}."
            )
        if isinstance(items[0], PIL.Image.Image):
            items = [item.convert("RGB") for item in items]
        pixels = self.image_processor.preprocess(items if isinstance(image, list) else items[0], height=h, width=w)
        return pixels.contiguous()  # PIL images come out strided: the same values give the same result in any form

    @staticmethod
    def image_rows(num_images: int, batch_size: int, num_images_per_prompt: int) -> torch.Tensor:
        """``[batch_size * num_images_per_prompt]`` the input image of each row of an image-to-image call.

        Rows follow the prompts (each repeated ``num_images_per_prompt`` times, as ``encode_prompt`` repeats them):
        one image serves every row; otherwise image ``i`` goes with prompt ``i``.
        """
        rows = torch.arange(batch_size * num_images_per_prompt)
        return rows // num_images_per_prompt if num_images > 1 else torch.zeros_like(rows)

    def _resolve_classifier(self, classifier: Any, device: torch.device) -> ImageClassifier | None:
        classifier = classifier if classifier is not None else self.classifier
        if classifier is None:
            return None
        adapter = as_image_classifier(classifier, self.classifier_processor)
        if adapter._param() is not None and adapter.device != device:
            logger.info(f"Moving the classifier from {adapter.device} to the pipeline's device {device}.")
            adapter.to(device)
        return adapter

    @torch.no_grad()
    def _probe_classifier(self, adapter: ImageClassifier, height: int, width: int, device: torch.device) -> int:
        """One forward pass on two gray images: checks the output shape against the batch and the labels; returns ``n``."""
        logits = checked_logits(adapter(torch.full((2, 3, height, width), 0.5, device=device)), 2)
        n = logits.shape[-1]
        if adapter.labels is not None and len(adapter.labels) != n:
            raise ValueError(
                f"The classifier returns {n} logits but has {len(adapter.labels)} labels; they have to match."
            )
        rows = logits.double()
        if n > 1 and bool(((rows >= 0) & (rows <= 1)).all()) and bool(((rows.sum(-1) - 1).abs() < 1e-3).all()):
            logger.warning(
                "The classifier's outputs are in [0, 1] and sum to 1: it seems to return probabilities. KLDB needs "
                "logits (log-probabilities also work); remove the final softmax."
            )
        return n

    # --- kldb_guidance_scale="auto" -----------------------------------------------------------------------------------

    def choose_guidance_scale(
        self,
        classes: Sequence[int] | Sequence[str],
        grid: Sequence[float] = AUTO_GRID,
        seeds: Sequence[int] = AUTO_SEEDS,
        avoid_seeds: Sequence[int] = (),
        **call_kwargs: Any,
    ) -> dict[str, Any]:
        """Pick alpha for ``classes`` by a short pilot: the lowest median KLDB over ``seeds`` on the log ``grid``.

        Each alpha of ``grid`` samples one image per pilot seed with the call's other arguments (``call_kwargs``,
        e.g. ``prompt``, ``guidance_scale``, ``num_inference_steps``, ``kldb_step_control``); ties go to the smaller
        alpha. Pilot seeds that are among ``avoid_seeds`` (the seeds of the images the caller returns) are moved, so
        the pilot never sees the images it chooses for.

        Returns:
            ``{"kldb_guidance_scale": chosen, "grid": [...], "median_kldb": [...], "seeds": [...], "seconds": t}``.
        """
        import time

        if not grid or any(
            isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < math.inf for a in grid
        ):
            raise ValueError(
                f"Expected argument `grid` to be a non-empty list of positive alphas but got {list(grid)!r}."
            )
        if not seeds or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds):
            raise ValueError(f"Expected argument `seeds` to be a non-empty list of ints but got {list(seeds)!r}.")
        avoid = {int(x) for x in avoid_seeds}
        pilot_seeds = [int(x) for x in seeds]
        while avoid & set(pilot_seeds) or len(set(pilot_seeds)) != len(pilot_seeds):
            pilot_seeds = [x + 7919 for x in pilot_seeds]
        prompt = call_kwargs.pop("prompt", None)
        prompt = prompt[0] if isinstance(prompt, list) else prompt  # the pilot samples the first prompt only
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            if isinstance(call_kwargs.get(name), torch.Tensor):
                call_kwargs[name] = call_kwargs[name][:1]
        for name in (
            "generator",
            "latents",
            "num_images_per_prompt",
            "output_type",
            "return_dict",
            "callback_on_step_end",
        ):
            call_kwargs.pop(name, None)  # the pilot samples its own images, one per seed, and runs no user callback
        call_kwargs.pop("callback_on_step_end_tensor_inputs", None)
        device = self._execution_device
        start = time.perf_counter()
        medians = []
        for alpha in grid:
            generators = [torch.Generator(device=device).manual_seed(x) for x in pilot_seeds]
            out = self(
                prompt=prompt, classes=classes, kldb_guidance_scale=float(alpha), generator=generators,
                num_images_per_prompt=len(pilot_seeds), output_type="pt", **call_kwargs,
            )  # fmt: skip
            medians.append(float(out.kldb.float().median()))
        best = min(range(len(grid)), key=lambda i: (medians[i], grid[i]))
        return {
            "kldb_guidance_scale": float(grid[best]),
            "grid": [float(a) for a in grid],
            "median_kldb": medians,
            "seeds": pilot_seeds,
            "seconds": time.perf_counter() - start,
        }

    # --- the call ----------------------------------------------------------------------------------------------------

    def _step_end_callback(
        self,
        guidance: KLDBGuidanceCallback | None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> tuple[Any, list[str]]:
        """The step-end callback the sampling loop runs: the guidance first, then the user's, whose return is final.

        Returns the callback (``None`` when there is none) and the tensor inputs it needs.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            user_inputs = list(callback_on_step_end.tensor_inputs)
        else:
            user_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        if guidance is None:
            return callback_on_step_end, user_inputs
        inputs = list(dict.fromkeys([*guidance.tensor_inputs, *user_inputs]))
        if callback_on_step_end is None:
            return guidance, inputs

        def guided_then_user(pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
            callback_kwargs = guidance(pipeline, step_index, timestep, callback_kwargs)
            returned = callback_on_step_end(pipeline, step_index, timestep, dict(callback_kwargs))
            if not isinstance(returned, dict):
                raise TypeError(
                    "Expected `callback_on_step_end` to return a dict of tensors (the `callback_kwargs` it was given, "
                    f"changed or not) but it returned {type(returned).__name__}."
                )
            return {**callback_kwargs, **returned}

        return guided_then_user, inputs

    # --- image-to-image ----------------------------------------------------------------------------------------------

    def prepare_image_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        batch_size: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """The starting latents of an image-to-image call, as ``StableDiffusionImg2ImgPipeline.prepare_latents``.

        ``scheduler.add_noise(scaling_factor * E(image), noise, timestep)``: the VAE's encoding of each row's image
        (a sample of its latent distribution drawn with ``generator``), noised to the call's first timestep with noise
        drawn from ``generator`` after it. A list of generators gives row ``i`` its own encoding and noise from
        ``generator[i]``. Rows pair with the prompts as :meth:`image_rows` says (diffusers' img2img repeats a batch
        of images as a block instead, which pairs them with the wrong prompts when ``num_images_per_prompt > 1``).

        Args:
            image: ``(N, 3, H, W)`` in ``[-1, 1]``, from :meth:`check_image_inputs`.
            timestep: ``[batch_size * num_images_per_prompt]`` the first timestep the call runs.
        """
        rows = self.image_rows(image.shape[0], batch_size, num_images_per_prompt).to(image.device)
        total = rows.shape[0]
        image = image.to(device=device, dtype=dtype)
        if isinstance(generator, list):
            if len(generator) != total:
                raise ValueError(
                    f"You have passed a list of generators of length {len(generator)}, but requested an effective "
                    f"batch size of {total}. Make sure the batch size matches the length of the generators."
                )
            init_latents = torch.cat(
                [retrieve_latents(self.vae.encode(image[r : r + 1]), generator=g) for r, g in zip(rows, generator)]
            )
        else:
            init_latents = retrieve_latents(self.vae.encode(image), generator=generator)[rows.to(device)]
        init_latents = self.vae.config.scaling_factor * init_latents  # (B, c, h, w)
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    def _sample_from_image(
        self,
        image: torch.Tensor,
        strength: float,
        prompt: str | list[str] | None,
        num_inference_steps: int,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        guidance_scale: float,
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        ip_adapter_image: PipelineImageInput | None,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        output_type: str,
        cross_attention_kwargs: dict[str, Any] | None,
        guidance_rescale: float,
        clip_skip: int | None,
        callback_on_step_end: Callable[..., dict] | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> tuple[torch.Tensor, list[bool] | None]:
        """The Stable Diffusion sampling loop started from ``image`` noised to ``strength``: the image-to-image call.

        As ``StableDiffusionImg2ImgPipeline``: ``int(num_inference_steps * strength)`` steps of the schedule run,
        the last ones, from :meth:`prepare_image_latents`, and the scheduler is told where they start
        (``set_begin_index``); plus what :class:`~diffusers.StableDiffusionPipeline`'s loop has (``guidance_rescale``).
        One difference: k-LMS starts its multistep at order 1 at the first step run, as a sampling call from noise
        does, instead of using coefficients built on noise levels of steps that never ran (diffusers' img2img passes
        no ``order``, so its first k-LMS steps mix in coefficients of up to order 4 with a single derivative stored:
        huggingface/diffusers#5630).

        Returns:
            ``(images, nsfw)``: ``(B, 3, H, W)`` in ``[0, 1]`` (or latents for ``output_type="latent"``) and the safety
            checker's flags.
        """
        height, width = image.shape[-2:]
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        if isinstance(prompt, str):
            batch_size = 1
        elif isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 1. Encode the prompt
        lora_scale = self.cross_attention_kwargs.get("scale") if self.cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 2. The timesteps: the last int(num_inference_steps * strength) of the schedule (diffusers' img2img rule)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        num_inference_steps = num_inference_steps - t_start

        # 3. The starting latents: the encoded image noised to the first timestep run
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)
        latents = self.prepare_image_latents(
            image, latent_timestep, batch_size, num_images_per_prompt, prompt_embeds.dtype, device, generator
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        lms = isinstance(self.scheduler, LMSDiscreteScheduler)
        added_cond_kwargs = {"image_embeds": image_embeds} if image_embeds is not None else None
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 4. Denoise
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)
                # k-LMS: the multistep order grows from 1 at the first step run (see the docstring)
                order = {"order": min(i + 1, LMS_MAX_ORDER)} if lms else {}
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, **order, return_dict=False)[
                    0
                ]
                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 5. Decode and check, as StableDiffusionPipeline does; images in [0, 1]
        has_nsfw = None
        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[
                0
            ]
            images, has_nsfw = self.run_safety_checker(images, device, prompt_embeds.dtype)
            do_denormalize = [True] * images.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
            images = self.image_processor.postprocess(images, output_type="pt", do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()
        return images, has_nsfw

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        classes: Sequence[int] | Sequence[str] | None = None,
        classifier: Any = None,
        kldb_guidance_scale: float | str = 0.1,
        kldb_guidance_interval: int = 5,
        kldb_gradient: str = "unet",
        kldb_autocast_dtype: torch.dtype | None = None,
        kldb_guidance_decoder: str = "auto",
        kldb_step_control: str = "fixed",
        kldb_max_halvings: int = 3,
        kldb_trust_radius: float = 0.1,
        kldb_step_temperature: float = 0.5,
        image: PipelineImageInput | None = None,
        strength: float | None = None,
        **kwargs: Any,
    ) -> KLDBBoundaryPipelineOutput | tuple:
        r"""Generate images pulled toward the decision boundary of ``classes``.

        Takes every argument of :meth:`StableDiffusionPipeline.__call__` (see there), with these differences and
        additions. Guidance runs when ``classes`` are given and ``kldb_guidance_scale`` > 0, and then needs the k-LMS
        scheduler; otherwise the call samples exactly as :class:`~diffusers.StableDiffusionPipeline` does, with any
        scheduler, and scores the images when the pipeline has a classifier.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                Defaults to the class names joined with " and " (the paper's prompt, e.g. "chihuahua and papillon").
            num_inference_steps (`int`, *optional*, defaults to 40):
                The paper's T.
            callback_on_step_end (`Callable` or `PipelineCallback`, *optional*):
                Runs at every step end after the KLDB guidance and sees the guided latents; what it returns is what
                the sampling loop uses.
            classes (`list[int]` or `list[str]`, *optional*):
                The class subset C, as indices into the classifier's output or as its label names. Without it, no
                guidance runs.
            classifier (*optional*, defaults to the pipeline's `classifier`):
                The classifier for this call (see :func:`as_image_classifier`).
            kldb_guidance_scale (`float` or `"auto"`, *optional*, defaults to 0.1):
                alpha, the strength of the normalised gradient step; 0 gives prompt-only sampling, identical to
                `StableDiffusionPipeline`. `"auto"` picks it for `classes` by a short pilot on seeds other than the
                returned images' (see `choose_guidance_scale`; its record is `auto_guidance` in the output).
            kldb_guidance_interval (`int`, *optional*, defaults to 5):
                k: guidance at steps k, 2k, ... (1-based).
            kldb_gradient (`str`, *optional*, defaults to `"unet"`):
                `"unet"`: the gradient flows through the noise prediction, as in the authors' code (the guided
                step's own conditional UNet forward runs with gradients on and is reused: a UNet backward, no extra
                forward); `"detached"`: the step's own noise prediction is used without its Jacobian (no UNet
                backward).
            kldb_autocast_dtype (`torch.dtype`, *optional*):
                Run only the guidance pass under `torch.autocast` in `torch.float16` or `torch.bfloat16` (on GPU).
                float16 gradients are loss-scaled so that they do not underflow; updates that still fail are
                skipped and counted in `skipped_updates`.
            kldb_guidance_decoder (`str`, *optional*, defaults to `"auto"`):
                Whose decoder the guidance gradient goes through: `"vae"` (the paper's), `"guidance_vae"` (the
                pipeline's small `guidance_vae`, much cheaper), or `"auto"`: `guidance_vae` when the pipeline has
                one, else `vae`. The returned images are always decoded by `vae`.
            kldb_step_control (`str`, *optional*, defaults to `"fixed"`):
                How each guided step's size is chosen, per image. `"fixed"`: the paper's, `alpha` every time.
                `"backtracking"`: try `alpha` and accept the step if the KLDB of the step's predicted clean image goes
                down, else halve it, up to `kldb_max_halvings` times, else no step. `"trust_region"`: the same
                halving, accepting a step that changes the classifier's probabilities by at most `kldb_trust_radius`
                (total variation). `"kldb_scaled"`: `alpha * min(1, KLDB / kldb_step_temperature)`, smaller steps
                near the boundary. A try costs one decoder and classifier forward (the step's own noise prediction is
                reused). The counts per image are in the output.
            kldb_max_halvings (`int`, *optional*, defaults to 3):
                For `"backtracking"` and `"trust_region"`.
            kldb_trust_radius (`float`, *optional*, defaults to 0.1):
                For `"trust_region"`.
            kldb_step_temperature (`float`, *optional*, defaults to 0.5):
                For `"kldb_scaled"`, in nats.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Start from this image instead of pure noise, as `StableDiffusionImg2ImgPipeline` does: the image is
                encoded by the VAE, noised to the noise level of the first step run, and the last
                `int(num_inference_steps * strength)` steps run, with KLDB guidance every `kldb_guidance_interval`
                steps counted from the first step run. Arrays `(H, W, 3)` / `(B, H, W, 3)` and tensors `(3, H, W)` /
                `(B, 3, H, W)` are floats in [0, 1]; PIL images are converted to RGB. Height and width have to be
                divisible by the VAE factor (images are not resized). One image serves every prompt; several go one
                per prompt (a single prompt, such as the default one, is used for each). Without `prompt` and
                `classes` the prompt is empty (unconditional editing). The output adds, per image, the input's KLDB
                and class probabilities (`kldb_start`, `probabilities_start`, `predicted_class_start`) and the
                distance to it (`pixel_l2`, `ssim`).
            strength (`float`, *optional*, defaults to 0.8 with `image`):
                In (0, 1]: how much of the schedule runs from `image` (1 starts from its encoding plus noise at the
                first noise level; smaller stays closer to it). Only with `image`.

        Examples:

        Returns:
            [`KLDBBoundaryPipelineOutput`] or `tuple`: with `return_dict=False`, the tuple of the output's fields in
            order: `(images, nsfw_content_detected, kldb, entropy, probabilities, predicted_class, classes,
            skipped_updates, guided_updates, accepted_steps, step_halvings, rejected_steps, auto_guidance, kldb_start,
            probabilities_start, predicted_class_start, pixel_l2, ssim)`.
        """
        if image is None and strength is not None:
            raise ValueError(f"`strength` ({strength!r}) was given without `image`: it only applies to an image.")
        if image is not None and kwargs:
            raise TypeError(f"Unexpected keyword arguments for a call with `image`: {sorted(kwargs)}.")
        auto = None
        if isinstance(kldb_guidance_scale, str) and kldb_guidance_scale == "auto":
            if image is not None:
                raise ValueError(
                    "`kldb_guidance_scale='auto'` is not available with `image` yet: pass a number (the pilot samples "
                    "from noise)."
                )
            if classes is None:
                raise ValueError("`kldb_guidance_scale='auto'` needs `classes`: the pilot picks alpha for them.")
            generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
            auto = self.choose_guidance_scale(
                classes,
                avoid_seeds=[g.initial_seed() for g in generators],
                prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                eta=eta, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                cross_attention_kwargs=cross_attention_kwargs, guidance_rescale=guidance_rescale, clip_skip=clip_skip,
                classifier=classifier, kldb_guidance_interval=kldb_guidance_interval, kldb_gradient=kldb_gradient,
                kldb_autocast_dtype=kldb_autocast_dtype, kldb_guidance_decoder=kldb_guidance_decoder,
                kldb_step_control=kldb_step_control, kldb_max_halvings=kldb_max_halvings,
                kldb_trust_radius=kldb_trust_radius, kldb_step_temperature=kldb_step_temperature,
            )  # fmt: skip
            kldb_guidance_scale = auto["kldb_guidance_scale"]
        device = self._execution_device
        adapter = self._resolve_classifier(classifier, device)
        self.check_kldb_inputs(
            kldb_guidance_scale,
            kldb_guidance_interval,
            kldb_gradient,
            num_inference_steps,
            adapter is not None,
            classes,
            timesteps,
            sigmas,
            height,
            width,
            kldb_guidance_decoder,
            num_images_per_prompt,
            prompt,
        )
        check_step_control(kldb_step_control, kldb_max_halvings, kldb_trust_radius, kldb_step_temperature)
        pixels = None  # (N, 3, H, W) in [-1, 1], the input images of an image-to-image call
        if image is not None:
            strength = DEFAULT_STRENGTH if strength is None else strength
            steps = (
                len(timesteps) if timesteps is not None else len(sigmas) if sigmas is not None else num_inference_steps
            )
            pixels = self.check_image_inputs(image, strength, height, width, latents, steps)
            steps_run = min(int(steps * strength), steps)
            if kldb_guidance_scale > 0 and classes is not None and kldb_guidance_interval > steps_run:
                raise ValueError(
                    f"`kldb_guidance_interval` has to be at most the number of steps an image-to-image call runs, "
                    f"int(num_inference_steps * strength) = {steps_run}, but is {kldb_guidance_interval}."
                )
            height, width = pixels.shape[-2:]
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Resolve the class subset and, without a prompt, build the paper's "<name> and <name>" prompt
        class_indices: list[int] | None = None
        if adapter is not None:
            num_classes = adapter.num_classes
            if classes is not None or num_classes is None:
                num_classes = self._probe_classifier(adapter, height, width, device)
            if classes is not None:
                class_indices = resolve_classes(classes, adapter.labels, num_classes)
        if prompt is None and prompt_embeds is None and class_indices is not None:
            if adapter.labels is None:
                raise ValueError("`prompt` was not given and the classifier has no label names to build it from.")
            prompt = class_prompt(adapter.labels, class_indices)
        if pixels is not None:
            num_images = pixels.shape[0]
            if prompt is None and prompt_embeds is None:
                prompt = ""  # unconditional editing
            if isinstance(prompt, str) and num_images > 1:
                prompt = [prompt] * num_images  # one prompt for each image
            num_prompts = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
            if num_images not in (1, num_prompts):
                raise ValueError(
                    f"`image` holds {num_images} images but there are {num_prompts} prompts: pass one image for all "
                    "prompts, one prompt for all images, or as many images as prompts."
                )
        if isinstance(prompt, (str, list)) or (prompt is None and isinstance(prompt_embeds, torch.Tensor)):
            batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
            self._check_latents(latents, batch * (num_images_per_prompt or 1), height, width)

        # 2. The guidance is a step-end callback that sees the sampling loop's UNet calls through a model hook; a
        #    user's callback runs after it
        guidance = None
        if kldb_guidance_scale > 0 and class_indices is not None:
            if kldb_gradient == "unet" and (ip_adapter_image is not None or ip_adapter_image_embeds is not None):
                raise ValueError("`kldb_gradient='unet'` does not support IP-Adapter inputs; use 'detached'.")
            guidance = KLDBGuidanceCallback(
                adapter,
                class_indices,
                guidance_scale=kldb_guidance_scale,
                interval=kldb_guidance_interval,
                gradient=kldb_gradient,
                autocast_dtype=kldb_autocast_dtype,
                decoder=self.guidance_decoder(kldb_guidance_decoder),
                step_control=kldb_step_control,
                max_halvings=kldb_max_halvings,
                trust_radius=kldb_trust_radius,
                step_temperature=kldb_step_temperature,
            )
        step_end, tensor_inputs = self._step_end_callback(
            guidance, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 3. Sample with the Stable Diffusion loop, from noise or from `image`; images come back as (B, 3, H, W) in [0, 1]
        with guidance.attached(self) if guidance is not None else nullcontext():
            if pixels is not None:
                images, nsfw = self._sample_from_image(
                    pixels, strength, prompt, num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt,
                    num_images_per_prompt or 1, eta, generator, prompt_embeds, negative_prompt_embeds,
                    ip_adapter_image, ip_adapter_image_embeds, output_type, cross_attention_kwargs, guidance_rescale,
                    clip_skip, step_end, tensor_inputs,
                )  # fmt: skip
            else:
                out = super().__call__(
                    prompt=prompt,
                    height=height,
                    width=width,
                    num_inference_steps=num_inference_steps,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt,
                    num_images_per_prompt=num_images_per_prompt,
                    eta=eta,
                    generator=generator,
                    latents=latents,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    ip_adapter_image=ip_adapter_image,
                    ip_adapter_image_embeds=ip_adapter_image_embeds,
                    output_type="latent" if output_type == "latent" else "pt",
                    return_dict=True,
                    cross_attention_kwargs=cross_attention_kwargs,
                    guidance_rescale=guidance_rescale,
                    clip_skip=clip_skip,
                    callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=tensor_inputs,
                    **kwargs,
                )
                images, nsfw = out.images, out.nsfw_content_detected

        # 4. Score the returned images
        kldb = ent = probs = predicted = None
        if adapter is not None and output_type != "latent":
            logits = checked_logits(adapter(images), images.shape[0])  # (B, n)
            probs = torch.softmax(logits, dim=-1)
            ent = entropy(logits)
            predicted = logits.argmax(dim=-1)
            kldb = kldb_score(logits, class_indices) if class_indices is not None else None
        # the input image of each row: its own scores, and how far the returned image moved from it
        kldb_start = probs_start = predicted_start = l2 = ssim = None
        if pixels is not None:
            rows = self.image_rows(
                pixels.shape[0], images.shape[0] // (num_images_per_prompt or 1), num_images_per_prompt or 1
            )
            inputs = self.image_processor.denormalize(pixels)[rows].to(device=images.device)  # (B, 3, H, W) in [0, 1]
            if adapter is not None:
                logits_start = checked_logits(adapter(inputs), inputs.shape[0])  # (B, n)
                probs_start = torch.softmax(logits_start, dim=-1)
                predicted_start = logits_start.argmax(dim=-1)
                kldb_start = kldb_score(logits_start, class_indices) if class_indices is not None else None
            if output_type != "latent":
                l2, ssim = pixel_l2(images, inputs), structural_similarity(images, inputs)
        skipped = guidance.skipped_updates if guidance is not None else 0
        guided = guidance.guided_updates if guidance is not None else 0
        counts = guidance.step_counts if guidance is not None else None
        if skipped:
            logger.warning(
                f"KLDB guidance skipped {skipped} of {skipped + guided} per-sample updates (zero or non-finite "
                "gradient, or a step too large to stay finite); those samples kept their unguided latents there."
            )

        # 5. Convert to the requested output type (the same conversion StableDiffusionPipeline applies)
        if output_type not in ("latent", "pt"):
            images = self.image_processor.postprocess(
                images, output_type=output_type, do_denormalize=[False] * images.shape[0]
            )

        output = KLDBBoundaryPipelineOutput(
            images=images,
            nsfw_content_detected=nsfw,
            kldb=kldb,
            entropy=ent,
            probabilities=probs,
            predicted_class=predicted,
            classes=class_indices,
            skipped_updates=skipped,
            guided_updates=guided,
            accepted_steps=counts["accepted"] if counts is not None else None,
            step_halvings=counts["halvings"] if counts is not None else None,
            rejected_steps=counts["rejected"] if counts is not None else None,
            auto_guidance=auto,
            kldb_start=kldb_start,
            probabilities_start=probs_start,
            predicted_class_start=predicted_start,
            pixel_l2=l2,
            ssim=ssim,
        )
        # every field in order, also those that are None (BaseOutput.to_tuple would drop them and shift the rest)
        return output if return_dict else tuple(getattr(output, field.name) for field in fields(output))
