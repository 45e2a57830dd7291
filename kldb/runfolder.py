"""The run folder of a sweep: its layout, its typed manifest records, and writing, reading and repairing them.

Layout::

    sweep.json                       the settings that fix how images are made (checked on every resume)
    images/<setting>/seed000028.png  one PNG per (setting, seed), prompt, seed, alpha, beta, KLDB, ... in its metadata
    manifest.rank<N>.jsonl           the lines process N wrote in the current run (one JSON object per image)
    manifest.jsonl                   all lines, merged by the main process at the end of a run
    auto/<setting>.json              for an alpha "auto" setting: its pilot (alpha chosen, grid, seeds, seconds)

A run started from a folder of real images (``init_images``, image-to-image: :mod:`kldb.sweep`) puts each source's
images in a folder of their own, ``images/<setting>/<source>/seed000028.png``, where ``<source>`` is the source's
relative path made file-system safe plus the first 8 hex digits of the SHA-256 of that relative path (so
``a b.png`` and ``a-b.png`` never share a folder). Its setting names end in ``_strength<s>`` and its keys add
(strength, source file); a text-to-image run's names, keys and paths are exactly those of earlier versions.

Each manifest line is one :class:`ImageRecord`. Lines written by older versions, without the fields added since
(``kldb_guidance_decoder``, ``process_index``), still load; fields this version does not know are kept. The fields of
an image-to-image run (:data:`WRITTEN_WHEN_SET`: ``source_file``, ``source_sha256``, ``strength``, ``kldb_start``, ...)
are written only when set, so a text-to-image line is written back byte for byte.

Guarantees:

- A PNG is written atomically (temporary file, fsync, rename) *before* its manifest line; a line is appended with
  one write followed by flush and fsync. So every line names a complete PNG; a killed run leaves at most a PNG
  without a line (made again on resume, the same file) and a trailing partial line (dropped on resume).
- A line whose PNG is missing or has another size than recorded is dropped when the folder is read for a resume.
- A full disk (``ENOSPC``) raises :class:`SweepDiskFullError`; a half-written manifest line is cut off again, so the
  manifest stays consistent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kldb.errors import KLDBInputError, KLDBPathError
from kldb.io import atomic_write_text, load_image

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
CONFIG_NAME = "sweep.json"
IMAGES_DIR = "images"
PART_PATTERN = re.compile(r"^manifest\.rank(\d+)\.jsonl$")
TEMP_PATTERN = re.compile(r"^\..+\.tmp$")

#: The identity of an image in a run: (class indices, alpha, beta, seed); alpha is ``"auto"`` for the images of an
#: ``alphas=["auto"]`` setting, whose alpha a pilot chose per class subset and beta. An image-to-image image (one made
#: from a source file of ``init_images``) adds (strength, source file): ``(classes, alpha, beta, seed, strength,
#: source_file)``.
RecordKey = (
    tuple[tuple[int, ...], float | str, float, int] | tuple[tuple[int, ...], float | str, float, int, float, str]
)
#: The alpha of a setting whose alpha is chosen by a pilot (``kldb_guidance_scale="auto"``) per class subset and beta.
AUTO = "auto"


class SweepDiskFullError(OSError):
    """The disk filled up during a sweep; what was written before is complete and recorded."""


# ----------------------------------------------------------------------------------------------------------------------
# Settings and records
# ----------------------------------------------------------------------------------------------------------------------


def record_key(line: Mapping[str, Any]) -> RecordKey:
    """The identity of a manifest line as read from JSON: (class indices, alpha, beta, seed); alpha is ``"auto"`` for a
    line with ``alpha_mode: "auto"`` (its ``alpha`` is the one the pilot chose). A line with a ``source_file`` (an
    image-to-image run) adds (strength, source file)."""
    key = (
        tuple(int(c) for c in line["class_indices"]),
        AUTO if line.get("alpha_mode") == AUTO else float(line["alpha"]),
        float(line["beta"]),
        int(line["seed"]),
    )
    if line.get("source_file") is not None:
        return (*key, float(line["strength"]), str(line["source_file"]))
    return key


@dataclass(frozen=True)
class Setting:
    """One cell of a sweep's grid: a class subset (indices into the classifier's output and their names), alpha, beta;
    for an image-to-image run also a strength and a source file.

    ``alpha`` is a number, or ``"auto"``: a pilot chooses it for the class subset and beta before the setting's images
    are made (:mod:`kldb.sweep`). ``source`` is the source image's path relative to ``init_images`` (POSIX form);
    ``strength`` and ``source`` are both set or both ``None`` (text-to-image). The :attr:`name` leaves the source out:
    the images of every source at one (classes, alpha, beta, strength) form one setting of the report.
    """

    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    alpha: float | str
    beta: float
    strength: float | None = None
    source: str | None = None

    @property
    def is_auto(self) -> bool:
        """Whether a pilot chooses this setting's alpha."""
        return self.alpha == AUTO

    @property
    def guided(self) -> bool:
        """Whether this setting's images are KLDB-guided (alpha > 0 or ``"auto"``)."""
        return self.is_auto or float(self.alpha) > 0

    @property
    def name(self) -> str:
        """A readable, file-system safe name, e.g. ``three+eight_alpha0.1_beta6.0``."""
        names = "+".join(
            re.sub(r"[^A-Za-z0-9._-]+", "-", n).strip("-") or str(i) for n, i in zip(self.class_names, self.classes)
        )
        alpha = AUTO if self.is_auto else repr(self.alpha)
        name = f"{names}_alpha{alpha}_beta{self.beta!r}"
        return name if self.strength is None else f"{name}_strength{self.strength!r}"

    @property
    def folder(self) -> str:
        """The folder of this cell's images under ``images/``: the name, plus the source's folder (:func:`source_folder`)
        for an image-to-image cell."""
        return self.name if self.source is None else f"{self.name}/{source_folder(self.source)}"

    def key(self, seed: int) -> RecordKey:
        alpha = AUTO if self.is_auto else float(self.alpha)
        key = (tuple(int(c) for c in self.classes), alpha, float(self.beta), int(seed))
        return key if self.source is None else (*key, float(self.strength), self.source)


