"""A web app over the library (Gradio): explore a classifier's decision boundaries, and audit them with a small sweep.

    kldb app                                   # the digits world, offline on a CPU, at http://127.0.0.1:7860
    python -m kldb.app --port 7861
    kldb app --pipeline CompVis/stable-diffusion-v1-4 --classifier torchvision:resnet50:IMAGENET1K_V2 --device cuda

Tabs:

- **Explore**: pick classes by label name, and ``Generate`` shows prompt-only (alpha = 0) and guided images from the
  same seeds, each captioned with its KLDB and top probabilities (:func:`kldb.render.caption_lines`), a table of
  medians, and a zip of the images with ``results.json`` (the records: :func:`kldb.demo.write_comparison`).
- **From an image**: push an uploaded image toward the boundary of the chosen classes (the pipeline's ``image=`` /
  ``strength=``), with a before/after view.
- **Audit**: a small alpha x beta sweep (:func:`kldb.sweep.run_sweep`) in a background thread, its progress (the
  manifest's lines), then its Table 1 and plots (:func:`kldb.report.write_report`); or reopen any run folder.

The handlers are plain functions of a :class:`World` (the pipeline, loaded once) and the page's values, so they are
tested without a browser; :func:`build_app` wires them to the page. Each browser session keeps its results in its own
folder (``gr.State``), which is removed when the session ends. Pipeline calls are queued one at a time (the pipeline's
guidance hooks are per call); the queue holds at most ``max_queue`` waiting requests.

Gradio is the ``app`` extra: ``pip install "kldb-boundary[app]"``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from kldb.demo import format_summary, write_comparison
from kldb.errors import KLDBInputError, KLDBPathError
from kldb.io import atomic_write_bytes, atomic_write_json, json_safe
from kldb.loading import DTYPES
from kldb.presets import PRESETS, Preset
from kldb.render import caption_lines
from pipeline_kldb_boundary import STEP_CONTROLS, KLDBBoundaryPipeline, class_prompt, resolve_classes

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_QUEUE",
    "ExploreResult",
    "SweepJob",
    "World",
    "build_app",
    "generate",
    "load_world",
    "open_run",
    "start_sweep",
    "sweep_status",
]

DEFAULT_HOST = "127.0.0.1"  # served on this machine only unless asked otherwise
DEFAULT_PORT = 7860
DEFAULT_MAX_QUEUE = 16  # waiting requests beyond this are refused with "queue is full"
MAX_IMAGES = 64  # images per row of one Explore call
MAX_SWEEP_IMAGES = 256  # images of one sweep started from the page
RESULTS_NAME = "results.json"
ZIP_NAME = "kldb_images.zip"


def has_image_mode() -> bool:
    """Whether the pipeline takes a starting image (``image=``): the "From an image" tab is shown only then."""
    import inspect

    return "image" in inspect.signature(KLDBBoundaryPipeline.__call__).parameters


# ----------------------------------------------------------------------------------------------------------------------
# The world: the pipeline, its classifier and the defaults, loaded once
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class World:
    """What every handler works on: the pipeline (loaded once), the classifier audited, its labels and the defaults.

    ``pipeline_spec`` / ``classifier_spec`` rebuild the same world for a sweep (:class:`kldb.sweep.SweepConfig`);
    ``lock`` makes pipeline calls from several sessions run one at a time.
    """

    pipe: KLDBBoundaryPipeline
    classifier: Any
    labels: list[str]
    preset: Preset
    pipeline_spec: str
    classifier_spec: str | None = None
    description: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def default_classes(self) -> list[str]:
        """The preset's classes when the classifier has them, else its first two labels."""
        named = [c for c in self.preset.classes if c in self.labels]
        return named if len(named) == len(self.preset.classes) else self.labels[:2]

    def call_defaults(self) -> dict[str, Any]:
        """The preset's pipeline arguments that the page does not show (negative prompt, guidance rescale, ...)."""
        p = self.preset
        return {
            "negative_prompt": p.negative_prompt,
            "guidance_rescale": p.guidance_rescale,
            "kldb_gradient": p.kldb_gradient,
            "kldb_guidance_decoder": p.kldb_guidance_decoder,
        }


