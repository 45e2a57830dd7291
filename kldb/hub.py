"""Write pipeline folders that diffusers loads as a community pipeline, export them for the Hub, and publish them.

* :func:`write_pipeline_folder`: ``save_pretrained`` weights plus the pipeline file under the names diffusers resolves.
* :func:`export_folder`: a Hub-ready folder: the above (from a pipeline or a saved folder), the model card as
  ``README.md``, local paths stripped from the configs, and a security scan that refuses tokens, local paths, caches,
  symbolic links and pickle files.
* :func:`publish`: ``HfApi().create_repo`` + ``upload_folder`` of an exported folder, after the same scan; with
  ``dry_run=True`` it only lists what would be uploaded.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline_kldb_boundary
from kldb.errors import KLDBPathError
from kldb.io import atomic_write_text, default_mode

logger = logging.getLogger(__name__)

#: The names diffusers resolves: ``model_index.json``'s ``_class_name`` (``["kldb_boundary", "KLDBBoundaryPipeline"]``)
#: and ``custom_pipeline="kldb_boundary"`` name ``kldb_boundary.py`` in the model folder, and a Hub repo id or local
#: folder given as ``custom_pipeline`` is read through its ``pipeline.py``.
PIPELINE_FILE_NAMES = (f"{pipeline_kldb_boundary.PIPELINE_FILE_STEM}.py", "pipeline.py")

#: The pipeline's model card (Hub format); the exported folder carries it as ``README.md``. It is the repository's
#: top-level ``model_card.md``, packaged as ``kldb/model_card.md`` (a link to it in the source tree).
MODEL_CARD_PATH = (Path(__file__).parent / "model_card.md").resolve()

#: The section of the model card that :func:`export_folder` fills from ``world_info.json`` and results files.
RESULTS_START = "<!-- kldb:results:start -->"
RESULTS_END = "<!-- kldb:results:end -->"

#: The repo id the model card uses in its loading snippets; replaced by the real one when it is known.
CARD_REPO_ID = "<namespace>/kldb-boundary"

#: Weight and object files that may hold pickles. Only safetensors weights are exported or uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
#: Folder names and file suffixes of caches that never belong in a published repo.
CACHE_NAMES = (".cache", "__pycache__", ".ipynb_checkpoints", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis")
CACHE_SUFFIXES = (".lock", ".pyc", ".pyo", ".incomplete", ".tmp")
#: Files read as text by the scan.
TEXT_SUFFIXES = (
    ".json", ".jsonl", ".txt", ".log", ".md", ".py", ".yaml", ".yml", ".cfg", ".ini", ".toml", ".jinja", ".csv", ".tsv",
)  # fmt: skip
#: Hugging Face user access tokens ("hf_" and 30+ letters and digits) and organisation API tokens.
TOKEN_PATTERN = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{30,}\b")
#: JSON keys that name where a component was loaded from.
NAME_OR_PATH_KEYS = ("_name_or_path", "name_or_path")

_REPO_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def pipeline_source() -> str:
    """The source of ``pipeline_kldb_boundary.py``, the one file that defines the pipeline."""
    return inspect.getsource(pipeline_kldb_boundary)


@contextlib.contextmanager
def _staged_folder(destination: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``destination``; on success it replaces ``destination`` in one rename."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    staging.chmod(default_mode(directory=True))  # mkdtemp makes it private; the export is an ordinary folder
    try:
        yield staging
        if destination.exists():
            backup = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            destination.rename(backup)
            staging.rename(destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_destination(folder: Any, name: str = "folder") -> Path:
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"Expected argument `{name}` to be a path but got {type(folder).__name__}.")
    destination = Path(folder)
    if destination.exists() and not destination.is_dir():
        raise ValueError(
            f"Expected argument `{name}` to be a folder (new or existing) but got the file {str(folder)!r}."
        )
    parent = next((p for p in destination.parents if p.exists()), None)  # the nearest existing folder above it
    if parent is not None and not parent.is_dir():
        raise ValueError(
            f"Expected argument `{name}` to be a folder (new or existing) but {str(folder)!r} lies inside the file "
            f"{str(parent)!r}."
        )
    return destination


def write_pipeline_folder(pipe: Any, folder: str | os.PathLike[str], **save_kwargs: Any) -> Path:
    """Save ``pipe`` with ``save_pretrained`` and add the pipeline file under the names diffusers resolves.

    The folder then loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (its
    ``model_index.json`` names ``kldb_boundary.py``), with ``custom_pipeline="kldb_boundary"``,
    ``custom_pipeline=folder`` or ``custom_pipeline=folder/"pipeline.py"``, and with
    ``KLDBBoundaryPipeline.from_pretrained(folder)`` (no code run from the folder). The folder is written next to its
    destination and moved into place, so an interrupted export never leaves a half-written folder behind.

    Args:
        pipe: a :class:`~pipeline_kldb_boundary.KLDBBoundaryPipeline`.
        folder: destination; replaced if it exists.
        save_kwargs: passed to ``save_pretrained`` (``safe_serialization`` is always on).

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    destination = _check_destination(folder)
    save_kwargs["safe_serialization"] = True
    with _staged_folder(destination) as staging:
        pipe.save_pretrained(staging, **save_kwargs)
        _write_pipeline_files(staging)
    return destination


