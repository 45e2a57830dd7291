"""Validity: are a run's boundary images still images of the audited classes C?

An *oracle*, a classifier independent of the audited one, labels every image of a run folder. Per setting (and over
the whole run), :func:`run_validity` reports

- ``valid_share``: the share of images whose oracle top-1 class is in C;
- ``off_manifold_share``: the share whose oracle top-1 is outside C *or* whose oracle maximum probability is below
  ``threshold`` (default 0.5): the oracle sees another class, or no class clearly. A valid image with a low maximum
  probability counts in both shares; ``low_confidence_count`` counts those;
- the counts behind both, the median oracle maximum probability and the median oracle probability of C;
- a grid of the most ambiguous *valid* images: per setting, the valid images with the lowest KLDB under the audited
  classifier (from the manifest), each captioned with that KLDB and the oracle's top-1 class and probability.

The threshold criterion reads the oracle's *maximum* probability. An image exactly between the |C| classes, with all
of the oracle's mass on C, has a maximum probability of 1/|C|: 0.5 for a pair, which the default threshold does not
count as low (the test is strict, ``< threshold``), but 1/3 for a triple. For |C| >= 3 choose a threshold at or below
1/|C|, or read ``median_oracle_class_mass`` (the oracle's probability of C), which such an image keeps near 1.

Oracles (argument ``oracle``):

- any classifier spec :func:`kldb.loading.load_classifier` accepts (``torchvision:<model>:<weights>``,
  ``package.module:function``, a classifier folder or Hub id), or a classifier object
  (:func:`~pipeline_kldb_boundary.as_image_classifier`); it must have the run's label space (same number of classes,
  same names), as ``kldb compare`` checks;
- ``"clip:<folder or Hub id>"``: zero-shot CLIP (transformers' ``CLIPModel`` and ``CLIPProcessor``) over the run's
  label names, one text per label from ``clip_template`` (default ``"a photo of a {name}"``); the oracle's
  probabilities are ``softmax(logit_scale * cos(image embedding, text embedding))`` over the label texts;
- ``None``: for a run of the digits world, the world's validity classifier
  (``kldb/digits/world/validity_classifier``, trained by :mod:`kldb.digits.validity_classifier`); other runs must name
  an oracle.

Scoring goes through :func:`kldb.compare.score_records` (the oracle sees the PNGs as they are on disk). The files,
``validity.json``, ``validity.md`` and ``validity_ambiguous_valid.png``, are written atomically into the run's report
folder (``<run>/report`` unless ``out_dir`` is given).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kldb.compare import RescoredImage, checked_second_classifier, score_records
from kldb.errors import KLDBInputError, KLDBInputTypeError
from kldb.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from kldb.metrics import summary_statistics
from kldb.runfolder import ImageRecord, iter_settings, read_run, run_info, run_labels
from pipeline_kldb_boundary import ImageClassifier

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_CLIP_TEMPLATE = "a photo of a {name}"
CLIP_PREFIX = "clip:"
FILE_NAMES = {"json": "validity.json", "markdown": "validity.md", "grid": "validity_ambiguous_valid.png"}
ORACLE_SPEC_HELP = (
    "a classifier spec ('torchvision:<model>:<weights>', 'package.module:function', a classifier folder or Hub id), "
    "a classifier object, or 'clip:<folder or Hub id>'"
)


def digits_validity_classifier_path() -> Path:
    """The digits world's validity classifier (:mod:`kldb.digits.validity_classifier`)."""
    from kldb.digits import WORLD_PATH

    return WORLD_PATH / "validity_classifier"


# ----------------------------------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------------------------------


class ZeroShotCLIP(torch.nn.Module):
    """Zero-shot CLIP over fixed texts: ``logit_scale.exp() * cos(image embedding, text embedding)``, ``[B, n]``.

    Radford et al. (2021), Section 3.1.2. The text embeddings are computed once, at construction.

    Args:
        model: a transformers ``CLIPModel``.
        text_embeds: ``[n, d]`` text embeddings of the class texts (normalised here).
    """

    def __init__(self, model: torch.nn.Module, text_embeds: torch.Tensor):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("text_embeds", text_embeds / text_embeds.norm(dim=-1, keepdim=True))  # (n, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = _embedding(self.model.get_image_features(pixel_values=pixel_values))  # (B, d)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * image_embeds @ self.text_embeds.to(image_embeds).T  # (B, n)


