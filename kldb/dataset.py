"""A run folder as a Hugging Face dataset: ``metadata.jsonl`` for the ``imagefolder`` loader, a dataset card, publishing.

A run folder (:mod:`kldb.runfolder`) holds one PNG per image under ``images/`` and one manifest record per image.
:func:`write_imagefolder_metadata` adds ``metadata.jsonl`` at the run's root: one line per image, its ``file_name``
(the PNG, relative to the run root) followed by the image's record. The folder then loads with the ``datasets``
library as it is, one row per image with its KLDB, probabilities, seed and settings::

    from datasets import load_dataset

    ds = load_dataset("imagefolder", data_dir="runs/digits", split="train")
    ds[0]["image"], ds[0]["kldb"], ds[0]["seed"], ds[0]["alpha"]

How ``datasets`` (5.x) reads the folder, and why the layout is what it is:

- With a metadata file the rows are the metadata's lines, so other images in the folder (the report's plots under
  ``report/``) are not rows, and ``manifest.jsonl`` is not read (only ``metadata.jsonl`` is a metadata file name).
- The loader fixes each column's type from the first ~10 MB of ``metadata.jsonl``. A column that is null there
  (``alpha_mode`` of the fixed-alpha settings, ``kldb_guidance_decoder`` of prompt-only images) could not hold a
  value later, so the first lines are images that give every column a value where any image has one; the other
  lines follow in the manifest's order.
- ``data_dir`` alone makes the loader look for split names in file and folder names: a setting folder whose class
  name ends in a separate word ``train``, ``test``, ``val``, ``dev``, ``eval``, ... (ImageNet's "bullet train") would
  turn into a split without the metadata. :func:`write_imagefolder_metadata` warns when ``datasets`` would do that;
  ``load_dataset("imagefolder", data_dir=run, data_files="metadata.jsonl")`` or ``load_dataset(run)`` (after
  :func:`publish_run` wrote the card, whose ``configs`` name the files) load such a run too.

:func:`publish_run` writes the dataset card (``README.md``: what was audited, the settings, Table 1 and the boundary
map when the report has them, how to reproduce the run and how to load it) and uploads the run folder as a dataset
repo through ``huggingface_hub``, after :mod:`kldb.hub`'s security scan. Loading needs ``datasets``
(``pip install "kldb-boundary[datasets]"``); publishing needs only ``huggingface_hub``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from kldb.errors import KLDBInputError, KLDBInputTypeError, KLDBPathError
from kldb.hub import (
    DEFAULT_LICENSE,
    SD_V1_LICENSE,
    SD_V1_REPO_PATTERN,
    PublishResult,
    _check_license,
    _check_repo_id,
    check_folder_is_safe,
    detect_base_model,
    list_files,
)
from kldb.io import atomic_write_text
from kldb.runfolder import CONFIG_NAME, IMAGES_DIR, MANIFEST_NAME, ImageRecord, manifest_parts, read_run, run_info

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_MARKER",
    "CARD_NAME",
    "DATA_FILES",
    "METADATA_NAME",
    "dataset_card",
    "metadata_rows",
    "publish_run",
    "split_name_paths",
    "sweep_command",
    "write_imagefolder_metadata",
]

#: The ``imagefolder`` metadata file at the run's root.
METADATA_NAME = "metadata.jsonl"
#: The dataset card, at the run's root (``datasets`` never reads it as data).
CARD_NAME = "README.md"
#: The first line of the card's body: a ``README.md`` without it was not written by kldb and is kept as it is.
CARD_MARKER = "<!-- kldb:dataset-card -->"
#: The files of the dataset (the card's ``configs``): the metadata and the images, nothing else of the run folder.
DATA_FILES = (METADATA_NAME, f"{IMAGES_DIR}/**/*.png")
#: Record fields that are floats (a manifest written by hand or an older version may hold ints there).
_FLOAT_FIELDS = ("alpha", "beta", "guidance_rescale", "kldb", "entropy", "batch_seconds")
_FLOAT_LIST_FIELDS = ("class_probabilities", "top_probabilities")
#: Hub ``size_categories`` by number of images.
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


# ----------------------------------------------------------------------------------------------------------------------
# metadata.jsonl
# ----------------------------------------------------------------------------------------------------------------------


def _check_run_dir(run_dir: Any) -> Path:
    """The run folder as a ``Path``; refuse anything that is not a run folder, naming ``run_dir``."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise KLDBInputTypeError(f"Expected argument `run_dir` to be a path but got {type(run_dir).__name__}.")
    run = Path(run_dir)
    if not run.is_dir():
        raise KLDBPathError(f"Expected argument `run_dir` to be an existing run folder but got {str(run_dir)!r}.")
    if not (run / CONFIG_NAME).is_file() or not ((run / MANIFEST_NAME).is_file() or manifest_parts(run)):
        raise KLDBPathError(
            f"Expected argument `run_dir` to be a run folder written by `kldb sweep` (with {CONFIG_NAME} and "
            f"{MANIFEST_NAME}) but {str(run_dir)!r} is not one."
        )
    return run