def source_folder(source: str) -> str:
    """The file-system safe folder of a source image's results: its relative path without the suffix, characters
    other than letters, digits, ``.``, ``_`` and ``-`` as ``-``, then ``-`` and the first 8 hex digits of the SHA-256
    of the relative path (``"cats/a b.png"`` -> ``"cats-a-b-<8 hex>"``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", str(Path(source).with_suffix(""))).strip("-.") or "source"
    return f"{stem}-{hashlib.sha256(source.encode('utf-8')).hexdigest()[:8]}"


def image_relpath(setting: Setting, seed: int) -> str:
    """Where the image of ``setting`` and ``seed`` lies in its run folder."""
    return f"{IMAGES_DIR}/{setting.folder}/seed{seed:06d}.png"


@dataclass(kw_only=True)
class ImageRecord:
    """One manifest line: an image of a run, how it was made, and what the audited classifier said about it.

    The fields are the JSON keys of the line, in their order on disk. ``kldb`` and ``entropy`` are ``None`` when the
    classifier gave a non-finite score; the fields after ``num_classes`` are ``None`` in lines of versions that did
    not write them.
    """

    setting: str
    classes: list[str]  # the names of C
    class_indices: list[int]  # C, as indices into the classifier's output
    alpha: float
    beta: float
    seed: int
    prompt: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    kldb_guidance_interval: int | None = None
    kldb_gradient: str | None = None
    kldb_guidance_decoder: str | None = None  # the decoder the guidance went through; None for alpha = 0
    guidance_rescale: float | None = None
    file: str  # the PNG, relative to the run folder
    kldb: float | None
    entropy: float | None
    class_probabilities: list[float | None]  # p_i for i in C, in the order of class_indices
    top_classes: list[int]  # the most probable classes, at least |C| of them
    top_labels: list[str]
    top_probabilities: list[float | None]
    predicted_class: int
    predicted_label: str
    num_classes: int
    batch_size: int | None = None
    batch_skipped_updates: int | None = None
    process_index: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    alpha_mode: str | None = None  # "auto": a pilot chose ``alpha`` for this class subset and beta; None: fixed
    kldb_step_control: str | None = None  # how each guided step was sized ("fixed", the paper's, or a control)
    accepted_steps: int | None = None  # guided steps this image took
    step_halvings: int | None = None  # step-size halvings of this image (backtracking / trust region)
    rejected_steps: int | None = None  # guided steps the step control refused for this image
    batch_seconds: float | None = None  # wall time of the pipeline call that made this image's batch
    # image-to-image runs (``init_images``): the source image and how far the result moved from it
    source_file: str | None = None  # the source image, relative to init_images (POSIX form)
    source_sha256: str | None = None  # SHA-256 of the source file's bytes
    strength: float | None = None  # share of the k-LMS schedule run from the noised source
    kldb_start: float | None = None  # KLDB of the source image for C
    class_probabilities_start: list[float | None] | None = None  # p_i of the source image for i in C
    predicted_class_start: int | None = None  # the arg-max class of the source image
    predicted_label_start: str | None = None
    pixel_l2: float | None = None  # Euclidean distance to the source over pixel values in [0, 1]
    ssim: float | None = None  # SSIM to the source (torchmetrics; None without it)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    @property
    def key(self) -> RecordKey:
        """(class indices, alpha, beta, seed), plus (strength, source file) for an image-to-image image: the identity
        of the image in its run."""
        return record_key({"class_indices": self.class_indices, "alpha": self.alpha, "beta": self.beta,
                           "seed": self.seed, "alpha_mode": self.alpha_mode, "strength": self.strength,
                           "source_file": self.source_file})  # fmt: skip

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> ImageRecord:
        """The record of one manifest line (a JSON object); raises ``KeyError`` when a required field is missing."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in line]
        if missing:
            raise KeyError(f"manifest line without {missing}")
        return cls(
            **{k: v for k, v in line.items() if k in known}, extra={k: v for k, v in line.items() if k not in known}
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest line: every field in order (``None`` as null; the fields of :data:`WRITTEN_WHEN_SET` only when
        set, so a line of an older version is written back as it was), then the unknown keys it was read with."""
        line = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra" and not (f.name in WRITTEN_WHEN_SET and getattr(self, f.name) is None)
        }
        return {**line, **self.extra}


#: Record fields added with step-size control, ``"auto"`` alphas and image-to-image runs: written only when they have
#: a value.
WRITTEN_WHEN_SET = frozenset(
    (
        "alpha_mode", "kldb_step_control", "accepted_steps", "step_halvings", "rejected_steps", "batch_seconds",
        "source_file", "source_sha256", "strength", "kldb_start", "class_probabilities_start",
        "predicted_class_start", "predicted_label_start", "pixel_l2", "ssim",
    )
)  # fmt: skip


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def iter_settings(records: Iterable[Any]) -> dict[str, list[Any]]:
    """Group records (anything with a ``setting`` attribute) by setting name, in order of first appearance."""
    groups: dict[str, list[Any]] = {}
    for record in records:
        groups.setdefault(record.setting, []).append(record)
    return groups


# ----------------------------------------------------------------------------------------------------------------------
# The manifest: append-only JSONL with flush + fsync; a trailing partial line is dropped on recovery
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_full_disk(path: Path, done: int) -> Iterator[None]:
    """Turn an ``ENOSPC`` error into a :class:`SweepDiskFullError` that says what to do (``done`` images are safe)."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC and not isinstance(error, SweepDiskFullError):
            raise SweepDiskFullError(
                errno.ENOSPC,
                f"No space left on the device while writing {str(path)!r}. The sweep stopped; the {done} images "
                "written in this run before it are complete and recorded in the manifest. Free some space and rerun "
                f"the same command to resume. ({error})",
            ) from error
        raise


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

    def append(self, record: ImageRecord | Mapping[str, Any]) -> None:
        """Append ``record`` (a record, or a JSON object) as one line; on failure, no partial line remains."""
        line = record.to_json() if isinstance(record, ImageRecord) else dict(record)
        data = (json.dumps(line, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")
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
    """The complete lines of a JSONL file as JSON objects; a trailing line without newline (a write cut short) is
    ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    lines = []
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("Skipping unreadable line %d of %s", number, path)
    return lines


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


def _is_intact(out_dir: Path, record: ImageRecord) -> bool:
    try:
        path = out_dir / record.file
        return path.is_file() and path.stat().st_size == int(record.bytes)
    except (TypeError, ValueError):  # no size recorded
        return False


def _records(lines: Iterable[Mapping[str, Any]], source: Path) -> Iterator[ImageRecord]:
    for line in lines:
        try:
            record = ImageRecord.from_json(line)
            record.key  # noqa: B018 - a key that does not parse makes the line unusable
        except (KeyError, TypeError, ValueError):
            logger.warning("Skipping a manifest line without a valid record in %s: %r", source, line)
            continue
        yield record


def load_records(out_dir: str | os.PathLike[str], check_files: bool = True) -> list[ImageRecord]:
    """Every manifest line of a run (merged manifest first, then the parts), one per key, first occurrence kept.

    With ``check_files``, lines whose PNG is missing or whose size differs from the recorded one are dropped
    (with a warning): their images are made again on resume.
    """
    out = Path(out_dir)
    seen: dict[RecordKey, ImageRecord] = {}
    for path in [out / MANIFEST_NAME, *manifest_parts(out)]:
        for record in _records(read_jsonl(path), path):
            if record.key in seen:
                continue
            if check_files and not _is_intact(out, record):
                logger.warning("Dropping the manifest line of %s: its file is missing or incomplete", record.file)
                continue
            seen[record.key] = record
    return list(seen.values())


def read_manifest(run: str | os.PathLike[str]) -> list[ImageRecord]:
    """The records of a run: ``run`` is a run folder or a manifest file."""
    path = Path(run)
    if path.is_dir():
        return load_records(path, check_files=False)
    if not path.is_file():
        raise KLDBPathError(f"Expected argument `run` to be a run folder or a manifest file but got {str(run)!r}.")
    return list(_records(read_jsonl(path), path))


def read_run(run: str | os.PathLike[str]) -> list[ImageRecord]:
    """The records of a finished run to report on (:func:`read_manifest`); a run without any is refused."""
    records = read_manifest(run)
    if not records:
        raise KLDBInputError(f"Expected argument `run` to hold at least one manifest line but {str(run)!r} has none.")
    return records


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


def merge_manifests(out_dir: str | os.PathLike[str], order: Sequence[RecordKey] | None = None) -> Path:
    """Merge the parts and the previous ``manifest.jsonl`` into a new ``manifest.jsonl`` (atomically), drop parts.

    Lines are sorted by ``order`` (a list of keys) where given, else kept in reading order; each key appears once.
    """
    out = Path(out_dir)
    parts = manifest_parts(out)
    records = load_records(out, check_files=True)
    if order is not None:
        rank = {key: i for i, key in enumerate(order)}
        records.sort(key=lambda r: (rank.get(r.key, len(rank)), r.key))
    text = "".join(json.dumps(r.to_json(), allow_nan=False) + "\n" for r in records)
    with stop_on_full_disk(out / MANIFEST_NAME, 0):
        atomic_write_text(out / MANIFEST_NAME, text)
    for part in parts:
        part.unlink(missing_ok=True)
    return out / MANIFEST_NAME


# ----------------------------------------------------------------------------------------------------------------------
# Reading a finished run: its settings, its images, its classifier
# ----------------------------------------------------------------------------------------------------------------------


def run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``sweep.json`` of a run folder: ``fixed`` (the image-fixing settings), ``labels``, ``last_config``."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise KLDBPathError(
            f"Expected argument `run` to be a sweep folder with a {CONFIG_NAME} but got {str(run_dir)!r}."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def run_labels(run_dir: str | os.PathLike[str], records: Sequence[ImageRecord]) -> list[str]:
    """The audited classifier's label names of a run (``"0"``, ``"1"``, ... when the run did not store them)."""
    return run_info(run_dir).get("labels") or [str(i) for i in range(int(records[0].num_classes))]


def load_run_images(run_dir: str | os.PathLike[str], records: Sequence[ImageRecord]) -> torch.Tensor:
    """The images of ``records`` as ``[N, 3, H, W]`` in ``[0, 1]``."""
    out = Path(run_dir)
    return torch.stack([load_image(out / r.file) for r in records])


def run_classifier(run_dir: str | os.PathLike[str]) -> Any:
    """The classifier a run was audited with (its classifier spec, else its pipeline's own classifier)."""
    from kldb.loading import load_classifier, load_pipeline, pipeline_classifier

    fixed = run_info(run_dir)["fixed"]
    if fixed.get("classifier"):
        return load_classifier(fixed["classifier"])
    return pipeline_classifier(load_pipeline(fixed["pipeline"], dtype="float32"))
