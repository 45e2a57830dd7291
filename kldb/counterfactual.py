"""The nearest boundary image: from a user's photo, the least-moved edit whose KLDB is below a threshold.

:func:`counterfactual` runs :class:`~pipeline_kldb_boundary.KLDBBoundaryPipeline` from one image over a grid of
``strength`` (how much of the schedule runs from the photo) and ``alpha`` (the KLDB guidance strength), one call per
cell with the same seed, and returns every candidate with its KLDB and its distance to the photo, and the chosen one:
among the candidates whose KLDB is below ``threshold``, the one at the least distance (ties: the smaller strength, then
the smaller alpha). That image is the *nearest boundary image*; when no candidate gets below the threshold there is
none, and the result says so.

Distances come from the pipeline's output, computed on the returned image against the preprocessed input in ``[0, 1]``:
``"pixel_l2"`` (Euclidean distance over all pixel values, :func:`pipeline_kldb_boundary.pixel_l2`) or ``"ssim"``
(``1 - SSIM``, torchmetrics' implementation; needs the ``audit`` extra), or ``"feature"``: the Euclidean distance
between the features of the edited image and of the input in a feature network the caller gives (``feature_net``: a
callable mapping ``[B, 3, H, W]`` in ``[0, 1]`` to ``[B, d]``), such as the digits world's independent feature space
(:func:`kldb.digits.feature_net.load_feature_net`), which the guidance does not optimise.

``kldb edit IMAGE --classes ... --out DIR`` is the command-line form (:func:`write_counterfactual`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from kldb.errors import KLDBInputError, KLDBInputTypeError, MissingExtraError
from kldb.io import atomic_write_json, save_png
from kldb.presets import PAPER_METHOD

#: The strengths of the grid by default (issue 15's measurement grid) and the paper's alpha.
DEFAULT_STRENGTHS: tuple[float, ...] = (0.3, 0.5, 0.7)
DEFAULT_ALPHAS: tuple[float, ...] = (float(PAPER_METHOD["alpha"]),)
#: KLDB (nats) below which an image counts as on the boundary by default: for a pair, 0.1 nats is a split of about
#: 72 / 28 between the two classes (KLDB = -log 2 - (log p_1 + log p_2) / 2 with p_1 + p_2 = 1).
DEFAULT_THRESHOLD = 0.1
DISTANCES = ("pixel_l2", "ssim", "feature")
#: Arguments :func:`counterfactual` sets itself on every call of the grid.
_GRID_ARGUMENTS = (
    "image", "strength", "classes", "kldb_guidance_scale", "generator", "output_type", "return_dict",
    "num_images_per_prompt", "latents",
)  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    """One cell of the grid: the setting, the edited image's scores and its distance to the photo.

    ``distance`` is the one the choice uses (``pixel_l2``, ``1 - ssim`` or ``feature_distance``); ``ssim`` is ``None``
    without torchmetrics, ``feature_distance`` without a feature network.
    """

    strength: float
    alpha: float
    kldb: float
    kldb_start: float
    pixel_l2: float
    ssim: float | None
    distance: float
    predicted_class: int
    predicted_class_start: int
    probabilities: list[float]
    probabilities_start: list[float]
    feature_distance: float | None = None


@dataclass
class CounterfactualResult:
    """What :func:`counterfactual` found for one photo.

    Args:
        candidates: every cell of the grid, strengths outer, alphas inner.
        images: ``[K, 3, H, W]`` in ``[0, 1]``, the edited image of each candidate.
        input_image: ``[3, H, W]`` in ``[0, 1]``, the photo as the pipeline saw it (preprocessed).
        nearest: index into ``candidates`` of the nearest boundary image, or ``None`` when no candidate's KLDB is
            below ``threshold``.
        threshold, distance, classes, seed: the arguments of the search.
    """

    candidates: list[Candidate]
    images: torch.Tensor
    input_image: torch.Tensor
    nearest: int | None
    threshold: float
    distance: str
    classes: list[int]
    seed: int

    @property
    def found(self) -> bool:
        """Whether some candidate got below the threshold."""
        return self.nearest is not None

    @property
    def nearest_candidate(self) -> Candidate | None:
        return self.candidates[self.nearest] if self.nearest is not None else None

    @property
    def nearest_image(self) -> torch.Tensor | None:
        """``[3, H, W]`` in ``[0, 1]``: the nearest boundary image, or ``None``."""
        return self.images[self.nearest] if self.nearest is not None else None

    def as_dict(self) -> dict[str, Any]:
        """The search as plain data (for JSON): the arguments, the candidates and the chosen index."""
        return {
            "classes": self.classes,
            "seed": self.seed,
            "threshold": self.threshold,
            "distance": self.distance,
            "nearest": self.nearest,
            "candidates": [asdict(c) for c in self.candidates],
        }


def nearest_boundary(candidates: Sequence[Candidate], threshold: float) -> int | None:
    """Index of the candidate at the least ``distance`` among those whose KLDB is below ``threshold``; ``None`` if none.

    Ties go to the smaller strength, then the smaller alpha (the gentler edit). Candidates with a non-finite KLDB or
    distance are never chosen.

    Example:
        >>> make = lambda s, k, d: Candidate(s, 0.1, k, 1.0, d, None, d, 0, 0, [], [])
        >>> nearest_boundary([make(0.3, 0.5, 1.0), make(0.5, 0.05, 4.0), make(0.7, 0.01, 6.0)], threshold=0.1)
        1
        >>> nearest_boundary([make(0.3, 0.5, 1.0)], threshold=0.1) is None
        True
    """
    eligible = [
        i
        for i, c in enumerate(candidates)
        if math.isfinite(c.kldb) and math.isfinite(c.distance) and c.kldb < threshold
    ]
    if not eligible:
        return None
    return min(eligible, key=lambda i: (candidates[i].distance, candidates[i].strength, candidates[i].alpha))


def _check_grid(strengths: Any, alphas: Any, threshold: Any, distance: Any, seed: Any) -> tuple[list[float], ...]:
    def numbers(name: str, values: Any, ok: Any, what: str) -> list[float]:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise KLDBInputError(
                f"Expected argument `{name}` to be a non-empty sequence of {what} but got {values!r}."
            )
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v) for v in values):
            raise KLDBInputError(
                f"Expected argument `{name}` to be a non-empty sequence of {what} but got {values!r}."
            )
        if len(set(values)) != len(values):
            raise KLDBInputError(f"Expected argument `{name}` to hold distinct values but got {list(values)!r}.")
        return [float(v) for v in values]

    strengths = numbers("strengths", strengths, lambda v: 0 < v <= 1, "numbers in (0, 1]")
    alphas = numbers("alphas", alphas, lambda v: math.isfinite(v) and v >= 0, "finite numbers >= 0")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
        raise KLDBInputError(
            f"Expected argument `threshold` to be a positive finite KLDB (nats) but got {threshold!r}."
        )
    if distance not in DISTANCES:
        raise KLDBInputError(f"Expected argument `distance` to be one of {DISTANCES} but got {distance!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise KLDBInputError(f"Expected argument `seed` to be a non-negative int but got {seed!r}.")
    return strengths, alphas


def counterfactual(
    pipe: Any,
    image: Any,
    classes: Sequence[int] | Sequence[str],
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    threshold: float = DEFAULT_THRESHOLD,
    distance: str = "pixel_l2",
    seed: int = 0,
    feature_net: Any = None,
    **call_kwargs: Any,
) -> CounterfactualResult:
    """Search a ``strength`` x ``alpha`` grid from one photo for its nearest boundary image.

    Each cell is one call ``pipe(image=image, strength=s, classes=classes, kldb_guidance_scale=a, generator=seed,
    output_type="pt", **call_kwargs)``: the same seed everywhere, so cells differ only by the setting. See the
    module docstring for the choice rule (:func:`nearest_boundary`).

    Args:
        pipe: a :class:`~pipeline_kldb_boundary.KLDBBoundaryPipeline` with a classifier (its own, or
            ``classifier=`` in ``call_kwargs``).
        image: one photo, in any form the pipeline's ``image`` takes (PIL, ``(H, W, 3)`` array, ``(3, H, W)`` tensor,
            or a batch of one).
        classes: the class subset C, as indices or label names.
        strengths: the grid's strengths, in ``(0, 1]``.
        alphas: the grid's KLDB guidance strengths (0: the edit without guidance).
        threshold: KLDB (nats) below which an image is on the boundary.
        distance: ``"pixel_l2"``, ``"ssim"`` (``1 - SSIM``; needs torchmetrics) or ``"feature"`` (needs
            ``feature_net``).
        seed: the generator seed of every call.
        feature_net: optional callable mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to features ``[B, d]``; with
            it each candidate also records its Euclidean distance to the input in that space.
        call_kwargs: further pipeline arguments (``prompt``, ``num_inference_steps``, ``guidance_scale``,
            ``kldb_guidance_interval``, ...); not those the grid sets.

    Returns:
        A :class:`CounterfactualResult`.
    """
    strengths, alphas = _check_grid(strengths, alphas, threshold, distance, seed)
    fixed = sorted(set(call_kwargs) & set(_GRID_ARGUMENTS))
    if fixed:
        raise KLDBInputError(
            f"Expected no argument the grid sets itself ({', '.join(_GRID_ARGUMENTS)}) but got {fixed}."
        )
    if distance == "feature" and feature_net is None:
        raise KLDBInputError(
            "Expected argument `feature_net` (a callable images -> features) with distance='feature'."
        )
    if feature_net is not None and not callable(feature_net):
        raise KLDBInputTypeError(
            f"Expected argument `feature_net` to be callable but got {type(feature_net).__name__}."
        )
    if distance == "ssim":
        import importlib.util

        if importlib.util.find_spec("torchmetrics") is None:
            raise MissingExtraError(
                "`distance='ssim'` needs torchmetrics, which a plain install of kldb-boundary leaves out; install it "
                'with: pip install "kldb-boundary[audit]"'
            )
    pixels = pipe.check_image_inputs(image, 1.0, None, None, None, 1)
    if pixels.shape[0] != 1:
        raise KLDBInputTypeError(f"Expected argument `image` to be one image but it holds {pixels.shape[0]}.")
    candidates: list[Candidate] = []
    images: list[torch.Tensor] = []
    input_image = pipe.image_processor.denormalize(pixels)[0].cpu()
    input_features = _features(feature_net, input_image[None]) if feature_net is not None else None
    class_indices: list[int] = []
    for strength in strengths:
        for alpha in alphas:
            out = pipe(
                image=image, strength=strength, classes=classes, kldb_guidance_scale=alpha,
                generator=torch.Generator(device=pipe.device).manual_seed(seed), output_type="pt", **call_kwargs,
            )  # fmt: skip
            if out.kldb is None:
                raise KLDBInputError(
                    "Expected the pipeline to have a classifier (its own or `classifier=`) but it has none."
                )
            class_indices = out.classes
            ssim = float(out.ssim[0]) if out.ssim is not None else None
            if distance == "ssim" and ssim is None:
                raise MissingExtraError('`distance="ssim"` needs torchmetrics: pip install "kldb-boundary[audit]"')
            l2 = float(out.pixel_l2[0])
            feature_distance = None
            if feature_net is not None:
                feature_distance = float((_features(feature_net, out.images[:1]) - input_features).norm())
            candidates.append(
                Candidate(
                    strength=strength,
                    alpha=alpha,
                    kldb=float(out.kldb[0]),
                    kldb_start=float(out.kldb_start[0]),
                    pixel_l2=l2,
                    ssim=ssim,
                    distance={
                        "pixel_l2": l2,
                        "ssim": 1.0 - ssim if ssim is not None else None,
                        "feature": feature_distance,
                    }[distance],
                    predicted_class=int(out.predicted_class[0]),
                    predicted_class_start=int(out.predicted_class_start[0]),
                    probabilities=[float(p) for p in out.probabilities[0]],
                    probabilities_start=[float(p) for p in out.probabilities_start[0]],
                    feature_distance=feature_distance,
                )
            )
            images.append(out.images[0].float().cpu())
    return CounterfactualResult(
        candidates=candidates,
        images=torch.stack(images),
        input_image=input_image,
        nearest=nearest_boundary(candidates, threshold),
        threshold=float(threshold),
        distance=distance,
        classes=list(class_indices),
        seed=seed,
    )


@torch.no_grad()
def _features(feature_net: Any, images: torch.Tensor) -> torch.Tensor:
    """``[B, d]`` float64 features of ``[B, 3, H, W]`` images in ``[0, 1]``, on the CPU."""
    parameter = next(feature_net.parameters(), None) if isinstance(feature_net, torch.nn.Module) else None
    features = feature_net(images.float().to(parameter.device if parameter is not None else images.device))
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise KLDBInputError(
            f"Expected argument `feature_net` to return features of shape [{images.shape[0]}, d] but it returned {got}."
        )
    return features.double().cpu()


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """``[3, H, W]`` in ``[0, 1]`` as an 8-bit RGB PIL image (rounded, as diffusers' ``numpy_to_pil``)."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array)


def write_counterfactual(result: CounterfactualResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write a search's files into ``out_dir``, each atomically.

    ``input.png`` (the photo as the pipeline saw it), ``candidate_<k>_s<strength>_a<alpha>.png`` for every cell,
    ``nearest.png`` (only when one was found; a stale one from an earlier search is removed) and
    ``counterfactual.json`` (the search, the candidates and file names), written last.

    Returns:
        The written paths by name (``"input"``, ``"nearest"``, ``"record"``, ``"candidate_<k>"``).
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"input": save_png(folder / "input.png", to_pil(result.input_image))}
    names = []
    for k, (candidate, image) in enumerate(zip(result.candidates, result.images)):
        name = f"candidate_{k}_s{candidate.strength:g}_a{candidate.alpha:g}.png"
        paths[f"candidate_{k}"] = save_png(folder / name, to_pil(image), {"kldb": candidate.kldb})
        names.append(name)
    nearest = folder / "nearest.png"
    if result.nearest_image is not None:
        paths["nearest"] = save_png(nearest, to_pil(result.nearest_image), asdict(result.nearest_candidate))
    else:
        nearest.unlink(missing_ok=True)
    record = result.as_dict() | {"files": {"input": "input.png", "candidates": names, "nearest": None}}
    if result.nearest is not None:
        record["files"]["nearest"] = "nearest.png"
    paths["record"] = atomic_write_json(folder / "counterfactual.json", record)
    return paths