def _write_pipeline_files(folder: Path) -> None:
    """Write the pipeline file under the names diffusers resolves and into each saved ImageClassifier's folder.

    A folder saved before ``model_index.json`` named the pipeline file (``_class_name`` a plain class name) is brought
    to the current layout, so that ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it.
    """
    source = pipeline_source()
    for name in PIPELINE_FILE_NAMES:
        (folder / name).write_text(source, encoding="utf-8")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    pipeline_class = pipeline_kldb_boundary.KLDBBoundaryPipeline.__name__
    if index.get("_class_name") == pipeline_class:
        index["_class_name"] = [pipeline_kldb_boundary.PIPELINE_FILE_STEM, pipeline_class]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    classifier_entry = [pipeline_kldb_boundary.CLASSIFIER_FILE_STEM, pipeline_kldb_boundary.ImageClassifier.__name__]
    for name, entry in index.items():
        if entry == classifier_entry and (folder / name).is_dir():
            (folder / name / f"{pipeline_kldb_boundary.CLASSIFIER_FILE_STEM}.py").write_text(source, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# The security scan
# ----------------------------------------------------------------------------------------------------------------------


def _is_cache(relative: Path) -> bool:
    return any(part in CACHE_NAMES for part in relative.parts) or relative.name.endswith(CACHE_SUFFIXES)


def _local_path_pattern(extra_paths: Sequence[str | os.PathLike[str]] = ()) -> re.Pattern[str]:
    """A pattern matching the home folder, the project folder, the working folder and temporary folders as paths."""
    candidates = {
        str(Path.home()),
        str(Path(pipeline_kldb_boundary.__file__).resolve().parent),
        os.getcwd(),
        tempfile.gettempdir(),
        "/tmp",
        "/var/tmp",
        *(str(p) for p in extra_paths),
    }
    for candidate in list(candidates):
        with contextlib.suppress(OSError):
            candidates.add(str(Path(candidate).resolve()))
    usable = sorted((c.rstrip("/\\") for c in candidates if len(c.rstrip("/\\")) > 1), key=len, reverse=True)
    # a path counts when it ends there or continues with a separator, so "/tmp" does not match "/tmpfs"
    return re.compile("|".join(rf"{re.escape(c)}(?=[/\\\"'\s,;:)\]}}]|$)" for c in usable))


def _looks_local(value: Any) -> bool:
    """Whether a ``_name_or_path`` value names a local folder rather than a Hub repo id."""
    if not isinstance(value, str) or not value:
        return False
    return os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value or Path(value).exists()


def _walk_json(obj: Any, key_path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{key_path}.{key}" if key_path else str(key), value
            yield from _walk_json(value, f"{key_path}.{key}" if key_path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _walk_json(value, f"{key_path}[{i}]")


def _safetensors_header(path: Path) -> str:
    """The JSON header of a safetensors file (tensor table and ``__metadata__``), as text."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return ""
        (length,) = struct.unpack("<Q", raw)
        return f.read(min(length, 100_000_000)).decode("utf-8", errors="replace")


def scan_folder(
    folder: str | os.PathLike[str],
    token: str | None = None,
    extra_paths: Sequence[str | os.PathLike[str]] = (),
) -> list[str]:
    """Everything in ``folder`` that must not be published, one ``"<relative path>: <reason>"`` line each.

    Refused: pickle-capable files (``.bin``, ``.pt``, ``.pkl``, ``.ckpt``, ...), caches (``.cache``, ``__pycache__``,
    ``*.lock``, ...), symbolic links, Hugging Face tokens (the pattern, ``token`` and the ``HF_TOKEN`` environment
    variables), and local paths (the home, project, working and temporary folders, ``extra_paths``, and any
    ``_name_or_path`` that names a local folder) in text files and safetensors headers.

    Returns:
        The findings, sorted; empty when the folder is safe to publish.
    """
    if not isinstance(folder, (str, os.PathLike)) or not Path(folder).is_dir():
        shown = str(folder) if isinstance(folder, (str, os.PathLike)) else folder
        raise ValueError(f"Expected argument `folder` to be an existing folder but got {shown!r}.")
    root = Path(folder)
    secrets = {t for t in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if t}
    local_path = _local_path_pattern([root.resolve(), *extra_paths])
    findings: list[str] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_symlink():
            findings.append(f"{relative.as_posix()}: symbolic link (upload would follow it out of the folder)")
            continue
        if _is_cache(relative):
            if not any(_is_cache(Path(*relative.parts[:i])) for i in range(1, len(relative.parts))):
                findings.append(f"{relative.as_posix()}: cache file or folder")  # reported once, at its top
            continue
        if not path.is_file():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            findings.append(f"{relative.as_posix()}: pickle-capable file ({path.suffix}); export safetensors only")
            continue
        if path.suffix.lower() in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix.lower() == ".safetensors":
            text = _safetensors_header(path)
        else:
            continue
        if TOKEN_PATTERN.search(text) or any(secret in text for secret in secrets):
            findings.append(f"{relative.as_posix()}: contains a Hugging Face token")
        match = local_path.search(text)
        if match:
            findings.append(f"{relative.as_posix()}: contains the local path {match.group(0)!r}")
        if path.suffix.lower() == ".json":
            with contextlib.suppress(ValueError):
                for key, value in _walk_json(json.loads(text)):
                    if key.rsplit(".", 1)[-1] in NAME_OR_PATH_KEYS and _looks_local(value):
                        findings.append(f"{relative.as_posix()}: `{key}` names the local folder {value!r}")
    return sorted(dict.fromkeys(findings))


def check_folder_is_safe(
    folder: str | os.PathLike[str], token: str | None = None, extra_paths: Sequence[str | os.PathLike[str]] = ()
) -> None:
    """Raise ``ValueError`` listing every finding of :func:`scan_folder`; return quietly when there is none."""
    findings = scan_folder(folder, token=token, extra_paths=extra_paths)
    if findings:
        listing = "\n".join(f"  - {finding}" for finding in findings)
        raise ValueError(
            f"Refusing to publish {str(folder)!r}: it contains what must not leave this machine:\n{listing}"
        )


def strip_local_paths(folder: str | os.PathLike[str]) -> list[str]:
    """Remove ``_name_or_path`` entries that name local folders from the JSON files in ``folder``.

    ``save_pretrained`` records where each component was loaded from; for a pipeline loaded from a local folder that
    is an absolute path on this machine, which says nothing to a Hub user. Returns the ``"<file>: <key>"`` removed.
    """
    removed: list[str] = []
    root = Path(folder)
    for path in sorted(root.rglob("*.json")):
        if path.is_symlink() or _is_cache(path.relative_to(root)):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        keys = [key for key in NAME_OR_PATH_KEYS if _looks_local(data.get(key))]
        if keys:
            for key in keys:
                data.pop(key)
                removed.append(f"{path.relative_to(root).as_posix()}: {key}")
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------------


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def render_world_table(info: dict[str, Any]) -> str:
    """A markdown table of the measured properties recorded in a digits world's ``world_info.json``."""
    classifier = info.get("classifier") or {}
    vae = info.get("vae") or {}
    splits = ", ".join(f"{name} {size}" for name, size in (info.get("split_sizes") or {}).items())
    rows: list[tuple[str, str]] = []
    if "test_accuracy" in classifier:
        name = "classifier accuracy on the held-out test digits" + (f" (split sizes: {splits})" if splits else "")
        rows.append((name, _percent(classifier["test_accuracy"])))
    if "temperature" in classifier:
        name = "classifier temperature (fitted on the validation split, baked into the weights)"
        rows.append((name, f"{classifier['temperature']:.4g}"))
    for split in ("val", "test"):
        before, after = classifier.get(f"{split}_ece_before"), classifier.get(f"{split}_ece_after")
        if before is not None and after is not None:
            name = f"expected calibration error on the {split} split, before / after temperature scaling"
            rows.append((name, f"{before:.4g} / {after:.4g}"))
    if "classifier_accuracy_on_test_reconstructions" in vae:
        name = "classifier accuracy on the VAE's reconstructions of the test digits"
        rows.append((name, _percent(vae["classifier_accuracy_on_test_reconstructions"])))
    if "test_reconstruction_mse" in vae:
        rows.append(("VAE reconstruction MSE on the test digits", f"{vae['test_reconstruction_mse']:.4g}"))
    for name, count in (info.get("parameters") or {}).items():
        rows.append((f"parameters: {name}", f"{count:,}"))
    small = info.get("guidance_vae") or {}
    fidelity = small.get("fidelity") or {}
    if "gradient_cosine_median" in fidelity:
        name = (
            f"guidance_vae (decoder {small.get('decoder_parameters', 0):,} parameters): cosine similarity of its KLDB "
            f"gradients for classes {fidelity.get('classes')} to the VAE decoder's, median / 10th percentile, "
            f"{fidelity.get('measured_on', 'held-out latents')}"
        )
        rows.append((name, f"{fidelity['gradient_cosine_median']:.3f} / {fidelity['gradient_cosine_q10']:.3f}"))
    if "unet_dtype" in info:
        rows.append(("UNet weights stored as", str(info["unet_dtype"])))
    if info.get("folder_bytes"):
        rows.append(("folder size", f"{info['folder_bytes'] / 1e6:.1f} MB"))
    total = (info.get("training_seconds") or {}).get("total")
    if total is not None:
        rows.append(("training time of all components on the CPU", f"{total / 60:.1f} min"))
    if "default_guidance_scale" in info:
        rows.append(("default classifier-free guidance scale (beta)", f"{info['default_guidance_scale']:g}"))
    if "seed" in info:
        rows.append(("training seed / script version", f"{info['seed']} / {info.get('script_version', 'unknown')}"))
    return "\n".join(["| measured property | value |", "|---|---|", *(f"| {n} | {v} |" for n, v in rows)])


def render_demo_results(report: dict[str, Any]) -> str:
    """A markdown table of a ``kldb.demo`` report: prompt-only against KLDB-guided images from the same seeds."""
    try:
        settings = report["settings"]
        seeds = report["seeds"]
        head = (
            f'Measured with `python -m kldb.demo` on the {report["world"]}: prompt "{report["prompt"]}", '
            f"beta = {report['beta']}, {report['steps']} k-LMS steps, guidance every {report['interval']} steps, "
            f"{len(seeds)} images per setting from seeds {seeds[0]}..{seeds[-1]} (the same seeds for both rows)."
        )
        lines = [
            head,
            "",
            "| setting | alpha | median KLDB | median entropy (nats) | predicted classes | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in settings.items():
            mix = ", ".join(f"{k}: {v}" for k, v in s["predicted_class_mix"].items())
            lines.append(
                f"| {name} | {s['alpha']} | {s['median_kldb']:.4f} | {s['median_entropy']:.4f} | {mix} | {s['seconds']} |"
            )
        change = report.get("relative_kldb_change")
        if change is not None:
            lines += ["", f"Median KLDB change with guidance: {100 * change:+.1f} %."]
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(
            f"Expected argument `results` to be a `kldb.demo` report (keys world, prompt, beta, steps, interval, seeds, "
            f"settings) but it lacks {error}."
        ) from None
    return "\n".join(lines)


def _load_results(results: Any) -> str:
    """Markdown for ``results``: a demo report (dict or ``.json``), or a markdown file included as it is."""
    if isinstance(results, dict):
        return render_demo_results(results)
    if not isinstance(results, (str, os.PathLike)):
        raise TypeError(
            f"Expected argument `results` to be a demo report dict or a path to a .json or .md file but got "
            f"{type(results).__name__}."
        )
    path = Path(results)
    if not path.is_file() or path.suffix.lower() not in (".json", ".md"):
        raise ValueError(f"Expected argument `results` to be an existing .json or .md file but got {str(results)!r}.")
    text = path.read_text(encoding="utf-8")
    return render_demo_results(json.loads(text)) if path.suffix.lower() == ".json" else text.strip()


#: The results section of an exported card whose weights come with no measurements: the repository's card shows the
#: digits world's figures, which must not be presented as those of other weights.
NOT_MEASURED = (
    "**Not measured for these weights.** This section is filled by `kldb.hub.export_folder` (and `kldb export`) from "
    "the exported world's `world_info.json`, and from a `RESULTS.md` or a demo `report.json` when one is given. This "
    "copy was exported without them."
)


def render_results_section(world_info: dict[str, Any] | None = None, results: Sequence[str] = ()) -> str | None:
    """The body of the model card's results section, or ``None`` when there is nothing measured to put there."""
    parts: list[str] = []
    if world_info:
        parts += [
            "The world these weights come from, as its training script measured it (`world_info.json`):",
            "",
            render_world_table(world_info),
        ]
    for text in results:
        parts += ["", text] if parts else [text]
    return "\n".join(parts) if parts else None


def render_model_card(
    template: str,
    repo_id: str | None = None,
    world_info: dict[str, Any] | None = None,
    results: Sequence[str] = (),
    *,
    license: str | None = None,
    base_model: str | None = None,
) -> str:
    """Fill the model card ``template``: results section, repo id, and ``license`` / ``base_model`` in its YAML header.

    Each is set only when given: the results section says "Not measured" without measurements, and the licence and
    base model of an export come from :func:`card_metadata`.
    """
    if not isinstance(template, str):
        raise TypeError(f"Expected argument `template` to be the model card's text but got {type(template).__name__}.")
    metadata = {"license": _check_license(license), "base_model": _check_base_model(base_model)}
    template = set_card_metadata(template, {key: value for key, value in metadata.items() if value is not None})
    body = render_results_section(world_info, results) or NOT_MEASURED
    start, end = template.find(RESULTS_START), template.find(RESULTS_END)
    if start < 0 or end < start:
        raise ValueError(
            f"Expected argument `model_card` to contain the markers {RESULTS_START} and {RESULTS_END} around its "
            "results section but they are missing."
        )
    template = f"{template[: start + len(RESULTS_START)]}\n{body}\n{template[end:]}"
    if repo_id is not None:
        template = template.replace(CARD_REPO_ID, repo_id)
    return template


# ----------------------------------------------------------------------------------------------------------------------
# The card's licence and base model
# ----------------------------------------------------------------------------------------------------------------------

#: The licence of the project's own weights (the digits world), and of exports whose weights are not recognised.
DEFAULT_LICENSE = "apache-2.0"
#: Stable Diffusion v1 weights are released under the CreativeML OpenRAIL-M licence, whose use restrictions carry over
#: to every copy and derivative; an export of them says so in its card.
SD_V1_LICENSE = "creativeml-openrail-m"
#: Hub ids of the Stable Diffusion v1 checkpoints, as ``_name_or_path`` records them (or a Hub cache path holds them).
SD_V1_REPO_PATTERN = re.compile(
    r"(?:CompVis/stable-diffusion-v1-[1-4]|runwayml/stable-diffusion-v1-5|stable-diffusion-v1-5/stable-diffusion-v1-5)"
    r"(?![\w.-])"
)
#: The UNet of Stable Diffusion v1 (v1.1 to v1.5 and their fine-tunes): what identifies its weights without a name.
SD_V1_UNET_SHAPE = {"cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280]}
#: Hub licence identifiers: lower-case letters, digits, ".", "-" and "+" ("apache-2.0", "openrail++", ...).
_LICENSE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
#: A Hub cache folder ``models--<namespace>--<name>`` names the repo it holds.
_CACHE_REPO_PATTERN = re.compile(r"models--([A-Za-z0-9][\w.-]*?)--([A-Za-z0-9][\w.-]*)")


@dataclass
class BaseModelInfo:
    """What an export's weights are, as far as their configs tell: see :func:`detect_base_model`."""

    sd_v1: bool
    base_model: str | None
    evidence: str | None


def _config_dicts(pipe_or_path: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, config)`` of a pipeline and each of its components, from a saved folder or a pipeline object."""
    if isinstance(pipe_or_path, (str, os.PathLike)):
        root = Path(pipe_or_path)
        for path in [root / "model_index.json", *sorted(root.glob("*/config.json"))]:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    yield path.relative_to(root).as_posix(), data
        return
    config = getattr(pipe_or_path, "config", None)
    if isinstance(config, dict):
        yield "model_index.json", dict(config)
    for name, component in (getattr(pipe_or_path, "components", None) or {}).items():
        config = getattr(component, "config", None)
        if isinstance(config, dict):
            yield f"{name}/config.json", dict(config)
        elif hasattr(config, "to_dict"):  # a transformers config
            yield f"{name}/config.json", config.to_dict()
        name_or_path = getattr(component, "name_or_path", None)  # transformers models and tokenizers
        if isinstance(name_or_path, str):
            yield name, {"name_or_path": name_or_path}


def _sd_v1_repo(value: Any) -> str | None:
    """The Stable Diffusion v1 repo id that a ``_name_or_path`` names, directly or as a Hub cache folder."""
    if not isinstance(value, str):
        return None
    cached = _CACHE_REPO_PATTERN.search(value)
    candidate = f"{cached.group(1)}/{cached.group(2)}" if cached else value
    match = SD_V1_REPO_PATTERN.search(candidate)
    return match.group(0) if match else None


def detect_base_model(pipe_or_path: Any) -> BaseModelInfo:
    """Whether a pipeline's weights are Stable Diffusion v1's, and which Hub repo they come from if its configs say.

    The names recorded by ``from_pretrained`` (``_name_or_path`` of the pipeline and of each component, also as a Hub
    cache folder ``models--CompVis--stable-diffusion-v1-4``) give the repo; a UNet of Stable Diffusion v1's shape
    (``cross_attention_dim`` 768, ``block_out_channels`` (320, 640, 1280, 1280)) identifies SD v1 weights without one,
    such as a fine-tune saved locally.

    Args:
        pipe_or_path: a pipeline object or a saved pipeline folder.

    Returns:
        A :class:`BaseModelInfo`: ``sd_v1``, the repo id as ``base_model`` (or ``None``) and what showed it.
    """
    repo, evidence, unet_shape = None, None, False
    for where, config in _config_dicts(pipe_or_path):
        for key in NAME_OR_PATH_KEYS:
            found = _sd_v1_repo(config.get(key))
            if found and repo is None:
                repo, evidence = found, f"{where}: `{key}` names {found}"
        if where.startswith("unet/") and all(
            list(config.get(key) or []) == value if isinstance(value, list) else config.get(key) == value
            for key, value in SD_V1_UNET_SHAPE.items()
        ):
            unet_shape = True
            evidence = evidence or f"{where}: a Stable Diffusion v1 UNet ({SD_V1_UNET_SHAPE})"
    return BaseModelInfo(sd_v1=repo is not None or unet_shape, base_model=repo, evidence=evidence)


def _check_license(license: Any) -> str | None:
    if license is not None and (not isinstance(license, str) or not _LICENSE_PATTERN.match(license)):
        raise ValueError(
            "Expected argument `license` to be a Hub licence identifier such as 'apache-2.0' or "
            f"'{SD_V1_LICENSE}' (lower-case letters, digits, '.', '-', '+') but got {license!r}."
        )
    return license


def _check_base_model(base_model: Any) -> str | None:
    if base_model is not None and (
        not isinstance(base_model, str) or not _REPO_ID_PATTERN.match(base_model) or ".." in base_model
    ):
        raise ValueError(
            "Expected argument `base_model` to be the Hub id of the model the weights come from, like "
            f"'CompVis/stable-diffusion-v1-4', but got {base_model!r}."
        )
    return base_model


def card_metadata(pipe_or_path: Any, license: str | None = None, base_model: str | None = None) -> dict[str, str]:
    """The ``license`` and ``base_model`` of the card of an export of ``pipe_or_path``.

    Given values win; otherwise Stable Diffusion v1 weights (:func:`detect_base_model`) get ``creativeml-openrail-m``
    and the repo they come from, and all other weights the project's licence, ``apache-2.0``, and no base model. A
    given licence other than OpenRAIL-M for SD v1 weights, or SD v1 weights without a known base model, is logged as
    a warning.

    Returns:
        ``{"license": ..., "base_model": ...}``, without ``base_model`` when there is none.
    """
    _check_license(license)
    _check_base_model(base_model)
    detected = detect_base_model(pipe_or_path)
    if detected.sd_v1 and license is not None and license != SD_V1_LICENSE:
        logger.warning(
            "These look like Stable Diffusion v1 weights (%s), which are licensed %s, but the card will say %s.",
            detected.evidence,
            SD_V1_LICENSE,
            license,
        )
    metadata = {"license": license or (SD_V1_LICENSE if detected.sd_v1 else DEFAULT_LICENSE)}
    base_model = base_model or detected.base_model
    if base_model is not None:
        metadata["base_model"] = base_model
    elif detected.sd_v1:
        logger.warning(
            "These look like Stable Diffusion v1 weights (%s) but no config names the repo they come from; pass "
            "`base_model` (`--base-model`), e.g. 'CompVis/stable-diffusion-v1-4', so the card says which.",
            detected.evidence,
        )
    return metadata


def set_card_metadata(card: str, metadata: dict[str, str]) -> str:
    """Set top-level keys of a model card's YAML header (between the first two ``---`` lines), adding one if none."""
    if not metadata:
        return card
    for key, value in metadata.items():
        if not re.fullmatch(r"[a-z_]+", key) or not isinstance(value, str) or not re.fullmatch(r"[\w.+/-]+", value):
            raise ValueError(f"Expected card metadata as plain `key: value` words but got {key!r}: {value!r}.")
    if not card.startswith("---\n") or "\n---\n" not in card[3:]:
        card = "---\n---\n" + card
    end = card.index("\n---\n", 3)
    lines = card[4:end].split("\n") if end > 4 else []
    for key, value in metadata.items():
        line = f"{key}: {value}"
        index = next((i for i, old in enumerate(lines) if re.match(rf"{key}\s*:", old)), None)
        if index is None:
            lines.append(line)
        else:
            lines[index] = line
            # a list value written as indented "- item" lines below the key is replaced too
            while index + 1 < len(lines) and re.match(r"\s+-\s|-\s", lines[index + 1]):
                del lines[index + 1]
    return "---\n" + "\n".join(lines) + card[end:]


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def _copy_saved_pipeline(source: Path, staging: Path) -> None:
    """Copy a ``save_pretrained`` folder, leaving out caches and the files the export writes itself."""
    pickles = sorted(
        p.relative_to(source).as_posix()
        for p in source.rglob("*")
        if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES and not _is_cache(p.relative_to(source))
    )
    if pickles:
        raise ValueError(
            f"Refusing to export {str(source)!r}: it holds pickle-capable files {pickles}; re-save the pipeline with "
            "`save_pretrained(..., safe_serialization=True)` first."
        )
    skipped = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if _is_cache(relative) or relative.as_posix() in (*PIPELINE_FILE_NAMES, "README.md"):
            skipped.append(relative.as_posix())
            continue
        if path.is_symlink():
            raise ValueError(f"Refusing to export {str(source)!r}: {relative.as_posix()!r} is a symbolic link.")
        if path.is_dir():
            (staging / relative).mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, staging / relative)
    if skipped:
        logger.info("Not copied from %s (caches, or files the export writes itself): %s", source, skipped)


def _read_world_info(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, (str, os.PathLike)) or not Path(value).is_file():
        raise ValueError(f"Expected argument `world_info` to be a dict or an existing JSON file but got {value!r}.")
    return json.loads(Path(value).read_text(encoding="utf-8"))


def export_folder(
    pipe_or_path: Any,
    folder: str | os.PathLike[str],
    model_card: bool | str | os.PathLike[str] = True,
    *,
    repo_id: str | None = None,
    world_info: dict[str, Any] | str | os.PathLike[str] | None = None,
    results: Any = None,
    license: str | None = None,
    base_model: str | None = None,
    **save_kwargs: Any,
) -> Path:
    """Write a Hub-ready folder: weights, the pipeline file as ``pipeline.py`` and ``kldb_boundary.py``, the card.

    The folder loads with ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="kldb_boundary",
    trust_remote_code=True)`` and with ``custom_pipeline=folder``; :func:`publish` uploads it. Local paths recorded by
    ``save_pretrained`` (``_name_or_path``) are removed, and the result is scanned with :func:`scan_folder`: any
    token, local path, cache or pickle file fails the export and leaves ``folder`` as it was. The folder is written
    beside its destination and renamed into place.

    Args:
        pipe_or_path: a :class:`~pipeline_kldb_boundary.KLDBBoundaryPipeline` (saved with ``save_pretrained``), or
            the path of a saved pipeline folder such as the digits world (copied file by file, dtypes kept).
        folder: destination; replaced if it exists.
        model_card: ``True`` for the project's ``model_card.md``, a path to another card template, or ``False`` for
            no ``README.md``.
        repo_id: the Hub repo the folder is meant for; replaces ``<namespace>/kldb-boundary`` in the card.
        world_info: the digits world's ``world_info.json`` (dict or path) for the card's results section; by default
            the ``world_info.json`` of a source folder, if it has one.
        results: measured results for the card: a ``kldb.demo`` report (dict or ``report.json``) or a markdown file
            included as it is, or a list of these; by default the ``RESULTS.md`` of a source folder, if it has one.
        license: the Hub licence identifier in the card's YAML header. By default ``creativeml-openrail-m`` for
            Stable Diffusion v1 weights (recognised by :func:`detect_base_model`) and ``apache-2.0`` (the project's
            own weights, such as the digits world) for all others.
        base_model: the Hub id of the model the weights come from, in the card's YAML header; by default the Stable
            Diffusion v1 repo that the configs name, if any.
        save_kwargs: passed to ``save_pretrained`` for a pipeline (``safe_serialization`` is always on).

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    destination = _check_destination(folder)
    source: Path | None = None
    if isinstance(pipe_or_path, (str, os.PathLike)):
        source = Path(pipe_or_path)
        if not (source / "model_index.json").is_file():
            raise ValueError(
                f"Expected argument `pipe_or_path` to be a saved pipeline folder with a model_index.json but got "
                f"{str(pipe_or_path)!r}."
            )
        resolved, target = source.resolve(), destination.resolve()
        if target == resolved or resolved in target.parents:
            raise ValueError(
                f"Expected argument `folder` to lie outside the source folder {str(source)!r} but got {str(folder)!r}."
            )
    elif not hasattr(pipe_or_path, "save_pretrained"):
        raise TypeError(
            "Expected argument `pipe_or_path` to be a pipeline with `save_pretrained` or the path of a saved pipeline "
            f"folder but got {type(pipe_or_path).__name__}."
        )
    if not isinstance(model_card, (bool, str, os.PathLike)):
        raise TypeError(f"Expected argument `model_card` to be a bool or a path but got {type(model_card).__name__}.")
    if repo_id is not None:
        _check_repo_id(repo_id)
    if model_card is False:
        card_only = {"repo_id": repo_id, "world_info": world_info, "results": results, "license": license,
                     "base_model": base_model}  # fmt: skip
        given = [name for name, value in card_only.items() if value is not None]
        if given:
            they = "they go" if len(given) > 1 else "it goes"
            raise ValueError(
                f"Expected no {', '.join(f'`{name}`' for name in given)} with `model_card=False`: {they} only into "
                "the model card, which is not written."
            )
    weights = source if source is not None else pipe_or_path
    metadata = card_metadata(weights, license=license, base_model=base_model) if model_card is not False else {}

    card_template: str | None = None
    if model_card is not False:
        card_path = MODEL_CARD_PATH if model_card is True else Path(model_card)
        if not card_path.is_file():
            raise KLDBPathError(
                f"Expected argument `model_card` to name an existing file but got {str(card_path)!r}."
            )
        card_template = card_path.read_text(encoding="utf-8")
    info = _read_world_info(world_info)
    if info is None and source is not None and (source / "world_info.json").is_file():
        info = json.loads((source / "world_info.json").read_text(encoding="utf-8"))
    if results is None and source is not None and (source / "RESULTS.md").is_file():
        results = source / "RESULTS.md"
    result_texts = (
        [] if results is None else [_load_results(r) for r in (results if isinstance(results, list) else [results])]
    )

    with _staged_folder(destination) as staging:
        if source is not None:
            _copy_saved_pipeline(source, staging)
        else:
            save_kwargs["safe_serialization"] = True
            pipe_or_path.save_pretrained(staging, **save_kwargs)
        _write_pipeline_files(staging)
        if card_template is not None:
            card = render_model_card(card_template, repo_id=repo_id, world_info=info, results=result_texts, **metadata)
            (staging / "README.md").write_text(card, encoding="utf-8")
        removed = strip_local_paths(staging)
        if removed:
            logger.info("Removed local paths recorded by save_pretrained: %s", removed)
        extra = [staging, destination.resolve()] + ([source.resolve()] if source is not None else [])
        findings = scan_folder(staging, extra_paths=extra)
        if findings:
            listing = "\n".join(f"  - {finding}" for finding in findings)
            raise ValueError(f"Refusing to export to {str(folder)!r}: the folder would contain\n{listing}")
    logger.info("Exported %s (%d files).", destination, len(list_files(destination)))
    return destination


# ----------------------------------------------------------------------------------------------------------------------
# Publish
# ----------------------------------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: Any) -> str:
    if (
        not isinstance(repo_id, str)
        or not _REPO_ID_PATTERN.match(repo_id)
        or ".." in repo_id
        or "--" in repo_id
        or len(repo_id.split("/")[-1]) > 96
        or repo_id.endswith((".", "-"))
    ):
        raise ValueError(
            f"Expected argument `repo_id` to be a Hub repo id like 'namespace/name' (letters, digits, '-', '_', '.') "
            f"but got {repo_id!r}."
        )
    return repo_id


def _card_license(card: str) -> str | None:
    """The ``license`` of a model card's YAML header, if it has one."""
    if not card.startswith("---\n") or "\n---\n" not in card[3:]:
        return None
    match = re.search(r"^license:[ \t]*(\S+)[ \t]*$", card[: card.index("\n---\n", 3)], flags=re.MULTILINE)
    return match.group(1) if match else None


def _update_card_metadata(root: Path, license: str | None, base_model: str | None, dry_run: bool) -> None:
    """Set the given ``license`` / ``base_model`` in ``root/README.md``; warn when SD v1 weights lack their licence."""
    _check_license(license)
    _check_base_model(base_model)
    readme = root / "README.md"
    metadata = {key: value for key, value in (("license", license), ("base_model", base_model)) if value is not None}
    if metadata and not readme.is_file():
        raise ValueError(
            f"Expected argument `folder` to hold a README.md model card to set {' and '.join(metadata)} in, but "
            f"{str(root)!r} has none."
        )
    if metadata:
        if dry_run:
            logger.info("Dry run: would set %s in README.md.", metadata)
        else:
            atomic_write_text(readme, set_card_metadata(readme.read_text(encoding="utf-8"), metadata))
            logger.info("Set %s in README.md.", metadata)
    if not readme.is_file():
        return
    stated = metadata.get("license") or _card_license(readme.read_text(encoding="utf-8"))
    detected = detect_base_model(root)
    if detected.sd_v1 and stated != SD_V1_LICENSE:
        logger.warning(
            "README.md gives the licence %s, but these look like Stable Diffusion v1 weights (%s), which are licensed "
            "%s: pass `license=%r` (`--license %s`).",
            stated,
            detected.evidence,
            SD_V1_LICENSE,
            SD_V1_LICENSE,
            SD_V1_LICENSE,
        )


def list_files(folder: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """``(path relative to folder, size in bytes)`` of every file under ``folder``, sorted by path."""
    root = Path(folder)
    return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]


@dataclass
class PublishResult:
    """What :func:`publish` uploaded, or with ``dry_run`` would upload."""

    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]
    dry_run: bool
    private: bool = False
    commit: Any = None
    url: str | None = None
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(size for _, size in self.files)

    def listing(self) -> str:
        """One line per file (size, path), then the total: the dry-run report."""
        width = max((len(f"{size:,}") for _, size in self.files), default=1)
        verb = "Would upload" if self.dry_run else "Uploaded"
        target = f"{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        lines = [f"{verb} {len(self.files)} files ({self.total_bytes:,} bytes) to {target}:"]
        lines += [f"  {size:>{width},} B  {path}" for path, size in self.files]
        return "\n".join(lines)


def publish(
    folder: str | os.PathLike[str],
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    api: Any = None,
    commit_message: str = "Upload KLDB boundary pipeline (kldb-boundary)",
    license: str | None = None,
    base_model: str | None = None,
) -> PublishResult:
    """Upload an exported folder to the Hub with ``HfApi.create_repo`` and ``HfApi.upload_folder``.

    The folder is scanned first (:func:`scan_folder`); any token, local path, cache, symbolic link or pickle file
    stops the upload before the Hub is contacted. Exactly the listed files are uploaded (``allow_patterns``).

    Args:
        folder: a folder written by :func:`export_folder`, or a Space written by :func:`kldb.space.write_space`
            (uploaded to a Gradio Space repo instead of a model repo).
        repo_id: ``"namespace/name"``; the model repo (or Space) is created if it does not exist.
        token: a Hugging Face token with write access; ``None`` uses the ``HF_TOKEN`` environment variable or the
            stored login. It is only passed to the API, never written anywhere.
        private: create the repo private (only when it is created).
        revision: a branch to upload to (created from main if missing); ``None`` for main.
        dry_run: only list what would be uploaded; nothing is sent.
        api: an object with ``create_repo``, ``upload_folder`` and ``create_branch`` like
            :class:`huggingface_hub.HfApi` (default: ``HfApi(token=token)``).
        commit_message: the commit message of the upload.
        license: set the card's (``README.md``) licence to this Hub licence identifier before the upload (not with
            ``dry_run``, which only reports it). Without it, a card that does not say ``creativeml-openrail-m`` for
            Stable Diffusion v1 weights is warned about.
        base_model: set the card's ``base_model`` (a Hub model id) before the upload, as ``license``.

    Returns:
        A :class:`PublishResult` with the file listing (and, after an upload, the commit info and repo URL).
    """
    _check_repo_id(repo_id)
    root = Path(folder) if isinstance(folder, (str, os.PathLike)) else None
    if root is None or not root.is_dir():
        shown = str(folder) if root is not None else folder
        raise ValueError(f"Expected argument `folder` to be an existing folder but got {shown!r}.")
    from kldb.space import is_space_folder

    space = is_space_folder(root)  # a Space written by `kldb export --space`: uploaded as a Gradio Space repo
    if not space and not (root / "pipeline.py").is_file():
        raise ValueError(
            f"Expected argument `folder` to be a folder written by `export_folder` (with a pipeline.py) or a Space "
            f"(a README.md whose YAML header names its sdk) but {str(folder)!r} is neither."
        )
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or " " in revision):
        raise ValueError(f"Expected argument `revision` to be a branch name without spaces but got {revision!r}.")
    _check_license(license)
    _check_base_model(base_model)
    check_folder_is_safe(root, token=token)
    _update_card_metadata(root, license=license, base_model=base_model, dry_run=dry_run)
    if not (root / "README.md").is_file():
        logger.warning("%s has no README.md: the Hub repo will have no model card.", root)
    result = PublishResult(
        repo_id=repo_id, revision=revision, files=list_files(root), dry_run=dry_run, private=private
    )
    readme = root / "README.md"
    if readme.is_file() and CARD_REPO_ID in readme.read_text(encoding="utf-8"):
        logger.warning(
            "README.md still shows %s as the repo id; export with `repo_id=%r` so that its snippets name this repo.",
            CARD_REPO_ID,
            repo_id,
        )
    summary = f"{len(result.files)} files ({result.total_bytes:,} bytes) to {repo_id}"
    logger.debug("%s", result.listing())
    if dry_run:
        logger.info("Dry run: would upload %s; nothing was sent.", summary)
        return result

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo_type = "space" if space else "model"
    repo_kwargs = {"space_sdk": "gradio"} if space else {}
    repo_url = api.create_repo(
        repo_id=repo_id, token=token, private=private, repo_type=repo_type, exist_ok=True, **repo_kwargs
    )
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, token=token, repo_type=repo_type, exist_ok=True)
    result.commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(root),
        repo_type=repo_type,
        revision=revision,
        token=token,
        commit_message=commit_message,
        allow_patterns=[path for path, _ in result.files],
    )
    result.url = str(repo_url) if repo_url is not None else None
    logger.info("Uploaded %s.", summary)
    return result
