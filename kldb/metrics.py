"""The statistics of the paper, as pure functions: numbers, arrays and tensors in, numbers out.

- :func:`summary_statistics`: median and interquartile range (75th minus 25th percentile, linear interpolation), the
  paper's summary of per-image KLDB and entropy; every median / IQR in kldb and its benchmarks comes from it;
- :func:`top_set_is_classes`: whether an image's |C| most probable classes are exactly C (the classifier hesitates
  *between the audited classes*, not toward a third one);
- :func:`class_margin`: the gap between the two most probable classes of C (``p_(1) - p_(2)`` among
  ``{p_i : i in C}``; 0 on the boundary; undefined for |C| = 1);
- FID computed by torchmetrics' ``FrechetInceptionDistance``, on features chosen by the user: the audited
  classifier's penultimate features (:class:`ClassifierFeatures`, offline, the default) or InceptionV3 (through
  torch-fidelity, only with its weights in a local file).

What applies them to a run folder (statistics per setting, FID against reference images) is in :mod:`kldb.report`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kldb.errors import KLDBInputError, KLDBInputTypeError, KLDBPathError

FEATURE_KINDS = ("classifier", "inception")


# ----------------------------------------------------------------------------------------------------------------------
# Per-image and per-setting statistics
# ----------------------------------------------------------------------------------------------------------------------


def summary_statistics(values: Sequence[float]) -> dict[str, float]:
    r"""Median, quartiles and interquartile range of ``values`` (numpy, linear interpolation).

    .. math:: \mathrm{IQR} = Q_{0.75} - Q_{0.25}

    Example:
        >>> summary_statistics([1.0, 2.0, 3.0, 4.0])
        {'n': 4, 'median': 2.5, 'q25': 1.75, 'q75': 3.25, 'iqr': 1.5, 'mean': 2.5}
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
        raise KLDBInputError(
            f"Expected argument `values` to be a non-empty 1-d sequence of finite numbers but got {values!r}."
        )
    q25, median, q75 = np.percentile(array, [25.0, 50.0, 75.0])
    return {
        "n": int(array.size),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "iqr": float(q75 - q25),
        "mean": float(array.mean()),
    }


def top_set_is_classes(top_classes: Sequence[int], classes: Sequence[int]) -> bool:
    """Whether the |C| most probable classes of an image (``top_classes``, most probable first) are exactly C.

    Example:
        >>> top_set_is_classes([0, 2, 1], classes=[2, 0]), top_set_is_classes([0, 1, 2], classes=[2, 0])
        (True, False)
    """
    classes = [int(c) for c in classes]
    top = [int(c) for c in top_classes]
    if len(top) < len(classes):
        raise KLDBInputError(
            f"Expected the record's `top_classes` to hold at least |C| = {len(classes)} classes but got {top!r}."
        )
    return set(top[: len(classes)]) == set(classes)


def class_margin(class_probabilities: Sequence[float]) -> float | None:
    """``p_(1) - p_(2)``: the gap between the two most probable classes of C; ``None`` when |C| = 1.

    Example:
        >>> round(class_margin([0.3, 0.5]), 6), class_margin([0.9])
        (0.2, None)
    """
    probabilities = sorted((float(p) for p in class_probabilities), reverse=True)
    if len(probabilities) < 2:
        return None
    return probabilities[0] - probabilities[1]


# ----------------------------------------------------------------------------------------------------------------------
# FID (torchmetrics), on the classifier's penultimate features or InceptionV3
# ----------------------------------------------------------------------------------------------------------------------


