"""Build a pipeline or a classifier from a short text spec, so that a command line or a subprocess can name them.

Pipeline specs:

- ``"digits"``: the bundled digits world (:func:`kldb.digits.load_pipeline`), offline;
- ``"package.module:function"``: ``function()`` must return a :class:`~pipeline_kldb_boundary.KLDBBoundaryPipeline`
  (tests use ``"kldb.testing:tiny_pipeline"``, tiny random components);
- anything else: a local folder or a Hub model id, loaded with ``KLDBBoundaryPipeline.from_pretrained``.

Classifier specs (``None`` keeps the pipeline's own classifier):

- ``"torchvision:<model>:<weights>"``, e.g. ``"torchvision:resnet50:IMAGENET1K_V2"``: a torchvision model with the
  preprocessing and label names of its weights (:meth:`ImageClassifier.from_torchvision`);
- ``"package.module:function"``: ``function()`` returns a classifier (see :func:`as_image_classifier`) or a pair
  ``(transformers model, image processor)``, e.g. ``"kldb.testing:tiny_classifier"``;
- a folder or Hub id saved by :meth:`ImageClassifier.save_pretrained` (its ``config.json`` names ``ImageClassifier``):
  the adapter with its preprocessing, labels and network, from safetensors;
- anything else: a transformers image-classification model folder or Hub id, with its image processor.

Guidance decoder specs (``guidance_vae``, the small decoder the guidance gradient may use instead of the VAE's):

- ``"package.module:function"``: ``function()`` returns an autoencoder (e.g. ``"kldb.testing:tiny_guidance_vae"``);
- anything else: an ``AutoencoderTiny`` folder or Hub id, e.g. ``"madebyollin/taesd"`` (TAESD, for Stable Diffusion
  v1 latents), loaded from safetensors.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any

import torch

from kldb.errors import KLDBInputTypeError
from pipeline_kldb_boundary import ImageClassifier, KLDBBoundaryPipeline, as_image_classifier

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` (or a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"Expected argument `dtype` to be one of {list(DTYPES)} but got {dtype!r}.")


def resolve_dtype(dtype: str, device: str | None = None) -> str:
    """``dtype``, with ``"auto"`` made float16 on a CUDA device (or, without a device, when CUDA is available) and
    float32 elsewhere.

    Example:
        >>> resolve_dtype("bfloat16"), resolve_dtype("auto", "cpu"), resolve_dtype("auto", "cuda:0")
        ('bfloat16', 'float32', 'float16')
    """
    if dtype != "auto":
        return dtype
    on_gpu = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    return "float16" if on_gpu else "float32"


def _call_factory(spec: str, argument: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"Expected argument `{argument}` to name an importable `module:function` but got {spec!r} ({error})."
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(
            f"Expected argument `{argument}` to name an importable `module:function` but got {spec!r} "
            f"(module {module_name!r} has no callable {attribute!r})."
        )
    return factory()


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` has the form ``package.module:function``."""
    return bool(_FACTORY.match(spec))


