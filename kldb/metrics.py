"""The statistics of the paper, as pure functions: numbers, arrays and tensors in, numbers out.

- :func:`summary_statistics`: median and interquartile range (75th minus 25th percentile, linear interpolation), the
  paper's summary of per-image KLDB and entropy; every median / IQR in kldb and its benchmarks comes from it;
- :func:`top_set_is_classes`: whether an image's |C| most probable classes are exactly C (the classifier hesitates
  *between the audited classes*, not toward a third one);
- :func:`class_margin`: the gap between the two most probable classes of C (``p_(1) - p_(2)`` among
  ``{p_i : i in C}``; 0 on the boundary; undefined for |C| = 1);
- bootstrap 95% intervals through ``scipy.stats.bootstrap``: :func:`median_interval` for a median over images and
  :func:`paired_relative_change_interval` for ``median(guided) / median(prompt-only) - 1`` resampled by seed, with the
  fixed defaults :data:`BOOTSTRAP_RESAMPLES`, :data:`BOOTSTRAP_SEED`, :data:`BOOTSTRAP_CONFIDENCE` and
  :data:`BOOTSTRAP_METHOD` (:func:`bootstrap_settings` checks them and gives the record a report stores);
- FID computed by torchmetrics' ``FrechetInceptionDistance``, on features chosen by the user: the audited
  classifier's penultimate features (:class:`ClassifierFeatures`, offline, the default) or InceptionV3 (through
  torch-fidelity, only with its weights in a local file).

What applies them to a run folder (statistics per setting, FID against reference images) is in :mod:`kldb.report`.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kldb.errors import KLDBInputError, KLDBInputTypeError, KLDBPathError

logger = logging.getLogger(__name__)

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
# Bootstrap intervals (scipy.stats.bootstrap)
# ----------------------------------------------------------------------------------------------------------------------

#: Resamples of every bootstrap interval a report gives, unless told otherwise (``kldb report --bootstrap-resamples``).
BOOTSTRAP_RESAMPLES = 2000
#: Seed of the resampling (``numpy.random.default_rng(seed)``), so that a rerun gives the same intervals.
BOOTSTRAP_SEED = 0
#: Two-sided confidence level of the intervals.
BOOTSTRAP_CONFIDENCE = 0.95
#: The percentile interval. BCa is not the default: its acceleration comes from the jackknife, which is inconsistent
#: for a median, and its bias correction counts resampled medians below the observed one, which the many ties of
#: resampled medians distort; on a degenerate bootstrap distribution it gives no interval at all.
BOOTSTRAP_METHOD = "percentile"
BOOTSTRAP_METHODS = ("percentile", "basic", "BCa")


def bootstrap_settings(
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    method: str = BOOTSTRAP_METHOD,
    prefix: str = "",
) -> dict[str, Any]:
    """Check the bootstrap's arguments and return the record a report stores beside its intervals.

    Args:
        resamples: number of bootstrap resamples, >= 1.
        seed: seed of ``numpy.random.default_rng``, an integer >= 0.
        confidence: two-sided confidence level, in (0, 1).
        method: one of :data:`BOOTSTRAP_METHODS` (``scipy.stats.bootstrap``'s ``method``).
        prefix: put before the argument names in error messages (``"bootstrap_"`` for ``bootstrap_resamples``).

    Example:
        >>> bootstrap_settings()["resamples"], bootstrap_settings()["method"]
        (2000, 'percentile')
    """
    import scipy

    if not isinstance(resamples, int | np.integer) or isinstance(resamples, bool) or resamples < 1:
        raise KLDBInputError(f"Expected argument `{prefix}resamples` to be a positive integer but got {resamples!r}.")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise KLDBInputError(f"Expected argument `{prefix}seed` to be an integer >= 0 but got {seed!r}.")
    if (
        not isinstance(confidence, float | int | np.floating)
        or isinstance(confidence, bool)
        or not 0.0 < float(confidence) < 1.0
    ):
        raise KLDBInputError(
            f"Expected argument `{prefix}confidence` to be a number in (0, 1) but got {confidence!r}."
        )
    if method not in BOOTSTRAP_METHODS:
        raise KLDBInputError(
            f"Expected argument `{prefix}method` to be one of {list(BOOTSTRAP_METHODS)} but got {method!r}."
        )
    return {
        "resamples": int(resamples),
        "seed": int(seed),
        "confidence": float(confidence),
        "method": method,
        "implementation": f"scipy.stats.bootstrap (scipy {scipy.__version__})",
    }


def _sample(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
        raise KLDBInputError(
            f"Expected argument `{name}` to be a non-empty 1-d sequence of finite numbers but got {values!r}."
        )
    return array


def _bootstrap(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., Any],
    paired: bool,
    settings: dict[str, Any],
) -> tuple[float | None, float | None]:
    """``scipy.stats.bootstrap`` with the rules for the cases where it gives no interval (see :func:`median_interval`)."""
    if len(samples[0]) < 2:
        return None, None
    with np.errstate(divide="ignore", invalid="ignore"):
        if all(np.all(s == s[0]) for s in samples):  # every resample is the sample itself
            point = float(statistic(*samples, axis=-1))
            return (point, point) if np.isfinite(point) else (None, None)
        import scipy.stats

        rng = np.random.default_rng(settings["seed"])
        # scipy >= 1.15 calls the generator `rng`; before, `random_state` (same stream for a Generator)
        seeding = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy's DegenerateDataWarning is one; handled below
            result = scipy.stats.bootstrap(
                samples,
                statistic,
                n_resamples=settings["resamples"],
                paired=paired,
                vectorized=True,
                confidence_level=settings["confidence"],
                method=settings["method"],
                **{seeding: rng},
            )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        logger.warning(
            "The %s bootstrap gave no finite interval (a degenerate bootstrap distribution): reported as none.",
            settings["method"],
        )
        return None, None
    return low, high


def median_interval(
    values: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    method: str = BOOTSTRAP_METHOD,
) -> tuple[float | None, float | None]:
    """Bootstrap confidence interval ``(low, high)`` of the median of ``values``, resampling the values.

    ``scipy.stats.bootstrap`` with ``n_resamples=resamples``, ``confidence_level=confidence``, ``method=method`` and
    the generator ``numpy.random.default_rng(seed)``. Where the bootstrap has nothing to resample, the rule is:

    - one value: ``(None, None)``; one image says nothing about the spread (scipy refuses it too);
    - all values equal: ``(v, v)``; every resample is the sample itself, so every method's interval is that point
      (BCa's formulas divide by zero there, so scipy is not called);
    - any other case where the method gives no finite bound (BCa on a degenerate bootstrap distribution):
      ``(None, None)``, with a logged warning.

    Example:
        >>> median_interval([2.0, 2.0, 2.0]), median_interval([1.0])
        ((2.0, 2.0), (None, None))
    """
    settings = bootstrap_settings(resamples, seed, confidence, method)
    return _bootstrap((_sample(values, "values"),), np.median, False, settings)


def relative_median_change(guided: np.ndarray, baseline: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""``median(guided) / median(baseline) - 1`` along ``axis``: the relative change of Table 1.

    .. math:: \frac{M(\mathrm{guided}) - M(\mathrm{baseline})}{M(\mathrm{baseline})}

    Example:
        >>> float(relative_median_change(np.array([1.0, 2.0, 3.0]), np.array([4.0, 4.0, 5.0])))
        -0.5
    """
    return np.median(guided, axis=axis) / np.median(baseline, axis=axis) - 1.0


def paired_relative_change_interval(
    guided: Mapping[Hashable, float],
    baseline: Mapping[Hashable, float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    method: str = BOOTSTRAP_METHOD,
) -> dict[str, Any]:
    """Paired bootstrap interval of :func:`relative_median_change`, pairing the two settings by key (the seed).

    Only the keys present in both mappings count; they are sorted, and ``scipy.stats.bootstrap(..., paired=True)``
    resamples them, so that a resample holds the guided *and* the prompt-only image of each seed it draws. The record
    order of either setting does not matter. The rules of :func:`median_interval` apply to the pairs (one pair: no
    interval; no pair: no change either). A baseline median of 0 in a resample makes that resample's change infinite;
    an interval that is not finite is reported as none.

    Args:
        guided: value (e.g. KLDB) per key (e.g. seed) of the guided setting.
        baseline: value per key of the prompt-only (alpha = 0) setting of the same class subset and beta.
        resamples, seed, confidence, method: as in :func:`median_interval`.

    Returns:
        ``{"change": ..., "low": ..., "high": ..., "n_paired": ...}``: the change over the paired keys, its interval
        and the number of pairs; ``None`` where undefined.

    Example:
        >>> paired_relative_change_interval({0: 1.0, 1: 1.0, 7: 9.0}, {1: 2.0, 0: 2.0})
        {'change': -0.5, 'low': -0.5, 'high': -0.5, 'n_paired': 2}
    """
    settings = bootstrap_settings(resamples, seed, confidence, method)
    keys = sorted(set(guided) & set(baseline))
    if not keys:
        return {"change": None, "low": None, "high": None, "n_paired": 0}
    g = _sample([guided[k] for k in keys], "guided")
    b = _sample([baseline[k] for k in keys], "baseline")
    with np.errstate(divide="ignore", invalid="ignore"):
        change = float(relative_median_change(g, b))
    low, high = _bootstrap((g, b), relative_median_change, True, settings)
    return {"change": change if np.isfinite(change) else None, "low": low, "high": high, "n_paired": len(keys)}


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

    Needs ``torch-fidelity`` (the ``audit`` extra) and the FID InceptionV3 weights
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
            "FID on InceptionV3 features needs torch-fidelity: `pip install \"kldb-boundary[audit]\"` (or "
            "`pip install torch-fidelity`), or use the classifier's features (`feature='classifier'`)."
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
