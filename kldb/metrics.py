"""Metrics of a finished sweep: the paper's KLDB and entropy statistics per setting, class agreement, FID.

Per setting (one class subset C, one alpha, one beta), over its images:

- median and interquartile range (75th minus 25th percentile, linear interpolation) of KLDB and of the entropy of the
  full softmax (nats), the paper's measures;
- ``top_set_share``: the share of images whose |C| most probable classes are exactly C (the classifier hesitates
  *between the audited classes*, not toward a third one);
- ``mean_class_margin``: the mean, over images, of the gap between the two most probable classes of C
  (``p_(1) - p_(2)`` among ``{p_i : i in C}``; 0 on the boundary; undefined for |C| = 1);
- FID against real images of the audited classes, computed by torchmetrics' ``FrechetInceptionDistance`` on
  features chosen by the user: the audited classifier's penultimate features (:class:`ClassifierFeatures`, offline,
  the default) or InceptionV3 (through torch-fidelity, only with its weights in a local file).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from kldb.sweep import CONFIG_NAME, iter_settings, read_manifest

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("classifier", "inception")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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
        raise ValueError(
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


def top_set_is_classes(record: dict[str, Any]) -> bool:
    """Whether the |C| most probable classes of an image are exactly C (a manifest record)."""
    classes = [int(c) for c in record["class_indices"]]
    top = [int(c) for c in record["top_classes"]]
    if len(top) < len(classes):
        raise ValueError(
            f"Expected the record's `top_classes` to hold at least |C| = {len(classes)} classes but got {top!r}."
        )
    return set(top[: len(classes)]) == set(classes)


def class_margin(record: dict[str, Any]) -> float | None:
    """``p_(1) - p_(2)``: the gap between the two most probable classes of C; ``None`` when |C| = 1."""
    probabilities = sorted((float(p) for p in record["class_probabilities"]), reverse=True)
    if len(probabilities) < 2:
        return None
    return probabilities[0] - probabilities[1]


def setting_metrics(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row of statistics per setting of a run, in the order the settings first appear in ``records``."""
    rows = []
    for setting, group in iter_settings(records).items():
        first = group[0]
        scored = [r for r in group if r["kldb"] is not None and r["entropy"] is not None]
        if not scored:
            raise ValueError(
                f"Expected setting {setting!r} to have at least one image with finite scores but it has none."
            )
        if len(scored) < len(group):
            logger.warning(
                "Setting %s: %d images without finite scores are left out.", setting, len(group) - len(scored)
            )
        kldb = summary_statistics([r["kldb"] for r in scored])
        entropy = summary_statistics([r["entropy"] for r in scored])
        margins = [m for m in (class_margin(r) for r in scored) if m is not None]
        predicted: dict[str, int] = {}
        for r in group:
            predicted[r["predicted_label"]] = predicted.get(r["predicted_label"], 0) + 1
        rows.append(
            {
                "setting": setting,
                "classes": list(first["classes"]),
                "class_indices": list(first["class_indices"]),
                "alpha": float(first["alpha"]),
                "beta": float(first["beta"]),
                "n": len(group),
                "n_scored": len(scored),
                "median_kldb": kldb["median"],
                "kldb_q25": kldb["q25"],
                "kldb_q75": kldb["q75"],
                "kldb_iqr": kldb["iqr"],
                "mean_kldb": kldb["mean"],
                "median_entropy": entropy["median"],
                "entropy_q25": entropy["q25"],
                "entropy_q75": entropy["q75"],
                "entropy_iqr": entropy["iqr"],
                "top_set_share": sum(top_set_is_classes(r) for r in scored) / len(scored),
                "mean_class_margin": float(np.mean(margins)) if margins else None,
                "predicted": dict(sorted(predicted.items(), key=lambda item: -item[1])),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# FID (torchmetrics), on the classifier's penultimate features or InceptionV3
# ----------------------------------------------------------------------------------------------------------------------


def _classification_head(model: torch.nn.Module) -> torch.nn.Module:
    """The last ``nn.Linear`` of ``model``: the head whose input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(
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
            raise TypeError(
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
        raise ValueError(
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
        raise FileNotFoundError(
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
        raise ValueError("Expected exactly one of the arguments `feature` and `inception_weights` but got "
                         f"{'both' if feature is not None else 'neither'}.")  # fmt: skip
    for name, images in (("real_images", real_images), ("fake_images", fake_images)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or len(images) < 2:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Expected argument `{name}` to be a [N >= 2, 3, H, W] tensor in [0, 1] but got {got}.")
    if feature is not None:
        metric = FrechetInceptionDistance(feature=feature, normalize=True)
    else:
        metric = inception_fid_metric(inception_weights)
    with torch.no_grad():
        for images, real in ((real_images, True), (fake_images, False)):
            for start in range(0, len(images), batch_size):
                metric.update(images[start : start + batch_size].float(), real=real)
    return float(metric.compute())


# ----------------------------------------------------------------------------------------------------------------------
# Images of a run and reference images
# ----------------------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as ``[3, H, W]`` in ``[0, 1]`` (RGB; resized bilinearly to ``size = (H, W)`` if given)."""
    with PIL.Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), PIL.Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


def load_run_images(run_dir: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> torch.Tensor:
    """The images of ``records`` as ``[N, 3, H, W]`` in ``[0, 1]``."""
    out = Path(run_dir)
    return torch.stack([load_image(out / r["file"]) for r in records])


def reference_images(
    reference: str | os.PathLike[str],
    class_indices: Sequence[int],
    labels: Sequence[str],
    size: tuple[int, int],
    limit: int | None = None,
) -> torch.Tensor:
    """Real images of the audited classes as ``[N, 3, H, W]`` in ``[0, 1]``, resized to ``size``.

    Args:
        reference: ``"digits"`` for the digits world's held-out test split, or a folder of images. A folder with one
            subfolder per label name uses the subfolders of the classes in ``class_indices``; else every image in it.
        class_indices: the audited classes C.
        labels: the classifier's label names.
        size: ``(H, W)`` of the generated images.
        limit: at most this many images (the first ones in sorted order), or all.
    """
    if str(reference) == "digits":
        from kldb.digits import load_digits_split

        images, targets = load_digits_split("test")
        keep = torch.isin(targets, torch.tensor(list(class_indices)))
        images = images[keep]
        if tuple(images.shape[-2:]) != tuple(size):
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images[:limit] if limit else images
    folder = Path(reference)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Expected argument `reference` to be 'digits' or a folder of images but got {str(reference)!r}."
        )
    names = [labels[i] for i in class_indices]
    subfolders = [folder / n for n in names if (folder / n).is_dir()]
    roots = subfolders if subfolders else [folder]
    files = sorted(p for root in roots for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        files = files[:limit]
    if len(files) < 2:
        raise ValueError(
            f"Expected argument `reference` to hold at least 2 images of {names} but found {len(files)} in "
            f"{str(folder)!r}."
        )
    return torch.stack([load_image(f, size) for f in files])


# ----------------------------------------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------------------------------------


def run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``sweep.json`` of a run folder."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected argument `run` to be a sweep folder with a {CONFIG_NAME} but got {str(run_dir)!r}."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def run_classifier(run_dir: str | os.PathLike[str]) -> Any:
    """The classifier a run was audited with (its classifier spec, else its pipeline's own classifier)."""
    from kldb.loading import load_classifier, load_pipeline, pipeline_classifier

    fixed = run_info(run_dir)["fixed"]
    if fixed.get("classifier"):
        return load_classifier(fixed["classifier"])
    return pipeline_classifier(load_pipeline(fixed["pipeline"], dtype="float32"))


def run_metrics(
    run: str | os.PathLike[str],
    reference: str | os.PathLike[str] | None = "digits",
    feature: str = "classifier",
    classifier: Any = None,
    inception_weights: str | os.PathLike[str] | None = None,
    reference_limit: int | None = None,
) -> dict[str, Any]:
    """Statistics of every setting of a run and, with a ``reference``, FID per setting.

    Args:
        run: a sweep folder.
        reference: ``"digits"``, a folder of real images (see :func:`reference_images`), or ``None`` for no FID.
        feature: ``"classifier"`` (penultimate features of the audited classifier) or ``"inception"``.
        classifier: the classifier for the features; ``None`` loads the run's own (see :func:`run_classifier`).
        inception_weights: local InceptionV3 weights file, for ``feature="inception"``.
        reference_limit: use at most this many reference images per class subset.

    Returns:
        ``{"settings": [row, ...], "fid_feature": ..., "reference": ...}``; each row as :func:`setting_metrics`, plus
        ``fid`` (``None`` without a reference).
    """
    if feature not in FEATURE_KINDS:
        raise ValueError(f"Expected argument `feature` to be one of {list(FEATURE_KINDS)} but got {feature!r}.")
    records = read_manifest(run)
    if not records:
        raise ValueError(f"Expected argument `run` to hold at least one manifest line but {str(run)!r} has none.")
    rows = setting_metrics(records)
    for row in rows:
        row["fid"] = None
    if reference is not None:
        if feature == "inception" and inception_weights is None:
            raise ValueError(
                "Expected argument `inception_weights` (a local file) with `feature='inception'` but got None."
            )
        labels = run_info(run).get("labels") or [str(i) for i in range(int(records[0]["num_classes"]))]
        groups = iter_settings(records)
        size = tuple(load_image(Path(run) / records[0]["file"]).shape[-2:])
        extractor = None
        if feature == "classifier":
            extractor = ClassifierFeatures(classifier if classifier is not None else run_classifier(run), size)
        from tqdm.auto import tqdm

        cached: dict[tuple[int, ...], torch.Tensor] = {}
        for row in tqdm(rows, desc="FID", unit="setting", leave=False):
            group = groups[row["setting"]]
            if len(group) < 2:
                logger.warning("Setting %s has fewer than 2 images: no FID.", row["setting"])
                continue
            key = tuple(row["class_indices"])
            if key not in cached:
                cached[key] = reference_images(reference, key, labels, size, reference_limit)
            fake = load_run_images(run, group)
            row["fid"] = fid(cached[key], fake, feature=extractor, inception_weights=inception_weights)
    return {
        "run": str(run),
        "fid_feature": feature if reference is not None else None,
        "reference": str(reference) if reference is not None else None,
        "settings": rows,
    }


def finite_or_none(value: float | None) -> float | None:
    """``value`` if it is a finite number, else ``None`` (JSON has no NaN)."""
    return value if value is not None and math.isfinite(value) else None
