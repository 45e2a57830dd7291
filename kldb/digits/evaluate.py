"""Quality figures of a digits world on its held-out test split, written into ``world_info.json`` and ``RESULTS.md``.

Run ``python -m kldb.digits.evaluate`` (about half an hour on 2 CPU cores). It measures the classifier's test
accuracy and calibration, prompt fidelity per digit at the world's default guidance scale, FID in the classifier's
penultimate feature space, and the paper's Table 1 on this world (prompt "three and eight", classes {3, 8}).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kldb.digits import WORLD_PATH, load_pipeline, world_info
from kldb.digits.calibration import expected_calibration_error
from kldb.digits.data import LABELS, load_digits_split
from kldb.io import atomic_write_json, atomic_write_text
from kldb.metrics import frechet_distance, summary_statistics
from kldb.noise import initial_noise
from kldb.presets import PAPER_ALPHAS, PAPER_BETAS, PRESETS
from pipeline_kldb_boundary import GRADIENT_MODES, GUIDANCE_DECODERS, class_prompt

logger = logging.getLogger(__name__)

TABLE_CLASSES: tuple[int, ...] = tuple(LABELS.index(name) for name in PRESETS["digits"].classes)  # (3, 8)
TABLE_PROMPT = class_prompt(LABELS, TABLE_CLASSES)  # "three and eight"
TABLE_BETAS: tuple[float, ...] = PAPER_BETAS
TABLE_ALPHAS: tuple[float, ...] = PAPER_ALPHAS
FID_TOLERANCE = 0.10


def digit_pixels(images: torch.Tensor) -> np.ndarray:
    """Images ``[N, 3, 32, 32]`` in [0, 1] as gray 8x8 pixel vectors ``[N, 64]``, the digits' native resolution.

    A feature space independent of the classifier, for an FID that does not reward staying inside a class.
    """
    gray = images.float().mean(dim=1, keepdim=True)  # (N, 1, 32, 32)
    return torch.nn.functional.adaptive_avg_pool2d(gray, 8).flatten(1).double().numpy()  # (N, 64)


class ClassifierProbe:
    """Logits and penultimate (pooled) features of the world's classifier for images ``[B, 3, 32, 32]`` in [0, 1]."""

    def __init__(self, pipeline: Any) -> None:
        from pipeline_kldb_boundary import as_image_classifier

        self.adapter = as_image_classifier(pipeline.classifier, pipeline.classifier_processor)
        self.model = pipeline.classifier

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self.adapter(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), batch_size):
            pixel_values = self.adapter.preprocess(images[start : start + batch_size].to(self.adapter.dtype))
            pooled = self.model.resnet(pixel_values=pixel_values).pooler_output  # (B, C, 1, 1)
            chunks.append(pooled.flatten(1).double().numpy())
        return np.concatenate(chunks)


