"""The main job in one command: prompt-only vs KLDB-guided images for two classes, from the same seeds.

Runs on the bundled digits world (offline, CPU). Before that world is trained, or with ``--tiny``, it runs on tiny
random-weight components instead and says so: the images are then noise, and only the mechanics are shown.

    python -m kldb.demo                 # = make demo
    python -m kldb.demo --num-images 32 --alpha 0.2 --out outputs/demo
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kldb.io import atomic_write_json, atomic_write_text, save_png
from kldb.render import caption_lines, captioned_grid

logger = logging.getLogger("kldb.demo")


def load_demo_pipeline(tiny: bool = False) -> tuple[Any, list[str], dict[str, Any], str]:
    """The digits world if it is shipped (else tiny components): ``(pipe, class names, defaults, world name)``."""
    if not tiny:
        from kldb import digits

        if (digits.WORLD_PATH / "model_index.json").is_file():
            pipe = digits.load_pipeline()
            # beta 6: the middle of the paper's grid and the digits preset's beta
            return pipe, ["three", "eight"], {"guidance_scale": 6.0}, "digits world"
        logger.warning("The digits world is not trained yet (no kldb/digits/world); using tiny random components.")
    from kldb.testing import tiny_pipeline

    return tiny_pipeline(), ["three", "two"], {"guidance_scale": 6.0}, "tiny random components (images are noise)"


def summarize(kldb: torch.Tensor, entropy: torch.Tensor, predicted: torch.Tensor, names: Sequence[str]) -> dict:
    """Median KLDB and entropy, and the mix of predicted classes."""
    mix = Counter(names[i] for i in predicted.tolist())
    return {
        "median_kldb": statistics.median(kldb.tolist()),
        "median_entropy": statistics.median(entropy.tolist()),
        "predicted_class_mix": dict(mix.most_common()),
    }


def run_demo(
    out_dir: str | Path = "outputs/demo",
    num_images: int = 16,
    alpha: float = 0.1,
    beta: float | None = None,
    steps: int = 40,
    interval: int = 5,
    seed: int = 0,
    tiny: bool = False,
) -> dict[str, Any]:
    """Generate prompt-only (alpha = 0) and guided images from the same seeds; write the grid, images and report."""
    if num_images < 1:
        raise ValueError(f"Expected argument `num_images` to be a positive integer but got {num_images}.")
    out = Path(out_dir)
    pipe, class_names, defaults, world = load_demo_pipeline(tiny)
    beta = defaults["guidance_scale"] if beta is None else beta
    pipe.set_progress_bar_config(desc="sampling", leave=False)
    labels = pipe.classifier.config.id2label
    names = [labels[i] for i in sorted(labels)]
    seeds = [seed + i for i in range(num_images)]
    common = {
        "classes": class_names,
        "num_inference_steps": steps,
        "guidance_scale": beta,
        "kldb_guidance_interval": interval,
        "output_type": "pil",
    }
    results = {}
    for setting, scale in (("prompt_only", 0.0), ("guided", alpha)):
        start = time.perf_counter()
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        output = pipe(num_images_per_prompt=num_images, generator=generators, kldb_guidance_scale=scale, **common)
        seconds = time.perf_counter() - start
        results[setting] = {"output": output, "seconds": seconds, "alpha": scale}
        for i, (image, s) in enumerate(zip(output.images, seeds)):
            save_png(
                out / "images" / f"{setting}_{i:03d}.png",
                image,
                {
                    "prompt": " and ".join(class_names),
                    "seed": s,
                    "alpha": scale,
                    "beta": beta,
                    "classes": output.classes,
                    "kldb": float(output.kldb[i]),
                    "probabilities": [round(p, 6) for p in output.probabilities[i].tolist()],
                },
            )

    report: dict[str, Any] = {
        "world": world,
        "prompt": " and ".join(class_names),
        "classes": class_names,
        "beta": beta,
        "steps": steps,
        "interval": interval,
        # the decoder the guidance gradient went through (the default "auto": the world's guidance_vae if it has one)
        "guidance_decoder": pipe.resolve_guidance_decoder(),
        "seeds": seeds,
        "settings": {},
    }
    rows = []
    for setting, result in results.items():
        o = result["output"]
        summary = summarize(o.kldb, o.entropy, o.predicted_class, names)
        summary.update(
            {"alpha": result["alpha"], "seconds": round(result["seconds"], 2), "skipped": o.skipped_updates}
        )
        report["settings"][setting] = summary
        captions = [caption_lines(float(k), p.tolist(), names, top=2) for k, p in zip(o.kldb, o.probabilities)]
        title = f"{setting.replace('_', '-')} (alpha={result['alpha']}): median KLDB {summary['median_kldb']:.3f}"
        rows.append((title, o.images, captions))
    base, guided = report["settings"]["prompt_only"], report["settings"]["guided"]
    report["relative_kldb_change"] = (guided["median_kldb"] - base["median_kldb"]) / base["median_kldb"]
    report["time_ratio_guided_over_prompt_only"] = guided["seconds"] / base["seconds"]

    save_png(out / "grid.png", captioned_grid(rows))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# KLDB demo on the {report['world']}",
        "",
        f'Prompt "{report["prompt"]}", beta = {report["beta"]}, {report["steps"]} k-LMS steps, guidance every '
        f"{report['interval']} steps (gradient through the `{report.get('guidance_decoder', 'vae')}` decoder), seeds "
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
    lines += ["", f"Median KLDB change with guidance: {100 * report['relative_kldb_change']:+.1f}%.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kldb.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--num-images", type=int, default=16, help="images per setting (default: 16)")
    parser.add_argument(
        "--alpha", type=float, default=0.1, help="KLDB guidance scale of the guided row (default: 0.1)"
    )
    parser.add_argument("--beta", type=float, default=None, help="classifier-free guidance scale (default: 6)")
    parser.add_argument("--steps", type=int, default=40, help="k-LMS steps (default: 40)")
    parser.add_argument("--interval", type=int, default=5, help="guidance every k steps (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i (default: 0)")
    parser.add_argument("--tiny", action="store_true", help="use tiny random components instead of the digits world")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run_demo(
        args.out, args.num_images, args.alpha, args.beta, args.steps, args.interval, args.seed, args.tiny
    )
    print(render_markdown(report))
    print(f"Wrote {Path(args.out) / 'grid.png'}, the images and report.json / report.md.")


if __name__ == "__main__":
    main()
