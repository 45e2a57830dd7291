"""The report of a finished sweep: statistics per setting, the paper's Table 1, plots, the most ambiguous images and a
model-card section.

Per setting (one class subset C, one alpha, one beta), over its images (:func:`setting_metrics`, :func:`run_metrics`):

- median and interquartile range of KLDB and of the entropy of the full softmax (nats), the paper's measures
  (:func:`kldb.metrics.summary_statistics`), each median with a bootstrap confidence interval over the setting's images
  (``median_kldb_low`` / ``median_kldb_high``, ``median_entropy_low`` / ``median_entropy_high``;
  :func:`kldb.metrics.median_interval`);
- for a guided setting (alpha > 0), the relative change of the median KLDB and of the median entropy against the
  prompt-only setting (alpha = 0) of the same class subset and beta, ``median / median_prompt_only - 1``, with a
  bootstrap interval paired by seed (``relative_kldb_change_low`` / ``_high``, ``relative_entropy_change_low`` /
  ``_high``, ``n_paired`` seeds; :func:`kldb.metrics.paired_relative_change_interval`);
- ``top_set_share``: the share of images whose |C| most probable classes are exactly C;
- ``mean_class_margin``: the mean gap between the two most probable classes of C (undefined for |C| = 1);
- FID against real images of the audited classes, on the audited classifier's penultimate features (default) or
  InceptionV3 (see :mod:`kldb.metrics`).

A run made from a folder of real images (``init_images``, :mod:`kldb.sweep`) has one setting per class subset, alpha,
beta and strength, pooling its sources. Its rows add :data:`IMAGE_TO_IMAGE_FIELDS`: the ``strength``, ``n_sources``,
the median KLDB of the sources themselves (``median_kldb_start``) beside the results' ``median_kldb``, and the
results' median ``pixel_l2`` and ``ssim`` to their sources. Its prompt-only baseline is alpha = 0 at the same class
subset, beta *and strength*, paired by (source, seed); Table 1 has one row per class subset, beta and strength.
``report.md`` then has a "Before and after" section: those medians per setting, and ``before_after.png`` (written with
``before_after.json``, the pairs it shows): per setting, up to ``per_setting`` sources in source order, each beside its
result at the lowest seed, with the classifier's probabilities for C before and after. The sources are read from the
``init_images`` folder ``sweep.json`` recorded; a source missing there or whose SHA-256 differs from the manifest's is
left out with a warning (and said on the page).

:func:`write_report` writes, into ``<run>/report`` by default:

- ``table1.md``, ``table1.csv``, ``table1.json``: for each class subset and beta, alpha = 0 (prompt-only) against the
  alpha > 0 with the lowest median KLDB: FID, median KLDB, median entropy and the relative KLDB change, the medians and
  the change with their bootstrap intervals (``_low`` / ``_high`` columns in CSV and JSON, brackets in Markdown);
- ``settings.csv``, ``metrics.json``: every setting's statistics;
- the bootstrap's resamples, seed, confidence level and method are recorded under ``"bootstrap"`` in ``metrics.json``
  and ``table1.json`` (defaults: :data:`kldb.metrics.BOOTSTRAP_RESAMPLES` resamples, seed
  :data:`kldb.metrics.BOOTSTRAP_SEED`, 95 %, percentile intervals), so a rerun gives the same numbers;
- ``kldb_distribution.png``: KLDB distribution per alpha, one panel per beta (and class subset);
- ``median_kldb_vs_alpha.png``: median KLDB against alpha with bootstrap interval bars on the median and the
  interquartile band of the images, one line per beta;
- ``ambiguous_images.png``: per setting, the images with the lowest KLDB, with their class probabilities;
- ``model_card_section.md``: a section an auditor can paste into the classifier's model card (Mitchell et al., 2019);
- ``report.md``: all of the above in one page.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kldb.errors import KLDBInputError, KLDBInputTypeError, KLDBPathError
from kldb.io import atomic_write_bytes, atomic_write_json, atomic_write_text, load_image
from kldb.metrics import (
    BOOTSTRAP_CONFIDENCE,
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    FEATURE_KINDS,
    ClassifierFeatures,
    bootstrap_settings,
    class_margin,
    fid,
    median_interval,
    paired_relative_change_interval,
    summary_statistics,
    top_set_is_classes,
)
from kldb.runfolder import (
    ImageRecord,
    iter_settings,
    load_run_images,
    read_run,
    run_classifier,
    run_info,
    run_labels,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TABLE_FIELDS = (
    "classes",
    "beta",
    "alpha_baseline",
    "alpha_best",
    "fid_baseline",
    "fid_best",
    "median_kldb_baseline",
    "median_kldb_baseline_low",
    "median_kldb_baseline_high",
    "median_kldb_best",
    "median_kldb_best_low",
    "median_kldb_best_high",
    "median_entropy_baseline",
    "median_entropy_baseline_low",
    "median_entropy_baseline_high",
    "median_entropy_best",
    "median_entropy_best_low",
    "median_entropy_best_high",
    "relative_kldb_change",
    "relative_kldb_change_low",
    "relative_kldb_change_high",
    "relative_entropy_change",
    "relative_entropy_change_low",
    "relative_entropy_change_high",
    "n_baseline",
    "n_best",
    "n_paired",
)
#: Keys of a setting row (:func:`setting_metrics`) that hold a bootstrap interval's bounds, by the value they bound.
INTERVAL_KEYS = {
    "median_kldb": ("median_kldb_low", "median_kldb_high"),
    "median_entropy": ("median_entropy_low", "median_entropy_high"),
    "relative_kldb_change": ("relative_kldb_change_low", "relative_kldb_change_high"),
    "relative_entropy_change": ("relative_entropy_change_low", "relative_entropy_change_high"),
}
#: Quality measures per feature space (:mod:`kldb.quality`), merged into the setting rows as ``<measure>_<space>``.
QUALITY_MEASURES = ("fid", "kid_mean", "kid_std", "precision", "recall")
#: Validity shares per setting (:mod:`kldb.validity`), merged into the setting rows.
VALIDITY_KEYS = ("valid_share", "off_manifold_share")
#: Keys of the setting rows of an image-to-image run (``init_images``): see the module docstring.
IMAGE_TO_IMAGE_FIELDS = ("strength", "n_sources", "median_kldb_start", "median_pixel_l2", "median_ssim")
#: Table 1 also names the best alpha among the guided settings with at least this valid share.
MIN_VALID_SHARE = 0.9
SETTING_FIELDS = (
    "setting",
    "classes",
    "alpha",
    "alpha_mode",
    "step_control",
    "beta",
    "n",
    "median_kldb",
    "median_kldb_low",
    "median_kldb_high",
    "kldb_q25",
    "kldb_q75",
    "kldb_iqr",
    "median_entropy",
    "median_entropy_low",
    "median_entropy_high",
    "entropy_q25",
    "entropy_q75",
    "entropy_iqr",
    "relative_kldb_change",
    "relative_kldb_change_low",
    "relative_kldb_change_high",
    "relative_entropy_change",
    "relative_entropy_change_low",
    "relative_entropy_change_high",
    "n_paired",
    "top_set_share",
    "mean_class_margin",
    "mean_step_halvings",
    "rejected_step_share",
    "fid",
)


def merge_quality(rows: Sequence[dict[str, Any]], quality: dict[str, Any]) -> list[str]:
    """Put the per-setting result of :func:`kldb.quality.run_quality` into the setting ``rows`` as
    ``<measure>_<space>`` (``fid_independent``, ``kid_mean_pixels``, ...); return the keys added."""
    by_setting = {r["setting"]: r.get("quality") or {} for r in quality["settings"]}
    keys = [f"{measure}_{space}" for space in quality["spaces"] for measure in QUALITY_MEASURES]
    for row in rows:
        measured = by_setting.get(row["setting"], {})
        for space in quality["spaces"]:
            for measure in QUALITY_MEASURES:
                row[f"{measure}_{space}"] = (measured.get(space) or {}).get(measure)
    return keys


def merge_validity(rows: Sequence[dict[str, Any]], validity: dict[str, Any]) -> list[str]:
    """Put the per-setting shares of :func:`kldb.validity.run_validity` into the setting ``rows``
    (:data:`VALIDITY_KEYS`); return the keys added."""
    by_setting = {r["setting"]: r for r in validity["settings"]}
    for row in rows:
        judged = by_setting.get(row["setting"])
        for key in VALIDITY_KEYS:
            row[key] = judged[key] if judged is not None else None
    return list(VALIDITY_KEYS)


def _extra_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The quality and validity keys the setting rows carry (see :func:`merge_quality`, :func:`merge_validity`)."""
    keys: list[str] = []
    for row in rows:
        for key in row:
            if key not in keys and (key in VALIDITY_KEYS or key.startswith(tuple(f"{m}_" for m in QUALITY_MEASURES))):
                keys.append(key)
    return keys


