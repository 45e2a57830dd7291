"""Image quality of a generated set against real images of the audited classes, in three feature spaces side by side.

FID in the audited classifier's own penultimate space measures distance in the space the KLDB guidance moves through,
so it rises with the guidance whatever the images look like. This module reports, for each feature space:

- FID (Heusel et al. 2017), :func:`kldb.metrics.frechet_distance` (torchmetrics' ``FrechetInceptionDistance``);
- KID (Binkowski et al. 2018), the unbiased MMD with the cubic polynomial kernel, mean and standard deviation over
  random subsets, by torchmetrics' ``KernelInceptionDistance`` (:func:`kernel_inception_distance`);
- precision and recall of the generated set against the real one (Kynkäänniemi et al. 2019: k-NN balls around each
  set's points, k = 3) by torch-fidelity (:func:`precision_recall`);

in the spaces (:data:`SPACES`):

- ``"classifier"``: the audited classifier's penultimate features (:class:`kldb.metrics.ClassifierFeatures`);
- ``"independent"``: a network the guidance does not see, the analogue of the paper's InceptionV3: for the digits
  world, its denoising-autoencoder features (:mod:`kldb.digits.feature_net`); for SD-scale audits, InceptionV3's pool
  features through torchmetrics / torch-fidelity, only from a local weights file (:class:`InceptionFeatures`);
- ``"pixels"``: the images themselves, area-averaged to at most 16x16 per channel (:class:`PixelFeatures`), for
  small images only.

Statistics on features are pure (:func:`feature_quality`); :func:`quality_metrics` takes image tensors and
:func:`run_quality` a run folder (every setting against real images of its classes).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kldb.errors import KLDBInputError, KLDBInputTypeError, KLDBPathError
from kldb.metrics import ClassifierFeatures, frechet_distance

logger = logging.getLogger(__name__)

SPACES: tuple[str, ...] = ("classifier", "independent", "pixels")
#: The largest image side the pixel space (and the ``"auto"`` choice of the digits feature network) accepts.
MAX_PIXEL_SIDE = 64
#: The pixel space averages each channel down to at most this many pixels per side (768 features for RGB).
PIXEL_SIZE = 16
#: k of the k-NN balls of precision and recall (Kynkäänniemi et al. 2019 use 3).
NEIGHBOURHOOD = 3
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0
#: The file of the FID InceptionV3 weights, as torch-fidelity publishes it.
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics on features (pure)
# ----------------------------------------------------------------------------------------------------------------------


def _features(name: str, features: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if tensor.ndim != 2 or len(tensor) < 2 or not torch.isfinite(tensor).all():
        raise KLDBInputError(
            f"Expected argument `{name}` to be a finite [N >= 2, d] array but got shape {tuple(tensor.shape)}"
            f"{'' if torch.isfinite(tensor).all() else ' with non-finite values'}."
        )
    return tensor


def _check_pair(real_features: Any, fake_features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    real, fake = _features("real_features", real_features), _features("fake_features", fake_features)
    if real.shape[1] != fake.shape[1]:
        raise KLDBInputError(
            "Expected arguments `real_features` and `fake_features` to have the same width d but got "
            f"{tuple(real.shape)} and {tuple(fake.shape)}."
        )
    return real, fake


def kernel_inception_distance(
    real_features: torch.Tensor | np.ndarray,
    fake_features: torch.Tensor | np.ndarray,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> tuple[float, float]:
    r"""KID between two feature sets ``[N, d]``, ``[M, d]``: mean and standard deviation over random subsets.

    Each subset draws ``min(subset_size, N, M)`` rows of each set without replacement and computes the unbiased MMD
    with the kernel :math:`k(x, y) = (x^\top y / d + 1)^3` (torchmetrics' ``KernelInceptionDistance``); the draws come
    from ``seed`` and leave torch's global random state as it was.

    .. math:: \mathrm{MMD}^2_u = \frac{\sum_{i \ne j} k(x_i, x_j) + k(y_i, y_j)}{m (m - 1)} - \frac{2}{m^2}
        \sum_{i, j} k(x_i, y_j)

    Example:
        >>> import torch
        >>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> mean, std = kernel_inception_distance(x, x + 3.0, subsets=10, subset_size=20)
        >>> mean > 1.0, std > 0.0
        (True, True)
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _check_pair(real_features, fake_features)
    if not (isinstance(subsets, int) and subsets >= 1 and isinstance(subset_size, int) and subset_size >= 2):
        raise KLDBInputError(
            f"Expected arguments `subsets` >= 1 and `subset_size` >= 2 to be ints but got {subsets!r} and "
            f"{subset_size!r}."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metric = KernelInceptionDistance(
            feature=torch.nn.Identity(), subsets=subsets, subset_size=min(subset_size, len(real), len(fake))
        )
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(
    real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray, k: int = NEIGHBOURHOOD
) -> tuple[float, float]:
    r"""Improved precision and recall (Kynkäänniemi et al. 2019) of generated features against real ones.

    Each point gets a ball whose radius is the distance to its k-th nearest neighbour in its own set. Precision is the
    share of generated points inside at least one real ball; recall the share of real points inside at least one
    generated ball. Computed by torch-fidelity (``metric_prc.prc_features_to_metric``).

    .. math:: \mathrm{precision} = \frac{1}{M} \sum_{j} \mathbb{1}\left[\exists i:
        \lVert \phi_g^{(j)} - \phi_r^{(i)} \rVert \le \lVert \phi_r^{(i)} - \mathrm{NN}_k(\phi_r^{(i)}) \rVert\right]

    Example:
        >>> import torch
        >>> x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
        >>> precision_recall(x, x), precision_recall(x, x + 100.0)
        ((1.0, 1.0), (0.0, 0.0))
    """
    real, fake = _check_pair(real_features, fake_features)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k >= min(len(real), len(fake)):
        raise KLDBInputError(
            f"Expected argument `k` to be an int in [1, {min(len(real), len(fake)) - 1}] (fewer than the points in "
            f"each set) but got {k!r}."
        )
    try:
        from torch_fidelity.metric_prc import prc_features_to_metric
    except ImportError as error:
        raise ImportError(
            "Precision and recall need torch-fidelity: `pip install 'kldb-boundary[audit]'` or "
            "`pip install torch-fidelity`."
        ) from error
    # torch-fidelity's convention: the first set is the generated one, the second the real one
    result = prc_features_to_metric(fake, real, prc_neighborhood=k, verbose=False)
    # torch-fidelity averages in float32: give the exact shares (counts over set sizes)
    return round(result["precision"] * len(fake)) / len(fake), round(result["recall"] * len(real)) / len(real)


def feature_quality(
    real_features: torch.Tensor | np.ndarray,
    fake_features: torch.Tensor | np.ndarray,
    k: int = NEIGHBOURHOOD,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> dict[str, float | int]:
    """FID, KID, precision and recall of generated features against real ones, in one feature space.

    Returns:
        ``fid``, ``kid_mean``, ``kid_std``, ``kid_subset_size`` (the subset size used: at most the smaller set),
        ``precision``, ``recall``, ``num_features`` (d).
    """
    real, fake = _check_pair(real_features, fake_features)
    kid_mean, kid_std = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, fake, k)
    return {
        "fid": frechet_distance(real, fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": min(kid_subset_size, len(real), len(fake)),
        "precision": precision,
        "recall": recall,
        "num_features": int(real.shape[1]),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Feature spaces: modules from images [B, 3, H, W] in [0, 1] to features [B, d]
# ----------------------------------------------------------------------------------------------------------------------


class PixelFeatures(torch.nn.Module):
    """The pixels of small images as features: each channel area-averaged to at most ``size`` x ``size``, flattened.

    Images with a side above ``max_side`` are refused: pixel statistics of large images say little, and FID's
    ``d x d`` covariances would be huge.
    """

    def __init__(self, size: int = PIXEL_SIZE, max_side: int = MAX_PIXEL_SIDE):
        super().__init__()
        self.size = size
        self.max_side = max_side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if max(height, width) > self.max_side:
            raise KLDBInputError(
                f"Expected images of at most {self.max_side}x{self.max_side} pixels for the 'pixels' space but got "
                f"{height}x{width}; leave 'pixels' out of `spaces` for larger images."
            )
        pooled = F.adaptive_avg_pool2d(images.float(), (min(self.size, height), min(self.size, width)))
        return pooled.flatten(1).double()  # (B, C * h * w)


class InceptionFeatures(torch.nn.Module):
    """InceptionV3's 2048-d pool features (the FID network) through torchmetrics / torch-fidelity, from a local file.

    The file is first read with ``torch.load(weights_only=True)``, so a file holding anything but tensors is refused
    before torch-fidelity loads it. Nothing is downloaded. Images ``[B, 3, H, W]`` in ``[0, 1]``.
    """

    def __init__(self, weights_path: str | os.PathLike[str] | None):
        super().__init__()
        check_inception_weights(weights_path)
        try:
            import torch_fidelity  # noqa: F401
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as error:
            raise ImportError(
                "The InceptionV3 feature space needs torch-fidelity: `pip install 'kldb-boundary[audit]'` or "
                "`pip install torch-fidelity`."
            ) from error
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        )
        self.num_features = 2048

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0.0, 1.0) * 255).to(torch.uint8)).double()  # (B, 2048)