def load_world(
    pipeline: str = "digits",
    classifier: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    tiny: bool = False,
) -> World:
    """Load the pipeline (and a classifier other than its own) once, for the whole app.

    Args:
        pipeline: a pipeline spec as for ``kldb generate`` (:func:`kldb.loading.load_pipeline`): ``"digits"`` (the
            bundled world, the default), ``package.module:function``, a folder or a Hub id.
        classifier: a classifier spec (:func:`kldb.loading.load_classifier`), or ``None`` for the pipeline's own.
        device: torch device.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"auto"``.
        tiny: tiny random components labelled like the digits world instead (fast, images are noise; for tests).
    """
    from kldb.loading import classifier_labels, load_classifier, load_pipeline, pipeline_classifier, resolve_dtype

    dtype = resolve_dtype(dtype, device)
    preset = PRESETS["digits"] if pipeline == "digits" else PRESETS["paper"]
    if tiny:
        from kldb.demo import tiny_digits_pipeline

        pipe = tiny_digits_pipeline().to(device)
        pipeline, description = "kldb.demo:tiny_digits_pipeline", "tiny random components (images are noise)"
    else:
        pipe = load_pipeline(pipeline, device=device, dtype=dtype)
        description = "the digits world" if pipeline == "digits" else pipeline
    if preset.timestep_spacing or preset.use_karras_sigmas:
        overrides: dict[str, Any] = {"use_karras_sigmas": preset.use_karras_sigmas}
        if preset.timestep_spacing:
            overrides["timestep_spacing"] = preset.timestep_spacing
        pipe.set_lms_scheduler(**overrides)
    pipe.set_progress_bar_config(disable=True)
    audited = load_classifier(classifier, device=device) if classifier else pipeline_classifier(pipe)
    if classifier:
        description += f" with the classifier {classifier}"
    return World(
        pipe=pipe,
        classifier=audited,
        labels=classifier_labels(audited),
        preset=preset,
        pipeline_spec=pipeline,
        classifier_spec=classifier,
        description=description,
        device=str(device),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Per-session folders
# ----------------------------------------------------------------------------------------------------------------------


def new_session_dir(root: str | os.PathLike[str] | None = None) -> str:
    """A fresh folder for one browser session's files, in ``root`` (the app's folder, see :func:`app_folder`) or else
    in the system's temporary folder."""
    return tempfile.mkdtemp(prefix="kldb-app-", dir=root)


def app_folder() -> str:
    """A folder for the sessions of one app process, removed when the process exits (also after Ctrl+C)."""
    import atexit

    root = tempfile.mkdtemp(prefix="kldb-app-server-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def remove_on_interrupt(root: str) -> None:
    """Remove ``root`` at once on Ctrl+C (SIGINT) or SIGTERM, before Gradio's own shutdown, which may take a while
    (or be cut short by a kill) under load; then stop as the signal would."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        shutil.rmtree(root, ignore_errors=True)
        if signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def remove_session_dir(session: Any) -> None:
    """Remove a session's folder; the ``delete_callback`` of its ``gr.State``."""
    if isinstance(session, str) and Path(session).name.startswith("kldb-app-"):
        shutil.rmtree(session, ignore_errors=True)


def _session(session: str | None) -> Path:
    return Path(session) if session else Path(new_session_dir())


# ----------------------------------------------------------------------------------------------------------------------
# Explore: prompt-only against guided, from the same seeds
# ----------------------------------------------------------------------------------------------------------------------


def _positive_int(value: Any, name: str, upper: int | None = None) -> int:
    """``value`` as an int, refused unless it is a whole number in ``[1, upper]``."""
    bound = f" in [1, {upper}]" if upper is not None else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise KLDBInputError(f"Expected argument `{name}` to be a positive integer{bound} but got {value!r}.")
    if upper is not None and value > upper:
        raise KLDBInputError(f"Expected argument `{name}` to be a positive integer{bound} but got {value!r}.")
    return int(value)


def _number(value: Any, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise KLDBInputError(f"Expected argument `{name}` to be a finite number >= {minimum:g} but got {value!r}.")
    return float(value)


def class_indices(world: World, classes: Sequence[str] | None) -> list[int]:
    """The picked class names as indices into the classifier's output; a readable error for none or unknown names."""
    if not classes:
        raise KLDBInputError(
            "Expected argument `classes` to name at least one class of the classifier but got none: pick classes first."
        )
    return resolve_classes(list(classes), world.labels, len(world.labels))


def prompt_for(world: World, classes: Sequence[str] | None) -> str:
    """The paper's prompt for the picked classes (``"three and eight"``); empty while none or an unknown one is picked."""
    try:
        return class_prompt(world.labels, class_indices(world, classes))
    except ValueError:
        return ""


def _progress_callback(report: Callable[[int], None]) -> Callable[..., dict]:
    """A ``callback_on_step_end`` that reports each finished step and changes nothing."""

    def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        report(step + 1)
        return callback_kwargs

    return on_step_end


@dataclass
class ExploreResult:
    """What one ``Generate`` made: per row the images with their captions, the medians, the records and the zip."""

    galleries: dict[str, list[tuple[PIL.Image.Image, str]]]
    medians: list[list[Any]]
    summary: str
    results: dict[str, Any]
    out_dir: Path
    zip_path: Path


MEDIAN_HEADERS = ["setting", "alpha", "median KLDB", "median entropy (nats)", "predicted classes"]


def generate(
    world: World,
    classes: Sequence[str] | None,
    prompt: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    interval: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    num_images: int = 4,
    step_control: str | None = None,
    session: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ExploreResult:
    """Prompt-only (alpha = 0) and guided images from the same seeds ``seed, seed + 1, ...``, written to the session.

    Args:
        world: the loaded world.
        classes: the class subset C by label name.
        prompt: the prompt; empty or ``None`` is the class names joined with " and ".
        alpha: KLDB guidance strength of the guided row (``None``: the preset's; the digits world's is the measured
            quick-start setting, :data:`kldb.presets.QUICK_START`).
        beta: classifier-free guidance scale (``None``: the preset's).
        interval: guidance every k steps (``None``: the preset's).
        steps: k-LMS steps (``None``: the preset's).
        seed: the first seed; image ``i`` of both rows starts from seed ``seed + i``.
        num_images: images per row, at most :data:`MAX_IMAGES`.
        step_control: ``kldb_step_control`` of the guided row (``None``: the preset's; backtracking on the digits
            world, the paper's fixed step otherwise).
        session: the session's folder (a new one when ``None``).
        progress: called as ``progress(done, total, row)`` after every sampling step.

    Returns:
        An :class:`ExploreResult`; ``out_dir`` holds ``images/<row>_<i>.png``, ``grid.png`` and ``results.json``, and
        ``zip_path`` all of them.
    """
    p = world.preset
    indices = class_indices(world, classes)
    beta = _number(p.beta if beta is None else beta, "beta")
    alpha = _number(p.alpha if alpha is None else alpha, "alpha")
    step_control = p.kldb_step_control if step_control is None else step_control
    interval = _positive_int(p.kldb_guidance_interval if interval is None else interval, "interval")
    steps = _positive_int(p.num_inference_steps if steps is None else steps, "steps", 1000)
    num_images = _positive_int(num_images, "num_images", MAX_IMAGES)
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or seed != int(seed) or seed < 0:
        raise KLDBInputError(f"Expected argument `seed` to be a non-negative integer but got {seed!r}.")
    if step_control not in STEP_CONTROLS:
        raise KLDBInputError(
            f"Expected argument `step_control` to be one of {list(STEP_CONTROLS)} but got {step_control!r}."
        )
    prompt = (prompt or "").strip() or class_prompt(world.labels, indices)
    seeds = [int(seed) + i for i in range(num_images)]
    rows = {"prompt_only": 0.0, "guided": alpha}
    total = steps * len(rows)
    runs = {}
    with world.lock:
        for r, (row, scale) in enumerate(rows.items()):
            report = (
                (lambda done, r=r, row=row: progress(r * steps + done, total, row)) if progress else (lambda _: None)
            )
            generator_device = "cpu" if world.device.startswith("mps") else world.device
            runs[row] = [
                world.pipe(
                    prompt=prompt,
                    classes=indices,
                    classifier=world.classifier,
                    num_inference_steps=steps,
                    guidance_scale=beta,
                    kldb_guidance_interval=interval,
                    kldb_guidance_scale=scale,
                    kldb_step_control=step_control if scale > 0 else "fixed",
                    num_images_per_prompt=num_images,
                    generator=[torch.Generator(device=generator_device).manual_seed(s) for s in seeds],
                    output_type="pil",
                    callback_on_step_end=_progress_callback(report),
                    **world.call_defaults(),
                )
            ]
    folder = _session(session)
    call_dir = folder / f"explore-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    for old in folder.glob("explore-*"):  # one Explore result per session on disk: the latest
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    settings = {
        "world": world.description,
        "prompt": prompt,
        "classes": [world.labels[i] for i in indices],
        "alpha": alpha,
        "beta": beta,
        "steps": steps,
        "interval": interval,
        "step_control": step_control,
        "seeds": seeds,
    }
    summary = write_comparison(
        call_dir,
        runs,
        world.labels,
        seeds=seeds,
        metadata={"prompt": prompt, "beta": beta},
        row_metadata={"prompt_only": {"alpha": 0.0}, "guided": {"alpha": alpha}},
    )
    galleries: dict[str, list[tuple[PIL.Image.Image, str]]] = {}
    images: list[dict[str, Any]] = []
    for row, outputs in runs.items():
        output = outputs[0]
        galleries[row] = []
        for i, (image, kldb, probabilities) in enumerate(zip(output.images, output.kldb, output.probabilities)):
            caption = ", ".join(caption_lines(float(kldb), probabilities.tolist(), world.labels, top=2))
            galleries[row].append((image, caption))
            images.append(
                {
                    "row": row,
                    "seed": seeds[i],
                    "file": f"images/{row}_{i:03d}.png",
                    "kldb": float(kldb),
                    "caption": caption,
                }
            )
    results = json_safe({"settings": settings, "rows": summary, "images": images})
    atomic_write_json(call_dir / RESULTS_NAME, results)
    medians = [
        [
            row,
            s["alpha"],
            round(s["median_kldb"], 4),
            round(s["median_entropy"], 4),
            ", ".join(f"{k}: {v}" for k, v in s["predicted_class_mix"].items()),
        ]
        for row, s in summary.items()
    ]
    return ExploreResult(
        galleries=galleries,
        medians=medians,
        summary=format_summary({"rows": summary}),
        results=results,
        out_dir=call_dir,
        zip_path=write_zip(call_dir, call_dir.parent / f"{call_dir.name}-{ZIP_NAME}"),
    )


def write_zip(folder: Path, path: Path) -> Path:
    """Every file under ``folder`` (paths relative to it) in one zip at ``path``, written atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder).as_posix())
    return atomic_write_bytes(path, buffer.getvalue())


def read_zip_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The records (``results.json``) inside a zip written by :func:`generate`."""
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(RESULTS_NAME))


# ----------------------------------------------------------------------------------------------------------------------
# From an image: before and after
# ----------------------------------------------------------------------------------------------------------------------


def edit_image(
    world: World,
    image: PIL.Image.Image | None,
    classes: Sequence[str] | None,
    strength: float = 0.5,
    alpha: float | None = None,
    prompt: str | None = None,
    steps: int | None = None,
    interval: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[PIL.Image.Image, PIL.Image.Image, dict[str, Any]]:
    """Push ``image`` toward the boundary of ``classes``: the pipeline starts from it noised to ``strength``.

    The image is resized to the pipeline's size first (bilinear). Returns the input as the pipeline saw it, the
    edited image, and their scores (KLDB, top classes, pixel distance). ``steps`` and ``interval`` (``None``: the
    preset's) are those of the whole schedule; the call runs ``int(steps * strength)`` of them, and needs at least
    ``interval``.
    """
    if image is None:
        raise KLDBInputError("Expected argument `image` to be an uploaded image but got none: upload an image first.")
    indices = class_indices(world, classes)
    strength = _number(strength, "strength")
    if not 0 < strength <= 1:
        raise KLDBInputError(f"Expected argument `strength` to be in (0, 1] but got {strength!r}.")
    alpha = _number(world.preset.alpha if alpha is None else alpha, "alpha")
    steps = _positive_int(world.preset.num_inference_steps if steps is None else steps, "steps", 1000)
    interval = _positive_int(world.preset.kldb_guidance_interval if interval is None else interval, "interval")
    size = world.pipe.unet.config.sample_size * world.pipe.vae_scale_factor
    start = image.convert("RGB").resize((size, size), PIL.Image.BILINEAR)
    prompt = (prompt or "").strip() or class_prompt(world.labels, indices)
    run_steps = max(1, int(steps * strength))
    report = (lambda done: progress(done, run_steps, "edit")) if progress else (lambda _: None)
    with world.lock:
        output = world.pipe(
            prompt=prompt,
            image=start,
            strength=strength,
            classes=indices,
            classifier=world.classifier,
            num_inference_steps=steps,
            guidance_scale=world.preset.beta,
            kldb_guidance_interval=interval,
            kldb_guidance_scale=alpha,
            generator=torch.Generator(device="cpu" if world.device.startswith("mps") else world.device).manual_seed(
                int(seed)
            ),
            output_type="pil",
            callback_on_step_end=_progress_callback(report),
            **world.call_defaults(),
        )
    before = ", ".join(
        caption_lines(float(output.kldb_start[0]), output.probabilities_start[0].tolist(), world.labels, 2)
    )
    after = ", ".join(caption_lines(float(output.kldb[0]), output.probabilities[0].tolist(), world.labels, 2))
    scores = {
        "before": before,
        "after": after,
        "kldb_start": float(output.kldb_start[0]),
        "kldb": float(output.kldb[0]),
        "pixel_l2": float(output.pixel_l2[0]),
    }
    return start, output.images[0], scores


# ----------------------------------------------------------------------------------------------------------------------
# Audit: a small sweep in the background, its report; reopen a run folder
# ----------------------------------------------------------------------------------------------------------------------


def parse_numbers(text: str, name: str) -> list[float]:
    """``"0, 0.1 0.2"`` as ``[0.0, 0.1, 0.2]``: numbers separated by commas or spaces, each finite and >= 0.

    Example:
        >>> parse_numbers("0, 0.1 0.2", "alphas")
        [0.0, 0.1, 0.2]
    """
    parts = [part for part in str(text or "").replace(",", " ").split() if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise KLDBInputError(
            f"Expected argument `{name}` to be numbers >= 0 separated by commas, such as '0, 0.1, 0.2', but got {text!r}."
        )
    return list(dict.fromkeys(values))


@dataclass
class SweepJob:
    """A sweep started from the page, running in a background thread; ``error`` is set if it failed."""

    run_dir: Path
    total: int
    thread: threading.Thread | None = None
    error: str | None = None
    report: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def count_done(run_dir: str | os.PathLike[str]) -> int:
    """Images a run folder's manifests record so far (``manifest.jsonl`` and the per-process parts)."""
    folder = Path(run_dir)
    count = 0
    for path in [folder / "manifest.jsonl", *sorted(folder.glob("manifest.rank*.jsonl"))]:
        if path.is_file():
            with path.open(encoding="utf-8") as lines:
                count += sum(1 for line in lines if line.strip())
    return count


def start_sweep(
    world: World,
    classes: Sequence[str] | None,
    alphas: str,
    betas: str,
    num_seeds: int,
    steps: int | None = None,
    run_dir: str | None = None,
    session: str | None = None,
) -> SweepJob:
    """Start ``kldb sweep``'s work (:func:`kldb.sweep.run_sweep`, then :func:`kldb.report.write_report`) in a thread.

    The sweep rebuilds the world from its specs, so it runs beside the page's own pipeline. Its settings are checked
    here first, so bad input is refused before the thread starts. An existing run folder with the same settings is
    resumed.
    """
    from kldb.sweep import SweepConfig, check_config

    indices = class_indices(world, classes)
    config = SweepConfig(
        out_dir=Path(run_dir) if run_dir else _session(session) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        pipeline=world.pipeline_spec,
        classifier=world.classifier_spec,
        class_subsets=[[world.labels[i] for i in indices]],
        alphas=parse_numbers(alphas, "alphas"),
        betas=parse_numbers(betas, "betas"),
        seeds=list(range(_positive_int(num_seeds, "num_seeds", MAX_SWEEP_IMAGES))),
        num_inference_steps=_positive_int(world.preset.num_inference_steps if steps is None else steps, "steps", 1000),
        kldb_guidance_interval=world.preset.kldb_guidance_interval,
        kldb_step_control=world.preset.kldb_step_control,
        negative_prompt=world.preset.negative_prompt,
        guidance_rescale=world.preset.guidance_rescale,
        timestep_spacing=world.preset.timestep_spacing,
        use_karras_sigmas=world.preset.use_karras_sigmas,
        dtype=world.dtype,
        device=world.device,
    )
    total = len(config.alphas) * len(config.betas) * len(config.seeds)
    if total > MAX_SWEEP_IMAGES:
        raise KLDBInputError(
            f"Expected a sweep of at most {MAX_SWEEP_IMAGES} images from the page but got {total} "
            f"({len(config.alphas)} alphas x {len(config.betas)} betas x {len(config.seeds)} seeds); run larger sweeps "
            "with `kldb sweep`."
        )
    check_config(config)
    job = SweepJob(run_dir=Path(config.out_dir), total=total)

    def work() -> None:
        from kldb.report import write_report
        from kldb.sweep import run_sweep

        try:
            run_sweep(config, progress=False)
            job.report = write_report(config.out_dir)
        except Exception as error:  # shown on the page; the thread ends
            logger.exception("The sweep in %s failed.", config.out_dir)
            job.error = f"{type(error).__name__}: {error}"

    job.thread = threading.Thread(target=work, name=f"kldb-sweep-{job.run_dir.name}", daemon=True)
    job.thread.start()
    return job


def sweep_status(job: SweepJob | None) -> tuple[str, bool]:
    """A line on the job (images done of the total, or its error, or where its report is) and whether it is over."""
    if job is None:
        return "No sweep started in this session.", True
    done = count_done(job.run_dir)
    seconds = time.monotonic() - job.started
    if job.error:
        return f"**The sweep failed:** {job.error} (run folder `{job.run_dir}`).", True
    if job.running:
        return f"Sweep running in `{job.run_dir}`: {done} of {job.total} images ({seconds:.0f} s).", False
    return f"Sweep done in `{job.run_dir}`: {done} of {job.total} images ({seconds:.0f} s); report below.", True


REPORT_PLOTS = (
    ("median_kldb_vs_alpha.png", "median KLDB against alpha"),
    ("kldb_distribution.png", "KLDB distribution"),
    ("ambiguous_images.png", "most ambiguous images"),
)


def open_run(run_dir: str | None, rewrite: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """A run folder's Table 1 (markdown) and its plots ``(path, caption)``; its report is written first if missing.

    Raises:
        KLDBPathError: ``run_dir`` is not an existing sweep folder.
    """
    from kldb.runfolder import CONFIG_NAME

    folder = Path(str(run_dir or "").strip()).expanduser()
    if not str(run_dir or "").strip() or not folder.is_dir():
        raise KLDBPathError(f"Expected argument `run_dir` to be an existing run folder but got {run_dir!r}.")
    if not (folder / CONFIG_NAME).is_file():
        raise KLDBPathError(
            f"Expected argument `run_dir` to be a run folder written by `kldb sweep` (with {CONFIG_NAME}) but "
            f"{str(run_dir)!r} has none."
        )
    report = folder / "report"
    if rewrite or not (report / "table1.md").is_file():
        from kldb.report import write_report

        write_report(folder)
    table = (report / "table1.md").read_text(encoding="utf-8")
    plots = [(str(report / name), caption) for name, caption in REPORT_PLOTS if (report / name).is_file()]
    return f"### Table 1: {folder.name}\n\n{table}\n\nAll report files: `{report}`", plots


# ----------------------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------------------


def _gradio_error(error: Exception) -> Exception:
    """The message of a refused input as a Gradio error (shown in the page, no traceback)."""
    import gradio as gr

    return gr.Error(str(error), title="Cannot do that")


#: Errors of the user's input (and missing files) shown as messages; anything else is a bug and propagates.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def build_app(world: World, max_queue: int = DEFAULT_MAX_QUEUE, root: str | os.PathLike[str] | None = None) -> Any:
    """The Gradio ``Blocks`` of the app over ``world``, queued with at most ``max_queue`` waiting requests.

    Each browser session's files go to a folder of its own in ``root`` (default: a new :func:`app_folder`); a session's
    folder is removed when the session ends, and ``root`` when the process exits.
    """
    import gradio as gr

    root = app_folder() if root is None else root

    p = world.preset
    with gr.Blocks(title="KLDB boundary explorer", analytics_enabled=False) as demo:
        session = gr.State(None, delete_callback=remove_session_dir)
        gr.Markdown(
            "# KLDB boundary explorer\n"
            f"Images on the decision boundary of a classifier's classes, by KLDB-guided latent diffusion. World: "
            f"**{world.description}** ({len(world.labels)} classes)."
        )
        with gr.Tab("Explore"):
            with gr.Row():
                with gr.Column(scale=1):
                    classes = gr.Dropdown(
                        choices=world.labels,
                        value=world.default_classes,
                        multiselect=True,
                        label="Classes (type to search)",
                        elem_id="classes",
                    )
                    prompt = gr.Textbox(
                        value=prompt_for(world, world.default_classes), label="Prompt (from the class names)",
                        elem_id="prompt",
                    )  # fmt: skip
                    with gr.Row():
                        alpha = gr.Number(value=p.alpha, label="alpha (KLDB guidance)", minimum=0)
                        beta = gr.Number(value=p.beta, label="beta (classifier-free guidance)", minimum=0)
                    with gr.Row():
                        steps = gr.Number(value=p.num_inference_steps, label="steps", precision=0, minimum=1,
                                          elem_id="steps")  # fmt: skip
                        interval = gr.Number(value=p.kldb_guidance_interval, label="guidance every k steps",
                                             precision=0, minimum=1)  # fmt: skip
                    with gr.Row():
                        seed = gr.Number(value=p.seed, label="first seed", precision=0, minimum=0)
                        num_images = gr.Number(value=4, label="images per row", precision=0, minimum=1,
                                               maximum=MAX_IMAGES, elem_id="num-images")  # fmt: skip
                    step_control = gr.Dropdown(
                        choices=list(STEP_CONTROLS), value=p.kldb_step_control,
                        label="step control (fixed: the paper's step)",
                    )  # fmt: skip
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    prompt_only = gr.Gallery(
                        label="Prompt only (alpha = 0)",
                        columns=4,
                        height="auto",
                        format="png",
                        elem_id="gallery-prompt-only",
                    )
                    guided = gr.Gallery(
                        label="KLDB-guided", columns=4, height="auto", format="png", elem_id="gallery-guided"
                    )
                    medians = gr.Dataframe(headers=MEDIAN_HEADERS, label="Medians", elem_id="medians",
                                           interactive=False)  # fmt: skip
                    summary = gr.Markdown(elem_id="summary")
                    download = gr.DownloadButton("Download images and records (zip)", interactive=False,
                                                 elem_id="download")  # fmt: skip

            classes.change(lambda names: prompt_for(world, names), inputs=classes, outputs=prompt, queue=False)

            def on_generate(names, text, a, b, k, t, s, n, control, session_dir, progress=gr.Progress()):  # noqa: B008
                folder = session_dir or new_session_dir(root)
                try:
                    result = generate(
                        world, names, text, a, b, k, t, s, n, control, session=folder,
                        progress=lambda done, total, row: progress((done, total), desc=row.replace("_", "-"), unit="steps"),
                    )  # fmt: skip
                except USER_ERRORS as error:
                    if not session_dir:  # the session keeps no folder yet: drop the one made for this call
                        remove_session_dir(folder)
                    raise _gradio_error(error) from None
                return (
                    result.galleries["prompt_only"],
                    result.galleries["guided"],
                    result.medians,
                    "  \n".join(line.strip() for line in result.summary.splitlines()),
                    gr.DownloadButton(value=str(result.zip_path), interactive=True),
                    folder,
                )

            run.click(
                on_generate,
                inputs=[classes, prompt, alpha, beta, interval, steps, seed, num_images, step_control, session],
                outputs=[prompt_only, guided, medians, summary, download, session],
                concurrency_id="pipeline",
                concurrency_limit=1,
            )

        if has_image_mode():
            with gr.Tab("From an image"):
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.Image(type="pil", label="Image", height=256, elem_id="edit-image")
                        edit_classes = gr.Dropdown(choices=world.labels, value=world.default_classes,
                                                   multiselect=True, label="Classes")  # fmt: skip
                        strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="strength (how much is redrawn)")
                        edit_alpha = gr.Number(value=p.alpha, label="alpha", minimum=0)
                        edit_seed = gr.Number(value=0, label="seed", precision=0, minimum=0)
                        edit_run = gr.Button("Push to the boundary", variant="primary", elem_id="edit")
                    with gr.Column(scale=2), gr.Row():
                        before = gr.Image(label="Before", interactive=False, height=256, elem_id="edit-before")
                        after = gr.Image(label="After", interactive=False, height=256, elem_id="edit-after")
                edit_scores = gr.Markdown(elem_id="edit-scores")

                def on_edit(image, names, s, a, sd, progress=gr.Progress()):  # noqa: B008
                    try:
                        start, edited, scores = edit_image(
                            world, image, names, s, a, seed=sd,
                            progress=lambda done, total, _: progress((done, total), desc="edit", unit="steps"),
                        )  # fmt: skip
                    except USER_ERRORS as error:
                        raise _gradio_error(error) from None
                    text = (
                        f"Before: {scores['before']}  \nAfter: {scores['after']}  \n"
                        f"Pixel distance (L2): {scores['pixel_l2']:.3f}"
                    )
                    return start, edited, text

                edit_run.click(
                    on_edit,
                    inputs=[upload, edit_classes, strength, edit_alpha, edit_seed],
                    outputs=[before, after, edit_scores],
                    concurrency_id="pipeline",
                    concurrency_limit=1,
                )

        with gr.Tab("Audit"):
            job = gr.State(None)
            gr.Markdown(
                "A small sweep over an alpha x beta grid for the classes picked, in the background: its progress, then "
                "Table 1 (prompt-only against the best alpha per beta) and its plots. Larger sweeps: `kldb sweep`."
            )
            with gr.Row():
                with gr.Column(scale=1):
                    sweep_classes = gr.Dropdown(choices=world.labels, value=world.default_classes, multiselect=True,
                                                label="Classes", elem_id="sweep-classes")  # fmt: skip
                    alphas = gr.Textbox(value="0, 0.1, 0.2", label="alphas", elem_id="alphas")
                    betas = gr.Textbox(value=f"{p.beta:g}", label="betas", elem_id="betas")
                    sweep_seeds = gr.Number(
                        value=4, label="seeds per setting", precision=0, minimum=1, elem_id="sweep-seeds"
                    )
                    sweep_steps = gr.Number(
                        value=p.num_inference_steps, label="steps", precision=0, minimum=1, elem_id="sweep-steps"
                    )
                    start = gr.Button("Start sweep", variant="primary", elem_id="start-sweep")
                    run_dir = gr.Textbox(label="Run folder", placeholder="a folder written by kldb sweep",
                                         elem_id="run-dir")  # fmt: skip
                    reopen = gr.Button("Open run folder", elem_id="open-run")
                with gr.Column(scale=2):
                    status = gr.Markdown("No sweep started in this session.", elem_id="sweep-status")
                    table = gr.Markdown(elem_id="table1")
                    plots = gr.Gallery(label="Report plots", columns=3, object_fit="contain", elem_id="report-plots")
            timer = gr.Timer(2.0, active=False)

            def on_start(names, a, b, n, t, session_dir):
                folder = session_dir or new_session_dir(root)
                try:
                    started = start_sweep(world, names, a, b, n, t, session=folder)
                except USER_ERRORS as error:
                    if not session_dir:
                        remove_session_dir(folder)
                    raise _gradio_error(error) from None
                line, _ = sweep_status(started)
                return started, line, str(started.run_dir), gr.Timer(active=True), folder

            def on_tick(current):
                line, over = sweep_status(current)
                if not over:
                    return line, gr.skip(), gr.skip(), gr.Timer(active=True)
                if current is not None and current.error is None:
                    text, images = open_run(str(current.run_dir))
                    return line, text, images, gr.Timer(active=False)
                return line, gr.skip(), gr.skip(), gr.Timer(active=False)

            def on_open(folder_text):
                try:
                    text, images = open_run(folder_text)
                except USER_ERRORS as error:
                    raise _gradio_error(error) from None
                return text, images

            start.click(
                on_start,
                inputs=[sweep_classes, alphas, betas, sweep_seeds, sweep_steps, session],
                outputs=[job, status, run_dir, timer, session],
            )
            timer.tick(on_tick, inputs=job, outputs=[status, table, plots, timer])
            reopen.click(on_open, inputs=run_dir, outputs=[table, plots])
    return demo.queue(max_size=max_queue)


# ----------------------------------------------------------------------------------------------------------------------
# Command line (also mounted as `kldb app`)
# ----------------------------------------------------------------------------------------------------------------------


#: Small images drawn with sharp pixels (a 32 x 32 digit is shown much larger than it is); captions wrap instead of
#: being cut; the galleries take the height of their images.
CSS = (
    "#gallery-prompt-only img, #gallery-guided img { image-rendering: pixelated; }\n"
    ":is(#edit-image, #edit-before, #edit-after) img { width: 100%; height: 100%; object-fit: contain;"
    " image-rendering: pixelated; }\n"
    ":is(#gallery-prompt-only, #gallery-guided) .thumbnail-item { aspect-ratio: auto; height: auto; }\n"
    ":is(#gallery-prompt-only, #gallery-guided) .thumbnail-lg > img { aspect-ratio: 1 / 1; height: auto; }\n"
    ":is(#gallery-prompt-only, #gallery-guided) .caption-label { position: static; white-space: normal; max-width: 100%;"
    " border: none; }\n"
    ":is(#gallery-prompt-only, #gallery-guided) .fixed-height { min-height: 0; }"
)


def launch(demo: Any, host: str | None = DEFAULT_HOST, port: int | None = DEFAULT_PORT, **kwargs: Any) -> Any:
    """Serve ``demo`` (from :func:`build_app`); ``host``/``port`` ``None`` leave them to Gradio (``GRADIO_SERVER_NAME``
    and ``GRADIO_SERVER_PORT``, as a Hugging Face Space sets them; else 127.0.0.1:7860)."""
    kwargs = {"ssr_mode": False, "show_error": False, "css": CSS, **kwargs}
    return demo.launch(server_name=host, server_port=port, **kwargs)


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kldb app`` and ``python -m kldb.app``."""
    parser.add_argument(
        "--pipeline",
        default="digits",
        help="pipeline spec as for `kldb generate`: 'digits' (the bundled world, default), 'package.module:function', "
        "a folder or a Hub id",
    )
    parser.add_argument(
        "--classifier", default=None, help="classifier spec as for `kldb generate` (default: the pipeline's own)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", *DTYPES), help="weights dtype (default: auto: float16 on a GPU)"
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to serve on (default: {DEFAULT_HOST}, this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait for the pipeline; more are refused (default: {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random components instead (images are noise)")


def run_app_command(args: argparse.Namespace) -> int:
    """Load the world and serve the app until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no usage reports
    from kldb.cli import check_device, check_local_path_spec

    check_device(args.device)
    check_local_path_spec(args.pipeline, "--pipeline")
    check_local_path_spec(args.classifier, "--classifier")
    if args.max_queue < 1:
        raise KLDBInputError(f"Expected argument `--max-queue` to be a positive integer but got {args.max_queue}.")
    if not 0 < args.port < 65536:
        raise KLDBInputError(f"Expected argument `--port` to be a port number in [1, 65535] but got {args.port}.")
    world = load_world(args.pipeline, args.classifier, device=args.device, dtype=args.dtype, tiny=args.tiny)
    root = app_folder()
    remove_on_interrupt(root)
    demo = build_app(world, max_queue=args.max_queue, root=root)
    print(f"Serving the KLDB app on {world.description} at http://{args.host}:{args.port} (Ctrl+C stops it).")
    print(f"Session files under {root} (removed on exit).")
    launch(demo, args.host, args.port, quiet=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kldb.app", description=__doc__.split("\n\n")[0])
    add_app_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from kldb.errors import run_command

    return run_command("python -m kldb.app", lambda: run_app_command(args))


if __name__ == "__main__":
    raise SystemExit(main())