def table1(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's Table 1 from per-setting rows (see :func:`setting_metrics`).

    For each class subset and beta: the prompt-only row (alpha = 0) and the alpha > 0 with the lowest median KLDB
    (ties: the smaller alpha), with ``relative_kldb_change = (best - baseline) / baseline``. Without an alpha = 0
    setting the baseline fields are ``None``; without an alpha > 0 the best fields are.

    The bootstrap intervals come from the rows (see :func:`setting_metrics`): ``median_kldb_baseline_low`` /
    ``_high``, ``median_kldb_best_low`` / ``_high``, ``median_entropy_baseline_low`` / ``_high``,
    ``median_entropy_best_low`` / ``_high``, and the best row's paired intervals ``relative_kldb_change_low`` /
    ``_high``, ``relative_entropy_change`` (with ``_low`` / ``_high``) and ``n_paired``. Rows without them (computed
    elsewhere) give ``None`` there.

    Quality and validity keys of the rows (:func:`merge_quality`, :func:`merge_validity`) come through as
    ``<key>_baseline`` and ``<key>_best``. With validity, ``alpha_valid`` names the guided alpha with the lowest median
    KLDB among those with a valid share of at least :data:`MIN_VALID_SHARE`, with its ``median_kldb_valid``,
    ``relative_kldb_change_valid`` and ``valid_share_valid`` (``None`` when no guided alpha is that valid).
    """
    extra = _extra_keys(rows)
    groups: dict[tuple[tuple[str, ...], float, float | None], list[dict[str, Any]]] = {}
    for row in rows:  # an image-to-image run: one row per strength too
        groups.setdefault((tuple(row["classes"]), float(row["beta"]), row.get("strength")), []).append(row)
    table = []
    for (classes, beta, strength), group in groups.items():
        baseline = next((r for r in group if r["alpha"] == 0.0), None)
        guided = sorted((r for r in group if r["alpha"] > 0.0), key=lambda r: (r["median_kldb"], r["alpha"]))
        best = guided[0] if guided else None
        if baseline is None:
            logger.warning("No alpha = 0 (prompt-only) setting for classes %s, beta %g: no baseline.", classes, beta)
        change = None
        if baseline is not None and best is not None and baseline["median_kldb"] > 0:
            change = (best["median_kldb"] - baseline["median_kldb"]) / baseline["median_kldb"]

        def field(row: dict[str, Any] | None, name: str) -> Any:
            return row.get(name) if row is not None else None

        paired = best if baseline is not None else None  # the best row's change is against this baseline

        table.append(
            {
                "classes": list(classes),
                "beta": beta,
                "alpha_baseline": field(baseline, "alpha"),
                "alpha_best": field(best, "alpha"),
                "alpha_mode_best": field(best, "alpha_mode"),
                "fid_baseline": field(baseline, "fid"),
                "fid_best": field(best, "fid"),
                "median_kldb_baseline": field(baseline, "median_kldb"),
                "median_kldb_baseline_low": field(baseline, "median_kldb_low"),
                "median_kldb_baseline_high": field(baseline, "median_kldb_high"),
                "median_kldb_best": field(best, "median_kldb"),
                "median_kldb_best_low": field(best, "median_kldb_low"),
                "median_kldb_best_high": field(best, "median_kldb_high"),
                "median_entropy_baseline": field(baseline, "median_entropy"),
                "median_entropy_baseline_low": field(baseline, "median_entropy_low"),
                "median_entropy_baseline_high": field(baseline, "median_entropy_high"),
                "median_entropy_best": field(best, "median_entropy"),
                "median_entropy_best_low": field(best, "median_entropy_low"),
                "median_entropy_best_high": field(best, "median_entropy_high"),
                "relative_kldb_change": change,
                "relative_kldb_change_low": field(paired, "relative_kldb_change_low"),
                "relative_kldb_change_high": field(paired, "relative_kldb_change_high"),
                "relative_entropy_change": field(paired, "relative_entropy_change"),
                "relative_entropy_change_low": field(paired, "relative_entropy_change_low"),
                "relative_entropy_change_high": field(paired, "relative_entropy_change_high"),
                "n_baseline": field(baseline, "n"),
                "n_best": field(best, "n"),
                "n_paired": field(paired, "n_paired"),
            }
        )
        if strength is not None:
            table[-1]["strength"] = strength
        for key in extra:
            table[-1][f"{key}_baseline"] = field(baseline, key)
            table[-1][f"{key}_best"] = field(best, key)
        if "valid_share" in extra:
            valid = [r for r in guided if r.get("valid_share") is not None and r["valid_share"] >= MIN_VALID_SHARE]
            choice = valid[0] if valid else None  # guided is sorted by median KLDB, then alpha
            table[-1]["alpha_valid"] = field(choice, "alpha")
            table[-1]["median_kldb_valid"] = field(choice, "median_kldb")
            table[-1]["relative_kldb_change_valid"] = field(choice if baseline is not None else None, "relative_kldb_change")
            table[-1]["valid_share_valid"] = field(choice, "valid_share")
    return table


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _alpha(value: float | None, mode: str | None = None) -> str:
    """``0.1``; ``auto (0.1)`` for an alpha a pilot chose."""
    if value is None:
        return "n/a"
    return f"auto ({value:g})" if mode == "auto" else f"{value:g}"


def _with_interval(value: float | None, low: float | None, high: float | None, digits: int = 4) -> str:
    """``0.1430 [0.1012, 0.1904]``; the bracket only where both bounds exist."""
    if value is None or low is None or high is None:
        return _number(value, digits)
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _percent_with_interval(value: float | None, low: float | None, high: float | None) -> str:
    """``-48.2% [-55.1%, -40.3%]``; the bracket only where both bounds exist."""
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{100 * value:+.1f}%"
    return f"{100 * value:+.1f}% [{100 * low:+.1f}%, {100 * high:+.1f}%]"


def bootstrap_note(bootstrap: dict[str, Any]) -> str:
    """One sentence that says what the brackets of the tables are (from :func:`kldb.metrics.bootstrap_settings`)."""
    return (
        f"Brackets: {100 * bootstrap['confidence']:g}% bootstrap intervals ({bootstrap['method']}, "
        f"{bootstrap['resamples']} resamples, seed {bootstrap['seed']}). A median's interval resamples the images of "
        "its setting; the KLDB change's interval resamples seeds, keeping each seed's prompt-only and guided image "
        "together (paired by seed)."
    )


def table1_markdown(table: Sequence[dict[str, Any]], bootstrap: dict[str, Any] | None = None) -> str:
    """Table 1 in the paper's layout: two lines per beta (alpha = 0, then the best alpha).

    Medians and the KLDB change carry their bootstrap intervals in brackets where the rows have them; with
    ``bootstrap`` (the record of :func:`kldb.metrics.bootstrap_settings`) a note under the table says how they were
    made.
    """
    lines = [
        "| classes | β | α | FID ↓ | M(KLDB) ↓ | M(Entropy) ↑ | KLDB change |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        classes = " / ".join(row["classes"])
        if row.get("strength") is not None:  # an image-to-image run
            classes += f" (strength {row['strength']:g})"

        def cell(name: str, row: dict[str, Any] = row) -> str:
            return _with_interval(row[name], row.get(f"{name}_low"), row.get(f"{name}_high"))

        lines.append(
            f"| {classes} | {row['beta']:g} | {_alpha(row['alpha_baseline'])} | {_number(row['fid_baseline'], 2)} | "
            f"{cell('median_kldb_baseline')} | {cell('median_entropy_baseline')} | |"
        )
        change = _percent_with_interval(
            row["relative_kldb_change"], row.get("relative_kldb_change_low"), row.get("relative_kldb_change_high")
        )
        lines.append(
            f"| | | {_alpha(row['alpha_best'], row.get('alpha_mode_best'))} | {_number(row['fid_best'], 2)} | {cell('median_kldb_best')} | "
            f"{cell('median_entropy_best')} | {change} |"
        )
    if bootstrap is not None:
        lines += ["", bootstrap_note(bootstrap)]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    """Rows as CSV with a header; lists are joined with ``+``; ``None`` is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: "+".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v) for k, v in row.items()}
        )
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Statistics per setting, and FID against reference images
# ----------------------------------------------------------------------------------------------------------------------


