"""A resumable, shardable sweep over class subsets x alpha x beta x seeds: every image on disk as soon as it is made.

A sweep is described by a :class:`SweepConfig` and writes a run folder (:mod:`kldb.runfolder`: the layout, the typed
manifest records, and the guarantees that every manifest line names a complete PNG). Beyond those:

- Rerunning the same command resumes: the manifests are read, done (setting, seed) keys are skipped, orphan
  temporary files are deleted. A line whose PNG is missing or has another size than recorded is dropped, and its
  image is made again. A run folder started with other image-fixing settings (:data:`FIXED_FIELDS`) is refused.
- The config is checked before anything is written: its own values first (:func:`check_config`), then, once the
  pipeline is loaded, everything that depends on it (:func:`check_against_pipeline`: class names, image size and
  the VAE factor, the scheduler, the guidance decoder), by the pipeline's own input checks.
- At the end of a run the main process writes ``metadata.jsonl`` (:func:`kldb.dataset.write_imagefolder_metadata`), so
  the run folder loads as a Hugging Face ``imagefolder`` dataset with every image's record.
- Under ``accelerate launch`` the pending work is split by :meth:`accelerate.PartialState.split_between_processes`;
  each process appends to its own ``manifest.rank<N>.jsonl``; after ``wait_for_everyone`` the main process merges
  every part into ``manifest.jsonl`` (atomically) and removes the parts. Each (setting, seed) is done exactly once.
- A full disk (``ENOSPC``) stops the run with :class:`~kldb.runfolder.SweepDiskFullError`; the manifest stays
  consistent and the run resumes once space is freed.
- ``"auto"`` among the alphas: before that setting's images are made, a short pilot chooses its alpha per class subset
  and beta (:meth:`~pipeline_kldb_boundary.KLDBBoundaryPipeline.choose_guidance_scale`: the lowest median KLDB over
  ``auto_seeds`` on the log grid ``auto_grid``). The pilot's seeds are moved off the sweep's seeds, so no returned
  image is one the pilot saw. Its record (the alpha chosen, the grid and its medians, the seeds, its seconds) is
  written to ``auto/<setting>.json`` before any image of the setting; a resumed run reuses it. Each image of the
  setting records ``alpha_mode: "auto"`` and the alpha chosen; :func:`auto_pilots` sets the pilots' cost against the
  images' (the sweep report shows it).
- Real images as the starting set (``init_images``, image-to-image): each image file of the folder (suffixes in
  :data:`IMAGE_SUFFIXES`, searched recursively, hidden files and folders left out, sorted by their relative POSIX path)
  is a *source*. The grid becomes ``class_subsets x betas x alphas x strengths x sources`` and every cell gets every
  seed: the pipeline's ``image=<source>, strength=<s>`` call, the seed fixing the VAE sample and the noise
  (:meth:`~pipeline_kldb_boundary.KLDBBoundaryPipeline.__call__`). A setting is (class subset, alpha, beta,
  strength): its name ends in ``_strength<s>`` and it pools its sources, whose images lie in one folder per source
  (:func:`kldb.runfolder.source_folder`). Each record adds ``source_file`` (relative to ``init_images``),
  ``source_sha256`` (of the file's bytes), ``strength``, the source's own ``kldb_start``,
  ``class_probabilities_start`` (for C), ``predicted_class_start`` / ``predicted_label_start``, and the result's
  ``pixel_l2`` and ``ssim`` to its source. ``sweep.json`` records every source's hash under ``"sources"``; a resumed
  run refuses a source whose bytes changed, naming the file, and a run folder is either text-to-image or
  image-to-image, never both. All sources must have one size, divisible by the VAE factor (the pipeline's own check);
  ``height`` / ``width``, when given, must be that size. The default strength is 0.5 (:data:`DEFAULT_STRENGTHS`), not
  diffusers' img2img 0.8: an audit asks how close *this* photo is to the boundary, and on the digits world (README,
  docs/usage.md) 0.5 gave the lowest median KLDB for 3 -> {3, 8} with the result still recognisably its photo
  (SSIM about 0.7), while 0.8 regenerates most of the image. ``alphas="auto"`` is not available with
  ``init_images`` (the pipeline's pilot samples from noise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from kldb.errors import KLDBInputError, KLDBInputTypeError
from kldb.io import atomic_write_json, finite_or_none, save_png
from kldb.loading import DTYPES
from kldb.presets import PRESETS
from kldb.runfolder import (
    AUTO,
    CONFIG_NAME,
    MANIFEST_NAME,
    ImageRecord,
    ManifestWriter,
    Setting,
    SweepDiskFullError,
    image_relpath,
    load_records,
    merge_manifests,
    read_jsonl,
    recover,
    stop_on_full_disk,
)
from pipeline_kldb_boundary import (
    AUTO_GRID,
    AUTO_SEEDS,
    GRADIENT_MODES,
    GUIDANCE_DECODERS,
    check_step_control,
    class_prompt,
    resolve_classes,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_DIR",
    "DEFAULT_STRENGTHS",
    "FIXED_FIELDS",
    "IMAGE_SUFFIXES",
    "SweepConfig",
    "SweepDiskFullError",
    "SweepResult",
    "auto_pilots",
    "build_settings",
    "check_against_pipeline",
    "check_config",
    "check_resume",
    "run_sweep",
    "source_hashes",
    "source_images",
]

TOP_K = 5  # classes recorded per image with their probabilities (at least |C|)
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
AUTO_DIR = "auto"  # the pilots' records of the "auto" settings, one JSON per setting
# fields of SweepConfig that change the images: a resumed run must use the same values
FIXED_FIELDS = (
    "pipeline",
    "classifier",
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "kldb_guidance_interval",
    "kldb_gradient",
    "kldb_guidance_decoder",
    "kldb_step_control",
    "kldb_max_halvings",
    "kldb_trust_radius",
    "kldb_step_temperature",
    "auto_grid",
    "auto_seeds",
    "guidance_vae",
    "guidance_rescale",
    "timestep_spacing",
    "use_karras_sigmas",
    "height",
    "width",
    "dtype",
)
_DIGITS = PRESETS["digits"]  # the library's defaults are the digits preset's
#: The strengths of an ``init_images`` run when none are given (see the module docstring for why 0.5).
DEFAULT_STRENGTHS = (0.5,)
#: The files of ``init_images`` that are sources (compared in lower case); other files are left out.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SOURCES_KEY = "sources"  # sweep.json: {source file: sha256} of an image-to-image run


@dataclass
class SweepConfig:
    """Everything a sweep needs; the grid is ``class_subsets x alphas x betas``, each with every seed.

    The defaults are those of the ``digits`` preset (:data:`kldb.presets.PRESETS`), with a small grid: alpha 0 and the
    preset's alpha, the preset's beta, 8 seeds.

    Args:
        out_dir: the run folder (created if needed; an existing run in it is resumed).
        pipeline: pipeline spec (see :func:`kldb.loading.load_pipeline`): ``"digits"``, a ``module:function``, a
            folder or a Hub id.
        classifier: classifier spec (see :func:`kldb.loading.load_classifier`), or ``None`` for the pipeline's own.
        class_subsets: the class subsets C to audit, each as label names or indices.
        alphas: KLDB guidance strengths; 0 is the prompt-only baseline; ``"auto"`` lets a pilot choose alpha per class
            subset and beta (see the module docstring).
        betas: classifier-free guidance scales.
        seeds: one image per seed and setting; image ``seed`` of every setting starts from the same noise.
        init_images: a folder of real images to start from instead of noise (image-to-image; see the module
            docstring): every image file in it is a source, and every setting runs from every source. ``None``:
            text-to-image.
        strengths: with ``init_images``, the strengths to run (the share of the k-LMS schedule run from the noised
            source, each in (0, 1]); ``None`` is :data:`DEFAULT_STRENGTHS`. Must be ``None`` without ``init_images``.
        prompt: the prompt of every image; ``None`` builds the paper's ``"<name> and <name>"`` per class subset.
        negative_prompt: the negative prompt, or ``None``.
        num_inference_steps: k-LMS steps T.
        kldb_guidance_interval: guidance every k steps.
        kldb_gradient: ``"unet"`` (through the noise prediction, as the authors) or ``"detached"``.
        kldb_guidance_decoder: ``"auto"`` (the pipeline's ``guidance_vae`` when it has one, else its VAE), ``"vae"``
            or ``"guidance_vae"``; each record names the decoder used.
        kldb_step_control: how each guided step is sized: ``"fixed"`` (the paper's step ``alpha``), ``"backtracking"``,
            ``"trust_region"`` or ``"kldb_scaled"`` (see the pipeline's ``__call__``); each record counts its accepted
            steps, halvings and rejected steps.
        kldb_max_halvings, kldb_trust_radius, kldb_step_temperature: the step controls' parameters.
        auto_grid: the alphas an ``"auto"`` setting's pilot tries.
        auto_seeds: the pilot's seeds (moved off ``seeds`` where they meet).
        guidance_vae: a small decoder to give the pipeline as its ``guidance_vae`` (see
            :func:`kldb.loading.load_guidance_vae`: e.g. ``"madebyollin/taesd"`` for Stable Diffusion v1); ``None``
            keeps the pipeline's own (the digits world ships one).
        guidance_rescale: Lin et al. (2024) rescale of the classifier-free guidance (the paper: 0.7).
        timestep_spacing: ``None`` keeps the scheduler's; else ``"leading"``, ``"linspace"`` or ``"trailing"``.
        use_karras_sigmas: Karras et al. (2022) noise levels for k-LMS.
        height, width: image size, multiples of the pipeline's VAE factor; ``None`` is the model's default.
        batch_size: images per pipeline call (same setting, consecutive seeds).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        device: ``None`` uses the device that ``accelerate`` assigns to this process.
    """

    out_dir: str | os.PathLike[str]
    pipeline: str = _DIGITS.pipeline
    classifier: str | None = _DIGITS.classifier
    class_subsets: list[list[str | int]] = field(default_factory=lambda: [list(_DIGITS.classes)])
    alphas: list[float | str] = field(default_factory=lambda: [0.0, _DIGITS.alpha])
    betas: list[float] = field(default_factory=lambda: [_DIGITS.beta])
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    init_images: str | os.PathLike[str] | None = None
    strengths: list[float] | None = None
    prompt: str | None = None
    negative_prompt: str | None = _DIGITS.negative_prompt
    num_inference_steps: int = _DIGITS.num_inference_steps
    kldb_guidance_interval: int = _DIGITS.kldb_guidance_interval
    kldb_gradient: str = _DIGITS.kldb_gradient
    kldb_guidance_decoder: str = _DIGITS.kldb_guidance_decoder
    kldb_step_control: str = _DIGITS.kldb_step_control
    kldb_max_halvings: int = 3
    kldb_trust_radius: float = 0.1
    kldb_step_temperature: float = 0.5
    auto_grid: list[float] = field(default_factory=lambda: list(AUTO_GRID))
    auto_seeds: list[int] = field(default_factory=lambda: list(AUTO_SEEDS))
    guidance_vae: str | None = None
    guidance_rescale: float = _DIGITS.guidance_rescale
    timestep_spacing: str | None = _DIGITS.timestep_spacing
    use_karras_sigmas: bool = _DIGITS.use_karras_sigmas
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    dtype: str = _DIGITS.dtype
    device: str | None = None

    def fixed(self) -> dict[str, Any]:
        """The fields that determine the images, as stored in ``sweep.json``."""
        return {name: _jsonable(getattr(self, name)) for name in FIXED_FIELDS}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expect(condition: bool, name: str, expected: str, got: Any) -> None:
    if not condition:
        raise KLDBInputError(f"Expected argument `{name}` to be {expected} but got {got!r}.")


def check_config(config: SweepConfig) -> None:
    """Check the values of ``config`` that need no pipeline; raise :class:`~kldb.errors.KLDBInputError` (a
    ``ValueError``) naming the first bad argument and its value.

    What depends on the pipeline (class names, the image size against its VAE factor, its scheduler, its guidance
    decoder) is checked by :func:`check_against_pipeline` once it is loaded.
    """
    if not isinstance(config.out_dir, (str, os.PathLike)):
        raise KLDBInputTypeError(f"Expected argument `out_dir` to be a path but got {type(config.out_dir).__name__}.")
    out = Path(config.out_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)  # the nearest part that exists
    if blocking is not None and not blocking.is_dir():
        where = "is a file" if blocking == out else f"lies inside the file {str(blocking)!r}"
        raise KLDBInputError(
            f"Expected argument `out_dir` to be a folder (new, or a run to resume) but {str(config.out_dir)!r} {where}."
        )
    for name in ("alphas", "betas"):
        values = getattr(config, name)
        auto = name == "alphas"  # alphas may hold "auto"
        _expect(
            isinstance(values, Sequence)
            and not isinstance(values, str)
            and len(values) > 0
            and all((auto and v == AUTO) or (_is_number(v) and math.isfinite(v) and v >= 0) for v in values)
            and len(set(values)) == len(values),
            name,
            "a non-empty list of distinct finite numbers >= 0" + (' (or "auto")' if auto else ""),
            values,
        )
    _expect(
        isinstance(config.auto_grid, Sequence)
        and len(config.auto_grid) > 0
        and all(_is_number(a) and 0 < a < math.inf for a in config.auto_grid)
        and len(set(config.auto_grid)) == len(config.auto_grid),
        "auto_grid",
        "a non-empty list of distinct positive finite alphas",
        config.auto_grid,
    )
    _expect(
        isinstance(config.auto_seeds, Sequence)
        and len(config.auto_seeds) > 0
        and all(_is_int(s) and 0 <= s < 2**62 for s in config.auto_seeds)
        and len(set(config.auto_seeds)) == len(config.auto_seeds),
        "auto_seeds",
        "a non-empty list of distinct integers in [0, 2**62)",
        config.auto_seeds,
    )
    try:
        check_step_control(
            config.kldb_step_control, config.kldb_max_halvings, config.kldb_trust_radius, config.kldb_step_temperature
        )
    except ValueError as error:
        raise KLDBInputError(str(error)) from None
    seeds = config.seeds
    _expect(
        isinstance(seeds, Sequence)
        and len(seeds) > 0
        and all(_is_int(s) and 0 <= s < 2**63 for s in seeds)
        and len(set(seeds)) == len(seeds),
        "seeds",
        "a non-empty list of distinct integers in [0, 2**63)",
        seeds,
    )
    subsets = config.class_subsets
    _expect(
        isinstance(subsets, Sequence)
        and not isinstance(subsets, str)
        and len(subsets) > 0
        and all(
            isinstance(s, Sequence)
            and not isinstance(s, str)
            and len(s) > 0
            and all(isinstance(c, (str, int)) for c in s)
            for s in subsets
        ),
        "class_subsets",
        "a non-empty list of non-empty lists of class names or indices",
        subsets,
    )
    for name in ("num_inference_steps", "kldb_guidance_interval", "batch_size"):
        value = getattr(config, name)
        _expect(_is_int(value) and value >= 1, name, "a positive integer", value)
    _expect(
        config.kldb_guidance_interval <= config.num_inference_steps or all(a == 0 for a in config.alphas),
        "kldb_guidance_interval",
        f"at most num_inference_steps={config.num_inference_steps}",
        config.kldb_guidance_interval,
    )
    _expect(
        config.kldb_gradient in GRADIENT_MODES, "kldb_gradient", f"one of {list(GRADIENT_MODES)}", config.kldb_gradient
    )
    _expect(
        config.guidance_vae is None or (isinstance(config.guidance_vae, str) and config.guidance_vae.strip() != ""),
        "guidance_vae",
        "None or a non-empty string (an AutoencoderTiny folder or Hub id, or package.module:function)",
        config.guidance_vae,
    )
    _expect(
        config.kldb_guidance_decoder in GUIDANCE_DECODERS,
        "kldb_guidance_decoder",
        f"one of {list(GUIDANCE_DECODERS)}",
        config.kldb_guidance_decoder,
    )
    _expect(
        _is_number(config.guidance_rescale) and 0 <= config.guidance_rescale <= 1,
        "guidance_rescale",
        "a number in [0, 1]",
        config.guidance_rescale,
    )
    _expect(
        config.timestep_spacing is None or config.timestep_spacing in TIMESTEP_SPACINGS,
        "timestep_spacing",
        f"None or one of {list(TIMESTEP_SPACINGS)}",
        config.timestep_spacing,
    )
    for name in ("height", "width"):  # multiples of the pipeline's VAE factor: check_against_pipeline
        value = getattr(config, name)
        _expect(value is None or (_is_int(value) and value > 0), name, "None or a positive integer", value)
    for name in ("prompt", "negative_prompt", "classifier"):
        value = getattr(config, name)
        _expect(value is None or (isinstance(value, str) and value != ""), name, "None or a non-empty string", value)
    _expect(
        isinstance(config.pipeline, str) and config.pipeline != "", "pipeline", "a non-empty string", config.pipeline
    )
    _expect(config.dtype in DTYPES, "dtype", f"one of {list(DTYPES)}", config.dtype)
    _check_init_images(config)


def _check_init_images(config: SweepConfig) -> None:
    """The image-to-image fields: ``init_images`` a folder with at least one image file, ``strengths`` distinct numbers
    in (0, 1] that leave the steps a (guided) call needs, no ``"auto"`` alpha; ``strengths`` only with a folder."""
    if config.init_images is None:
        _expect(config.strengths is None, "strengths", "None without `init_images` (a text-to-image run)",
                config.strengths)  # fmt: skip
        return
    folder = config.init_images
    _expect(isinstance(folder, (str, os.PathLike)) and Path(folder).is_dir(), "init_images", "a folder of images",
            str(folder) if isinstance(folder, os.PathLike) else folder)  # fmt: skip
    _expect(bool(source_images(folder)), "init_images",
            f"a folder holding at least one image file ({', '.join(IMAGE_SUFFIXES)})", str(folder))  # fmt: skip
    strengths = list(DEFAULT_STRENGTHS) if config.strengths is None else config.strengths
    _expect(
        isinstance(strengths, Sequence)
        and not isinstance(strengths, str)
        and len(strengths) > 0
        and all(_is_number(s) and 0 < s <= 1 for s in strengths)
        and len(set(strengths)) == len(strengths),
        "strengths",
        "a non-empty list of distinct numbers in (0, 1]",
        strengths,
    )
    steps = config.num_inference_steps
    guided = any(a == AUTO or (_is_number(a) and a > 0) for a in config.alphas)
    need = config.kldb_guidance_interval if guided else 1  # a guided call needs a guided step among those it runs
    short = [s for s in strengths if int(steps * s) < need]
    _expect(
        not short,
        "strengths",
        f"numbers whose int(num_inference_steps * strength) steps (num_inference_steps={steps}) reach "
        + (f"kldb_guidance_interval={need}, the first guided step" if guided else "at least one step"),
        short,
    )
    _expect(AUTO not in config.alphas, "alphas", 'numbers with `init_images` ("auto" samples its pilot from noise)',
            config.alphas)  # fmt: skip


def source_images(folder: str | os.PathLike[str]) -> list[str]:
    """The sources of an ``init_images`` folder: its image files (:data:`IMAGE_SUFFIXES`, any depth, hidden files and
    folders left out) as POSIX paths relative to ``folder``, sorted."""
    root = Path(folder)
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if (
            path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
            and not any(p.startswith(".") for p in relative.parts)
        ):
            found.append(relative.as_posix())
    return sorted(found)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_hashes(config: SweepConfig) -> dict[str, str]:
    """``{source file: SHA-256 of its bytes}`` of ``config.init_images`` in source order; ``{}`` without it."""
    if config.init_images is None:
        return {}
    root = Path(config.init_images)
    return {name: _file_sha256(root / name) for name in source_images(root)}


def _load_source(config: SweepConfig, source: str) -> PIL.Image.Image:
    """A source image as the pipeline takes it from a user: the PIL image of the file (the pipeline converts to RGB)."""
    with PIL.Image.open(Path(config.init_images) / source) as image:
        image.load()
        return image.copy()


def _check_sources(config: SweepConfig, pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """One size for every source (named file by file otherwise), then the pipeline's own image checks (the VAE factor,
    ``height`` / ``width``, each strength against the steps) on the first; returns the sources' (height, width)."""
    root = Path(config.init_images)
    sizes: dict[tuple[int, int], list[str]] = {}
    for name in source_images(root):
        try:
            with PIL.Image.open(root / name) as image:
                sizes.setdefault((image.height, image.width), []).append(name)
        except (OSError, ValueError) as error:
            raise KLDBInputError(
                f"Expected argument `init_images` to hold readable images but {name!r} in {str(root)!r} is not one "
                f"({error})."
            ) from None
    if len(sizes) > 1:
        found = "; ".join(f"{h}x{w}: {', '.join(repr(n) for n in names[:3])}" + (" ..." if len(names) > 3 else "")
                          for (h, w), names in sorted(sizes.items()))  # fmt: skip
        raise KLDBInputError(
            f"Expected argument `init_images` to hold images of one size (height x width) but {str(root)!r} holds "
            f"{found}. Resize or crop them first."
        )
    first = next(iter(sizes.values()))[0]
    for strength in list(DEFAULT_STRENGTHS) if config.strengths is None else config.strengths:
        try:
            pipe.check_image_inputs(_load_source(config, first), strength, height, width, None,
                                    config.num_inference_steps)  # fmt: skip
        except ValueError as error:
            raise KLDBInputError(f"`init_images` {str(root)!r} ({first!r}): {error}") from None
    return next(iter(sizes))


def check_against_pipeline(config: SweepConfig, pipe: Any, settings: Sequence[Setting], labels: Sequence[str]) -> None:
    """Check ``config`` with the loaded pipeline's own input checks, before any image is made.

    These are the checks a call runs first: the pipeline's ``check_kldb_inputs`` (the image size against its
    ``vae_scale_factor``, the k-LMS scheduler and epsilon prediction that guidance needs, a ``guidance_vae`` for
    ``kldb_guidance_decoder="guidance_vae"``), then diffusers' ``check_inputs`` (an image size divisible by 8, the
    prompts). They raise the pipeline's ``ValueError``.
    """
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = config.height or default_size, config.width or default_size
    if config.init_images is not None:  # the sources' size, checked by the pipeline's own image checks
        height, width = _check_sources(config, pipe, config.height, config.width)
    # a guided setting, if there is one: guidance has more to check ("auto" is checked with its largest grid alpha)
    guided = max(settings, key=lambda s: max(config.auto_grid) if s.is_auto else s.alpha)
    pipe.check_kldb_inputs(
        kldb_guidance_scale=max(config.auto_grid) if guided.is_auto else guided.alpha,
        kldb_guidance_interval=config.kldb_guidance_interval,
        kldb_gradient=config.kldb_gradient,
        num_inference_steps=config.num_inference_steps,
        has_classifier=True,
        classes=list(guided.classes),
        height=height,
        width=width,
        kldb_guidance_decoder=config.kldb_guidance_decoder,
        num_images_per_prompt=config.batch_size,
        prompt=config.prompt,
    )
    try:
        pipe.check_inputs(_prompt(config, guided, labels), height, width, None, negative_prompt=config.negative_prompt)
    except ValueError as error:
        if config.init_images is None:
            raise
        raise KLDBInputError(
            f"`init_images` {str(config.init_images)!r} (images of {height}x{width}): {error}"
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------------------


def build_settings(config: SweepConfig, labels: Sequence[str]) -> list[Setting]:
    """The grid in a fixed order: class subset, then beta, then alpha (with ``init_images``: then strength, then
    source); class names are resolved against ``labels``."""
    settings = []
    sources = source_images(config.init_images) if config.init_images is not None else []
    strengths = list(DEFAULT_STRENGTHS) if config.strengths is None else config.strengths
    for subset in config.class_subsets:
        indices = resolve_classes(list(subset), list(labels), len(labels))
        names = tuple(labels[i] for i in indices)
        for beta in config.betas:
            for alpha in config.alphas:
                cell = Setting(tuple(indices), names, AUTO if alpha == AUTO else float(alpha), float(beta))
                if not sources:
                    settings.append(cell)
                    continue
                for strength in strengths:
                    settings += [dataclasses.replace(cell, strength=float(strength), source=s) for s in sources]
    folders = [s.folder for s in settings]
    if len(set(folders)) != len(folders):
        raise KLDBInputError(
            "Expected argument `class_subsets` to hold distinct class subsets (with distinct file-system names) but "
            f"got {config.class_subsets!r}."
        )
    return settings


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What a sweep did: the run folder, its manifest, and counts (of this process and of the whole run)."""

    out_dir: Path
    manifest: Path
    generated: int
    already_done: int
    total: int
    skipped_updates: int = 0
    settings: list[str] = dataclasses.field(default_factory=list)


def _batches(items: Sequence[tuple[Setting, int]], size: int) -> Iterator[tuple[Setting, list[int]]]:
    """Consecutive items of the same setting, at most ``size`` per batch."""
    batch: list[int] = []
    current: Setting | None = None
    for setting, seed in items:
        if current is not None and (setting != current or len(batch) == size):
            yield current, batch
            batch = []
        current = setting
        batch.append(seed)
    if batch:
        yield current, batch


def check_resume(out_dir: Path, config: SweepConfig, hashes: dict[str, str] | None = None) -> None:
    """Refuse to resume a run folder that was started with settings that change the images, with (or without) the
    ``init_images`` it was started without (or with), or with a source file whose bytes changed since (``hashes``:
    :func:`source_hashes` of ``config`` if already computed)."""
    path = out_dir / CONFIG_NAME
    if not path.is_file():
        return
    info = json.loads(path.read_text(encoding="utf-8"))
    stored_sources = info.get(SOURCES_KEY)
    if (stored_sources is not None) != (config.init_images is not None):
        started = "with `init_images` (image-to-image)" if stored_sources is not None else "without `init_images`"
        raise KLDBInputError(
            f"Expected argument `init_images` to be {'a folder' if stored_sources is not None else 'None'}, as the run "
            f"being resumed in {str(out_dir)!r} was started {started}, but got {_path_text(config.init_images)}. Use "
            "another output folder."
        )
    if stored_sources is not None:
        made = {line.get("source_file"): line.get("source_sha256") for line in _manifest_lines(out_dir)}
        for name, digest in (source_hashes(config) if hashes is None else hashes).items():
            before = stored_sources.get(name) or made.get(name)
            if before is not None and before != digest:
                raise KLDBInputError(
                    f"Expected source image {name!r} in `init_images` {str(config.init_images)!r} to be the file the "
                    f"run being resumed in {str(out_dir)!r} started from (sha256 {before}) but it changed (sha256 "
                    f"{digest}). Restore it, or use another output folder."
                )
    stored = info.get("fixed", {})
    current = config.fixed()
    for name in FIXED_FIELDS:
        if name in stored and stored[name] != current[name]:
            raise KLDBInputError(
                f"Expected argument `{name}` to be {stored[name]!r}, as in the run being resumed in {str(out_dir)!r}, "
                f"but got {current[name]!r}. Use another output folder for different settings."
            )


def _path_text(path: Any) -> str:
    return repr(str(path)) if isinstance(path, os.PathLike) else repr(path)


def _manifest_lines(out_dir: Path) -> list[dict[str, Any]]:
    from kldb.runfolder import manifest_parts

    return [line for p in [out_dir / MANIFEST_NAME, *manifest_parts(out_dir)] for line in read_jsonl(p)]


def _prepare_pipeline(config: SweepConfig, device: torch.device | str) -> tuple[Any, Any, list[str]]:
    from kldb.loading import classifier_labels, load_classifier, load_guidance_vae, load_pipeline, pipeline_classifier

    pipe = load_pipeline(config.pipeline, device=device, dtype=config.dtype)
    if config.guidance_vae is not None:
        pipe.register_modules(guidance_vae=load_guidance_vae(config.guidance_vae, device=device, dtype=config.dtype))
    overrides: dict[str, Any] = {}
    if config.timestep_spacing is not None:
        overrides["timestep_spacing"] = config.timestep_spacing
    if config.use_karras_sigmas:
        overrides["use_karras_sigmas"] = True
    if overrides:
        pipe.set_lms_scheduler(**overrides)
    classifier = load_classifier(config.classifier, device=device) if config.classifier else pipeline_classifier(pipe)
    return pipe, classifier, classifier_labels(classifier)


def _prompt(config: SweepConfig, setting: Setting, labels: Sequence[str]) -> str:
    """The configured prompt, else the paper's prompt of the setting's class subset."""
    return config.prompt if config.prompt is not None else class_prompt(labels, setting.classes)


def _call_kwargs(config: SweepConfig, setting: Setting, labels: Sequence[str], classifier: Any) -> dict[str, Any]:
    """The pipeline arguments every image of ``setting`` shares (all but the alpha, the seeds and the batch size)."""
    return {
        "prompt": _prompt(config, setting, labels),
        "negative_prompt": config.negative_prompt,
        "classes": list(setting.classes),
        "classifier": classifier,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": setting.beta,
        "guidance_rescale": config.guidance_rescale,
        "kldb_guidance_interval": config.kldb_guidance_interval,
        "kldb_gradient": config.kldb_gradient,
        "kldb_guidance_decoder": config.kldb_guidance_decoder,
        "kldb_step_control": config.kldb_step_control,
        "kldb_max_halvings": config.kldb_max_halvings,
        "kldb_trust_radius": config.kldb_trust_radius,
        "kldb_step_temperature": config.kldb_step_temperature,
        "height": config.height,
        "width": config.width,
    }


def _generate_batch(
    pipe: Any,
    classifier: Any,
    config: SweepConfig,
    setting: Setting,
    seeds: list[int],
    labels: Sequence[str],
    device: torch.device | str,
    alpha: float,
    source: PIL.Image.Image | None = None,
) -> Any:
    """One pipeline call for ``seeds`` of ``setting``; an image-to-image setting starts from ``source`` (its image)."""
    generator_device = "cpu" if str(device).startswith("mps") else device
    from_image = {"image": source, "strength": setting.strength} if setting.source is not None else {}
    return pipe(
        **_call_kwargs(config, setting, labels, classifier),
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator(device=generator_device).manual_seed(s) for s in seeds],
        kldb_guidance_scale=alpha,
        output_type="pil",
        **from_image,
    )


def _pilot_path(out: Path, setting: Setting) -> Path:
    return out / AUTO_DIR / f"{setting.name}.json"


def _run_pilots(
    pipe: Any, classifier: Any, config: SweepConfig, settings: Sequence[Setting], labels: Sequence[str], out: Path
) -> None:
    """Choose the alpha of each ``"auto"`` setting by its pilot, unless a resumed run already recorded it."""
    for setting in settings:
        path = _pilot_path(out, setting)
        if path.is_file():
            continue
        logger.info("Pilot for %s: alphas %s over %d seeds.", setting.name, config.auto_grid, len(config.auto_seeds))
        pilot = pipe.choose_guidance_scale(
            grid=list(config.auto_grid),
            seeds=list(config.auto_seeds),
            avoid_seeds=list(config.seeds),
            **_call_kwargs(config, setting, labels, classifier),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with stop_on_full_disk(path, 0):
            atomic_write_json(path, {"setting": setting.name, **pilot})


def _read_pilot(out: Path, setting: Setting) -> dict[str, Any]:
    return json.loads(_pilot_path(out, setting).read_text(encoding="utf-8"))


def run_sweep(config: SweepConfig, progress: bool = True, state: Any = None) -> SweepResult:
    """Run (or resume) the sweep described by ``config``; see the module docstring for the guarantees.

    Args:
        config: the sweep.
        progress: show a tqdm progress bar on the main process.
        state: an ``accelerate.PartialState``; by default one is created (``cpu=True`` without CUDA or when
            ``config.device`` is ``"cpu"``).

    Returns:
        A :class:`SweepResult`; ``generated`` counts the images this process made.

    Raises:
        ValueError: for bad settings (:class:`~kldb.errors.KLDBInputError`, or the pipeline's own input checks), or a
            run folder started with other image-fixing settings. Nothing is written then.
        SweepDiskFullError: when the disk fills up; the manifest stays consistent and the run can be resumed.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    check_config(config)
    out = Path(config.out_dir)
    if state is None:
        on_cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
        state = PartialState(cpu=True) if on_cpu else PartialState()
    device = torch.device(config.device) if config.device is not None else state.device
    hashes = source_hashes(config)  # {source file: sha256}; {} for a text-to-image run
    check_resume(out, config, hashes)

    # 1. Everyone loads the pipeline; the grid is checked against it before anything is written
    pipe, classifier, labels = _prepare_pipeline(config, device)
    pipe.set_progress_bar_config(disable=True)  # the sweep's own bar counts images; per-call step bars clutter it
    settings = build_settings(config, labels)
    check_against_pipeline(config, pipe, settings, labels)
    decoder = pipe.resolve_guidance_decoder(config.kldb_guidance_decoder)  # named in every record

    # 2. The main process repairs the folder (partial lines, temporary files) and records the settings
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        recover(out)
        info = {"fixed": config.fixed(), "labels": list(labels), "last_config": _config_dict(config)}
        if config.init_images is not None:  # every source ever used, with its hash (checked on resume)
            stored = json.loads((out / CONFIG_NAME).read_text("utf-8")) if (out / CONFIG_NAME).is_file() else {}
            info[SOURCES_KEY] = {**stored.get(SOURCES_KEY, {}), **hashes}
        with stop_on_full_disk(out / CONFIG_NAME, 0):
            atomic_write_json(out / CONFIG_NAME, info)
    state.wait_for_everyone()

    # 3. Everyone reads what is done; the main process runs the pilots of the "auto" settings with images to make;
    # then the pending work is split between the processes
    done = {r.key for r in load_records(out)}
    state.wait_for_everyone()  # nobody writes before everyone has read
    order = [s.key(seed) for s in settings for seed in config.seeds]
    pending = [(s, seed) for s in settings for seed in config.seeds if s.key(seed) not in done]
    already = len(order) - len(pending)
    auto = list(dict.fromkeys(s for s, _ in pending if s.is_auto))
    if state.is_main_process and auto:
        _run_pilots(pipe, classifier, config, auto, labels, out)
    state.wait_for_everyone()
    chosen = {s: float(_read_pilot(out, s)["kldb_guidance_scale"]) for s in auto}
    if state.is_main_process:
        logger.info(
            "Sweep in %s: %d settings x %d seeds, %d already done, %d to make on %d process(es).",
            out, len(settings), len(config.seeds), already, len(pending), state.num_processes,
        )  # fmt: skip
    with state.split_between_processes(pending) as mine:
        mine = list(mine)

    # 4. Make the images: each PNG atomically, then its manifest line
    generated = skipped = 0
    part = out / f"manifest.rank{state.process_index}.jsonl"
    bar = tqdm(total=len(mine), desc="sweep", unit="img", disable=not (progress and state.is_main_process))
    try:
        with ManifestWriter(part) as writer:
            loaded: tuple[str, PIL.Image.Image] | None = None  # the last source read (settings go source by source)
            for setting, seeds in _batches(mine, config.batch_size):
                alpha = chosen[setting] if setting.is_auto else float(setting.alpha)
                source = None
                if setting.source is not None:
                    if loaded is None or loaded[0] != setting.source:
                        loaded = (setting.source, _load_source(config, setting.source))
                    source = loaded[1]
                start = time.perf_counter()
                output = _generate_batch(pipe, classifier, config, setting, seeds, labels, device, alpha, source)
                seconds = time.perf_counter() - start
                skipped += output.skipped_updates
                for i, seed in enumerate(seeds):
                    record = _record(config, setting, seed, output, i, labels, len(seeds), decoder, alpha)
                    if setting.source is not None:
                        record.source_sha256 = hashes[setting.source]
                    record.process_index = state.process_index
                    record.batch_seconds = round(seconds, 4)
                    path = out / record.file
                    with stop_on_full_disk(path, generated):
                        save_png(path, output.images[i], _png_metadata(record))
                    data = path.read_bytes()
                    record.bytes = len(data)
                    record.sha256 = hashlib.sha256(data).hexdigest()
                    with stop_on_full_disk(part, generated):
                        writer.append(record)
                    generated += 1
                    bar.update(1)
    finally:
        bar.close()

    # 5. The main process merges every part into manifest.jsonl, then writes metadata.jsonl: the run folder is also an
    # `imagefolder` dataset (kldb.dataset)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_manifests(out, order)
        if (out / MANIFEST_NAME).is_file() and (out / MANIFEST_NAME).stat().st_size:
            from kldb.dataset import write_imagefolder_metadata

            with stop_on_full_disk(out / "metadata.jsonl", generated):
                write_imagefolder_metadata(out)
    state.wait_for_everyone()
    return SweepResult(
        out_dir=out,
        manifest=out / MANIFEST_NAME,
        generated=generated,
        already_done=already,
        total=len(order),
        skipped_updates=skipped,
        settings=[s.name for s in settings],
    )


def _config_dict(config: SweepConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["out_dir"] = str(config.out_dir)
    if config.init_images is not None:
        data["init_images"] = str(config.init_images)
    return data


def _record(
    config: SweepConfig,
    setting: Setting,
    seed: int,
    output: Any,
    i: int,
    labels: Sequence[str],
    batch: int,
    decoder: str = "vae",
    alpha: float | None = None,
) -> ImageRecord:
    """The manifest record of image ``i`` of a pipeline ``output`` (its file fields are filled in once it is saved);
    ``alpha`` is the alpha the image was made with (the pilot's choice for an ``"auto"`` setting)."""
    alpha = float(setting.alpha) if alpha is None else alpha
    probabilities = output.probabilities[i].double()  # (n,)
    top = probabilities.topk(min(len(probabilities), max(TOP_K, len(setting.classes))))
    predicted = int(output.predicted_class[i])
    guided = alpha > 0

    def count(values: Any) -> int | None:
        return int(values[i]) if guided and values is not None else None

    return ImageRecord(
        setting=setting.name,
        classes=list(setting.class_names),
        class_indices=list(setting.classes),
        alpha=alpha,
        beta=setting.beta,
        seed=seed,
        prompt=_prompt(config, setting, labels),
        negative_prompt=config.negative_prompt,
        num_inference_steps=config.num_inference_steps,
        kldb_guidance_interval=config.kldb_guidance_interval,
        kldb_gradient=config.kldb_gradient,
        kldb_guidance_decoder=decoder if guided else None,
        guidance_rescale=config.guidance_rescale,
        file=image_relpath(setting, seed),
        kldb=_score(float(output.kldb[i]), "KLDB", setting, seed),
        entropy=_score(float(output.entropy[i]), "entropy", setting, seed),
        class_probabilities=[_round(probabilities[c]) for c in setting.classes],
        top_classes=[int(c) for c in top.indices],
        top_labels=[labels[int(c)] for c in top.indices],
        top_probabilities=[_round(p) for p in top.values],
        predicted_class=predicted,
        predicted_label=labels[predicted],
        num_classes=len(labels),
        batch_size=batch,
        batch_skipped_updates=int(output.skipped_updates),
        alpha_mode=AUTO if setting.is_auto else None,
        kldb_step_control=config.kldb_step_control if guided else None,
        accepted_steps=count(output.accepted_steps),
        step_halvings=count(output.step_halvings),
        rejected_steps=count(output.rejected_steps),
        **(_start_fields(setting, output, i, labels) if setting.source is not None else {}),
    )


def _start_fields(setting: Setting, output: Any, i: int, labels: Sequence[str]) -> dict[str, Any]:
    """The image-to-image fields of image ``i`` of ``output`` (but ``source_sha256``): the source, the strength, the
    source's own scores and the result's distance to it."""

    def number(values: Any) -> float | None:
        return finite_or_none(float(values[i])) if values is not None else None

    start = output.predicted_class_start
    return {
        "source_file": setting.source,
        "strength": setting.strength,
        "kldb_start": number(output.kldb_start),
        "class_probabilities_start": (
            [_round(output.probabilities_start[i].double()[c]) for c in setting.classes]
            if output.probabilities_start is not None
            else None
        ),
        "predicted_class_start": int(start[i]) if start is not None else None,
        "predicted_label_start": labels[int(start[i])] if start is not None else None,
        "pixel_l2": number(output.pixel_l2),
        "ssim": number(output.ssim),
    }


def _round(probability: torch.Tensor) -> float | None:
    value = finite_or_none(float(probability))
    return round(value, 8) if value is not None else None


def _score(value: float, name: str, setting: Setting, seed: int) -> float | None:
    """``value``, or ``None`` (JSON has no NaN) with a warning when the classifier gave a non-finite score."""
    if finite_or_none(value) is None:
        logger.warning("Non-finite %s (%s) for %s, seed %d: recorded as null.", name, value, setting.name, seed)
    return finite_or_none(value)


def _png_metadata(record: ImageRecord) -> dict[str, Any]:
    keys = ("prompt", "negative_prompt", "seed", "alpha", "beta", "classes", "class_indices", "kldb", "entropy")
    metadata = {k: getattr(record, k) for k in keys if getattr(record, k) is not None}
    metadata["class_probabilities"] = record.class_probabilities
    metadata["top_labels"] = record.top_labels
    metadata["top_probabilities"] = record.top_probabilities
    metadata["predicted_label"] = record.predicted_label
    metadata["setting"] = record.setting
    for key in ("source_file", "strength", "kldb_start"):
        if getattr(record, key) is not None:
            metadata[key] = getattr(record, key)
    return metadata


def auto_pilots(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The pilots of a run's ``"auto"`` settings with their cost set against the images they chose for.

    One row per pilot record in ``auto/``: the setting, the alpha chosen, the grid and its median KLDBs, the pilot's
    seeds and seconds, and, from the manifest, the number of the setting's images, their seconds (each batch's wall
    time spread over its images) and ``cost_ratio``: (pilot + images) / images seconds, the factor the pilot adds.
    """
    from kldb.runfolder import read_manifest

    out = Path(run_dir)
    folder = out / AUTO_DIR
    if not folder.is_dir():
        return []
    seconds: dict[str, float] = {}
    images: dict[str, int] = {}
    for record in read_manifest(out):
        images[record.setting] = images.get(record.setting, 0) + 1
        if record.batch_seconds is not None and record.batch_size:
            seconds[record.setting] = seconds.get(record.setting, 0.0) + record.batch_seconds / record.batch_size
    rows = []
    for path in sorted(folder.glob("*.json")):
        pilot = json.loads(path.read_text(encoding="utf-8"))
        name = pilot["setting"]
        made = seconds.get(name)
        rows.append(
            {
                "setting": name,
                "alpha": pilot["kldb_guidance_scale"],
                "grid": pilot["grid"],
                "median_kldb": pilot["median_kldb"],
                "pilot_seeds": pilot["seeds"],
                "pilot_seconds": round(float(pilot["seconds"]), 3),
                "images": images.get(name, 0),
                "image_seconds": round(made, 3) if made is not None else None,
                "cost_ratio": round((made + float(pilot["seconds"])) / made, 3) if made else None,
            }
        )
    return rows