def check_inception_weights(weights_path: str | os.PathLike[str] | None) -> Path:
    """The path of a local file of FID InceptionV3 weights, checked to hold only tensors; a clear error otherwise."""
    how = (
        f"kldb never downloads them: fetch {INCEPTION_WEIGHTS_URL} on a machine with network access and pass its "
        "path as `inception_weights` (CLI: --inception-weights PATH), or pass `independent=` a feature module of your "
        "own."
    )
    if weights_path is None:
        raise KLDBInputError(
            "Expected argument `inception_weights` to be a local file with the FID InceptionV3 weights "
            f"({INCEPTION_WEIGHTS_NAME}) for the independent feature space but got None; {how}"
        )
    path = Path(weights_path)
    if not path.is_file():
        raise KLDBPathError(
            "Expected argument `inception_weights` to be a local file with the FID InceptionV3 weights "
            f"({INCEPTION_WEIGHTS_NAME}) but got {str(weights_path)!r} (no such file); {how}"
        )
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise KLDBInputError(
            f"Expected argument `inception_weights` to be a file of tensors (a state dict) but {str(path)!r} is not "
            f"one: {error}"
        ) from error
    return path


def independent_features(
    independent: str | torch.nn.Module = "auto",
    image_size: tuple[int, int] | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
) -> torch.nn.Module:
    """The module of the ``"independent"`` space.

    Args:
        independent: ``"feature_net"`` (the digits world's denoising-autoencoder features,
            :func:`kldb.digits.feature_net.load_feature_net`), ``"inception"`` (:class:`InceptionFeatures`, needs
            ``inception_weights``), a module of your own, or ``"auto"``: InceptionV3 when ``inception_weights`` is
            given or the images are larger than :data:`MAX_PIXEL_SIDE`, else the digits feature network.
        image_size: ``(H, W)`` of the images, for ``"auto"``.
        inception_weights: a local file with the FID InceptionV3 weights.
    """
    if isinstance(independent, torch.nn.Module):
        return independent
    if independent == "auto":
        small = image_size is not None and max(image_size) <= MAX_PIXEL_SIDE
        independent = "inception" if inception_weights is not None or not small else "feature_net"
    if independent == "feature_net":
        from kldb.digits.feature_net import load_feature_net

        return load_feature_net()
    if independent == "inception":
        return InceptionFeatures(inception_weights)
    raise KLDBInputError(
        "Expected argument `independent` to be 'auto', 'feature_net', 'inception' or a torch.nn.Module but got "
        f"{independent!r}."
    )