def setting_metrics(
    records: Sequence[ImageRecord],
    *,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
    bootstrap_confidence: float = BOOTSTRAP_CONFIDENCE,
) -> list[dict[str, Any]]:
    """One row of statistics per setting of a run, in the order the settings first appear in ``records``.

    Besides the medians, quartiles and shares (module docstring), each row has bootstrap intervals
    (:data:`kldb.metrics.BOOTSTRAP_METHOD` intervals through ``scipy.stats.bootstrap``):

    - ``median_kldb_low`` / ``median_kldb_high`` and ``median_entropy_low`` / ``median_entropy_high``: the median's
      interval, resampling the setting's scored images (:func:`kldb.metrics.median_interval`; ``None`` for one image);
    - for alpha > 0 with a prompt-only (alpha = 0) setting of the same class subset and beta in ``records``:
      ``relative_kldb_change = median_kldb / median_kldb_prompt_only - 1`` over all images (Table 1's definition), the
      same for entropy (``relative_entropy_change``), and their intervals ``relative_kldb_change_low`` / ``_high``,
      ``relative_entropy_change_low`` / ``_high``, resampling the ``n_paired`` seeds that both settings have
      (:func:`kldb.metrics.paired_relative_change_interval`). These keys are ``None`` for alpha = 0 and without a
      prompt-only setting.

    Args:
        records: the run's records.
        bootstrap_resamples: resamples per interval.
        bootstrap_seed: seed of the resampling; each interval starts from ``numpy.random.default_rng(seed)``.
        bootstrap_confidence: two-sided confidence level, in (0, 1).
    """
    options = bootstrap_settings(
        bootstrap_resamples, bootstrap_seed, bootstrap_confidence, BOOTSTRAP_METHOD, prefix="bootstrap_"
    )
    options = {k: options[k] for k in ("resamples", "seed", "confidence", "method")}
    rows = []
    # setting -> "kldb" / "entropy" -> seed (image-to-image: (source, seed)) -> value
    by_seed: dict[str, dict[str, dict[Any, float]]] = {}
    for setting, group in iter_settings(records).items():
        first = group[0]
        scored = [r for r in group if r.kldb is not None and r.entropy is not None]
        if not scored:
            raise KLDBInputError(
                f"Expected setting {setting!r} to have at least one image with finite scores but it has none."
            )
        if len(scored) < len(group):
            logger.warning(
                "Setting %s: %d images without finite scores are left out.", setting, len(group) - len(scored)
            )
        kldb = summary_statistics([r.kldb for r in scored])
        entropy = summary_statistics([r.entropy for r in scored])
        kldb_low, kldb_high = median_interval([r.kldb for r in scored], **options)
        entropy_low, entropy_high = median_interval([r.entropy for r in scored], **options)
        by_seed[setting] = {
            "kldb": {_pair_key(r): r.kldb for r in scored},
            "entropy": {_pair_key(r): r.entropy for r in scored},
        }
        margins = [m for m in (class_margin(r.class_probabilities) for r in scored) if m is not None]
        predicted: dict[str, int] = {}
        for r in group:
            predicted[r.predicted_label] = predicted.get(r.predicted_label, 0) + 1
        counted = [r for r in group if r.accepted_steps is not None and r.rejected_steps is not None]
        tried = sum(r.accepted_steps + r.rejected_steps for r in counted)
        rows.append(
            {
                "setting": setting,
                "classes": list(first.classes),
                "class_indices": list(first.class_indices),
                "alpha": float(first.alpha),
                "alpha_mode": first.alpha_mode,  # "auto": a pilot chose alpha (kldb.sweep.auto_pilots)
                "step_control": first.kldb_step_control,
                "beta": float(first.beta),
                "n": len(group),
                "n_scored": len(scored),
                "median_kldb": kldb["median"],
                "median_kldb_low": kldb_low,
                "median_kldb_high": kldb_high,
                "kldb_q25": kldb["q25"],
                "kldb_q75": kldb["q75"],
                "kldb_iqr": kldb["iqr"],
                "mean_kldb": kldb["mean"],
                "median_entropy": entropy["median"],
                "median_entropy_low": entropy_low,
                "median_entropy_high": entropy_high,
                "entropy_q25": entropy["q25"],
                "entropy_q75": entropy["q75"],
                "entropy_iqr": entropy["iqr"],
                "top_set_share": sum(top_set_is_classes(r.top_classes, r.class_indices) for r in scored) / len(scored),
                "mean_class_margin": float(np.mean(margins)) if margins else None,
                # the step control's counts, where the records have them (guided images of runs since 0.2)
                "mean_step_halvings": float(np.mean([r.step_halvings for r in counted])) if counted else None,
                "rejected_step_share": sum(r.rejected_steps for r in counted) / tried if tried else None,
                "predicted": dict(sorted(predicted.items(), key=lambda item: -item[1])),
            }
        )
        if first.source_file is not None:
            rows[-1].update(_image_to_image_metrics(group))
    prompt_only = {(tuple(r["class_indices"]), r["beta"], r.get("strength")): r for r in rows if r["alpha"] == 0.0}
    for row in rows:
        cell = (tuple(row["class_indices"]), row["beta"], row.get("strength"))
        baseline = prompt_only.get(cell) if row["alpha"] > 0.0 else None
        row["n_paired"] = None
        for name in ("kldb", "entropy"):
            change = low = high = None
            if baseline is not None and baseline[f"median_{name}"] > 0:
                change = (row[f"median_{name}"] - baseline[f"median_{name}"]) / baseline[f"median_{name}"]
                paired = paired_relative_change_interval(
                    by_seed[row["setting"]][name], by_seed[baseline["setting"]][name], **options
                )
                low, high, row["n_paired"] = paired["low"], paired["high"], paired["n_paired"]
            row[f"relative_{name}_change"] = change
            row[f"relative_{name}_change_low"] = low
            row[f"relative_{name}_change_high"] = high
    return rows