def _embedding(output: Any) -> torch.Tensor:
    """The projected embedding of ``get_image_features`` / ``get_text_features`` (a tensor, or an output with it as
    ``pooler_output`` in recent transformers)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def check_clip_template(clip_template: Any) -> str:
    """Refuse a CLIP text template without the ``{name}`` field (or with other fields)."""
    if not isinstance(clip_template, str):
        raise KLDBInputTypeError(
            f"Expected argument `clip_template` to be a string with the field {{name}} but got {clip_template!r}."
        )
    try:
        text = clip_template.format(name="x")
    except (KeyError, IndexError, ValueError):
        text = None
    if text is None or "{name}" not in clip_template:
        raise KLDBInputError(
            f"Expected argument `clip_template` to be a string with the field {{name}} (and no other) but got "
            f"{clip_template!r}."
        )
    return clip_template


@torch.no_grad()
def clip_oracle(
    model: torch.nn.Module, processor: Any, labels: Sequence[str], clip_template: str = DEFAULT_CLIP_TEMPLATE
) -> ImageClassifier:
    """Zero-shot CLIP as an :class:`ImageClassifier` over ``labels``, one text ``clip_template.format(name=label)`` each.

    Args:
        model: a transformers ``CLIPModel``.
        processor: its ``CLIPProcessor`` (tokenizer and image processor); the image processor's resize, crop and
            normalisation are applied in torch, as for any classifier.
        labels: the class names, in the order of the audited classifier's outputs.
        clip_template: the text for each class, with the field ``{name}``.
    """
    check_clip_template(clip_template)
    texts = [clip_template.format(name=label) for label in labels]
    tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    text_embeds = _embedding(
        model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
    )  # (n, d)
    head = ZeroShotCLIP(model, text_embeds.detach()).eval()
    geometry = ImageClassifier.from_transformers(head, processor.image_processor)  # resize, crop, mean, std
    return ImageClassifier(
        head,
        resize=geometry.resize,
        crop=geometry.crop,
        mean=geometry.config["mean"],
        std=geometry.config["std"],
        labels=list(labels),
        interpolation=geometry.interpolation,
    )


def load_oracle(
    oracle: str | Any,
    labels: Sequence[str],
    device: str | torch.device = "cpu",
    clip_template: str = DEFAULT_CLIP_TEMPLATE,
) -> tuple[ImageClassifier, str, str]:
    """The oracle named by ``oracle`` (see the module docstring) as ``(classifier, name, kind)``.

    ``kind`` is ``"clip"`` or ``"classifier"``. ``labels`` are the run's label names (the CLIP oracle's classes).
    """
    from pipeline_kldb_boundary import as_image_classifier

    if isinstance(oracle, str):
        if not oracle.strip():
            raise KLDBInputError(f"Expected argument `oracle` to be {ORACLE_SPEC_HELP} but got {oracle!r}.")
        if oracle.startswith(CLIP_PREFIX):
            return _load_clip(oracle, labels, device, clip_template), oracle, "clip"
        from kldb.loading import load_classifier

        try:
            classifier = load_classifier(oracle, device)
        except (OSError, ValueError) as error:
            raise KLDBInputError(
                f"Expected argument `oracle` to be {ORACLE_SPEC_HELP} but got {oracle!r} ({error})"
            ) from error
        return classifier, oracle, "classifier"
    if oracle is None or isinstance(oracle, (bool, int, float)) or not callable(oracle):
        raise KLDBInputTypeError(f"Expected argument `oracle` to be {ORACLE_SPEC_HELP} but got {oracle!r}.")
    classifier = as_image_classifier(oracle)
    name = type(getattr(classifier, "model", classifier)).__name__
    return classifier.to(device), name, "classifier"


def _load_clip(spec: str, labels: Sequence[str], device: str | torch.device, clip_template: str) -> ImageClassifier:
    from transformers import CLIPModel, CLIPProcessor

    check_clip_template(clip_template)
    path = spec[len(CLIP_PREFIX) :]
    if not path.strip():
        raise KLDBInputError(
            f"Expected argument `oracle` to look like 'clip:<folder or Hub id>' (a CLIPModel with its CLIPProcessor) "
            f"but got {spec!r}."
        )
    try:
        model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise KLDBInputError(
            f"Expected argument `oracle` to name a CLIPModel with its CLIPProcessor after 'clip:' but got {spec!r} "
            f"({error})"
        ) from error
    return clip_oracle(model, processor, labels, clip_template).to(device)


def check_threshold(threshold: Any) -> float:
    """Refuse a threshold that is not a number in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise KLDBInputError(f"Expected argument `threshold` to be a number in [0, 1] but got {threshold!r}.")
    return float(threshold)