def load_pipeline(
    spec: str = "digits", device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", **kwargs: Any
) -> KLDBBoundaryPipeline:
    """Build the :class:`KLDBBoundaryPipeline` named by ``spec`` (see the module docstring), on ``device``.

    Every spec ends the same way: each torch module component whose weights are not in ``dtype`` (such as a UNet
    stored in float16) is cast to it, and the pipeline is moved to ``device``. :func:`kldb.digits.load_pipeline` is
    this function for a world folder. Further keyword arguments go to ``KLDBBoundaryPipeline.from_pretrained``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"Expected argument `pipeline` to be a non-empty string but got {spec!r}.")
    torch_dtype = parse_dtype(dtype)
    if spec == "digits":
        from kldb import digits

        return digits.load_pipeline(torch_dtype=torch_dtype, device=device, **kwargs)  # the shipped world's folder
    if is_factory_spec(spec):
        pipe = _call_factory(spec, "pipeline")
        if not isinstance(pipe, KLDBBoundaryPipeline):
            raise KLDBInputTypeError(
                f"Expected argument `pipeline` {spec!r} to return a KLDBBoundaryPipeline but it returned "
                f"{type(pipe).__name__}."
            )
    else:
        pipe = KLDBBoundaryPipeline.from_pretrained(spec, torch_dtype=torch_dtype, **kwargs)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and any(p.dtype != torch_dtype for p in module.parameters()):
            logger.info("Casting %s to %s.", name, torch_dtype)
            module.to(dtype=torch_dtype)
    return pipe.to(device)


def load_guidance_vae(
    spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> torch.nn.Module:
    """The autoencoder named by ``spec`` (see the module docstring), on ``device`` in ``dtype``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"Expected argument `guidance_vae` to be a non-empty string but got {spec!r}.")
    torch_dtype = parse_dtype(dtype)
    if is_factory_spec(spec):
        model = _call_factory(spec, "guidance_vae")
        if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "decode", None)):
            raise KLDBInputTypeError(
                f"Expected argument `guidance_vae` {spec!r} to return an autoencoder with a `decode` method but it "
                f"returned {type(model).__name__}."
            )
    else:
        from diffusers import AutoencoderTiny

        model = AutoencoderTiny.from_pretrained(spec, use_safetensors=True)
    return model.eval().to(device=device, dtype=torch_dtype)


def load_classifier(spec: str | None, device: str | torch.device = "cpu") -> ImageClassifier | None:
    """Build the classifier named by ``spec`` as an :class:`ImageClassifier` on ``device``; ``None`` gives ``None``."""
    if spec is None:
        return None
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"Expected argument `classifier` to be a non-empty string or None but got {spec!r}.")
    if spec.startswith("torchvision:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(
                f"Expected argument `classifier` to look like 'torchvision:<model>:<weights>' "
                f"(e.g. 'torchvision:resnet50:IMAGENET1K_V2') but got {spec!r}."
            )
        import torchvision.models

        _, name, weights_name = parts
        try:
            weights_enum = torchvision.models.get_model_weights(name)
        except ValueError as error:
            raise ValueError(
                f"Expected argument `classifier` to name a torchvision model but got {name!r}."
            ) from error
        try:
            weights = weights_enum[weights_name]
        except KeyError as error:
            raise ValueError(
                f"Expected argument `classifier` to name weights of {name} among "
                f"{[w.name for w in weights_enum]} but got {weights_name!r}."
            ) from error
        model = torchvision.models.get_model(name, weights=weights)
        adapter = ImageClassifier.from_torchvision(model.eval(), weights)
    elif is_factory_spec(spec):
        made = _call_factory(spec, "classifier")
        # a factory may return the model alone or (model, image processor)
        adapter = (
            as_image_classifier(*made) if isinstance(made, tuple) and len(made) == 2 else as_image_classifier(made)
        )
    elif is_saved_image_classifier(spec):
        adapter = ImageClassifier.from_pretrained(spec)
    else:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(spec).eval()
        processor = AutoImageProcessor.from_pretrained(spec)
        adapter = ImageClassifier.from_transformers(model, processor)
    return adapter.to(device)


def is_saved_image_classifier(spec: str) -> bool:
    """Whether ``spec`` names a folder or Hub repo written by :meth:`ImageClassifier.save_pretrained`."""
    try:
        config = ImageClassifier.load_config(spec)
    except (OSError, ValueError):
        return False
    return config.get("_class_name") == ImageClassifier.__name__


def pipeline_classifier(pipe: KLDBBoundaryPipeline) -> ImageClassifier:
    """The pipeline's own classifier as an :class:`ImageClassifier` (with its image processor)."""
    if pipe.classifier is None:
        raise ValueError("The pipeline has no classifier; give one with `classifier=` (a classifier spec).")
    return as_image_classifier(pipe.classifier, pipe.classifier_processor)


def classifier_labels(classifier: ImageClassifier) -> list[str]:
    """Label names of ``classifier`` in index order (``"0"``, ``"1"``, ... when it has none)."""
    if classifier.labels is not None:
        return list(classifier.labels)
    if classifier.num_classes is None:
        raise ValueError("The classifier has neither label names nor a known number of classes.")
    return [str(i) for i in range(classifier.num_classes)]
