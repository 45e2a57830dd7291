"""The main job in one command: prompt-only vs KLDB-guided images for two classes, from the same seeds.

Runs on the bundled digits world (offline, CPU), with the ``digits`` preset's classes and settings. With ``--tiny`` it
runs on tiny random-weight components labelled like the digits world instead and says so: the images are then noise,
and only the mechanics are shown.

    python -m kldb.demo                 # = make demo = kldb demo
    python -m kldb.demo --num-images 32 --alpha 0.2 --out outputs/demo

The comparison itself (each row's images with their scores, a captioned grid, a summary) is :func:`write_comparison`;
the examples in ``examples/`` write theirs with :func:`save_comparison`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kldb.errors import KLDBInputError
from kldb.examples_support import TINY_ENV, tiny_stable_diffusion
from kldb.io import atomic_write_json, atomic_write_text, save_png
from kldb.metrics import summary_statistics
from kldb.presets import PRESETS, QUICK_START
from kldb.render import caption_lines, captioned_grid
from pipeline_kldb_boundary import STEP_CONTROLS, KLDBBoundaryPipeline, KLDBBoundaryPipelineOutput, class_prompt

logger = logging.getLogger("kldb.demo")

#: The demo's defaults: the digits preset's classes, alpha, beta, steps, interval, seed and number of images.
DEMO_PRESET = PRESETS["digits"]


# ----------------------------------------------------------------------------------------------------------------------
# The digits world, or its tiny stand-in when asked for explicitly
# ----------------------------------------------------------------------------------------------------------------------


def tiny_digits_pipeline(seed: int = 0) -> KLDBBoundaryPipeline:
    """Tiny random components with a ten-class classifier labelled like the digits world ("zero" ... "nine")."""
    from kldb.digits.data import LABELS
    from kldb.testing import tiny_classifier

    classifier, processor = tiny_classifier(num_labels=len(LABELS), seed=seed)
    classifier.config.id2label = dict(enumerate(LABELS))
    classifier.config.label2id = {name: i for i, name in enumerate(LABELS)}
    return tiny_stable_diffusion(classifier=classifier, classifier_processor=processor)


def digits_pipeline(tiny: bool) -> KLDBBoundaryPipeline:
    """The bundled digits world on the CPU, or with ``tiny`` its tiny stand-in; a clear error if it is not trained."""
    if tiny:
        return tiny_digits_pipeline()
    from kldb import digits

    if not (digits.WORLD_PATH / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The digits world is not trained yet (no model_index.json in {digits.WORLD_PATH}). Train it with "
            f"`python -m kldb.digits.train --out {digits.WORLD_PATH}` (about an hour on 2 CPU cores), or run on tiny "
            f"random components: pass --tiny (kldb demo) or set {TINY_ENV}=1 (the examples)."
        )
    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# Prompt-only against guided: images, grid, summary
# ----------------------------------------------------------------------------------------------------------------------


def write_comparison(
    out_dir: str | os.PathLike[str],
    runs: Mapping[str, Sequence[KLDBBoundaryPipelineOutput]],
    names: Sequence[str],
    seeds: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    row_metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write each row's images and a captioned grid; return each row's scores and their summary.

    Args:
        out_dir: output folder (created): ``images/<row>_<i>.png`` and ``grid.png``.
        runs: ``{row name: outputs}`` (e.g. ``prompt_only`` and ``guided``); each output holds one or more images
            (PIL) with their scores.
        names: the classifier's label names, for the captions.
        seeds: the seed of image ``i`` of every row, when the rows were made from the same seeds; stored per image.
        metadata: stored in every image's PNG metadata (e.g. the prompt and beta).
        row_metadata: per row, stored in its images' metadata and in its summary (e.g. its alpha).

    Returns:
        ``{row: {...row_metadata, "median_kldb", "median_entropy", "kldb", "entropy", "predicted",
        "predicted_class_mix", "class_probabilities", "skipped_updates"}}``; medians by
        :func:`kldb.metrics.summary_statistics`.
    """
    out = Path(out_dir)
    summary: dict[str, dict[str, Any]] = {}
    grid_rows = []
    for row, outputs in runs.items():
        extra = dict((row_metadata or {}).get(row, {}))
        images = [image for o in outputs for image in o.images]
        kldb = [float(k) for o in outputs for k in o.kldb]
        entropy = [float(e) for o in outputs for e in o.entropy]
        probabilities = [p.tolist() for o in outputs for p in o.probabilities]
        classes = outputs[0].classes
        predicted = [names[max(range(len(p)), key=p.__getitem__)] for p in probabilities]
        for i, image in enumerate(images):
            image_metadata = {"row": row, **(metadata or {}), **extra}
            if seeds is not None:
                image_metadata["seed"] = seeds[i]
            image_metadata.update(
                {"kldb": kldb[i], "classes": classes, "probabilities": [round(p, 6) for p in probabilities[i]]}
            )
            save_png(out / "images" / f"{row}_{i:03d}.png", image, image_metadata)
        summary[row] = {
            **extra,
            "median_kldb": summary_statistics(kldb)["median"],
            "median_entropy": summary_statistics(entropy)["median"],
            "kldb": kldb,
            "entropy": entropy,
            "predicted": predicted,
            "predicted_class_mix": dict(Counter(predicted).most_common()),
            "class_probabilities": [[p[c] for c in classes] for p in probabilities],
            "skipped_updates": sum(o.skipped_updates for o in outputs),
        }
        captions = [caption_lines(k, p, names, top=2) for k, p in zip(kldb, probabilities)]
        alpha = f" (alpha={extra['alpha']})" if "alpha" in extra else ""
        title = f"{row.replace('_', '-')}{alpha}: median KLDB = {summary[row]['median_kldb']:.3f}"
        grid_rows.append((title, images, captions))
    save_png(out / "grid.png", captioned_grid(grid_rows))
    return summary