def _pair_key(record: ImageRecord) -> Any:
    """What pairs a guided image with its prompt-only image: the seed, and for image-to-image also the source."""
    return record.seed if record.source_file is None else (record.source_file, record.seed)


def _median(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def _image_to_image_metrics(group: Sequence[ImageRecord]) -> dict[str, Any]:
    """The :data:`IMAGE_TO_IMAGE_FIELDS` of one image-to-image setting (medians over its images; each image counts
    its source's KLDB once, so a source weighs by its seeds in both medians)."""
    return {
        "strength": float(group[0].strength),
        "n_sources": len({r.source_file for r in group}),
        "median_kldb_start": _median([r.kldb_start for r in group]),
        "median_pixel_l2": _median([r.pixel_l2 for r in group]),
        "median_ssim": _median([r.ssim for r in group]),
    }


def reference_images(
    reference: str | os.PathLike[str],
    class_indices: Sequence[int],
    labels: Sequence[str],
    size: tuple[int, int],
    limit: int | None = None,
) -> torch.Tensor:
    """Real images of the audited classes as ``[N, 3, H, W]`` in ``[0, 1]``, resized to ``size``.

    Args:
        reference: ``"digits"`` for the digits world's held-out test split, or a folder of images. A folder with one
            subfolder per label name uses the subfolders of the classes in ``class_indices``; else every image in it.
        class_indices: the audited classes C.
        labels: the classifier's label names.
        size: ``(H, W)`` of the generated images.
        limit: at most this many images (the first ones in sorted order), or all.
    """
    if str(reference) == "digits":
        from kldb.digits import load_digits_split

        images, targets = load_digits_split("test")
        keep = torch.isin(targets, torch.tensor(list(class_indices)))
        images = images[keep]
        if tuple(images.shape[-2:]) != tuple(size):
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images[:limit] if limit else images
    folder = Path(reference)
    if not folder.is_dir():
        raise KLDBPathError(
            f"Expected argument `reference` to be 'digits' or a folder of images but got {str(reference)!r}."
        )
    names = [labels[i] for i in class_indices]
    subfolders = [folder / n for n in names if (folder / n).is_dir()]
    roots = subfolders if subfolders else [folder]
    files = sorted(p for root in roots for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        files = files[:limit]
    if len(files) < 2:
        raise KLDBInputError(
            f"Expected argument `reference` to hold at least 2 images of {names} but found {len(files)} in "
            f"{str(folder)!r}."
        )
    return torch.stack([load_image(f, size) for f in files])


def run_metrics(
    run: str | os.PathLike[str],
    reference: str | os.PathLike[str] | None = "digits",
    feature: str = "classifier",
    classifier: Any = None,
    inception_weights: str | os.PathLike[str] | None = None,
    reference_limit: int | None = None,
    *,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
    bootstrap_confidence: float = BOOTSTRAP_CONFIDENCE,
) -> dict[str, Any]:
    """Statistics of every setting of a run and, with a ``reference``, FID per setting.

    Args:
        run: a sweep folder.
        reference: ``"digits"``, a folder of real images (see :func:`reference_images`), or ``None`` for no FID.
        feature: ``"classifier"`` (penultimate features of the audited classifier) or ``"inception"``.
        classifier: the classifier for the features; ``None`` loads the run's own
            (:func:`kldb.runfolder.run_classifier`).
        inception_weights: local InceptionV3 weights file, for ``feature="inception"``.
        reference_limit: use at most this many reference images per class subset.
        bootstrap_resamples, bootstrap_seed, bootstrap_confidence: the bootstrap of the intervals (see
            :func:`setting_metrics`).

    Returns:
        ``{"run": ..., "fid_feature": ..., "reference": ..., "bootstrap": ..., "settings": [row, ...]}``; each row as
        :func:`setting_metrics`, plus ``fid`` (``None`` without a reference); ``bootstrap`` is the record of
        :func:`kldb.metrics.bootstrap_settings` (resamples, seed, confidence, method, implementation).
    """
    if feature not in FEATURE_KINDS:
        raise KLDBInputError(f"Expected argument `feature` to be one of {list(FEATURE_KINDS)} but got {feature!r}.")
    bootstrap = bootstrap_settings(
        bootstrap_resamples, bootstrap_seed, bootstrap_confidence, BOOTSTRAP_METHOD, prefix="bootstrap_"
    )
    records = read_run(run)
    rows = setting_metrics(
        records,
        bootstrap_resamples=bootstrap_resamples,
        bootstrap_seed=bootstrap_seed,
        bootstrap_confidence=bootstrap_confidence,
    )
    for row in rows:
        row["fid"] = None
    if reference is not None:
        if feature == "inception" and inception_weights is None:
            raise KLDBInputError(
                "Expected argument `inception_weights` (a local file) with `feature='inception'` but got None."
            )
        labels = run_labels(run, records)
        groups = iter_settings(records)
        size = tuple(load_image(Path(run) / records[0].file).shape[-2:])
        extractor = None
        if feature == "classifier":
            extractor = ClassifierFeatures(classifier if classifier is not None else run_classifier(run), size)
        from tqdm.auto import tqdm

        cached: dict[tuple[int, ...], torch.Tensor] = {}
        for row in tqdm(rows, desc="FID", unit="setting", leave=False):
            group = groups[row["setting"]]
            if len(group) < 2:
                logger.warning("Setting %s has fewer than 2 images: no FID.", row["setting"])
                continue
            key = tuple(row["class_indices"])
            if key not in cached:
                cached[key] = reference_images(reference, key, labels, size, reference_limit)
            fake = load_run_images(run, group)
            row["fid"] = fid(cached[key], fake, feature=extractor, inception_weights=inception_weights)
    return {
        "run": str(run),
        "fid_feature": feature if reference is not None else None,
        "reference": str(reference) if reference is not None else None,
        "bootstrap": bootstrap,
        "settings": rows,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)
# ----------------------------------------------------------------------------------------------------------------------


def _figure_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kldb_distribution(records: Sequence[ImageRecord]) -> bytes:
    """Box plots of KLDB per alpha, one panel per (class subset, beta); PNG bytes."""
    plt = _pyplot()
    panels: dict[tuple[tuple[str, ...], float], dict[float, list[float]]] = {}
    for r in records:
        panel = panels.setdefault((tuple(r.classes), float(r.beta)), {})
        panel.setdefault(float(r.alpha), []).append(float(r.kldb))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, ((classes, beta), by_alpha) in zip(axes[0], panels.items()):
        alphas = sorted(by_alpha)
        ax.boxplot([by_alpha[a] for a in alphas], tick_labels=[f"{a:g}" for a in alphas], showfliers=True)
        ax.set_title(f"{' / '.join(classes)}, β = {beta:g}")
        ax.set_xlabel("α (KLDB guidance)")
    axes[0][0].set_ylabel("KLDB (nats)")
    figure.suptitle("KLDB per image: lower is closer to the decision boundary", y=1.03)
    return _figure_bytes(figure)


def plot_median_kldb_vs_alpha(rows: Sequence[dict[str, Any]], confidence: float = BOOTSTRAP_CONFIDENCE) -> bytes:
    """Median KLDB against alpha, one line per (class subset, beta); PNG bytes.

    Bars with caps: the bootstrap interval of each median (``median_kldb_low`` / ``median_kldb_high``, where the rows
    have them); shaded band: the interquartile range of the images (``kldb_q25`` to ``kldb_q75``). The legend names
    both. Lines are shifted along alpha by up to 1.5 % of its range, so that the bars of different betas do not hide
    each other.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _pyplot()
    lines: dict[tuple[tuple[str, ...], float], list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault((tuple(row["classes"]), float(row["beta"])), []).append(row)
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    every_alpha = [float(r["alpha"]) for r in rows]
    step = 0.03 * (max(every_alpha) - min(every_alpha) if rows else 0.0) / max(len(lines) - 1, 1)
    for index, ((classes, beta), group) in enumerate(lines.items()):
        group = sorted(group, key=lambda r: r["alpha"])
        shift = (index - (len(lines) - 1) / 2) * step
        alphas = [r["alpha"] + shift for r in group]
        label = f"β = {beta:g}" if len({c for c, _ in lines}) == 1 else f"{' / '.join(classes)}, β = {beta:g}"
        (line,) = ax.plot(alphas, [r["median_kldb"] for r in group], marker="o", label=label)
        ax.fill_between(
            alphas, [r["kldb_q25"] for r in group], [r["kldb_q75"] for r in group], color=line.get_color(), alpha=0.15
        )
        bounded = [r for r in group if r.get("median_kldb_low") is not None and r.get("median_kldb_high") is not None]
        if bounded:
            low = np.array([r["median_kldb_low"] for r in bounded])
            high = np.array([r["median_kldb_high"] for r in bounded])
            ax.errorbar(
                [r["alpha"] + shift for r in bounded],
                (low + high) / 2,
                yerr=(high - low) / 2,  # a bar from low to high, wherever the median lies in it
                fmt="none",
                ecolor=line.get_color(),
                elinewidth=1.5,
                capsize=4,
            )
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="0.3", marker="|", markersize=10, linestyle="none",
               label=f"bars: {100 * confidence:g}% bootstrap CI of the median"),
        Patch(facecolor="0.3", alpha=0.15, label="band: IQR of the images"),
    ]  # fmt: skip
    ax.set_xlabel("α (KLDB guidance)")
    ax.set_ylabel("median KLDB (nats)")
    ax.legend(handles=handles, fontsize="small")
    ax.grid(alpha=0.3)
    return _figure_bytes(figure)


def most_ambiguous(records: Sequence[ImageRecord], per_setting: int = 6) -> dict[str, list[ImageRecord]]:
    """Per setting, the ``per_setting`` records with the lowest KLDB (ties: lower seed)."""
    return {
        setting: sorted(group, key=lambda r: (r.kldb, r.seed))[:per_setting]
        for setting, group in iter_settings(records).items()
    }


def ambiguous_grid(run_dir: str | os.PathLike[str], records: Sequence[ImageRecord], per_setting: int = 6) -> bytes:
    """A captioned grid (PNG bytes): one row per setting, its most ambiguous images with KLDB and top probabilities."""
    import PIL.Image

    from kldb.render import captioned_grid, labelled

    out = Path(run_dir)
    rows = []
    for setting, chosen in most_ambiguous(records, per_setting).items():
        images, captions = [], []
        for r in chosen:
            with PIL.Image.open(out / r.file) as image:
                images.append(image.convert("RGB"))
            top = [labelled(name, p, 2) for name, p in zip(r.top_labels[:2], r.top_probabilities[:2])]
            captions.append([labelled("KLDB", r.kldb, 3), *top, labelled("seed", r.seed)])
        rows.append((setting, images, captions))
    buffer = io.BytesIO()
    captioned_grid(rows).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Model card section (Mitchell et al., 2019)
# ----------------------------------------------------------------------------------------------------------------------


def model_card_section(
    records: Sequence[ImageRecord],
    rows: Sequence[dict[str, Any]],
    table: Sequence[dict[str, Any]],
    info: dict[str, Any],
    per_setting: int = 3,
    bootstrap: dict[str, Any] | None = None,
) -> str:
    """A Markdown section for the audited classifier's model card: what was tested, the numbers, the boundary images.

    Medians and changes are quoted with their bootstrap intervals where the rows have them; ``bootstrap`` (the record
    of :func:`kldb.metrics.bootstrap_settings`) adds the note that says how they were made.
    """
    fixed = info.get("fixed", {})
    subsets = sorted({tuple(r.classes) for r in records})
    alphas = sorted({float(r.alpha) for r in records})
    betas = sorted({float(r.beta) for r in records})
    lines = [
        "## Decision-boundary stress test (KLDB-guided latent diffusion)",
        "",
        "### Evaluation data",
        "",
        f"- {len(records)} synthetic images generated with the pipeline `{fixed.get('pipeline', 'unknown')}` "
        f"({fixed.get('num_inference_steps', '?')} k-LMS steps, KLDB guidance every "
        f'{fixed.get("kldb_guidance_interval", "?")} steps), prompts such as "{records[0].prompt}".',
        f"- Class subsets audited: {', '.join(' / '.join(s) for s in subsets)}.",
        f"- Guidance strengths α ∈ {{{', '.join(f'{a:g}' for a in alphas)}}}, prompt scales β ∈ "
        f"{{{', '.join(f'{b:g}' for b in betas)}}}; α = 0 is prompt-only generation.",
        "",
        "### Metrics",
        "",
        "- KLDB: KL divergence from the uniform distribution over the audited classes to the classifier's softmax "
        "restricted to them (nats; 0 = the classes share the probability equally).",
        "- Entropy of the full softmax (nats); FID against real images of the audited classes; the share of images "
        "whose top-|C| classes are exactly the audited ones.",
        "- Medians and the relative KLDB change carry bootstrap confidence intervals (in brackets): a median's "
        "resamples the images of its setting, the change's resamples the seeds, paired between the prompt-only and "
        "the guided setting.",
        "",
        "### Quantitative analyses",
        "",
        table1_markdown(table, bootstrap).rstrip(),
        "",
    ]
    for row in table:
        if row["relative_kldb_change"] is not None:
            low, high = row.get("relative_kldb_change_low"), row.get("relative_kldb_change_high")
            interval = ""
            if low is not None and high is not None:
                level = f"{100 * bootstrap['confidence']:g}% " if bootstrap is not None else ""
                interval = (
                    f" ({level}interval {100 * low:+.1f}% to {100 * high:+.1f}%, paired over {row['n_paired']} seeds)"
                )
            before, after = (
                _with_interval(row[name], row.get(f"{name}_low"), row.get(f"{name}_high"))
                for name in ("median_kldb_baseline", "median_kldb_best")
            )
            lines.append(
                f"- {' / '.join(row['classes'])}, β = {row['beta']:g}: guidance at α = {row['alpha_best']:g} changed "
                f"the median KLDB from {before} to {after}, by {100 * row['relative_kldb_change']:+.1f}%{interval}, "
                "against prompt-only images."
            )
    lines += ["", "### Boundary images and what the classifier did on them", ""]
    lines += ["| setting | image | KLDB | entropy | prediction | top probabilities |", "|---|---|---|---|---|---|"]
    for setting, chosen in most_ambiguous(records, per_setting).items():
        for r in chosen:
            top = ", ".join(f"{n} {p:.2f}" for n, p in zip(r.top_labels[:3], r.top_probabilities[:3]))
            lines.append(f"| {setting} | `{r.file}` | {r.kldb:.4f} | {r.entropy:.4f} | {r.predicted_label} | {top} |")
    lines += ["", "Predicted classes per setting:", ""]
    for row in rows:
        mix = ", ".join(f"{k}: {v}" for k, v in row["predicted"].items())
        share = row["top_set_share"]
        lines.append(f"- {row['setting']}: {mix} (top-|C| = C for {100 * share:.0f}% of images)")
    lines += [
        "",
        "### Caveats and recommendations",
        "",
        "- The images are synthetic and pulled toward the classifier's boundary on purpose; some are hybrids of the "
        "audited classes that may not look like natural photographs. Treat them as probes of where the classifier "
        "hesitates, not as a sample of deployment data.",
        "- Review the boundary images above for features that drive the hesitation (pose, background, texture), and "
        "check them against real data before changing the model.",
        "- Numbers depend on the generator, the prompt and the seeds; the run's manifest records all of them.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------------------------------------


def write_report(
    run: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    metrics: dict[str, Any] | None = None,
    per_setting: int = 6,
    bootstrap_resamples: int | None = None,
    bootstrap_seed: int | None = None,
    bootstrap_confidence: float | None = None,
    quality: bool | dict[str, Any] = False,
    validity: bool | str | dict[str, Any] | None = None,
    validity_threshold: float | None = None,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Compute the metrics of a sweep folder (unless given) and write every report file; return what was written.

    Args:
        run: a sweep folder.
        out_dir: where to write (default ``<run>/report``).
        metrics: the result of :func:`run_metrics`, if already computed. Its bootstrap intervals are recomputed from
            the run's records when it has none or when the bootstrap arguments ask for another bootstrap.
        per_setting: images per setting in the grid of most ambiguous images.
        bootstrap_resamples: resamples per bootstrap interval; ``None``: as recorded in ``metrics``, else
            :data:`kldb.metrics.BOOTSTRAP_RESAMPLES`.
        bootstrap_seed: seed of the resampling; ``None``: as recorded in ``metrics``, else
            :data:`kldb.metrics.BOOTSTRAP_SEED`.
        bootstrap_confidence: confidence level of the intervals; ``None``: as recorded, else 0.95.
        quality: ``True`` measures FID, KID, precision and recall in the three feature spaces of :mod:`kldb.quality`
            against the ``reference`` images (``metric_kwargs``; the digits test split for a digits run), or the
            result of :func:`kldb.quality.run_quality`; written to ``quality.json`` and shown side by side.
        validity: ``True`` (the default oracle: the digits world's validity classifier for a digits run), an oracle
            spec (see :func:`kldb.validity.run_validity`: a classifier spec or ``"clip:<path>"``) or the result of
            :func:`kldb.validity.run_validity`; ``None`` uses the ``validity.json`` that ``kldb validity`` wrote into
            the report folder, if it covers this run's images. Adds each setting's valid and off-manifold shares and
            Table 1's validity section.
        validity_threshold: the oracle's off-manifold threshold (default :data:`kldb.validity.DEFAULT_THRESHOLD`).
        **metric_kwargs: passed to :func:`run_metrics` (``reference``, ``feature``, ...).

    Returns:
        ``{"table": [...], "settings": [...], "bootstrap": {...}, "files": {name: path}}``.
    """
    run = Path(run)
    out = Path(out_dir) if out_dir is not None else run / "report"
    if not isinstance(per_setting, int) or isinstance(per_setting, bool) or per_setting < 1:
        raise KLDBInputError(f"Expected argument `per_setting` to be a positive integer but got {per_setting!r}.")
    recorded = (metrics or {}).get("bootstrap") or {}
    options = {
        "bootstrap_resamples": recorded.get("resamples", BOOTSTRAP_RESAMPLES)
        if bootstrap_resamples is None
        else bootstrap_resamples,
        "bootstrap_seed": recorded.get("seed", BOOTSTRAP_SEED) if bootstrap_seed is None else bootstrap_seed,
        "bootstrap_confidence": recorded.get("confidence", BOOTSTRAP_CONFIDENCE)
        if bootstrap_confidence is None
        else bootstrap_confidence,
    }
    bootstrap = bootstrap_settings(*options.values(), BOOTSTRAP_METHOD, prefix="bootstrap_")
    records = read_run(run)
    info = run_info(run)
    if metrics is None:
        metrics = run_metrics(run, **options, **metric_kwargs)
    elif any(recorded.get(k) != bootstrap[k] for k in ("resamples", "seed", "confidence", "method")):
        fresh = {r["setting"]: r for r in setting_metrics(records, **options)}
        interval_keys = [k for bounds in INTERVAL_KEYS.values() for k in bounds]
        interval_keys += ["relative_kldb_change", "relative_entropy_change", "n_paired"]
        rows = [{**row, **{k: fresh[row["setting"]][k] for k in interval_keys}} for row in metrics["settings"]]
        metrics = {**metrics, "bootstrap": bootstrap, "settings": rows}
    rows = metrics["settings"]
    quality_result = _report_quality(run, quality, metric_kwargs)
    if quality_result is not None:
        merge_quality(rows, quality_result)
        metrics = {**metrics, "quality": {k: v for k, v in quality_result.items() if k != "settings"}}
    validity_result = _report_validity(run, out, validity, validity_threshold, len(records))
    if validity_result is not None:
        merge_validity(rows, validity_result)
        metrics = {**metrics, "validity": {k: validity_result[k] for k in ("oracle", "oracle_kind", "threshold")}}
    table = table1(rows)
    extra = _extra_keys(rows)
    valid_fields = ["alpha_valid", "median_kldb_valid", "relative_kldb_change_valid", "valid_share_valid"]
    table_fields = [*TABLE_FIELDS, *(f"{k}_{w}" for k in extra for w in ("baseline", "best"))]
    table_fields += valid_fields if validity_result is not None else []
    from_images = any(r.get("strength") is not None for r in rows)  # an image-to-image run
    table_fields += ["strength"] if from_images else []
    files = {
        "table1.md": atomic_write_text(out / "table1.md", table1_markdown(table, bootstrap)),
        "table1.csv": atomic_write_text(out / "table1.csv", to_csv(table, table_fields)),
        "table1.json": atomic_write_json(
            out / "table1.json", {"fid_feature": metrics.get("fid_feature"), "bootstrap": bootstrap, "rows": table}
        ),
        "settings.csv": atomic_write_text(
            out / "settings.csv",
            to_csv(rows, [*SETTING_FIELDS, *(IMAGE_TO_IMAGE_FIELDS if from_images else ()), *extra]),
        ),
        "metrics.json": atomic_write_json(out / "metrics.json", metrics),
        "kldb_distribution.png": atomic_write_bytes(out / "kldb_distribution.png", plot_kldb_distribution(records)),
        "median_kldb_vs_alpha.png": atomic_write_bytes(
            out / "median_kldb_vs_alpha.png", plot_median_kldb_vs_alpha(rows, bootstrap["confidence"])
        ),
        "ambiguous_images.png": atomic_write_bytes(
            out / "ambiguous_images.png", ambiguous_grid(run, records, per_setting)
        ),
    }
    if quality_result is not None:
        files["quality.json"] = atomic_write_json(out / "quality.json", quality_result)
    from kldb.sweep import auto_pilots

    pilots = auto_pilots(run)
    if pilots:
        files["auto_pilots.json"] = atomic_write_json(out / "auto_pilots.json", pilots)
    card = model_card_section(records, rows, table, info, bootstrap=bootstrap)
    files["model_card_section.md"] = atomic_write_text(out / "model_card_section.md", card)
    fid_note = (
        f"FID on {metrics['fid_feature']} features against `{metrics['reference']}`."
        if metrics.get("reference")
        else "No reference images given: no FID."
    )
    page = [
        f"# Audit report: {run.name}",
        "",
        f"{len(records)} images, {len(rows)} settings. {fid_note}",
        "",
        "## Table 1: prompt-only (α = 0) against the best α per β",
        "",
        table1_markdown(table, bootstrap),
    ]
    if quality_result is not None:
        page += [
            "## Quality in three feature spaces",
            "",
            f"Against `{quality_result['reference']}`. FID and KID (mean ± std over {quality_result['kid_subsets']} "
            f"subsets, seed {quality_result['kid_seed']}) and k-NN precision / recall (k = {quality_result['k']}; "
            "Kynkäänniemi et al. 2019) in: the audited classifier's penultimate features (the space the guidance moves "
            "through, so it rises with guidance whatever the images look like), an independent network the guidance "
            "never sees, and pixels.",
            "",
            quality_markdown(table, quality_result["spaces"]),
        ]
    if validity_result is not None:
        page += [
            "## Validity: are the images still images of C?",
            "",
            f"Oracle `{validity_result['oracle']}` ({validity_result['oracle_kind']}); valid: its top-1 class is in C; "
            f"off-manifold: its top-1 is outside C or its maximum probability is below {validity_result['threshold']:g}.",
            "",
            validity_findings(table),
        ]
    page += [
        "## All settings",
        "",
        "| setting | n | median KLDB [CI] | KLDB IQR | median entropy [CI] | entropy IQR | KLDB change vs α = 0 [CI] "
        "| top-set share | mean margin | FID |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kldb, entropy = (
            _with_interval(r[name], r.get(f"{name}_low"), r.get(f"{name}_high"))
            for name in ("median_kldb", "median_entropy")
        )
        change = _percent_with_interval(
            r.get("relative_kldb_change"), r.get("relative_kldb_change_low"), r.get("relative_kldb_change_high")
        )
        page.append(
            f"| {r['setting']} | {r['n']} | {kldb} | {r['kldb_iqr']:.4f} | {entropy} | {r['entropy_iqr']:.4f} | "
            f"{change} | {r['top_set_share']:.2f} | {_number(r['mean_class_margin'])} | {_number(r['fid'], 2)} |"
        )
    page += ["", bootstrap_note(bootstrap) + " CI: confidence interval; IQR: interquartile range of the images."]
    if pilots:
        page += ["", auto_pilots_markdown(pilots)]
    if from_images:
        pairs, missing = before_after_pairs(run, records, per_setting)
        files["before_after.png"] = atomic_write_bytes(out / "before_after.png", before_after_grid(run, pairs))
        files["before_after.json"] = atomic_write_json(
            out / "before_after.json",
            [{k: v for k, v in p.items() if k not in ("source_path", "record")} for p in pairs],
        )
        page += ["", before_after_markdown(rows, info, missing)]
    page += [
        "",
        "![KLDB distribution](kldb_distribution.png)",
        "",
        "![Median KLDB against alpha](median_kldb_vs_alpha.png)",
        "",
        "![Most ambiguous images](ambiguous_images.png)",
        "",
        card,
    ]
    files["report.md"] = atomic_write_text(out / "report.md", "\n".join(page))
    return {
        "table": table,
        "settings": rows,
        "bootstrap": bootstrap,
        "quality": quality_result,
        "validity": validity_result,
        "files": {k: str(v) for k, v in files.items()},
    }


def before_after_pairs(
    run: str | os.PathLike[str], records: Sequence[ImageRecord], per_setting: int = 6
) -> tuple[list[dict[str, Any]], list[str]]:
    """The (source, result) pairs the report shows: per setting, its first ``per_setting`` sources in source order,
    each with its result at the lowest seed.

    Sources are read from the ``init_images`` folder of the run's ``sweep.json``; one that is missing there or whose
    SHA-256 differs from the manifest's is left out (with a warning).

    Returns:
        ``(pairs, missing)``: each pair ``{"setting", "source_file", "source_sha256", "seed", "file", "source_path",
        "record"}`` (``file`` relative to the run folder, ``record`` the result's :class:`ImageRecord`), and the source
        files left out.
    """
    import hashlib

    folder = (run_info(run).get("last_config") or {}).get("init_images")
    pairs, missing, checked = [], [], {}
    for setting, group in iter_settings(records).items():
        first: dict[str, ImageRecord] = {}
        for r in sorted(group, key=lambda r: (r.source_file, r.seed)):
            first.setdefault(r.source_file, r)
        shown = 0
        for name in sorted(first):
            if shown == per_setting:
                break
            r = first[name]
            path = Path(folder) / name if folder is not None else None
            if name not in checked:
                checked[name] = (
                    path is not None
                    and path.is_file()
                    and hashlib.sha256(path.read_bytes()).hexdigest() == r.source_sha256
                )
                if not checked[name]:
                    logger.warning("Source %r is missing from %r or changed: left out of the before/after grid.", name,
                                   folder)  # fmt: skip
                    missing.append(name)
            if not checked[name]:
                continue
            pairs.append({"setting": setting, "source_file": name, "source_sha256": r.source_sha256, "seed": r.seed,
                          "file": r.file, "source_path": str(path), "record": r})  # fmt: skip
            shown += 1
    return pairs, missing


def before_after_grid(run: str | os.PathLike[str], pairs: Sequence[dict[str, Any]]) -> bytes:
    """A captioned grid (PNG bytes): one row per setting, each pair as the source then its result, captioned with
    KLDB, the probabilities of C and the predicted class, before (the source) and after (the result)."""
    import PIL.Image

    from kldb.render import captioned_grid, labelled

    out = Path(run)
    rows: dict[str, tuple[list[PIL.Image.Image], list[list[str]]]] = {}
    for pair in pairs:
        r: ImageRecord = pair["record"]
        images, captions = rows.setdefault(pair["setting"], ([], []))
        for when, path, kldb, probabilities, predicted in (
            ("before", pair["source_path"], r.kldb_start, r.class_probabilities_start, r.predicted_label_start),
            ("after", out / r.file, r.kldb, r.class_probabilities, r.predicted_label),
        ):
            with PIL.Image.open(path) as image:
                images.append(image.convert("RGB"))
            lines = [f"{when}: {Path(r.source_file).name}"[:18]]
            lines.append(labelled("KLDB", kldb, 3) if kldb is not None else "KLDB = n/a")
            lines += [labelled(n, p, 2) for n, p in zip(r.classes, probabilities or []) if p is not None]
            lines.append(f"top: {predicted}")
            if when == "after":
                lines.append(labelled("L2", r.pixel_l2, 2) if r.pixel_l2 is not None else f"seed = {r.seed}")
            captions.append(lines)
    grid = [(setting, images, captions) for setting, (images, captions) in rows.items()]
    buffer = io.BytesIO()
    captioned_grid(grid or [("no source could be read", [], [])]).save(buffer, format="PNG")
    return buffer.getvalue()


def before_after_markdown(rows: Sequence[dict[str, Any]], info: dict[str, Any], missing: Sequence[str]) -> str:
    """The report's "Before and after" section of an image-to-image run: per setting, the sources' median KLDB
    against the results', and the results' median distance to their sources; then the grid."""
    folder = (info.get("last_config") or {}).get("init_images")
    lines = [
        "## Before and after: from real images",
        "",
        f"Every image started from a source image of `{folder}`, noised to its strength (the last "
        "int(steps x strength) k-LMS steps run). Before: the source's own KLDB; after: the result's. Pixel L2: over "
        "pixel values in [0, 1]; SSIM: torchmetrics'.",
        "",
        "| setting | sources | n | median KLDB before → after | median pixel L2 | median SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("strength") is None:
            continue
        lines.append(
            f"| {r['setting']} | {r['n_sources']} | {r['n']} | {_number(r['median_kldb_start'])} → "
            f"{_number(r['median_kldb'])} | {_number(r['median_pixel_l2'], 3)} | {_number(r['median_ssim'], 3)} |"
        )
    lines += ["", "![Before and after: each source beside its result](before_after.png)"]
    if missing:
        lines += ["", f"Left out of the grid (missing from `{folder}` or changed since the run): "
                  + ", ".join(f"`{m}`" for m in missing) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _report_quality(run: Path, quality: bool | dict[str, Any], metric_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The quality result the report shows: given, measured (``quality=True``), or none."""
    if isinstance(quality, dict):
        return quality
    if quality is not True:
        if quality is not False:
            raise KLDBInputTypeError(f"Expected argument `quality` to be a bool or a dict but got {quality!r}.")
        return None
    from kldb.quality import run_quality

    reference = metric_kwargs.get("reference", "digits")
    if reference is None:
        raise KLDBInputError(
            "Expected argument `reference` to name real images (\"digits\" or a folder) for `quality=True` but got None."
        )
    options = {k: metric_kwargs[k] for k in ("inception_weights", "reference_limit") if metric_kwargs.get(k)}
    return run_quality(run, reference=reference, **options)


def _report_validity(
    run: Path, out: Path, validity: bool | str | dict[str, Any] | None, threshold: float | None, n_images: int
) -> dict[str, Any] | None:
    """The validity result the report shows: given, judged now, the one ``kldb validity`` left in ``out``, or none."""
    from kldb.validity import DEFAULT_THRESHOLD, run_validity

    if isinstance(validity, dict):
        return validity
    if validity is None or validity is False:
        stored = out / "validity.json"
        if validity is None and stored.is_file():
            result = json.loads(stored.read_text(encoding="utf-8"))
            if result.get("overall", {}).get("n") == n_images:
                return result
            logger.warning("%s covers another set of images than the run's %d: left out.", stored, n_images)
        return None
    if not isinstance(validity, (bool, str)):
        raise KLDBInputTypeError(f"Expected argument `validity` to be a bool, an oracle spec or a dict but got {validity!r}.")
    oracle = None if validity is True else validity
    return run_validity(
        run, oracle=oracle, threshold=DEFAULT_THRESHOLD if threshold is None else threshold, out_dir=out
    )


def quality_markdown(table: Sequence[dict[str, Any]], spaces: Sequence[str]) -> str:
    """FID, KID and precision / recall of Table 1's rows (prompt-only and best alpha) in each feature space."""
    lines = [
        "| classes | β | α | space | FID ↓ | KID ×10³ ↓ | precision ↑ | recall ↑ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        for which in ("baseline", "best"):
            alpha = _alpha(row[f"alpha_{which}"], row.get(f"alpha_mode_{which}"))
            for space in spaces:

                def get(measure: str, row: dict[str, Any] = row, which: str = which, space: str = space) -> Any:
                    return row.get(f"{measure}_{space}_{which}")

                kid = get("kid_mean")
                kid_text = "n/a" if kid is None else f"{1e3 * kid:.2f} ± {1e3 * (get('kid_std') or 0.0):.2f}"
                lines.append(
                    f"| {' / '.join(row['classes'])} | {row['beta']:g} | {alpha} | {space} | {_number(get('fid'), 2)} | "
                    f"{kid_text} | {_number(get('precision'), 3)} | {_number(get('recall'), 3)} |"
                )
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def validity_findings(table: Sequence[dict[str, Any]]) -> str:
    """Table 1's validity: the valid share of prompt-only and of the best alpha, and, where the best alpha costs
    validity (below :data:`MIN_VALID_SHARE`), the alpha with the best drop that keeps it, said in plain words."""
    lines = [
        f"| classes | β | valid, α = 0 | best α: valid | best α with ≥ {100 * MIN_VALID_SHARE:.0f} % valid | its M(KLDB) | "
        "its KLDB change |",
        "|---|---|---|---|---|---|---|",
    ]
    words = []
    for row in table:
        classes = " / ".join(row["classes"])
        lines.append(
            f"| {classes} | {row['beta']:g} | {_share(row.get('valid_share_baseline'))} | "
            f"{_alpha(row['alpha_best'], row.get('alpha_mode_best'))}: {_share(row.get('valid_share_best'))} | "
            f"{_alpha(row.get('alpha_valid'))} | {_number(row.get('median_kldb_valid'))} | "
            f"{_percent_with_interval(row.get('relative_kldb_change_valid'), None, None)} |"
        )
        best = row.get("valid_share_best")
        if best is not None and best < MIN_VALID_SHARE:
            alternative = (
                f"the best alpha that keeps at least {100 * MIN_VALID_SHARE:.0f} % valid is {_alpha(row.get('alpha_valid'))}"
                f" (median KLDB {_number(row.get('median_kldb_valid'))})"
                if row.get("alpha_valid") is not None
                else f"no guided alpha keeps {100 * MIN_VALID_SHARE:.0f} % valid"
            )
            words.append(
                f"- {classes}, β {row['beta']:g}: the best alpha for KLDB ({_alpha(row['alpha_best'])}) costs validity: "
                f"{_share(best)} of its images are still judged images of C by the oracle; {alternative}."
            )
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(words) + "\n" if words else "")


def auto_pilots_markdown(pilots: Sequence[dict[str, Any]]) -> str:
    """The section of the report on the settings whose alpha a pilot chose (``alphas`` with ``"auto"``): the alpha
    chosen, the grid's median KLDBs, the pilot's seeds, and its cost set against the images it chose for."""
    lines = [
        "## Alpha chosen by a pilot (`auto`)",
        "",
        "Each pilot sampled one image per pilot seed at each alpha of its grid (with the run's other settings) and kept "
        "the alpha with the lowest median KLDB. Its seeds are never the run's. Cost: (pilot + images) / images seconds.",
        "",
        "| setting | alpha chosen | grid: median KLDB | pilot seeds | pilot s | images | images s | cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in pilots:
        grid = ", ".join(f"{a:g}: {m:.3f}" for a, m in zip(p["grid"], p["median_kldb"]))
        seeds = ", ".join(str(s) for s in p["pilot_seeds"])
        cost = "n/a" if p["cost_ratio"] is None else f"{p['cost_ratio']:.2f}x"
        lines.append(
            f"| {p['setting']} | {p['alpha']:g} | {grid} | {seeds} | {p['pilot_seconds']:.1f} | {p['images']} | "
            f"{_number(p['image_seconds'], 1)} | {cost} |"
        )
    return "\n".join(lines)


def load_table(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a written ``table1.json``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
