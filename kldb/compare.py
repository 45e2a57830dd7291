"""Compare classifiers on the same boundary: score a run's images with a second classifier of the same label space.

Images made to sit on classifier A's decision boundary between the classes C: does classifier B hesitate on them too?
Per setting and over the whole run, :func:`compare_run` reports

- the median KLDB and entropy under A (from the manifest) and under B (rescored from the PNGs);
- the Spearman rank correlation of KLDB under A and under B (``scipy.stats.spearmanr``): do the images A finds most
  ambiguous rank as most ambiguous under B?
- ``top_set_agreement``: the share of images on which A and B have the same set of |C| most probable classes;
- ``both_top_set_share``: the share of images whose top-|C| classes are exactly C under both;
- ``prediction_agreement``: the share of images with the same arg-max class.

A's scores in the manifest were computed on the generated image before it was quantised to 8-bit PNG; B's are computed
on the PNG, as B would see it from disk.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kldb.errors import KLDBInputError
from kldb.io import atomic_write_json, atomic_write_text, load_image
from kldb.metrics import summary_statistics, top_set_is_classes
from kldb.runfolder import ImageRecord, iter_settings, read_run, run_labels
from pipeline_kldb_boundary import ImageClassifier, entropy, kldb_score

logger = logging.getLogger(__name__)

PER_IMAGE_FIELDS = (
    "setting",
    "seed",
    "file",
    "kldb_a",
    "kldb_b",
    "entropy_a",
    "entropy_b",
    "predicted_a",
    "predicted_b",
    "top_set_a",
    "top_set_b",
)


@dataclass
class RescoredImage:
    """An image of a run scored by the run's classifier A (from its manifest record) and by a second classifier B."""

    setting: str
    seed: int
    file: str
    classes: list[int]
    kldb_a: float
    kldb_b: float
    entropy_a: float
    entropy_b: float
    predicted_a: int
    predicted_b: int
    top_set_a: list[int]  # the |C| most probable classes, sorted
    top_set_b: list[int]
    a_top_is_c: bool
    b_top_is_c: bool
    max_probability_b: float  # B's largest class probability
    class_mass_b: float  # B's probability of C (the sum over its classes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_same_label_space(
    labels_a: Sequence[str], classifier_b: ImageClassifier, num_classes_b: int, subject: str = "the second classifier"
) -> None:
    """Refuse a second classifier whose outputs are not the run classifier's classes (same count, same names).

    ``subject`` names the classifier in the message (e.g. ``"argument `oracle`"``).
    """
    if num_classes_b != len(labels_a):
        raise KLDBInputError(
            f"Expected {subject} to have the run's {len(labels_a)} classes but it returns {num_classes_b} logits."
        )
    labels_b = classifier_b.labels
    if labels_b is not None and [a.casefold() for a in labels_a] != [b.casefold() for b in labels_b]:
        first = next(i for i, (a, b) in enumerate(zip(labels_a, labels_b)) if a.casefold() != b.casefold())
        raise KLDBInputError(
            f"Expected {subject} to have the run's label names but class {first} is "
            f"{labels_b[first]!r} for it and {labels_a[first]!r} for the run."
        )


def checked_second_classifier(
    run: str | os.PathLike[str],
    records: Sequence[ImageRecord],
    classifier: ImageClassifier,
    subject: str = "the second classifier",
) -> ImageClassifier:
    """``classifier`` after checking, on the run's first image, that it has the run's label space."""
    with torch.no_grad():
        probe = load_image(Path(run) / records[0].file).unsqueeze(0)
        num_classes = classifier(probe).shape[-1]
    check_same_label_space(run_labels(run, records), classifier, num_classes, subject)
    return classifier


@torch.no_grad()
def score_records(
    run_dir: str | os.PathLike[str],
    records: Sequence[ImageRecord],
    classifier: ImageClassifier,
    batch_size: int = 64,
) -> list[RescoredImage]:
    """Rescore the PNGs of ``records`` with ``classifier``: one :class:`RescoredImage` per image, in order."""
    from tqdm.auto import tqdm

    out = Path(run_dir)
    rows = []
    for start in tqdm(range(0, len(records), batch_size), desc="scoring", unit="batch", leave=False):
        chunk = records[start : start + batch_size]
        images = torch.stack([load_image(out / r.file) for r in chunk])  # (B, 3, H, W)
        logits = classifier(images)  # (B, n)
        ent = entropy(logits)
        probabilities = logits.double().softmax(dim=-1)  # (B, n)
        for i, r in enumerate(chunk):
            classes = [int(c) for c in r.class_indices]
            row_logits = logits[i : i + 1]
            top_b = row_logits[0].topk(len(classes)).indices.tolist()
            rows.append(
                RescoredImage(
                    setting=r.setting,
                    seed=r.seed,
                    file=r.file,
                    classes=classes,
                    kldb_a=float(r.kldb),
                    kldb_b=float(kldb_score(row_logits, classes)[0]),
                    entropy_a=float(r.entropy),
                    entropy_b=float(ent[i]),
                    predicted_a=int(r.predicted_class),
                    predicted_b=int(row_logits[0].argmax()),
                    top_set_a=sorted(int(c) for c in r.top_classes[: len(classes)]),
                    top_set_b=sorted(top_b),
                    a_top_is_c=top_set_is_classes(r.top_classes, classes),
                    b_top_is_c=top_set_is_classes(top_b, classes),
                    max_probability_b=float(probabilities[i].max()),
                    class_mass_b=float(probabilities[i, classes].sum()),
                )
            )
    return rows


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