def _read_records(run: Path) -> list[ImageRecord]:
    try:
        return read_run(run)
    except KLDBInputError:
        raise KLDBInputError(
            f"Expected argument `run_dir` to hold at least one image record but {str(run)!r} has none."
        ) from None


def _safe_relative(file: str) -> bool:
    """Whether a record's ``file`` is a relative path inside the run (``datasets`` refuses any other)."""
    path = PurePosixPath(file)
    return bool(file) and "\\" not in file and "://" not in file and not path.is_absolute() and ".." not in path.parts


def _row(record: ImageRecord) -> dict[str, Any]:
    """``file_name``, then the record's fields (unknown keys included) in manifest order, floats as floats."""
    line = record.to_json()
    row = {"file_name": line.pop("file"), **line}
    for name in _FLOAT_FIELDS:
        if isinstance(row.get(name), int) and not isinstance(row[name], bool):
            row[name] = float(row[name])
    for name in _FLOAT_LIST_FIELDS:
        if isinstance(row.get(name), list):
            row[name] = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in row[name]]
    return row


def _has_type(value: Any) -> bool:
    """Whether ``value`` shows its column's type to a JSON reader: not null, a list with such an element, a dict whose
    values all are."""
    if value is None:
        return False
    if isinstance(value, list):
        return any(_has_type(v) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(_has_type(v) for v in value.values())
    return True


def _typed_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with, first, for each column, the first row that gives it a type (if any does); the rest in order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    front: list[int] = []
    for column in columns:
        if any(_has_type(rows[i].get(column)) for i in front):
            continue
        first = next((i for i, row in enumerate(rows) if _has_type(row.get(column))), None)
        if first is not None:
            front.append(first)
    chosen = set(front)
    return [rows[i] for i in front] + [row for i, row in enumerate(rows) if i not in chosen]


def metadata_rows(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a run's ``metadata.jsonl``: one per record whose PNG exists, ``file_name`` first.

    Records whose file is missing, or whose path is not a relative path inside the run, are left out with a warning:
    the loader could not read them. The order is the manifest's, except that the first lines give every column a
    type (module docstring).
    """
    run = _check_run_dir(run_dir)
    rows = []
    for record in _read_records(run):
        if not _safe_relative(record.file) or not (run / record.file).is_file():
            logger.warning("Leaving %s out of %s: no such image in %s.", record.file, METADATA_NAME, run)
            continue
        rows.append(_row(record))
    if not rows:
        raise KLDBInputError(
            f"Expected argument `run_dir` to hold at least one image file named by its manifest but {str(run)!r} has "
            "none."
        )
    return _typed_first(rows)


#: What ``datasets`` (5.x, ``datasets.data_files``) reads as split names in the folder and file names under a
#: ``data_dir`` given alone: the words of its ``SPLIT_KEYWORDS`` set off by its ``NON_WORDS_CHARS`` (a folder named
#: ``test``, ``..._test``, ``test-...``; a file named ``test_...``, ``..._test_...``), and the file names of its other
#: default patterns (``*.eval``, ``task.toml``, ``instruction.md``). Matched here name by name, which is fast; its own
#: ``get_data_patterns`` globs the folder once per pattern (45 s for 10,000 empty files, measured on a shared, busy
#: machine).
_SPLIT_WORDS = "train|training|validation|valid|dev|val|test|testing|eval|evaluation"
_SPLIT_IN_FOLDER_NAME = re.compile(rf"(?:.*[-._ 0-9])?(?:{_SPLIT_WORDS})(?:[-._ 0-9].*)?")
_SPLIT_IN_FILE_NAME = re.compile(rf"(?:.*[-._ 0-9])?(?:{_SPLIT_WORDS})[-._ 0-9].*|.*\.eval|task\.toml|instruction\.md")


def split_name_paths(run_dir: str | os.PathLike[str]) -> list[str]:
    """The folders and files of a run whose names ``datasets`` takes for split names.

    With any of them, ``load_dataset("imagefolder", data_dir=run_dir)`` makes splits of those files and leaves the
    metadata out (a class named "bullet train" gives the folder ``images/three+bullet-train_alpha0.1_beta6.0``);
    ``data_files="metadata.jsonl"`` loads such a run as it should. Hidden files and folders, and folders starting
    with ``__``, are skipped, as ``datasets`` skips them.

    Returns:
        Their paths relative to the run, folders with a trailing ``/``, sorted.
    """
    run = _check_run_dir(run_dir)
    found = []
    for folder, folders, files in os.walk(run):
        folders[:] = [name for name in folders if not name.startswith((".", "__"))]  # not walked into
        relative = Path(folder).relative_to(run)
        for name in folders:
            if _SPLIT_IN_FOLDER_NAME.fullmatch(name) and any(f for _, _, f in os.walk(Path(folder) / name)):
                found.append(f"{(relative / name).as_posix()}/")
        found += [(relative / name).as_posix() for name in files
                  if not name.startswith(".") and _SPLIT_IN_FILE_NAME.fullmatch(name)]  # fmt: skip
    return sorted(found)


def write_imagefolder_metadata(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``metadata.jsonl`` at the root of a run folder, so that it loads as an ``imagefolder`` dataset.

    One JSON line per image (:func:`metadata_rows`): ``file_name`` (the PNG, relative to the run root), then its
    manifest record (``setting``, ``classes``, ``class_indices``, ``alpha``, ``beta``, ``seed``, ``prompt``, ...,
    ``kldb``, ``entropy``, ``class_probabilities``, ``top_classes``, ``top_labels``, ``top_probabilities``, ...).
    ``datasets.load_dataset("imagefolder", data_dir=run_dir)`` then gives one row per image: an ``image`` column
    and these fields (lists as lists).

    The file is made from the manifest every time (:func:`kldb.runfolder.read_run`) and written atomically, so a rerun
    after more images were made brings it up to date, and a rerun with nothing new leaves it as it is.

    Args:
        run_dir: a run folder written by ``kldb sweep`` / :func:`kldb.sweep.run_sweep`.

    Returns:
        The path of ``metadata.jsonl``.

    Raises:
        KLDBPathError: ``run_dir`` is not a run folder.
        KLDBInputError: it holds no image record.
    """
    run = _check_run_dir(run_dir)
    rows = metadata_rows(run)
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    path = run / METADATA_NAME
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    splits = split_name_paths(run)
    if splits:
        logger.warning(
            "`datasets.load_dataset('imagefolder', data_dir=%r)` would take split names from %s and leave the metadata "
            "out; load the run with `data_files=%r` as well.",
            str(run),
            ", ".join(splits),
            METADATA_NAME,
        )
    return path


# ----------------------------------------------------------------------------------------------------------------------
# The reproducing command
# ----------------------------------------------------------------------------------------------------------------------


def _token(value: Any) -> str:
    return shlex.quote(value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value))


def sweep_command(run_dir: str | os.PathLike[str], out: str | None = None) -> tuple[str | None, list[str]]:
    """The ``kldb sweep`` command that makes a run's images again, from the last config in its ``sweep.json``.

    Every option is spelled out (the digits preset is the default only for what stays unset); the seeds become
    ``--seed`` and ``--num-images``. The option names are read from the command line's own table
    (:data:`kldb.cli.GENERATION_OPTIONS`), their one definition.

    Args:
        run_dir: a run folder.
        out: the ``--out`` of the command (default: the run folder's name).

    Returns:
        ``(command, notes)``: the command, or ``None`` when ``sweep.json`` records no config; and what the command
        cannot say (settings the command line has no option for, seeds that are not consecutive, images in the folder
        from settings the last command did not name).
    """
    from kldb.cli import generation_options  # the flags' one definition; imported only here, when a card is written
    from kldb.presets import PRESETS
    from kldb.sweep import SweepConfig

    run = _check_run_dir(run_dir)
    info = run_info(run)
    last = info.get("last_config")
    if not isinstance(last, dict):
        return None, [f"{CONFIG_NAME} records no command (it was written without a `last_config`)."]
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(last) - fields)
    config = SweepConfig(**{key: value for key, value in last.items() if key in fields})
    default = SweepConfig(out_dir=config.out_dir)
    notes: list[str] = []
    if unknown:
        notes.append(f"{CONFIG_NAME} holds settings this version does not know: {', '.join(unknown)}.")
    unrecorded = sorted(fields - set(last) - {"out_dir", "device"})
    if unrecorded:
        notes.append(
            f"{CONFIG_NAME} was written by an older version that did not record {', '.join(unrecorded)}: the command "
            "leaves them to today's defaults, which may differ from what that version did."
        )
    words = ["kldb", "sweep", "--out", _token(out if out is not None else run.name)]
    covered = {"out_dir", "device", "seeds", *unrecorded}
    for option in generation_options(grid=True):
        if option.config is None or option.config in covered:
            continue
        covered.add(option.config)
        value = getattr(config, option.config)
        if value is None:
            if option.preset is not None and getattr(PRESETS["digits"], option.preset) is not None:
                notes.append(f"`{option.config}` was None, which no value of {option.flag} says (Python API).")
            continue
        if option.argparse.get("action") == "append":  # --classes: one flag per class subset
            for subset in value:
                words += [option.flag, *(_token(v) for v in subset)]
        elif isinstance(option.argparse.get("action"), type):  # argparse.BooleanOptionalAction
            words.append(option.flag if value else f"--no-{option.flag[2:]}")
        elif option.argparse.get("nargs") == "+":
            words += [option.flag, *(_token(v) for v in value)]
        else:
            words += [option.flag, _token(value)]
    seeds = list(config.seeds)
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        words += ["--seed", str(seeds[0]), "--num-images", str(len(seeds))]
    else:
        notes.append(f"The seeds are not consecutive, which the command line cannot say: seeds={seeds}.")
    for name in sorted(fields - covered):
        if getattr(config, name) != getattr(default, name):
            notes.append(f"No option sets `{name}`; this run used {name}={getattr(config, name)!r} (Python API).")
    made = {(r.setting, r.seed) for r in _read_records(run)}
    names = _setting_names(config, info.get("labels"))
    if names is not None:
        extra = sorted({setting for setting, seed in made if setting not in names or seed not in seeds})
        if extra:
            notes.append(
                f"The folder also holds images the last command did not name (settings {', '.join(extra)}): "
                "earlier commands made them."
            )
    return " ".join(words), notes


