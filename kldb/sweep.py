"""A resumable, shardable sweep over class subsets x alpha x beta x seeds: every image on disk as soon as it is made.

Layout of a run folder::

    sweep.json                       the settings that fix how images are made (checked on every resume)
    images/<setting>/seed000028.png  one PNG per (setting, seed), prompt, seed, alpha, beta, KLDB, ... in its metadata
    manifest.rank<N>.jsonl           the lines process N wrote in the current run (one JSON object per image)
    manifest.jsonl                   all lines, merged by the main process at the end of a run

Guarantees:

- A PNG is written atomically (temporary file, fsync, rename) *before* its manifest line; a line is appended with
  one write followed by flush and fsync. So every line names a complete PNG; a killed run leaves at most a PNG
  without a line (made again on resume, the same file) and a trailing partial line (dropped on resume).
- Rerunning the same command resumes: the manifests are read, done (setting, seed) keys are skipped, orphan
  temporary files are deleted. A line whose PNG is missing or has another size than recorded is dropped, and its
  image is made again.
- Under ``accelerate launch`` the pending work is split by :meth:`accelerate.PartialState.split_between_processes`;
  each process appends to its own ``manifest.rank<N>.jsonl``; after ``wait_for_everyone`` the main process merges
  every part into ``manifest.jsonl`` (atomically) and removes the parts. Each (setting, seed) is done exactly once.
- A full disk (``ENOSPC``) stops the run with :class:`SweepDiskFullError`; a half-written manifest line is cut off
  again, so the manifest stays consistent and the run resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kldb.io import atomic_write_json, save_png
from pipeline_kldb_boundary import GRADIENT_MODES, GUIDANCE_DECODERS

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
CONFIG_NAME = "sweep.json"
IMAGES_DIR = "images"
PART_PATTERN = re.compile(r"^manifest\.rank(\d+)\.jsonl$")
TEMP_PATTERN = re.compile(r"^\..+\.tmp$")
TOP_K = 5  # classes recorded per image with their probabilities (at least |C|)
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
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
    "guidance_vae",
    "guidance_rescale",
    "timestep_spacing",
    "use_karras_sigmas",
    "height",
    "width",
    "dtype",
)


class SweepDiskFullError(OSError):
    """The disk filled up during a sweep; what was written before is complete and recorded."""


@dataclass
class SweepConfig:
    """Everything a sweep needs; the grid is ``class_subsets x alphas x betas``, each with every seed.

    Args:
        out_dir: the run folder (created if needed; an existing run in it is resumed).
        pipeline: pipeline spec (see :func:`kldb.loading.load_pipeline`): ``"digits"``, ``"tiny"``, a
            ``module:function``, a folder or a Hub id.
        classifier: classifier spec (see :func:`kldb.loading.load_classifier`), or ``None`` for the pipeline's own.
        class_subsets: the class subsets C to audit, each as label names or indices.
        alphas: KLDB guidance strengths; 0 is the prompt-only baseline.
        betas: classifier-free guidance scales.
        seeds: one image per seed and setting; image ``seed`` of every setting starts from the same noise.
        prompt: the prompt of every image; ``None`` builds the paper's ``"<name> and <name>"`` per class subset.
        negative_prompt: the negative prompt, or ``None``.
        num_inference_steps: k-LMS steps T.
        kldb_guidance_interval: guidance every k steps.
        kldb_gradient: ``"unet"`` (through the noise prediction, as the authors) or ``"detached"``.
        kldb_guidance_decoder: ``"auto"`` (the pipeline's ``guidance_vae`` when it has one, else its VAE), ``"vae"``
            or ``"guidance_vae"``; each record names the decoder used.
        guidance_vae: a small decoder to give the pipeline as its ``guidance_vae`` (see
            :func:`kldb.loading.load_guidance_vae`: e.g. ``"madebyollin/taesd"`` for Stable Diffusion v1); ``None``
            keeps the pipeline's own (the digits world ships one).
        guidance_rescale: Lin et al. (2024) rescale of the classifier-free guidance (the paper: 0.7).
        timestep_spacing: ``None`` keeps the scheduler's; else ``"leading"``, ``"linspace"`` or ``"trailing"``.
        use_karras_sigmas: Karras et al. (2022) noise levels for k-LMS.
        height, width: image size; ``None`` is the model's default.
        batch_size: images per pipeline call (same setting, consecutive seeds).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        device: ``None`` uses the device that ``accelerate`` assigns to this process.
    """

    out_dir: str | os.PathLike[str]
    pipeline: str = "digits"
    classifier: str | None = None
    class_subsets: list[list[str | int]] = field(default_factory=lambda: [["three", "eight"]])
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.1])
    betas: list[float] = field(default_factory=lambda: [6.0])
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    prompt: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int = 40
    kldb_guidance_interval: int = 5
    kldb_gradient: str = "unet"
    kldb_guidance_decoder: str = "auto"
    guidance_vae: str | None = None
    guidance_rescale: float = 0.0
    timestep_spacing: str | None = None
    use_karras_sigmas: bool = False
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    dtype: str = "float32"
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
        raise ValueError(f"Expected argument `{name}` to be {expected} but got {got!r}.")


def check_config(config: SweepConfig) -> None:
    """Check every field of ``config``; raise ``ValueError`` naming the first bad argument and its value."""
    if not isinstance(config.out_dir, (str, os.PathLike)):
        raise TypeError(f"Expected argument `out_dir` to be a path but got {type(config.out_dir).__name__}.")
    out = Path(config.out_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)  # the nearest part that exists
    if blocking is not None and not blocking.is_dir():
        where = "is a file" if blocking == out else f"lies inside the file {str(blocking)!r}"
        raise ValueError(
            f"Expected argument `out_dir` to be a folder (new, or a run to resume) but {str(config.out_dir)!r} {where}."
        )
    for name in ("alphas", "betas"):
        values = getattr(config, name)
        _expect(
            isinstance(values, Sequence)
            and not isinstance(values, str)
            and len(values) > 0
            and all(_is_number(v) and math.isfinite(v) and v >= 0 for v in values)
            and len(set(values)) == len(values),
            name,
            "a non-empty list of distinct finite numbers >= 0",
            values,
        )
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
        config.kldb_guidance_interval <= config.num_inference_steps or max(config.alphas) == 0,
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
    for name in ("height", "width"):
        value = getattr(config, name)
        _expect(
            value is None or (_is_int(value) and value > 0 and value % 8 == 0),
            name,
            "None or a positive multiple of 8",
            value,
        )
    for name in ("prompt", "negative_prompt", "classifier"):
        value = getattr(config, name)
        _expect(value is None or (isinstance(value, str) and value != ""), name, "None or a non-empty string", value)
    _expect(
        isinstance(config.pipeline, str) and config.pipeline != "", "pipeline", "a non-empty string", config.pipeline
    )
    _expect(
        config.dtype in ("float32", "float16", "bfloat16"),
        "dtype",
        "one of ['float32', 'float16', 'bfloat16']",
        config.dtype,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Settings and keys
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One cell of the grid: a class subset (indices into the classifier's output and their names), alpha, beta."""

    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    alpha: float
    beta: float

    @property
    def name(self) -> str:
        """A readable, file-system safe name, e.g. ``three+eight_alpha0.1_beta6.0``."""
        names = "+".join(
            re.sub(r"[^A-Za-z0-9._-]+", "-", n).strip("-") or str(i) for n, i in zip(self.class_names, self.classes)
        )
        return f"{names}_alpha{self.alpha!r}_beta{self.beta!r}"

    def key(self, seed: int) -> tuple[tuple[int, ...], float, float, int]:
        return record_key({"class_indices": self.classes, "alpha": self.alpha, "beta": self.beta, "seed": seed})


def record_key(record: dict[str, Any]) -> tuple[tuple[int, ...], float, float, int]:
    """The identity of a manifest line: (class indices, alpha, beta, seed)."""
    return (
        tuple(int(c) for c in record["class_indices"]),
        float(record["alpha"]),
        float(record["beta"]),
        int(record["seed"]),
    )


def image_relpath(setting: Setting, seed: int) -> str:
    return f"{IMAGES_DIR}/{setting.name}/seed{seed:06d}.png"


def build_settings(config: SweepConfig, labels: Sequence[str]) -> list[Setting]:
    """The grid in a fixed order: class subset, then beta, then alpha."""
    from pipeline_kldb_boundary import resolve_classes

    settings = []
    for subset in config.class_subsets:
        indices = resolve_classes(list(subset), list(labels), len(labels))
        names = tuple(labels[i] for i in indices)
        for beta in config.betas:
            for alpha in config.alphas:
                settings.append(Setting(tuple(indices), names, float(alpha), float(beta)))
    folders = [s.name for s in settings]
    if len(set(folders)) != len(folders):
        raise ValueError(
            "Expected argument `class_subsets` to hold distinct class subsets (with distinct file-system names) but "
            f"got {config.class_subsets!r}."
        )
    return settings


# ----------------------------------------------------------------------------------------------------------------------
# The manifest: append-only JSONL with flush + fsync; a trailing partial line is dropped on recovery
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_on_full_disk(path: Path, done: int) -> Iterator[None]:
    """Turn an ``ENOSPC`` error into a :class:`SweepDiskFullError` that says what to do."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC and not isinstance(error, SweepDiskFullError):
            raise _disk_full(path, error, done) from error
        raise


def _disk_full(path: Path, error: OSError, done: int) -> SweepDiskFullError:
    return SweepDiskFullError(
        errno.ENOSPC,
        f"No space left on the device while writing {str(path)!r}. The sweep stopped; the {done} images written "
        f"in this run before it are complete and recorded in the manifest. Free some space and rerun the same command "
        f"to resume. ({error})",
    )


class ManifestWriter:
    """Appends one JSON line per image to a JSONL file: an unbuffered write of the whole line, then fsync.

    If the write fails part-way (e.g. ``ENOSPC``, or an interrupt), a partial line is cut off again, so that the file
    only ever holds complete lines; a line that was written completely is kept.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered: no bytes of a failed line can linger in a buffer and be flushed later
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the run, closed in close()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written:]
        os.fsync(self._file.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line; on failure, no partial line remains."""
        data = (json.dumps(record, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")
        position = os.fstat(self._file.fileno()).st_size
        try:
            self._write(data)
        except BaseException:
            try:
                if os.fstat(self._file.fileno()).st_size != position + len(data):
                    os.ftruncate(self._file.fileno(), position)
                    os.fsync(self._file.fileno())
            except OSError:  # a partial line that could not be cut off is dropped on recovery
                logger.exception("Could not cut a partial line off %s", self.path)
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file; a trailing line without newline (a write cut short) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("Skipping unreadable line %d of %s", number, path)
    return records


def drop_partial_line(path: str | os.PathLike[str]) -> int:
    """Cut a trailing line without newline off ``path``; return how many bytes were removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    logger.warning("Dropped a partial last line (%d bytes) from %s", len(data) - keep, path)
    return len(data) - keep


def manifest_parts(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The per-process manifest parts in a run folder, by rank."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    parts = [p for p in out.iterdir() if PART_PATTERN.match(p.name)]
    return sorted(parts, key=lambda p: int(PART_PATTERN.match(p.name).group(1)))


def _record_is_intact(out_dir: Path, record: dict[str, Any]) -> bool:
    try:
        path = out_dir / record["file"]
        return path.is_file() and path.stat().st_size == int(record["bytes"])
    except (KeyError, TypeError, ValueError):
        return False


def load_records(out_dir: str | os.PathLike[str], check_files: bool = True) -> list[dict[str, Any]]:
    """Every manifest line of a run (merged manifest first, then the parts), one per key, first occurrence kept.

    With ``check_files``, lines whose PNG is missing or whose size differs from the recorded one are dropped
    (with a warning): their images are made again on resume.
    """
    out = Path(out_dir)
    seen: dict[tuple, dict[str, Any]] = {}
    for path in [out / MANIFEST_NAME, *manifest_parts(out)]:
        for record in read_jsonl(path):
            try:
                key = record_key(record)
            except (KeyError, TypeError, ValueError):
                logger.warning("Skipping a manifest line without a valid key in %s: %r", path, record)
                continue
            if key in seen:
                continue
            if check_files and not _record_is_intact(out, record):
                logger.warning(
                    "Dropping the manifest line of %s: its file is missing or incomplete", record.get("file")
                )
                continue
            seen[key] = record
    return list(seen.values())


def read_manifest(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run: ``run`` is a run folder or a manifest file."""
    path = Path(run)
    if path.is_dir():
        return load_records(path, check_files=False)
    if not path.is_file():
        raise FileNotFoundError(f"Expected argument `run` to be a run folder or a manifest file but got {str(run)!r}.")
    return read_jsonl(path)


def recover(out_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Make a run folder consistent after a crash: drop partial manifest lines, delete orphan temporary files."""
    out = Path(out_dir)
    dropped = sum(1 for p in [out / MANIFEST_NAME, *manifest_parts(out)] if drop_partial_line(p))
    removed = 0
    if out.is_dir():
        for path in out.rglob(".*.tmp"):
            if TEMP_PATTERN.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        logger.info("Deleted %d orphan temporary files in %s", removed, out)
    return {"partial_lines_dropped": dropped, "temporary_files_deleted": removed}


def merge_manifests(out_dir: str | os.PathLike[str], order: Sequence[tuple] | None = None) -> Path:
    """Merge the parts and the previous ``manifest.jsonl`` into a new ``manifest.jsonl`` (atomically), drop parts.

    Lines are sorted by ``order`` (a list of keys) where given, else kept in reading order; each key appears once.
    """
    from kldb.io import atomic_write_text

    out = Path(out_dir)
    parts = manifest_parts(out)
    records = load_records(out, check_files=True)
    if order is not None:
        rank = {key: i for i, key in enumerate(order)}
        records.sort(key=lambda r: (rank.get(record_key(r), len(rank)), record_key(r)))
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    with _stop_on_full_disk(out / MANIFEST_NAME, 0):
        atomic_write_text(out / MANIFEST_NAME, text)
    for part in parts:
        part.unlink(missing_ok=True)
    return out / MANIFEST_NAME


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


def check_resume(out_dir: Path, config: SweepConfig) -> None:
    """Refuse to resume a run folder that was started with settings that change the images."""
    path = out_dir / CONFIG_NAME
    if not path.is_file():
        return
    stored = json.loads(path.read_text(encoding="utf-8")).get("fixed", {})
    current = config.fixed()
    for name in FIXED_FIELDS:
        if name in stored and stored[name] != current[name]:
            raise ValueError(
                f"Expected argument `{name}` to be {stored[name]!r}, as in the run being resumed in {str(out_dir)!r}, "
                f"but got {current[name]!r}. Use another output folder for different settings."
            )


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


def _generate_batch(
    pipe: Any, classifier: Any, config: SweepConfig, setting: Setting, seeds: list[int], device: torch.device | str
) -> Any:
    prompt = config.prompt if config.prompt is not None else " and ".join(setting.class_names)
    generator_device = "cpu" if str(device).startswith("mps") else device
    return pipe(
        prompt=prompt,
        negative_prompt=config.negative_prompt,
        classes=list(setting.classes),
        classifier=classifier,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator(device=generator_device).manual_seed(s) for s in seeds],
        num_inference_steps=config.num_inference_steps,
        guidance_scale=setting.beta,
        guidance_rescale=config.guidance_rescale,
        kldb_guidance_scale=setting.alpha,
        kldb_guidance_interval=config.kldb_guidance_interval,
        kldb_gradient=config.kldb_gradient,
        kldb_guidance_decoder=config.kldb_guidance_decoder,
        height=config.height,
        width=config.width,
        output_type="pil",
    )


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
        ValueError: for bad settings, or a run folder started with other image-fixing settings.
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
    check_resume(out, config)

    # 1. The main process repairs the folder (partial lines, temporary files) before anyone reads it
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        recover(out)
    state.wait_for_everyone()

    # 2. Everyone reads what is done, then the pending work is split between the processes
    pipe, classifier, labels = _prepare_pipeline(config, device)
    pipe.set_progress_bar_config(
        disable=True
    )  # the sweep's own bar counts images; per-call step bars would clutter it
    decoder = pipe.resolve_guidance_decoder(config.kldb_guidance_decoder)  # named in every record
    settings = build_settings(config, labels)
    if state.is_main_process:
        with _stop_on_full_disk(out / CONFIG_NAME, 0):
            atomic_write_json(
                out / CONFIG_NAME,
                {"fixed": config.fixed(), "labels": list(labels), "last_config": _config_dict(config)},
            )
    done = {record_key(r) for r in load_records(out)}
    state.wait_for_everyone()  # nobody writes before everyone has read
    order = [s.key(seed) for s in settings for seed in config.seeds]
    pending = [(s, seed) for s in settings for seed in config.seeds if s.key(seed) not in done]
    already = len(order) - len(pending)
    if state.is_main_process:
        logger.info(
            "Sweep in %s: %d settings x %d seeds, %d already done, %d to make on %d process(es).",
            out, len(settings), len(config.seeds), already, len(pending), state.num_processes,
        )  # fmt: skip
    with state.split_between_processes(pending) as mine:
        mine = list(mine)

    # 3. Make the images: each PNG atomically, then its manifest line
    generated = skipped = 0
    part = out / f"manifest.rank{state.process_index}.jsonl"
    bar = tqdm(total=len(mine), desc="sweep", unit="img", disable=not (progress and state.is_main_process))
    try:
        with ManifestWriter(part) as writer:
            for setting, seeds in _batches(mine, config.batch_size):
                output = _generate_batch(pipe, classifier, config, setting, seeds, device)
                skipped += output.skipped_updates
                for i, seed in enumerate(seeds):
                    record = _record(config, setting, seed, output, i, labels, len(seeds), decoder)
                    record["process_index"] = state.process_index
                    path = out / record["file"]
                    with _stop_on_full_disk(path, generated):
                        save_png(path, output.images[i], _png_metadata(record))
                    data = path.read_bytes()
                    record["bytes"] = len(data)
                    record["sha256"] = hashlib.sha256(data).hexdigest()
                    with _stop_on_full_disk(part, generated):
                        writer.append(record)
                    generated += 1
                    bar.update(1)
    finally:
        bar.close()

    # 4. The main process merges every part into manifest.jsonl
    state.wait_for_everyone()
    if state.is_main_process:
        merge_manifests(out, order)
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
) -> dict[str, Any]:
    probabilities = output.probabilities[i].double()  # (n,)
    top = probabilities.topk(min(len(probabilities), max(TOP_K, len(setting.classes))))
    predicted = int(output.predicted_class[i])
    prompt = config.prompt if config.prompt is not None else " and ".join(setting.class_names)
    return {
        "setting": setting.name,
        "classes": list(setting.class_names),
        "class_indices": list(setting.classes),
        "alpha": setting.alpha,
        "beta": setting.beta,
        "seed": seed,
        "prompt": prompt,
        "negative_prompt": config.negative_prompt,
        "num_inference_steps": config.num_inference_steps,
        "kldb_guidance_interval": config.kldb_guidance_interval,
        "kldb_gradient": config.kldb_gradient,
        "kldb_guidance_decoder": decoder if setting.alpha > 0 else None,
        "guidance_rescale": config.guidance_rescale,
        "file": image_relpath(setting, seed),
        "kldb": _finite_or_none(float(output.kldb[i]), "KLDB", setting, seed),
        "entropy": _finite_or_none(float(output.entropy[i]), "entropy", setting, seed),
        "class_probabilities": [_round(probabilities[c]) for c in setting.classes],
        "top_classes": [int(c) for c in top.indices],
        "top_labels": [labels[int(c)] for c in top.indices],
        "top_probabilities": [_round(p) for p in top.values],
        "predicted_class": predicted,
        "predicted_label": labels[predicted],
        "num_classes": len(labels),
        "batch_size": batch,
        "batch_skipped_updates": int(output.skipped_updates),
    }


def _round(probability: torch.Tensor) -> float | None:
    value = float(probability)
    return round(value, 8) if math.isfinite(value) else None


def _finite_or_none(value: float, name: str, setting: Setting, seed: int) -> float | None:
    """``value``, or ``None`` (JSON has no NaN) with a warning when the classifier gave a non-finite score."""
    if math.isfinite(value):
        return value
    logger.warning("Non-finite %s (%s) for %s, seed %d: recorded as null.", name, value, setting.name, seed)
    return None


def _png_metadata(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("prompt", "negative_prompt", "seed", "alpha", "beta", "classes", "class_indices", "kldb", "entropy")
    metadata = {k: record[k] for k in keys if record.get(k) is not None}
    metadata["class_probabilities"] = record["class_probabilities"]
    metadata["top_labels"] = record["top_labels"]
    metadata["top_probabilities"] = record["top_probabilities"]
    metadata["predicted_label"] = record["predicted_label"]
    metadata["setting"] = record["setting"]
    return metadata


def iter_settings(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group manifest records by setting name, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["setting"], []).append(record)
    return groups