# ----------------------------------------------------------------------------------------------------------------------
# Judgements and statistics (pure)
# ----------------------------------------------------------------------------------------------------------------------


def judge(row: RescoredImage, threshold: float, labels: Sequence[str]) -> dict[str, Any]:
    """One image's validity: the oracle's top-1 class and probabilities, ``valid`` and ``off_manifold``."""
    valid = row.predicted_b in row.classes
    return {
        "setting": row.setting,
        "seed": row.seed,
        "file": row.file,
        "kldb": row.kldb_a,
        "oracle_top1": row.predicted_b,
        "oracle_top1_label": labels[row.predicted_b] if row.predicted_b < len(labels) else str(row.predicted_b),
        "oracle_max_probability": row.max_probability_b,
        "oracle_class_mass": row.class_mass_b,
        "valid": valid,
        "off_manifold": (not valid) or row.max_probability_b < threshold,
    }


def validity_statistics(images: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and shares of a group of judged images (:func:`judge`)."""
    n = len(images)
    valid = sum(image["valid"] for image in images)
    off = sum(image["off_manifold"] for image in images)
    return {
        "n": n,
        "valid_count": valid,
        "valid_share": valid / n,
        "off_manifold_count": off,
        "off_manifold_share": off / n,
        "top1_outside_c_count": n - valid,
        "low_confidence_count": sum(image["valid"] and image["off_manifold"] for image in images),
        "median_oracle_max_probability": summary_statistics([i["oracle_max_probability"] for i in images])["median"],
        "median_oracle_class_mass": summary_statistics([i["oracle_class_mass"] for i in images])["median"],
    }


def most_ambiguous_valid(images: Sequence[dict[str, Any]], per_setting: int) -> dict[str, list[dict[str, Any]]]:
    """Per setting, up to ``per_setting`` valid images with the lowest audited KLDB (ties: lower seed)."""

    def order(image: dict[str, Any]) -> tuple[float, int]:
        kldb = image["kldb"]
        return (kldb if kldb is not None and math.isfinite(kldb) else math.inf, image["seed"])

    return {
        setting: sorted((i for i in group if i["valid"]), key=order)[:per_setting]
        for setting, group in _group(images).items()
    }


def _group(images: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for image in images:
        groups.setdefault(image["setting"], []).append(image)
    return groups


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def ambiguous_valid_grid(run_dir: str | os.PathLike[str], chosen: dict[str, list[dict[str, Any]]]) -> bytes:
    """A captioned grid (PNG bytes): one row per setting, its most ambiguous valid images."""
    import PIL.Image

    from kldb.render import captioned_grid, labelled

    rows = []
    for setting, images in chosen.items():
        pictures, captions = [], []
        for image in images:
            with PIL.Image.open(Path(run_dir) / image["file"]) as picture:
                pictures.append(picture.convert("RGB"))
            captions.append(
                [
                    labelled("KLDB", image["kldb"], 3),
                    labelled(f"oracle {image['oracle_top1_label']}", image["oracle_max_probability"], 2),
                    labelled("seed", image["seed"]),
                ]
            )
        title = setting if images else f"{setting}: no valid image"
        rows.append((title, pictures, captions))
    buffer = io.BytesIO()
    captioned_grid(rows).save(buffer, format="PNG")
    return buffer.getvalue()


def validity_markdown(result: dict[str, Any]) -> str:
    """The validity of a run as a Markdown table, one row per setting and one for the whole run."""
    lines = [
        f"# Validity of run `{result['run']}`: oracle `{result['oracle']}`",
        "",
        f"Valid: the oracle's top-1 class is in C. Off-manifold: the oracle's top-1 class is outside C, or its maximum "
        f"probability is below {result['threshold']:g}.",
        "",
        "| setting | n | valid | off-manifold | top-1 outside C | valid, low confidence | median oracle max p | "
        "median oracle p(C) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in [*result["settings"], {"setting": "**all**", **result["overall"]}]:
        lines.append(
            f"| {row['setting']} | {row['n']} | {100 * row['valid_share']:.1f}% ({row['valid_count']}) | "
            f"{100 * row['off_manifold_share']:.1f}% ({row['off_manifold_count']}) | {row['top1_outside_c_count']} | "
            f"{row['low_confidence_count']} | {row['median_oracle_max_probability']:.3f} | "
            f"{row['median_oracle_class_mass']:.3f} |"
        )
    lines += ["", f"Most ambiguous valid images: `{FILE_NAMES['grid']}`.", ""]
    return "\n".join(lines)


def _setting_fields(records: Sequence[ImageRecord]) -> dict[str, Any]:
    first = records[0]
    return {
        "classes": list(first.classes),
        "class_indices": [int(c) for c in first.class_indices],
        "alpha": first.alpha,
        "beta": first.beta,
    }


def _is_digits_run(run: str | os.PathLike[str]) -> bool:
    from kldb.digits import WORLD_PATH

    pipeline = run_info(run)["fixed"].get("pipeline")
    if pipeline == "digits":
        return True
    return isinstance(pipeline, str) and Path(pipeline).expanduser().resolve() == WORLD_PATH.resolve()


def run_validity(
    run_dir: str | os.PathLike[str],
    oracle: str | Any | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    out_dir: str | os.PathLike[str] | None = None,
    clip_template: str = DEFAULT_CLIP_TEMPLATE,
    per_setting: int = 6,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Label every image of a run with an oracle and write ``validity.json``, ``validity.md`` and the grid.

    Args:
        run_dir: a run folder (``kldb sweep`` / ``kldb generate``).
        oracle: the independent classifier (see the module docstring); ``None``: the digits world's validity
            classifier for a digits run.
        threshold: an image whose oracle maximum probability is below it is off-manifold; in [0, 1].
        out_dir: where to write (default ``<run>/report``).
        clip_template: the CLIP oracle's text per class, with the field ``{name}``.
        per_setting: valid images per setting in the grid.
        batch_size: images per oracle pass.
        device: where the oracle runs.

    Returns:
        ``{"run", "oracle", "oracle_kind", "threshold", "clip_template", "labels", "overall", "settings", "images",
        "files"}``. ``overall`` and each row of ``settings`` hold ``n``, ``valid_count``, ``valid_share``,
        ``off_manifold_count``, ``off_manifold_share``, ``top1_outside_c_count``, ``low_confidence_count``,
        ``median_oracle_max_probability`` and ``median_oracle_class_mass``; a setting row also ``setting``,
        ``classes``, ``class_indices``, ``alpha``, ``beta``. ``images`` has one :func:`judge` dict per image, in
        manifest order. ``clip_template`` is ``None`` unless the oracle is CLIP.
    """
    threshold = check_threshold(threshold)
    for name, value in (("per_setting", per_setting), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KLDBInputError(f"Expected argument `{name}` to be a positive integer but got {value!r}.")
    records = read_run(run_dir)
    labels = run_labels(run_dir, records)
    if oracle is None:
        if not _is_digits_run(run_dir):
            raise KLDBInputError(
                f"Expected argument `oracle` to be {ORACLE_SPEC_HELP} but got None, and run {str(run_dir)!r} was not "
                "made with the digits world, whose validity classifier is the default."
            )
        oracle = str(digits_validity_classifier_path())
    classifier, name, kind = load_oracle(oracle, labels, device, clip_template)
    checked_second_classifier(run_dir, records, classifier, subject="argument `oracle`")
    rows = score_records(run_dir, records, classifier, batch_size)
    images = [judge(row, threshold, labels) for row in rows]
    record_groups = iter_settings(records)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "oracle": name,
        "oracle_kind": kind,
        "threshold": threshold,
        "clip_template": clip_template if kind == "clip" else None,
        "labels": list(labels),
        "overall": validity_statistics(images),
        "settings": [
            {"setting": setting, **_setting_fields(record_groups[setting]), **validity_statistics(group)}
            for setting, group in _group(images).items()
        ],
        "images": images,
    }
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    grid = ambiguous_valid_grid(run_dir, most_ambiguous_valid(images, per_setting))
    files = {
        FILE_NAMES["grid"]: atomic_write_bytes(out / FILE_NAMES["grid"], grid),
        FILE_NAMES["markdown"]: atomic_write_text(out / FILE_NAMES["markdown"], validity_markdown(result)),
    }
    result["files"] = {key: str(path) for key, path in files.items()}
    result["files"][FILE_NAMES["json"]] = str(out / FILE_NAMES["json"])
    atomic_write_json(out / FILE_NAMES["json"], result)
    return result
