"""The report of a finished sweep: the paper's Table 1, plots, the most ambiguous images and a model-card section.

:func:`write_report` writes, into ``<run>/report`` by default:

- ``table1.md``, ``table1.csv``, ``table1.json``: for each class subset and beta, alpha = 0 (prompt-only) against the
  alpha > 0 with the lowest median KLDB: FID, median KLDB, median entropy and the relative KLDB change;
- ``settings.csv``, ``metrics.json``: every setting's statistics (see :mod:`kldb.metrics`);
- ``kldb_distribution.png``: KLDB distribution per alpha, one panel per beta (and class subset);
- ``median_kldb_vs_alpha.png``: median KLDB against alpha with the interquartile band, one line per beta;
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

from kldb.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from kldb.metrics import run_metrics
from kldb.sweep import iter_settings, read_manifest

logger = logging.getLogger(__name__)

TABLE_FIELDS = (
    "classes",
    "beta",
    "alpha_baseline",
    "alpha_best",
    "fid_baseline",
    "fid_best",
    "median_kldb_baseline",
    "median_kldb_best",
    "median_entropy_baseline",
    "median_entropy_best",
    "relative_kldb_change",
    "n_baseline",
    "n_best",
)
SETTING_FIELDS = (
    "setting",
    "classes",
    "alpha",
    "beta",
    "n",
    "median_kldb",
    "kldb_q25",
    "kldb_q75",
    "kldb_iqr",
    "median_entropy",
    "entropy_q25",
    "entropy_q75",
    "entropy_iqr",
    "top_set_share",
    "mean_class_margin",
    "fid",
)


def table1(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's Table 1 from per-setting rows (see :func:`kldb.metrics.setting_metrics`).

    For each class subset and beta: the prompt-only row (alpha = 0) and the alpha > 0 with the lowest median KLDB
    (ties: the smaller alpha), with ``relative_kldb_change = (best - baseline) / baseline``. Without an alpha = 0
    setting the baseline fields are ``None``; without an alpha > 0 the best fields are.
    """
    groups: dict[tuple[tuple[str, ...], float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((tuple(row["classes"]), float(row["beta"])), []).append(row)
    table = []
    for (classes, beta), group in groups.items():
        baseline = next((r for r in group if r["alpha"] == 0.0), None)
        guided = sorted((r for r in group if r["alpha"] > 0.0), key=lambda r: (r["median_kldb"], r["alpha"]))
        best = guided[0] if guided else None
        if baseline is None:
            logger.warning("No alpha = 0 (prompt-only) setting for classes %s, beta %g: no baseline.", classes, beta)
        change = None
        if baseline is not None and best is not None and baseline["median_kldb"] > 0:
            change = (best["median_kldb"] - baseline["median_kldb"]) / baseline["median_kldb"]

        def field(row: dict[str, Any] | None, name: str) -> Any:
            return row[name] if row is not None else None

        table.append(
            {
                "classes": list(classes),
                "beta": beta,
                "alpha_baseline": field(baseline, "alpha"),
                "alpha_best": field(best, "alpha"),
                "fid_baseline": field(baseline, "fid"),
                "fid_best": field(best, "fid"),
                "median_kldb_baseline": field(baseline, "median_kldb"),
                "median_kldb_best": field(best, "median_kldb"),
                "median_entropy_baseline": field(baseline, "median_entropy"),
                "median_entropy_best": field(best, "median_entropy"),
                "relative_kldb_change": change,
                "n_baseline": field(baseline, "n"),
                "n_best": field(best, "n"),
            }
        )
    return table


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _alpha(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def table1_markdown(table: Sequence[dict[str, Any]]) -> str:
    """Table 1 in the paper's layout: two lines per beta (alpha = 0, then the best alpha)."""
    lines = [
        "| classes | β | α | FID ↓ | M(KLDB) ↓ | M(Entropy) ↑ | KLDB change |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        classes = " / ".join(row["classes"])
        lines.append(
            f"| {classes} | {row['beta']:g} | {_alpha(row['alpha_baseline'])} | {_number(row['fid_baseline'], 2)} | "
            f"{_number(row['median_kldb_baseline'])} | {_number(row['median_entropy_baseline'])} | |"
        )
        change = row["relative_kldb_change"]
        lines.append(
            f"| | | {_alpha(row['alpha_best'])} | {_number(row['fid_best'], 2)} | {_number(row['median_kldb_best'])} | "
            f"{_number(row['median_entropy_best'])} | {'n/a' if change is None else f'{100 * change:+.1f}%'} |"
        )
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


def plot_kldb_distribution(records: Sequence[dict[str, Any]]) -> bytes:
    """Box plots of KLDB per alpha, one panel per (class subset, beta); PNG bytes."""
    plt = _pyplot()
    panels: dict[tuple[tuple[str, ...], float], dict[float, list[float]]] = {}
    for r in records:
        panel = panels.setdefault((tuple(r["classes"]), float(r["beta"])), {})
        panel.setdefault(float(r["alpha"]), []).append(float(r["kldb"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, ((classes, beta), by_alpha) in zip(axes[0], panels.items()):
        alphas = sorted(by_alpha)
        ax.boxplot([by_alpha[a] for a in alphas], tick_labels=[f"{a:g}" for a in alphas], showfliers=True)
        ax.set_title(f"{' / '.join(classes)}, β = {beta:g}")
        ax.set_xlabel("α (KLDB guidance)")
    axes[0][0].set_ylabel("KLDB (nats)")
    figure.suptitle("KLDB per image: lower is closer to the decision boundary", y=1.03)
    return _figure_bytes(figure)


def plot_median_kldb_vs_alpha(rows: Sequence[dict[str, Any]]) -> bytes:
    """Median KLDB against alpha with the interquartile band, one line per (class subset, beta); PNG bytes."""
    plt = _pyplot()
    lines: dict[tuple[tuple[str, ...], float], list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault((tuple(row["classes"]), float(row["beta"])), []).append(row)
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    for (classes, beta), group in lines.items():
        group = sorted(group, key=lambda r: r["alpha"])
        alphas = [r["alpha"] for r in group]
        label = f"β = {beta:g}" if len({c for c, _ in lines}) == 1 else f"{' / '.join(classes)}, β = {beta:g}"
        ax.plot(alphas, [r["median_kldb"] for r in group], marker="o", label=label)
        ax.fill_between(alphas, [r["kldb_q25"] for r in group], [r["kldb_q75"] for r in group], alpha=0.15)
    ax.set_xlabel("α (KLDB guidance)")
    ax.set_ylabel("median KLDB (nats), IQR band")
    ax.legend()
    ax.grid(alpha=0.3)
    return _figure_bytes(figure)


def most_ambiguous(records: Sequence[dict[str, Any]], per_setting: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Per setting, the ``per_setting`` records with the lowest KLDB (ties: lower seed)."""
    return {
        setting: sorted(group, key=lambda r: (r["kldb"], r["seed"]))[:per_setting]
        for setting, group in iter_settings(records).items()
    }


def ambiguous_grid(run_dir: str | os.PathLike[str], records: Sequence[dict[str, Any]], per_setting: int = 6) -> bytes:
    """A captioned grid (PNG bytes): one row per setting, its most ambiguous images with KLDB and top probabilities."""
    import PIL.Image

    from kldb.render import captioned_grid

    out = Path(run_dir)
    rows = []
    for setting, chosen in most_ambiguous(records, per_setting).items():
        images, captions = [], []
        for r in chosen:
            with PIL.Image.open(out / r["file"]) as image:
                images.append(image.convert("RGB"))
            top = [f"{name} {p:.2f}" for name, p in zip(r["top_labels"][:2], r["top_probabilities"][:2])]
            captions.append([f"KLDB {r['kldb']:.3f}", *top, f"seed {r['seed']}"])
        rows.append((setting, images, captions))
    buffer = io.BytesIO()
    captioned_grid(rows).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Model card section (Mitchell et al., 2019)
# ----------------------------------------------------------------------------------------------------------------------


def model_card_section(
    records: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    table: Sequence[dict[str, Any]],
    info: dict[str, Any],
    per_setting: int = 3,
) -> str:
    """A Markdown section for the audited classifier's model card: what was tested, the numbers, the boundary images."""
    fixed = info.get("fixed", {})
    subsets = sorted({tuple(r["classes"]) for r in records})
    alphas = sorted({float(r["alpha"]) for r in records})
    betas = sorted({float(r["beta"]) for r in records})
    lines = [
        "## Decision-boundary stress test (KLDB-guided latent diffusion)",
        "",
        "### Evaluation data",
        "",
        f"- {len(records)} synthetic images generated with the pipeline `{fixed.get('pipeline', 'unknown')}` "
        f"({fixed.get('num_inference_steps', '?')} k-LMS steps, KLDB guidance every "
        f'{fixed.get("kldb_guidance_interval", "?")} steps), prompts such as "{records[0]["prompt"]}".',
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
        "",
        "### Quantitative analyses",
        "",
        table1_markdown(table).rstrip(),
        "",
    ]
    for row in table:
        if row["relative_kldb_change"] is not None:
            lines.append(
                f"- {' / '.join(row['classes'])}, β = {row['beta']:g}: guidance at α = {row['alpha_best']:g} changed "
                f"the median KLDB by {100 * row['relative_kldb_change']:+.1f}% against prompt-only images."
            )
    lines += ["", "### Boundary images and what the classifier did on them", ""]
    lines += ["| setting | image | KLDB | entropy | prediction | top probabilities |", "|---|---|---|---|---|---|"]
    for setting, chosen in most_ambiguous(records, per_setting).items():
        for r in chosen:
            top = ", ".join(f"{n} {p:.2f}" for n, p in zip(r["top_labels"][:3], r["top_probabilities"][:3]))
            lines.append(
                f"| {setting} | `{r['file']}` | {r['kldb']:.4f} | {r['entropy']:.4f} | {r['predicted_label']} | {top} |"
            )
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
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Compute the metrics of a sweep folder (unless given) and write every report file; return what was written.

    Args:
        run: a sweep folder.
        out_dir: where to write (default ``<run>/report``).
        metrics: the result of :func:`kldb.metrics.run_metrics`, if already computed.
        per_setting: images per setting in the grid of most ambiguous images.
        **metric_kwargs: passed to :func:`kldb.metrics.run_metrics` (``reference``, ``feature``, ...).

    Returns:
        ``{"table": [...], "settings": [...], "files": {name: path}}``.
    """
    from kldb.metrics import run_info

    run = Path(run)
    out = Path(out_dir) if out_dir is not None else run / "report"
    if not isinstance(per_setting, int) or isinstance(per_setting, bool) or per_setting < 1:
        raise ValueError(f"Expected argument `per_setting` to be a positive integer but got {per_setting!r}.")
    records = read_manifest(run)
    if not records:
        raise ValueError(f"Expected argument `run` to hold at least one manifest line but {str(run)!r} has none.")
    info = run_info(run)
    metrics = metrics if metrics is not None else run_metrics(run, **metric_kwargs)
    rows = metrics["settings"]
    table = table1(rows)
    files = {
        "table1.md": atomic_write_text(out / "table1.md", table1_markdown(table)),
        "table1.csv": atomic_write_text(out / "table1.csv", to_csv(table, TABLE_FIELDS)),
        "table1.json": atomic_write_json(
            out / "table1.json", {"fid_feature": metrics.get("fid_feature"), "rows": table}
        ),
        "settings.csv": atomic_write_text(out / "settings.csv", to_csv(rows, SETTING_FIELDS)),
        "metrics.json": atomic_write_json(out / "metrics.json", metrics),
        "kldb_distribution.png": atomic_write_bytes(out / "kldb_distribution.png", plot_kldb_distribution(records)),
        "median_kldb_vs_alpha.png": atomic_write_bytes(
            out / "median_kldb_vs_alpha.png", plot_median_kldb_vs_alpha(rows)
        ),
        "ambiguous_images.png": atomic_write_bytes(
            out / "ambiguous_images.png", ambiguous_grid(run, records, per_setting)
        ),
    }
    card = model_card_section(records, rows, table, info)
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
        table1_markdown(table),
        "## All settings",
        "",
        "| setting | n | median KLDB [IQR] | median entropy [IQR] | top-set share | mean margin | FID |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        page.append(
            f"| {r['setting']} | {r['n']} | {r['median_kldb']:.4f} [{r['kldb_iqr']:.4f}] | "
            f"{r['median_entropy']:.4f} [{r['entropy_iqr']:.4f}] | {r['top_set_share']:.2f} | "
            f"{_number(r['mean_class_margin'])} | {_number(r['fid'], 2)} |"
        )
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
    return {"table": table, "settings": rows, "files": {k: str(v) for k, v in files.items()}}


def load_table(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a written ``table1.json``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