def generate(
    pipeline: Any,
    prompt: str,
    num_images: int,
    seed: int,
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Images and scores from fixed initial latents (the same `seed` gives the same latents in every setting)."""
    latents = initial_noise(pipeline, num_images, torch.Generator().manual_seed(seed))
    outputs: dict[str, list[torch.Tensor]] = {"images": [], "kldb": [], "entropy": [], "predicted_class": []}
    for start in range(0, num_images, batch_size):
        chunk = latents[start : start + batch_size]
        result = pipeline(
            prompt=[prompt] * len(chunk),
            latents=chunk,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            output_type="pt",
            **kwargs,
        )
        for key in outputs:
            value = getattr(result, key)
            if value is not None:
                outputs[key].append(value.detach().float().cpu())
    return {key: torch.cat(value) for key, value in outputs.items() if value}


def evaluate_classifier(probe: ClassifierProbe, seed: int) -> dict[str, float]:
    images, labels = load_digits_split("test", seed)
    logits = probe.logits(images)
    return {
        "test_accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "test_ece": expected_calibration_error(logits, labels),
        "test_size": len(labels),
    }


def evaluate_fidelity(
    pipeline: Any, probe: ClassifierProbe, seed: int, images_per_digit: int, guidance_scale: float, steps: int,
    batch_size: int,
) -> dict[str, Any]:  # fmt: skip
    """Prompt fidelity per digit (prompt = the digit's name, no KLDB guidance) and FID against the real test split."""
    per_digit: dict[str, float] = {}
    generated = []
    for digit, name in enumerate(tqdm(LABELS, desc="fidelity")):
        result = generate(
            pipeline, name, images_per_digit, seed + digit, guidance_scale, steps, batch_size, kldb_guidance_scale=0.0
        )
        per_digit[name] = float((result["predicted_class"] == digit).float().mean())
        generated.append(result["images"])
        logger.info("fidelity %s: %.3f", name, per_digit[name])
    real_images, _ = load_digits_split("test", seed)
    fid = frechet_distance(probe.features(torch.cat(generated)), probe.features(real_images))
    return {
        "guidance_scale": guidance_scale,
        "images_per_digit": images_per_digit,
        "per_digit": per_digit,
        "mean": float(np.mean(list(per_digit.values()))),
        "fid_vs_test": fid,
    }


def summarize_table(rows: Sequence[dict[str, Any]], fid_key: str = "fid") -> list[dict[str, Any]]:
    """Best alpha per beta: the lowest median KLDB among alpha > 0 whose FID (`fid_key`) is within the tolerance.

    Without such an alpha, the lowest-KLDB alpha > 0. Rows that lack `fid_key` are left out.
    """
    rows = [row for row in rows if fid_key in row]
    summary = []
    for beta in sorted({row["beta"] for row in rows}):
        baseline = next((row for row in rows if row["beta"] == beta and row["alpha"] == 0.0), None)
        guided = [row for row in rows if row["beta"] == beta and row["alpha"] > 0.0]
        if baseline is None or not guided:
            continue
        within = [row for row in guided if row[fid_key] <= (1.0 + FID_TOLERANCE) * baseline[fid_key]]
        best = min(within or guided, key=lambda row: row["median_kldb"])
        summary.append(
            {
                "beta": beta,
                "best_alpha": best["alpha"],
                "best_alpha_within_fid_tolerance": bool(within),
                "median_kldb_alpha0": baseline["median_kldb"],
                "median_kldb_best": best["median_kldb"],
                "kldb_relative_change": best["median_kldb"] / baseline["median_kldb"] - 1.0,
                "fid_kind": fid_key,
                "fid_alpha0": baseline[fid_key],
                "fid_best": best[fid_key],
                "fid_relative_change": best[fid_key] / baseline[fid_key] - 1.0,
                "median_entropy_alpha0": baseline["median_entropy"],
                "median_entropy_best": best["median_entropy"],
            }
        )
    return summary


def evaluate_table(
    pipeline: Any,
    probe: ClassifierProbe,
    seed: int,
    num_images: int,
    betas: Sequence[float],
    alphas: Sequence[float],
    steps: int,
    interval: int,
    batch_size: int,
    kldb_gradient: str,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    known_rows: Sequence[dict[str, Any]] = (),
    kldb_guidance_decoder: str = "vae",
) -> dict[str, Any]:
    """The paper's Table 1 on the digits world: median KLDB, entropy and FID per (beta, alpha), same seeds.

    `on_row` is called with the table so far after every setting (to save partial results). Settings found in
    `known_rows` (rows of a table measured with the same images, steps, interval and gradient) are reused.
    """
    real_images, real_labels = load_digits_split("test", seed)
    in_classes = torch.isin(real_labels, torch.tensor(TABLE_CLASSES))
    real_features = probe.features(real_images[in_classes])
    real_pixels = digit_pixels(real_images[in_classes])
    table: dict[str, Any] = {
        "prompt": TABLE_PROMPT,
        "classes": list(TABLE_CLASSES),
        "images_per_setting": num_images,
        "num_inference_steps": steps,
        "kldb_guidance_interval": interval,
        "kldb_gradient": kldb_gradient,
        "kldb_guidance_decoder": kldb_guidance_decoder,
        "real_reference": f"test split images of classes {list(TABLE_CLASSES)} (n={int(in_classes.sum())})",
        "fid_tolerance": FID_TOLERANCE,
        "rows": [],
        "summary": [],
    }
    for beta in betas:
        for alpha in tqdm(alphas, desc=f"table beta={beta:g}"):
            known = next(
                (row for row in known_rows if row["beta"] == beta and row["alpha"] == alpha and "fid_pixels" in row),
                None,
            )
            if known is not None:
                table["rows"].append(dict(known))
                table["summary"] = summarize_table(table["rows"])
                continue
            started = time.perf_counter()
            result = generate(
                pipeline, TABLE_PROMPT, num_images, seed, beta, steps, batch_size, classes=list(TABLE_CLASSES),
                kldb_guidance_scale=alpha, kldb_guidance_interval=interval, kldb_gradient=kldb_gradient,
                kldb_guidance_decoder=kldb_guidance_decoder,
            )  # fmt: skip
            kldb = summary_statistics(result["kldb"].double().tolist())
            predicted = result["predicted_class"]
            row = {
                "beta": beta,
                "alpha": alpha,
                "median_kldb": kldb["median"],
                "kldb_q25": kldb["q25"],
                "kldb_q75": kldb["q75"],
                "median_entropy": summary_statistics(result["entropy"].double().tolist())["median"],
                "fid": frechet_distance(probe.features(result["images"]), real_features),
                "fid_pixels": frechet_distance(digit_pixels(result["images"]), real_pixels),
                "fraction_predicted_in_classes": float(
                    torch.isin(predicted, torch.tensor(TABLE_CLASSES)).float().mean()
                ),
                "predicted_mix": {LABELS[c]: int((predicted == c).sum()) for c in range(len(LABELS))},
                "seconds": time.perf_counter() - started,
            }
            table["rows"].append(row)
            table["summary"] = summarize_table(table["rows"])
            table["summary_pixels"] = summarize_table(table["rows"], "fid_pixels")
            logger.info(
                "beta %g alpha %g: median KLDB %.4f, median entropy %.4f, FID %.3f (%.0f s)",
                beta, alpha, row["median_kldb"], row["median_entropy"], row["fid"], row["seconds"],
            )  # fmt: skip
            if on_row is not None:
                on_row(table)
    return table


def summary_markdown(summary: Sequence[dict[str, Any]], space: str, tolerance: float) -> list[str]:
    """Markdown lines of a best-alpha-per-beta summary, judged by the FID named `space`."""
    lines = [
        "",
        f"Best alpha per beta by {space}: the lowest median KLDB among alpha > 0 whose {space} is at most "
        f"{100 * tolerance:.0f}% above alpha = 0's ((*): no such alpha; the lowest-KLDB alpha is shown).",
        "",
        f"| beta | best alpha | median KLDB alpha=0 -> best | change | {space} alpha=0 -> best | change | "
        "median entropy alpha=0 -> best |",
        "|---|---|---|---|---|---|---|",
    ]
    for item in summary:
        lines.append(
            f"| {item['beta']:g} | {item['best_alpha']:g}{'' if item['best_alpha_within_fid_tolerance'] else ' (*)'} | "
            f"{item['median_kldb_alpha0']:.4f} -> {item['median_kldb_best']:.4f} | "
            f"{100 * item['kldb_relative_change']:+.1f}% | {item['fid_alpha0']:.3f} -> {item['fid_best']:.3f} | "
            f"{100 * item['fid_relative_change']:+.1f}% | "
            f"{item['median_entropy_alpha0']:.4f} -> {item['median_entropy_best']:.4f} |"
        )
    return lines


def table_markdown(table: dict[str, Any], title: str) -> list[str]:
    """Markdown lines of one (beta, alpha) table and its best-alpha summary."""
    lines = [
        f'## {title}: prompt "{table["prompt"]}", classes {table["classes"]}, '
        f"{table['images_per_setting']} images per setting, {table['num_inference_steps']} LMS steps, "
        f"interval {table['kldb_guidance_interval']}, guidance gradient `{table['kldb_gradient']}` through the "
        f"`{table.get('kldb_guidance_decoder', 'vae')}` decoder",
        "",
        f"FID against {table['real_reference']}, in the classifier's penultimate feature space (which separates "
        "the audited classes, so images moved toward their boundary move away from both classes' real features).",
        "",
        "FID (8x8 pixels): the same against the real digits at their native 8x8 gray resolution, a feature space "
        "independent of the classifier ('-': not measured in that run).",
        "",
        "| beta | alpha | median KLDB | KLDB IQR | median entropy | FID | FID (8x8 pixels) | in {3, 8} | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        fid_pixels = f"{row['fid_pixels']:.3f}" if "fid_pixels" in row else "-"
        lines.append(
            f"| {row['beta']:g} | {row['alpha']:g} | {row['median_kldb']:.4f} | "
            f"[{row['kldb_q25']:.4f}, {row['kldb_q75']:.4f}] | {row['median_entropy']:.4f} | {row['fid']:.3f} | "
            f"{fid_pixels} | {row['fraction_predicted_in_classes']:.2f} | {row['seconds']:.0f} |"
        )
    for summary, space in [(table["summary"], "FID"), (table.get("summary_pixels", []), "FID (8x8 pixels)")]:
        if summary:
            lines += summary_markdown(summary, space, table["fid_tolerance"])
    lines.append("")
    return lines


def results_markdown(info: dict[str, Any]) -> str:
    """The quality figures of `world_info.json` as a Markdown report."""
    evaluation = info["evaluation"]
    classifier, fidelity, table = evaluation["classifier"], evaluation["fidelity"], evaluation["table"]
    calibration = info.get("classifier", {})
    lines = [
        "# Digits world: quality figures",
        "",
        f"Seed {info['seed']}, training script {info['script_version']}, "
        f"training time {info['training_seconds']['total'] / 60:.1f} min on 2 CPU cores; "
        f"evaluation time {evaluation.get('seconds', 0.0) / 60:.1f} min"
        f"{'' if evaluation.get('complete') else ' (INCOMPLETE: the evaluation was interrupted)'}. "
        "Regenerate with `python -m kldb.digits.evaluate`.",
        "",
        "## Classifier (held-out test split)",
        "",
        f"- accuracy: {classifier['test_accuracy']:.4f} (n={classifier['test_size']})",
        f"- expected calibration error (15 bins), test: {calibration.get('test_ece_before', float('nan')):.4f} "
        f"before temperature scaling, {classifier['test_ece']:.4f} after (T = "
        f"{calibration.get('temperature', float('nan')):.3f}, fitted on the validation split and baked into the "
        "final layer)",
        "",
        f"## Prompt fidelity (beta = {fidelity['guidance_scale']:g}, {fidelity['images_per_digit']} images per digit)",
        "",
        "| " + " | ".join(LABELS) + " | mean |",
        "|" + "---|" * (len(LABELS) + 1),
        "| " + " | ".join(f"{fidelity['per_digit'][name]:.2f}" for name in LABELS) + f" | {fidelity['mean']:.3f} |",
        "",
        f"FID (classifier penultimate features) of all generated digits against the real test split: "
        f"{fidelity['fid_vs_test']:.3f}",
        "",
    ]
    lines += table_markdown(table, "Table 1 on digits")
    for name, extra in evaluation.get("extra_tables", {}).items():
        lines += table_markdown(extra, f"Extra table `{name}`")
    small = info.get("guidance_vae")
    if small and "fidelity" in small:
        figures = small["fidelity"]
        lines += [
            "## Guidance decoder (`guidance_vae/`)",
            "",
            f"An AutoencoderTiny distilled from the VAE by `{small['script']}` (seed {small['seed']}, "
            f"{small['training_seconds'] / 60:.1f} min): {small['decoder_parameters']:,} decoder parameters against "
            f"the VAE decoder's {small['vae_decoder_parameters']:,}. On {figures['measured_on']}:",
            "",
            f"- KLDB gradient for classes {figures['classes']} through it against through the VAE decoder, cosine "
            f"similarity: median {figures['gradient_cosine_median']:.3f} (clean {figures['gradient_cosine_median_clean']:.3f}, "
            f"predicted {figures['gradient_cosine_median_predicted']:.3f}), 10th percentile {figures['gradient_cosine_q10']:.3f}",
            f"- image mean squared error against the VAE decoder: {figures['image_mse']:.2e}; the classifier's predicted "
            f"class agrees on {100 * figures['classifier_agreement']:.1f}%",
            "",
        ]
    return "\n".join(lines)


def write_results(path: Path, info: dict[str, Any]) -> None:
    atomic_write_json(path / "world_info.json", info)
    atomic_write_text(path / "RESULTS.md", results_markdown(info))


def evaluate_world(
    path: Path, images_per_setting: int, images_per_digit: int, steps: int, interval: int, batch_size: int,
    kldb_gradient: str = "detached", betas: Sequence[float] = TABLE_BETAS, alphas: Sequence[float] = TABLE_ALPHAS,
    kldb_guidance_decoder: str = "vae",
) -> dict[str, Any]:  # fmt: skip
    """Measure every quality figure of the world at `path`; write them into its world_info.json and RESULTS.md.

    Both files are rewritten after every table setting, so an interrupted run leaves its figures so far.
    """
    started = time.perf_counter()
    info = world_info(path)
    seed = info["seed"]
    pipeline = load_pipeline(path)
    pipeline.set_progress_bar_config(disable=True)
    probe = ClassifierProbe(pipeline)
    guidance_scale = info["default_guidance_scale"]
    evaluation: dict[str, Any] = {"complete": False, "classifier": evaluate_classifier(probe, seed)}
    info["evaluation"] = evaluation
    logger.info("classifier: %s", evaluation["classifier"])
    evaluation["fidelity"] = evaluate_fidelity(
        pipeline, probe, seed, images_per_digit, guidance_scale, steps, batch_size
    )
    logger.info("fidelity: mean %.3f, FID %.3f", evaluation["fidelity"]["mean"], evaluation["fidelity"]["fid_vs_test"])

    def save_partial(table: dict[str, Any]) -> None:
        evaluation["table"] = table
        evaluation["seconds"] = time.perf_counter() - started
        write_results(path, info)

    evaluation["table"] = evaluate_table(
        pipeline, probe, seed, images_per_setting, betas, alphas, steps, interval, batch_size, kldb_gradient,
        on_row=save_partial, kldb_guidance_decoder=kldb_guidance_decoder,
    )  # fmt: skip
    evaluation["seconds"] = time.perf_counter() - started
    evaluation["complete"] = True
    write_results(path, info)
    return info


def evaluate_extra_table(
    path: Path, name: str, betas: Sequence[float], alphas: Sequence[float], images_per_setting: int, steps: int,
    interval: int, batch_size: int, kldb_gradient: str, kldb_guidance_decoder: str = "vae",
) -> dict[str, Any]:  # fmt: skip
    """A further (beta, alpha) grid, stored as ``evaluation.extra_tables[name]``; settings of the main table with
    the same images, steps, interval and gradient are reused (same seeds give the same images)."""
    info = world_info(path)
    main_table = info.get("evaluation", {}).get("table", {})
    same_settings = all(
        main_table.get(key) == value
        for key, value in [
            ("images_per_setting", images_per_setting), ("num_inference_steps", steps),
            ("kldb_guidance_interval", interval), ("kldb_gradient", kldb_gradient),
        ]
    ) and main_table.get("kldb_guidance_decoder", "vae") == kldb_guidance_decoder  # fmt: skip
    pipeline = load_pipeline(path)
    pipeline.set_progress_bar_config(disable=True)

    def save(table: dict[str, Any]) -> None:
        current = world_info(path)  # re-read: only this table is written
        current.setdefault("evaluation", {}).setdefault("extra_tables", {})[name] = table
        write_results(path, current)

    return evaluate_table(
        pipeline, ClassifierProbe(pipeline), info["seed"], images_per_setting, betas, alphas, steps, interval,
        batch_size, kldb_gradient, on_row=save, known_rows=main_table.get("rows", []) if same_settings else (),
        kldb_guidance_decoder=kldb_guidance_decoder,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=WORLD_PATH, help="world folder (default: the shipped one)")
    parser.add_argument("--images-per-setting", type=int, default=256)
    parser.add_argument("--images-per-digit", type=int, default=100)
    parser.add_argument("--steps", type=int, default=PRESETS["digits"].num_inference_steps)
    parser.add_argument("--interval", type=int, default=PRESETS["digits"].kldb_guidance_interval)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--kldb-gradient", choices=GRADIENT_MODES, default="detached",
        help="how the guidance gradient treats the noise prediction (see the pipeline's `kldb_gradient`)",
    )  # fmt: skip
    parser.add_argument(
        "--kldb-guidance-decoder", choices=GUIDANCE_DECODERS, default="vae",
        help="whose decoder the guidance gradient goes through (see the pipeline's `kldb_guidance_decoder`); the "
        "tables in RESULTS.md were measured with 'vae'",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--extra-table", default=None, metavar="NAME",
        help="only measure a further (beta, alpha) grid, stored as evaluation.extra_tables[NAME]",
    )  # fmt: skip
    parser.add_argument("--betas", type=float, nargs="+", default=list(TABLE_BETAS), help="with --extra-table")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(TABLE_ALPHAS), help="with --extra-table")
    parser.add_argument(
        "--report-only", action="store_true",
        help="recompute the best-alpha summaries from world_info.json and rewrite RESULTS.md; generate nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.report_only:
        info = world_info(args.world)
        evaluation = info["evaluation"]
        for table in [evaluation["table"], *evaluation.get("extra_tables", {}).values()]:
            table["summary"] = summarize_table(table["rows"])
            table["summary_pixels"] = summarize_table(table["rows"], "fid_pixels")
        write_results(args.world, info)
        print(results_markdown(info))
        return
    if args.extra_table is not None:
        evaluate_extra_table(
            args.world, args.extra_table, args.betas, args.alphas, args.images_per_setting, args.steps, args.interval,
            args.batch_size, args.kldb_gradient, args.kldb_guidance_decoder,
        )  # fmt: skip
        print(results_markdown(world_info(args.world)))
        return
    info = evaluate_world(
        args.world, args.images_per_setting, args.images_per_digit, args.steps, args.interval, args.batch_size,
        args.kldb_gradient, kldb_guidance_decoder=args.kldb_guidance_decoder,
    )  # fmt: skip
    print(results_markdown(info))


if __name__ == "__main__":
    main()