def _setting_names(config: Any, labels: Sequence[str] | None) -> set[str] | None:
    """The names of the settings a config makes, or ``None`` when they cannot be worked out without the pipeline."""
    from kldb.sweep import build_settings

    if not labels:
        return None
    try:
        return {s.name for s in build_settings(config, list(labels))}
    except (KLDBInputError, ValueError, TypeError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# The dataset card
# ----------------------------------------------------------------------------------------------------------------------


def _default_license(pipeline: Any) -> str:
    """Stable Diffusion v1's licence for images of SD v1 weights (named, or a saved folder of them); else the
    project's."""
    if not isinstance(pipeline, str):
        return DEFAULT_LICENSE
    if SD_V1_REPO_PATTERN.search(pipeline):
        return SD_V1_LICENSE
    with contextlib.suppress(OSError):
        if Path(pipeline).is_dir() and detect_base_model(pipeline).sd_v1:
            return SD_V1_LICENSE
    return DEFAULT_LICENSE


def _size_category(n: int) -> str:
    return next((name for limit, name in _SIZE_CATEGORIES if n < limit), "n>1M")


def _numbers(values: Sequence[Any]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _seeds_text(seeds: Sequence[int]) -> str:
    seeds = sorted(set(seeds))
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]} ({len(seeds)} seeds)"
    return f"{_numbers(seeds)} ({len(seeds)} seeds)"