def save_comparison(
    out_dir: str | os.PathLike[str],
    runs: Mapping[str, Sequence[KLDBBoundaryPipelineOutput]],
    names: Sequence[str],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """:func:`write_comparison`, and ``results.json`` with ``settings`` (what produced the runs) and every row.

    Returns:
        The summary written to ``results.json``: ``{"settings": ..., "rows": {row: ...}}``.
    """
    out = Path(out_dir)
    summary = {"settings": dict(settings), "rows": write_comparison(out, runs, names)}
    atomic_write_json(out / "results.json", summary)
    logger.info("Wrote %s, %s and the images.", out / "grid.png", out / "results.json")
    return summary


def seeds_moved(prompt_only: Sequence[float], guided: Sequence[float]) -> dict[str, int]:
    """Per seed, whether guidance moved the image toward the boundary: how many guided images have a lower KLDB than
    the prompt-only image of the same seed, how many a higher one (``worse``), and how many are compared.

    Example:
        >>> seeds_moved([0.5, 0.2, 0.9], [0.1, 0.3, 0.9])
        {'toward': 1, 'worse': 1, 'total': 3}
    """
    if len(prompt_only) != len(guided):
        raise KLDBInputError(
            f"Expected the prompt-only and guided rows to hold one image per seed each but got {len(prompt_only)} and "
            f"{len(guided)}."
        )
    pairs = list(zip(prompt_only, guided))
    return {
        "toward": sum(g < b for b, g in pairs),
        "worse": sum(g > b for b, g in pairs),
        "total": len(pairs),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line per row: median KLDB and entropy, and the predicted classes; then how many seeds moved toward the
    boundary, when there are prompt-only and guided rows from the same seeds."""
    lines = []
    rows = summary["rows"]
    for row, r in rows.items():
        predicted = ", ".join(sorted(set(r["predicted"])))
        lines.append(
            f"{row:>12}: median KLDB {r['median_kldb']:.4f}, median entropy {r['median_entropy']:.4f} nats, "
            f"predicted {predicted}"
        )
    if "prompt_only" in rows and "guided" in rows:
        moved = seeds_moved(rows["prompt_only"]["kldb"], rows["guided"]["kldb"])
        lines.append(
            f"    per seed: {moved['toward']} of {moved['total']} images moved toward the boundary (lower KLDB than the "
            f"same seed's prompt-only image), {moved['worse']} moved away"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------------


def run_demo(
    out_dir: str | Path = "outputs/demo",
    num_images: int = QUICK_START["num_images"],
    alpha: float = QUICK_START["alpha"],
    beta: float | None = None,
    steps: int = DEMO_PRESET.num_inference_steps,
    interval: int = DEMO_PRESET.kldb_guidance_interval,
    seed: int = DEMO_PRESET.seed,
    tiny: bool = False,
    step_control: str = QUICK_START["kldb_step_control"],
) -> dict[str, Any]:
    """Generate prompt-only (alpha = 0) and guided images from the same seeds; write the grid, images and report.

    ``beta`` ``None`` is the digits preset's beta; the classes are the preset's. The guided row uses the measured
    quick-start setting (:data:`kldb.presets.QUICK_START`: backtracking from alpha 0.2) unless told otherwise;
    ``step_control="fixed"`` is the paper's step.
    """
    if num_images < 1:
        raise KLDBInputError(f"Expected argument `num_images` to be a positive integer but got {num_images}.")
    out = Path(out_dir)
    pipe = digits_pipeline(tiny)
    world = "tiny random components (images are noise)" if tiny else "digits world"
    class_names = list(DEMO_PRESET.classes)
    beta = DEMO_PRESET.beta if beta is None else beta
    pipe.set_progress_bar_config(desc="sampling", leave=False)
    labels = pipe.classifier.config.id2label
    names = [labels[i] for i in sorted(labels)]
    seeds = [seed + i for i in range(num_images)]
    common = {
        "classes": class_names,
        "num_inference_steps": steps,
        "guidance_scale": beta,
        "kldb_guidance_interval": interval,
        "kldb_step_control": step_control,
        "output_type": "pil",
    }
    runs, seconds = {}, {}
    for setting, scale in (("prompt_only", 0.0), ("guided", alpha)):
        start = time.perf_counter()
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        output = pipe(num_images_per_prompt=num_images, generator=generators, kldb_guidance_scale=scale, **common)
        seconds[setting] = time.perf_counter() - start
        runs[setting] = [output]
    prompt = class_prompt(names, runs["guided"][0].classes)  # the prompt the pipeline built
    rows = write_comparison(
        out,
        runs,
        names,
        seeds=seeds,
        metadata={"prompt": prompt, "beta": beta},
        row_metadata={"prompt_only": {"alpha": 0.0}, "guided": {"alpha": alpha}},
    )
    report: dict[str, Any] = {
        "world": world,
        "prompt": prompt,
        "classes": class_names,
        "beta": beta,
        "steps": steps,
        "interval": interval,
        "step_control": step_control,
        # the decoder the guidance gradient went through (the default "auto": the world's guidance_vae if it has one)
        "guidance_decoder": pipe.resolve_guidance_decoder(),
        "seeds": seeds,
        "settings": {
            setting: {
                "median_kldb": row["median_kldb"],
                "median_entropy": row["median_entropy"],
                "predicted_class_mix": row["predicted_class_mix"],
                "alpha": row["alpha"],
                "seconds": round(seconds[setting], 2),
                "skipped": row["skipped_updates"],
            }
            for setting, row in rows.items()
        },
    }
    base, guided = report["settings"]["prompt_only"], report["settings"]["guided"]
    report["relative_kldb_change"] = (guided["median_kldb"] - base["median_kldb"]) / base["median_kldb"]
    report["seeds_moved"] = seeds_moved(rows["prompt_only"]["kldb"], rows["guided"]["kldb"])
    report["time_ratio_guided_over_prompt_only"] = guided["seconds"] / base["seconds"]
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# KLDB demo on the {report['world']}",
        "",
        f'Prompt "{report["prompt"]}", beta = {report["beta"]}, {report["steps"]} k-LMS steps, guidance every '
        f"{report['interval']} steps (step control `{report.get('step_control', 'fixed')}`, gradient through the "
        f"`{report.get('guidance_decoder', 'vae')}` decoder), seeds "
        f"{report['seeds'][0]}..{report['seeds'][-1]} (same for both rows).",
        "",
        "| setting | alpha | median KLDB | median entropy (nats) | predicted classes | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["settings"].items():
        mix = ", ".join(f"{k}: {v}" for k, v in s["predicted_class_mix"].items())
        lines.append(
            f"| {name} | {s['alpha']} | {s['median_kldb']:.4f} | {s['median_entropy']:.4f} | {mix} | {s['seconds']} |"
        )
    lines += ["", f"Median KLDB change with guidance: {100 * report['relative_kldb_change']:+.1f}%."]
    moved = report.get("seeds_moved")
    if moved:
        lines += [
            f"Per seed: {moved['toward']} of {moved['total']} guided images moved toward the boundary (lower KLDB than "
            f"the same seed's prompt-only image), {moved['worse']} moved away."
        ]
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line (also mounted as `kldb demo`)
# ----------------------------------------------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kldb demo`` and ``python -m kldb.demo``; defaults from the digits preset."""
    p = DEMO_PRESET
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    q = QUICK_START
    parser.add_argument(
        "--num-images", type=int, default=q["num_images"], help=f"images per setting (default: {q['num_images']})"
    )
    parser.add_argument(
        "--alpha", type=float, default=q["alpha"], help=f"KLDB guidance strength of the guided row (default: {q['alpha']})"
    )
    parser.add_argument(
        "--step-control",
        default=q["kldb_step_control"],
        choices=STEP_CONTROLS,
        help=f"kldb_step_control of the guided row; fixed is the paper's step (default: {q['kldb_step_control']})",
    )
    parser.add_argument(
        "--beta", type=float, default=None, help=f"classifier-free guidance scale (default: {p.beta:g})"
    )
    parser.add_argument(
        "--steps", type=int, default=p.num_inference_steps, help=f"k-LMS steps (default: {p.num_inference_steps})"
    )
    parser.add_argument(
        "--interval",
        type=int,
        default=p.kldb_guidance_interval,
        help=f"guidance every k steps (default: {p.kldb_guidance_interval})",
    )
    parser.add_argument(
        "--seed", type=int, default=p.seed, help=f"first seed; image i uses seed + i (default: {p.seed})"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random components instead of the digits world")


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo from parsed :func:`add_demo_arguments` options and print its report."""
    report = run_demo(
        args.out, args.num_images, args.alpha, args.beta, args.steps, args.interval, args.seed, args.tiny,
        args.step_control,
    )
    print(render_markdown(report))
    print(f"Wrote {Path(args.out) / 'grid.png'}, the images and report.json / report.md.")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kldb.demo", description=__doc__.split("\n\n")[0])
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo_command(args)


if __name__ == "__main__":
    main()