def feature_spaces(
    spaces: Sequence[str] = SPACES,
    image_size: tuple[int, int] = (32, 32),
    classifier: Any = None,
    independent: str | torch.nn.Module = "auto",
    inception_weights: str | os.PathLike[str] | None = None,
) -> dict[str, torch.nn.Module]:
    """The feature modules of the named spaces, in the order given.

    Args:
        spaces: names from :data:`SPACES`.
        image_size: ``(H, W)`` of the images.
        classifier: the audited classifier (anything :func:`~pipeline_kldb_boundary.as_image_classifier` accepts), for
            ``"classifier"``.
        independent: see :func:`independent_features`.
        inception_weights: see :func:`independent_features`.
    """
    if isinstance(spaces, str) or not spaces or len(set(spaces)) != len(spaces) or set(spaces) - set(SPACES):
        raise KLDBInputError(
            f"Expected argument `spaces` to be a non-empty sequence of distinct names from {list(SPACES)} but got "
            f"{spaces!r}."
        )
    if "pixels" in spaces and max(image_size) > MAX_PIXEL_SIDE:
        raise KLDBInputError(
            f"Expected images of at most {MAX_PIXEL_SIDE}x{MAX_PIXEL_SIDE} pixels for the 'pixels' space but got "
            f"{image_size[0]}x{image_size[1]}; leave 'pixels' out of `spaces` for larger images."
        )
    if "classifier" in spaces and classifier is None:
        raise KLDBInputError(
            "Expected argument `classifier` (the audited classifier) with 'classifier' in `spaces` but got None."
        )
    modules: dict[str, torch.nn.Module] = {}
    for name in spaces:
        if name == "classifier":
            modules[name] = ClassifierFeatures(classifier, tuple(image_size))
        elif name == "independent":
            modules[name] = independent_features(independent, tuple(image_size), inception_weights)
        else:
            modules[name] = PixelFeatures()
    return modules