def _code(value: Any) -> str:
    return "—" if value is None else f"`{value}`"


def _report_sections(run: Path) -> list[str]:
    """Table 1 and the plots of ``report/``, or what is missing; the boundary map of ``map/`` if the run has one."""
    lines = ["## Results: Table 1", ""]
    table = run / "report" / "table1.md"
    if table.is_file():
        lines += [
            "From `report/table1.md`, written by `kldb report` (for each class subset and beta: prompt-only against "
            "the alpha with the lowest median KLDB):",
            "",
            table.read_text(encoding="utf-8").strip(),
        ]
    else:
        lines.append(
            "Missing: this run had no `report/table1.md` when it was published. Run `kldb report RUN` and publish "
            "again to include Table 1 and the plots."
        )
    plots = [p for p in ("median_kldb_vs_alpha.png", "kldb_distribution.png", "ambiguous_images.png")
             if (run / "report" / p).is_file()]  # fmt: skip
    if plots:
        lines += ["", *(f"![{Path(p).stem.replace('_', ' ')}](report/{p})" for p in plots)]
    boundary_map = run / "map"
    if boundary_map.is_dir():  # written by `kldb map`: K x K heatmaps and the ranked table
        heatmaps = sorted(p.name for p in boundary_map.glob("*.png"))
        lines += ["", "## The boundary map", ""]
        lines += [f"![{Path(name).stem.replace('_', ' ')}](map/{name})" for name in heatmaps]
        if (boundary_map / "map.md").is_file():
            lines += ["", "Every boundary, most fragile first: [map/map.md](map/map.md)."]
    return lines