def _classification_head(model: torch.nn.Module) -> torch.nn.Module:
    """The last ``nn.Linear`` of ``model``: the head whose input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise KLDBInputError(
            f"Expected the classifier {type(model).__name__} to end in a torch.nn.Linear head but it has none; "
            "pass `layer=` (the module whose input is the feature vector)."
        )
    return linears[-1]


class ClassifierFeatures(torch.nn.Module):
    """Penultimate features of an image classifier, for FID in the classifier's own feature space.

    Images ``[B, 3, H, W]`` in ``[0, 1]`` go through the adapter's preprocessing and the model; a forward hook takes
    the input of ``layer`` (by default the last ``nn.Linear``, the classification head) flattened to ``[B, d]``. For a
    transformers ResNet this is ``model.resnet(x).pooler_output.flatten(1)``; for a torchvision ResNet the input of
    ``fc``. The output is float64 (FID is computed in float64).

    Args:
        classifier: anything :func:`~pipeline_kldb_boundary.as_image_classifier` accepts, with an ``nn.Module`` model.
        image_size: ``(H, W)`` of the images it will get; used once to find the feature width ``num_features``.
        layer: the module whose *input* is the feature vector; ``None`` for the last ``nn.Linear``.
    """

    def __init__(self, classifier: Any, image_size: tuple[int, int], layer: torch.nn.Module | None = None):
        from pipeline_kldb_boundary import as_image_classifier

        super().__init__()
        self.adapter = as_image_classifier(classifier)
        model = self.adapter.model
        if not isinstance(model, torch.nn.Module):
            raise KLDBInputTypeError(
                f"Expected the classifier to be a torch.nn.Module to take features from but got {type(model).__name__}."
            )
        self.layer = layer if layer is not None else _classification_head(model)
        self._captured: list[torch.Tensor] = []
        with torch.no_grad():
            probe = torch.full((1, 3, *image_size), 0.5, device=self.adapter.device or "cpu")
            self.num_features = int(self(probe).shape[-1])

    def _capture(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._captured.append(inputs[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._captured.clear()
        handle = self.layer.register_forward_hook(self._capture)  # only for this pass
        try:
            self.adapter(images)
        finally:
            handle.remove()
        if not self._captured:
            raise RuntimeError("The feature layer was not called in the classifier's forward pass.")
        features = self._captured[-1].flatten(1)  # (B, d)
        self._captured.clear()
        return features.double().cpu()


class _Identity(torch.nn.Module):
    """Passes precomputed features ``[B, d]`` to torchmetrics' FID unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def frechet_distance(real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray) -> float:
    r"""FID between two feature sets ``[N, d]``, ``[M, d]`` with torchmetrics' implementation, in float64.

    .. math:: \lVert \mu_r - \mu_f \rVert^2 + \operatorname{tr}\left(\Sigma_r + \Sigma_f - 2 (\Sigma_r \Sigma_f)^{1/2}\right)

    Example:
        >>> import torch
        >>> a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
        >>> round(frechet_distance(a, a + 1.0), 6)  # same covariance: the squared distance of the means
        2.0
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) < 2:
        raise KLDBInputError(
            "Expected arguments `real_features` and `fake_features` to be [N, d] arrays with the same d and N >= 2 "
            f"but got {tuple(real.shape)} and {tuple(fake.shape)}."
        )
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def inception_fid_metric(weights_path: str | os.PathLike[str]) -> Any:
    """torchmetrics' ``FrechetInceptionDistance`` on InceptionV3 pool features, with weights from a local file.

    Needs ``torch-fidelity`` (``pip install torch-fidelity``) and the FID InceptionV3 weights
    (``pt_inception-2015-12-05-6726825d.pth``) in ``weights_path``: nothing is downloaded.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise KLDBPathError(
            f"Expected argument `inception_weights` to be a local file with the FID InceptionV3 weights but got "
            f"{str(weights_path)!r} (no such file)."
        )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "FID on InceptionV3 features needs torch-fidelity: `pip install torch-fidelity`, or use the classifier's "
            "features (`feature='classifier'`)."
        ) from error
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))


def fid(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    feature: torch.nn.Module | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
) -> float:
    """FID between two image sets ``[N, 3, H, W]`` in ``[0, 1]`` with torchmetrics.

    Args:
        real_images: reference images (e.g. real images of the audited classes).
        fake_images: generated images.
        feature: a feature module (such as :class:`ClassifierFeatures`) mapping images to ``[B, d]``.
        inception_weights: instead of ``feature``, a local file with InceptionV3 weights (see
            :func:`inception_fid_metric`).
        batch_size: images per feature pass.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if (feature is None) == (inception_weights is None):
        raise KLDBInputError("Expected exactly one of the arguments `feature` and `inception_weights` but got "
                         f"{'both' if feature is not None else 'neither'}.")  # fmt: skip
    for name, images in (("real_images", real_images), ("fake_images", fake_images)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or len(images) < 2:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise KLDBInputError(
                f"Expected argument `{name}` to be a [N >= 2, 3, H, W] tensor in [0, 1] but got {got}."
            )
    if feature is not None:
        metric = FrechetInceptionDistance(feature=feature, normalize=True)
    else:
        metric = inception_fid_metric(inception_weights)
    with torch.no_grad():
        for images, real in ((real_images, True), (fake_images, False)):
            for start in range(0, len(images), batch_size):
                metric.update(images[start : start + batch_size].float(), real=real)
    return float(metric.compute())