def summarize(rows: Sequence[RescoredImage]) -> dict[str, Any]:
    """Carry-over statistics of a set of rescored images (see the module docstring)."""
    kldb_a, kldb_b = [r.kldb_a for r in rows], [r.kldb_b for r in rows]
    return {
        "n": len(rows),
        "median_kldb_a": summary_statistics(kldb_a)["median"],
        "median_kldb_b": summary_statistics(kldb_b)["median"],
        "median_entropy_a": summary_statistics([r.entropy_a for r in rows])["median"],
        "median_entropy_b": summary_statistics([r.entropy_b for r in rows])["median"],
        "kldb_spearman": _spearman(kldb_a, kldb_b),
        "top_set_agreement": float(np.mean([r.top_set_a == r.top_set_b for r in rows])),
        "a_top_set_share": float(np.mean([r.a_top_is_c for r in rows])),
        "b_top_set_share": float(np.mean([r.b_top_is_c for r in rows])),
        "both_top_set_share": float(np.mean([r.a_top_is_c and r.b_top_is_c for r in rows])),
        "prediction_agreement": float(np.mean([r.predicted_a == r.predicted_b for r in rows])),
    }


def compare_run(
    run: str | os.PathLike[str],
    classifier: str | Any,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Score a run's images with a second classifier and write ``per_image.csv``, ``summary.json``, ``summary.md``.

    Args:
        run: a sweep folder.
        classifier: the second classifier B: a classifier spec (see :func:`kldb.loading.load_classifier`) or an
            object :func:`~pipeline_kldb_boundary.as_image_classifier` accepts.
        out_dir: where to write (default ``<run>/compare``).
        batch_size: images per classifier pass.
        device: where B runs.

    Returns:
        ``{"classifier": ..., "overall": {...}, "settings": [{"setting": ..., ...}], "files": {...}}``.
    """
    from kldb.loading import load_classifier
    from kldb.report import to_csv
    from pipeline_kldb_boundary import as_image_classifier

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KLDBInputError(f"Expected argument `batch_size` to be a positive integer but got {batch_size!r}.")
    records = read_run(run)
    name = classifier if isinstance(classifier, str) else type(classifier).__name__
    adapter = load_classifier(classifier, device) if isinstance(classifier, str) else as_image_classifier(classifier)
    checked_second_classifier(run, records, adapter)
    rows = score_records(run, records, adapter, batch_size)
    groups = iter_settings(rows)
    result: dict[str, Any] = {
        "run": str(run),
        "classifier": name,
        "overall": summarize(rows),
        "settings": [{"setting": setting, **summarize(group)} for setting, group in groups.items()],
    }
    out = Path(out_dir) if out_dir is not None else Path(run) / "compare"
    files = {
        "per_image.csv": atomic_write_text(
            out / "per_image.csv", to_csv([r.as_dict() for r in rows], PER_IMAGE_FIELDS)
        ),
        "summary.json": atomic_write_json(out / "summary.json", result),
        "summary.md": atomic_write_text(out / "summary.md", summary_markdown(result)),
    }
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table, one row per setting and one for the whole run."""
    lines = [
        f"# Does the ambiguity carry over? Run `{result['run']}`, second classifier `{result['classifier']}`",
        "",
        "A = the classifier the images were made for (manifest), B = the second classifier (rescored PNGs).",
        "",
        "| setting | n | median KLDB A | median KLDB B | median entropy A | median entropy B | Spearman (KLDB) | "
        "top-|C| agreement | top-|C| = C under both | same prediction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in [*result["settings"], {"setting": "**all**", **result["overall"]}]:
        lines.append(
            f"| {row['setting']} | {row['n']} | {row['median_kldb_a']:.4f} | {row['median_kldb_b']:.4f} | "
            f"{row['median_entropy_a']:.4f} | {row['median_entropy_b']:.4f} | {_fmt(row['kldb_spearman'])} | "
            f"{100 * row['top_set_agreement']:.0f}% | {100 * row['both_top_set_share']:.0f}% | "
            f"{100 * row['prediction_agreement']:.0f}% |"
        )
    return "\n".join(lines) + "\n"