def dataset_card(run_dir: str | os.PathLike[str], repo_id: str | None = None, license: str | None = None) -> str:
    """The dataset card (``README.md``) of a run: YAML header, what was audited, settings, results, how to reproduce
    and load it.

    Args:
        run_dir: a run folder.
        repo_id: the dataset repo it is meant for, named in the loading snippet.
        license: the Hub licence identifier of the images; by default ``creativeml-openrail-m`` for a Stable Diffusion
            v1 pipeline and ``apache-2.0`` (the project's, and the digits world's) for others.
    """
    run = _check_run_dir(run_dir)
    if repo_id is not None:
        _check_repo_id(repo_id)
    _check_license(license)
    records = _read_records(run)
    info = run_info(run)
    fixed = info.get("fixed") or {}
    labels = info.get("labels") or []
    name = repo_id.split("/")[-1] if repo_id else run.name
    repo = repo_id or f"<namespace>/{run.name}"
    subsets = list(dict.fromkeys((tuple(r.classes), tuple(r.class_indices)) for r in records))
    prompts = list(dict.fromkeys(r.prompt for r in records if r.prompt is not None))
    auto_images = [getattr(r, "alpha_mode", None) == "auto" for r in records]
    alphas = sorted({float(r.alpha) for r, is_auto in zip(records, auto_images) if not is_auto})
    betas = sorted({float(r.beta) for r in records})
    auto = any(auto_images)
    command, notes = sweep_command(run)

    header = [
        "---",
        f"license: {license or _default_license(fixed.get('pipeline'))}",
        "task_categories:",
        "- image-classification",
        "tags:",
        "- kldb-boundary",
        "- decision-boundary",
        "- classifier-audit",
        "- synthetic",
        "- diffusers",
        "size_categories:",
        f"- {_size_category(len(records))}",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path:",
        *(f"    - {pattern}" for pattern in DATA_FILES),
        "---",
    ]
    classifier = fixed.get("classifier")
    own_classifier = "the pipeline's own classifier"
    label_text = ", ".join(labels) if len(labels) <= 20 else f"{', '.join(labels[:20])}, ... ({len(labels)} in all)"
    body = [
        CARD_MARKER,
        f"# {name}: images on a classifier's decision boundary",
        "",
        "Images generated with kldb-boundary (KLDB-guided latent diffusion, the `kldb_boundary` diffusers community "
        "pipeline): every image is "
        "pushed towards the decision boundary of the audited image classifier between the classes of a subset C, "
        "and comes with what that classifier said about it (KLDB, the KL divergence of its probabilities on C from "
        "the uniform distribution, 0 on the boundary; entropy; probabilities), its seed and its settings.",
        "",
        "## What was audited",
        "",
        "| | |",
        "|---|---|",
        f"| pipeline | {_code(fixed.get('pipeline'))} |",
        f"| classifier | {_code(classifier) if classifier else own_classifier} |",
        f"| its classes | {len(labels) or records[0].num_classes}: {label_text or '(names not recorded)'} |",
        "| class subsets C | "
        + "; ".join(f"{' + '.join(names)} (indices {', '.join(map(str, idx))})" for names, idx in subsets)
        + " |",
        f"| prompts | {'; '.join(repr(p) for p in prompts) or '—'} |",
        f"| images | {len(records)} |",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| alpha (KLDB guidance strength; 0 = prompt-only) | {_numbers(alphas)}{', auto' if auto else ''} |",
        f"| beta (classifier-free guidance scale) | {_numbers(betas)} |",
        f"| seeds | {_seeds_text([r.seed for r in records])} |",
        *(f"| {key} | {_code(value)} |" for key, value in fixed.items() if key not in ("pipeline", "classifier")),
        "",
        *_report_sections(run),
        "",
        "## How to reproduce it",
        "",
    ]
    if command is not None:
        body += [
            'With the same pipeline and classifier available (`pip install "kldb-boundary[audit]"`):',
            "",
            "```bash",
            command,
            f"kldb report {shlex.quote(run.name)}",
            "```",
        ]
    body += [*(["", *(f"- {note}" for note in notes)] if notes else []), ""]
    body += [
        f"`{CONFIG_NAME}` holds the full configuration (`last_config`) and the settings that fix the images "
        "(`fixed`); a rerun of the command resumes rather than repeats.",
        "",
        "## How to load it",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo}", split="train")',
        'row = ds[0]  # row["image"] (PIL), row["kldb"], row["seed"], row["alpha"], row["beta"], ...',
        "",
        "# a run folder on disk loads the same way:",
        f'ds = load_dataset("imagefolder", data_dir="{run.name}", split="train")',
        "```",
        "",
        "One row per image. The columns are the run's manifest records: `image`; `setting`, `classes`, "
        "`class_indices`, `alpha`, `beta`, `seed`, `prompt`, `negative_prompt`, `num_inference_steps`, "
        "`kldb_guidance_interval`, `kldb_gradient`, `kldb_guidance_decoder`, `guidance_rescale` (how it was made); "
        "`kldb` and `entropy` (nats), `class_probabilities` (p_i for i in C, in the order of `class_indices`), "
        "`top_classes`, `top_labels`, `top_probabilities`, `predicted_class`, `predicted_label`, `num_classes` "
        "(what the audited classifier said); `bytes` and `sha256` of the PNG.",
        "",
        "## Files",
        "",
        f"- `{IMAGES_DIR}/<setting>/seed<seed>.png`: the images (their PNG text chunks repeat the record).",
        f"- `{METADATA_NAME}`: one line per image, `file_name` and its record (what `datasets` reads).",
        f"- `{MANIFEST_NAME}`: the run's manifest, from which `{METADATA_NAME}` is made; `{CONFIG_NAME}`: the run's "
        "configuration.",
        "- `report/` (when present): Table 1 (Markdown, CSV, JSON) and the plots of `kldb report`; `map/` (when "
        "present): the boundary map of `kldb map`.",
        "",
    ]
    return "\n".join(header) + "\n" + "\n".join(body)