@torch.no_grad()
def extract_features(module: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Features ``[N, d]`` (float64, CPU) of images ``[N, 3, H, W]`` in ``[0, 1]``, in batches."""
    parts = [module(images[start : start + batch_size].float()) for start in range(0, len(images), batch_size)]
    return torch.cat([part.detach().double().cpu().flatten(1) for part in parts])


def _check_images(name: str, images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or len(images) < 2:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KLDBInputError(f"Expected argument `{name}` to be a [N >= 2, 3, H, W] tensor in [0, 1] but got {got}.")
    return images


def quality_metrics(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    spaces: Sequence[str] | Mapping[str, torch.nn.Module] = SPACES,
    classifier: Any = None,
    independent: str | torch.nn.Module = "auto",
    inception_weights: str | os.PathLike[str] | None = None,
    k: int = NEIGHBOURHOOD,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
    batch_size: int = 64,
) -> dict[str, Any]:
    """FID, KID, precision and recall of generated images against real ones, in each feature space.

    Args:
        real_images: real images of the audited classes, ``[N, 3, H, W]`` in ``[0, 1]``.
        fake_images: generated images, ``[M, 3, H, W]`` in ``[0, 1]``, of the same size.
        spaces: names from :data:`SPACES` (built by :func:`feature_spaces` from the next three arguments), or a
            mapping from names of your choice to feature modules (images to ``[B, d]``).
        classifier: the audited classifier, for ``"classifier"``.
        independent: the ``"independent"`` space's network (see :func:`independent_features`).
        inception_weights: a local file with the FID InceptionV3 weights.
        k: the neighbourhood of precision and recall.
        kid_subsets: KID's number of subsets.
        kid_subset_size: KID's subset size (at most the smaller set is used).
        seed: the seed of KID's subsets.
        batch_size: images per feature pass.

    Returns:
        ``{"spaces": {name: feature_quality(...)}, "n_real", "n_fake", "k", "kid_subsets", "kid_seed"}``; each space's
        entry has ``fid``, ``kid_mean``, ``kid_std``, ``kid_subset_size``, ``precision``, ``recall``,
        ``num_features``.
    """
    real_images, fake_images = _check_images("real_images", real_images), _check_images("fake_images", fake_images)
    if real_images.shape[-2:] != fake_images.shape[-2:]:
        raise KLDBInputError(
            "Expected arguments `real_images` and `fake_images` to have the same height and width but got "
            f"{tuple(real_images.shape[-2:])} and {tuple(fake_images.shape[-2:])}."
        )
    if isinstance(spaces, Mapping):
        if not spaces or not all(isinstance(module, torch.nn.Module) for module in spaces.values()):
            raise KLDBInputTypeError(
                f"Expected argument `spaces` as a mapping to map names to torch.nn.Module feature extractors but got "
                f"{ {name: type(module).__name__ for name, module in spaces.items()} }."
            )
        modules = dict(spaces)
    else:
        size = tuple(fake_images.shape[-2:])
        modules = feature_spaces(spaces, size, classifier, independent, inception_weights)
    result: dict[str, Any] = {"spaces": {}}
    for name, module in modules.items():
        real = extract_features(module, real_images, batch_size)
        fake = extract_features(module, fake_images, batch_size)
        result["spaces"][name] = feature_quality(real, fake, k, kid_subsets, kid_subset_size, seed)
    result.update(n_real=len(real_images), n_fake=len(fake_images), k=k, kid_subsets=kid_subsets, kid_seed=seed)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# A run folder: every setting against real images of its classes
# ----------------------------------------------------------------------------------------------------------------------


def run_quality(
    run: str | os.PathLike[str],
    reference: str | os.PathLike[str] = "digits",
    spaces: Sequence[str] = SPACES,
    classifier: Any = None,
    independent: str | torch.nn.Module = "auto",
    inception_weights: str | os.PathLike[str] | None = None,
    reference_limit: int | None = None,
    k: int = NEIGHBOURHOOD,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Quality of every setting of a run against real images of its class subset, in each feature space.

    Args:
        run: a sweep folder.
        reference: ``"digits"`` (the digits world's test split) or a folder of real images, as
            :func:`kldb.report.reference_images` reads it.
        spaces: names from :data:`SPACES`.
        classifier: the classifier for ``"classifier"``; ``None`` loads the run's own
            (:func:`kldb.runfolder.run_classifier`).
        independent: the ``"independent"`` network; ``"auto"`` is the digits feature network for
            ``reference="digits"`` and else as :func:`independent_features` decides.
        inception_weights: a local file with the FID InceptionV3 weights.
        reference_limit: at most this many real images per class subset.
        k: the neighbourhood of precision and recall.
        kid_subsets: KID's number of subsets.
        kid_subset_size: KID's subset size.
        seed: the seed of KID's subsets.
        batch_size: images per feature pass.

    Returns:
        ``{"run", "reference", "spaces", "k", "kid_subsets", "kid_seed", "settings": [row, ...]}``; each row has
        ``setting``, ``classes``, ``class_indices``, ``alpha``, ``beta``, ``n``, ``n_reference`` and ``quality``
        (``{space: feature_quality(...)}``, or ``None`` for a setting with fewer than ``k + 1`` images).
    """
    from kldb.io import load_image
    from kldb.report import reference_images
    from kldb.runfolder import iter_settings, load_run_images, read_run, run_classifier, run_labels

    records = read_run(run)
    labels = run_labels(run, records)
    size = tuple(load_image(Path(run) / records[0].file).shape[-2:])
    if independent == "auto" and str(reference) == "digits":
        independent = "feature_net"
    if "classifier" in spaces and classifier is None:
        classifier = run_classifier(run)
    modules = feature_spaces(spaces, size, classifier, independent, inception_weights)
    real_cache: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
    rows = []
    for setting, group in iter_settings(records).items():
        first = group[0]
        key = tuple(int(c) for c in first.class_indices)
        if key not in real_cache:
            real = reference_images(reference, key, labels, size, reference_limit)
            real_cache[key] = {name: extract_features(module, real, batch_size) for name, module in modules.items()}
        row: dict[str, Any] = {
            "setting": setting,
            "classes": list(first.classes),
            "class_indices": list(key),
            "alpha": float(first.alpha),
            "beta": float(first.beta),
            "n": len(group),
            "n_reference": len(next(iter(real_cache[key].values()))),
            "quality": None,
        }
        if len(group) <= k:
            logger.warning(
                "Setting %s has %d images, not more than k = %d: no quality figures.", setting, len(group), k
            )
        else:
            fake = load_run_images(run, group)
            row["quality"] = {
                name: feature_quality(
                    real_cache[key][name], extract_features(module, fake, batch_size), k, kid_subsets,
                    kid_subset_size, seed,
                )
                for name, module in modules.items()
            }  # fmt: skip
        rows.append(row)
    return {
        "run": str(run),
        "reference": str(reference),
        "spaces": list(modules),
        "k": k,
        "kid_subsets": kid_subsets,
        "kid_seed": seed,
        "settings": rows,
    }