# ----------------------------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------------------------


def _write_card(run: Path, card: str, dry_run: bool) -> None:
    """Write the card to ``run/README.md``, unless a README.md that kldb did not write is there (kept, with a
    warning)."""
    path = run / CARD_NAME
    if path.is_file() and CARD_MARKER not in path.read_text(encoding="utf-8"):
        logger.warning("%s was not written by kldb: it is kept as the dataset card, not replaced.", path)
        return
    atomic_write_text(path, card)
    logger.info("%s the dataset card %s.", "Dry run: wrote" if dry_run else "Wrote", path)


def _upload_paths(run: Path) -> list[str]:
    """The files of a run folder to publish: all but hidden ones (temporary files), as posix paths."""
    paths = []
    for path in sorted(run.rglob("*")):
        relative = path.relative_to(run)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() or path.is_symlink():
            paths.append(relative.as_posix())
    return paths


def _out_dir(config_path: Path) -> str | None:
    """The ``last_config.out_dir`` of a ``sweep.json``, if it records one."""
    last = json.loads(config_path.read_text(encoding="utf-8")).get("last_config")
    return last.get("out_dir") if isinstance(last, dict) else None


@contextlib.contextmanager
def _staged_run(run: Path, paths: Sequence[str]) -> Iterator[Path]:
    """A temporary folder with the files to upload: hard links to the run's files (copies across file systems),
    symbolic links kept as links (for the scan to refuse), and ``sweep.json`` with ``last_config.out_dir`` made the
    run folder's name (a path on this machine says nothing on the Hub)."""
    try:  # beside the run, where hard links work
        staging = Path(tempfile.mkdtemp(prefix=f".{run.name}.publish-", dir=run.resolve().parent))
    except OSError:
        staging = Path(tempfile.mkdtemp(prefix=".kldb-publish-"))
    try:
        for relative in paths:
            source, target = run / relative, staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
            elif relative == CONFIG_NAME and _out_dir(source) not in (None, run.name):
                info = json.loads(source.read_text(encoding="utf-8"))
                info["last_config"]["out_dir"] = run.name
                target.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            else:
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_run(
    run_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    dry_run: bool = False,
    private: bool = False,
    token: str | None = None,
    license: str | None = None,
    api: Any = None,
    commit_message: str = "Upload KLDB boundary audit (kldb-boundary)",
) -> PublishResult:
    """Publish a run folder as a Hugging Face dataset repo: images, ``metadata.jsonl``, manifest, report, card.

    Writes ``metadata.jsonl`` (:func:`write_imagefolder_metadata`) and the dataset card ``README.md``
    (:func:`dataset_card`) into the run folder, then uploads the folder with ``HfApi.create_repo`` and
    ``HfApi.upload_folder`` (``repo_type="dataset"``). The upload is scanned first as :func:`kldb.hub.publish` scans a
    model folder (tokens, local paths, caches, symbolic links, pickle files): any finding stops it before the Hub is
    contacted. Hidden files are not uploaded; ``sweep.json``'s ``last_config.out_dir`` is uploaded as the run folder's
    name. The repo then loads with ``datasets.load_dataset(repo_id)``.

    Args:
        run_dir: a finished run folder (no ``manifest.rank<N>.jsonl`` parts left: a run still going, or interrupted,
            is refused).
        repo_id: ``"namespace/name"`` of the dataset repo (created if it does not exist).
        dry_run: write ``metadata.jsonl`` and the card and list what would be uploaded; send nothing.
        private: create the repo private (only when it is created).
        token: a token with write access; ``None`` uses ``HF_TOKEN`` or the stored login. Only given to the API.
        license: the card's licence (see :func:`dataset_card`).
        api: an object with ``create_repo`` and ``upload_folder`` like :class:`huggingface_hub.HfApi` (default:
            ``HfApi(token=token)``).
        commit_message: the commit message of the upload.

    Returns:
        A :class:`kldb.hub.PublishResult`: the files (path, size) and, after an upload, the commit and the repo URL.

    Raises:
        KLDBPathError: ``run_dir`` is not a run folder.
        ValueError: a bad ``repo_id`` or ``license``, a run still in progress, or a scan finding.
    """
    run = _check_run_dir(run_dir)
    _check_repo_id(repo_id)
    _check_license(license)
    parts = manifest_parts(run)
    if parts:
        raise KLDBInputError(
            f"Expected argument `run_dir` to be a finished run but {str(run_dir)!r} still has "
            f"{', '.join(p.name for p in parts)}: the sweep is running or was interrupted. Rerun its command to "
            "finish it, then publish."
        )
    write_imagefolder_metadata(run)
    _write_card(run, dataset_card(run, repo_id=repo_id, license=license), dry_run)
    paths = _upload_paths(run)
    with _staged_run(run, paths) as staging:
        check_folder_is_safe(staging, token=token, extra_paths=[run.resolve()])
        result = PublishResult(
            repo_id=repo_id, revision=None, files=list_files(staging), dry_run=dry_run, private=private
        )
        summary = f"{len(result.files)} files ({result.total_bytes:,} bytes) to the dataset repo {repo_id}"
        if dry_run:
            logger.info("Dry run: would upload %s; nothing was sent.", summary)
            return result
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        repo_url = api.create_repo(repo_id=repo_id, token=token, private=private, repo_type="dataset", exist_ok=True)
        result.commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staging),
            repo_type="dataset",
            token=token,
            commit_message=commit_message,
            allow_patterns=[path for path, _ in result.files],
        )
    result.url = str(repo_url) if repo_url is not None else None
    logger.info("Uploaded %s.", summary)
    return result
