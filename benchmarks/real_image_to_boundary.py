"""Real digits pushed toward a boundary (issue 15): KLDB before and after, and how far each image moved.

Test-split digits of one class are edited toward the boundary of a pair ({3, 8} from 3s, {4, 9} from 4s) with the
pipeline's image-to-image call (``image=``, ``strength=``), one generator per image (seed = the image's index). Per
setting (source class, strength, alpha, prompt) it records every image's KLDB before (``kldb_start``) and after, its
pixel L2 and SSIM to the input, its predicted class before and after, and the wall time; the summary gives medians,
the share of images whose KLDB went down, and the share predicted inside the pair.

Two prompt modes: ``classes`` (the paper's "three and eight") and ``empty`` ("": unconditional editing).

Results go to a JSON file written after every setting (atomically), so a rerun resumes; ``--table`` prints the
Markdown table of a results file. Measured on a shared, busy 2-core CPU: times are not speed claims.

    python benchmarks/real_image_to_boundary.py --out benchmarks/results/real_image_to_boundary_digits.json
    python benchmarks/real_image_to_boundary.py --out benchmarks/results/real_image_to_boundary_digits.json --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kldb.io import atomic_write_json

#: (source class, the pair it is pushed toward)
TASKS = ((3, [3, 8]), (4, [4, 9]))


def settings(strengths: list[float], alpha: float, prompt_strength: float) -> list[dict[str, Any]]:
    """At ``prompt_strength`` the class prompt and the empty prompt at ``alpha``, then the other strengths with the
    class prompt, then alpha 0 (the edit without guidance) at ``prompt_strength``."""
    runs = [{"strength": prompt_strength, "alpha": alpha, "prompt": p} for p in ("classes", "empty")]
    runs += [{"strength": s, "alpha": alpha, "prompt": "classes"} for s in strengths if s != prompt_strength]
    runs.append({"strength": prompt_strength, "alpha": 0.0, "prompt": "classes"})
    return runs


def name(source: int, setting: dict[str, Any]) -> str:
    return f"{source} strength {setting['strength']:g} alpha {setting['alpha']:g} prompt {setting['prompt']}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kldb.digits import load_digits_split, load_pipeline

    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    fixed = {
        "world": "digits", "split": "test", "n": args.n, "steps": args.steps, "beta": args.beta,
        "interval": args.interval, "guidance_rescale": 0.0,
    }  # fmt: skip
    if results.get("settings", fixed) != fixed:
        raise SystemExit(f"{out} holds results of other settings {results['settings']}; use another --out.")
    results["settings"] = fixed
    runs = results.setdefault("runs", {})
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    images, labels = load_digits_split("test")
    for setting in settings(args.strengths, args.alpha, args.prompt_strength):
        for source, pair in TASKS:
            inputs = images[labels == source][: args.n]  # (n, 3, 32, 32) in [0, 1]
            key = name(source, setting)
            if key in runs:
                continue
            start = time.perf_counter()
            out_ = pipe(
                image=inputs, strength=setting["strength"], classes=pair, kldb_guidance_scale=setting["alpha"],
                prompt="" if setting["prompt"] == "empty" else None, num_inference_steps=args.steps,
                guidance_scale=args.beta, kldb_guidance_interval=args.interval,
                generator=[torch.Generator().manual_seed(i) for i in range(len(inputs))], output_type="pt",
            )  # fmt: skip
            runs[key] = {
                "source": source, "classes": pair, **setting, "seconds": time.perf_counter() - start,
                "kldb_start": out_.kldb_start.tolist(), "kldb": out_.kldb.tolist(),
                "pixel_l2": out_.pixel_l2.tolist(), "ssim": out_.ssim.tolist() if out_.ssim is not None else None,
                "predicted_class_start": out_.predicted_class_start.tolist(),
                "predicted_class": out_.predicted_class.tolist(),
            }  # fmt: skip
            atomic_write_json(out, results)
            print(key, summary(runs[key]), flush=True)
    return results


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """Medians, the share of images whose KLDB went down, and the share predicted inside the pair."""
    before, after = record["kldb_start"], record["kldb"]
    inside = [c in record["classes"] for c in record["predicted_class"]]
    return {
        "n": len(after),
        "median_kldb_start": statistics.median(before),
        "median_kldb": statistics.median(after),
        "lowered": sum(a < b for a, b in zip(after, before)) / len(after),
        "median_pixel_l2": statistics.median(record["pixel_l2"]),
        "median_ssim": statistics.median(record["ssim"]) if record["ssim"] is not None else None,
        "predicted_in_pair": sum(inside) / len(inside),
        "flipped": sum(a != b for a, b in zip(record["predicted_class"], record["predicted_class_start"]))
        / len(after),
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| source -> pair | strength | alpha | prompt | median KLDB before -> after | KLDB lowered | median pixel L2 | "
        "median SSIM | predicted in pair | class changed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in results["runs"].values():
        s = summary(record)
        ssim = f"{s['median_ssim']:.3f}" if s["median_ssim"] is not None else "-"
        lines.append(
            f"| {record['source']} -> {set(record['classes'])} | {record['strength']:g} | {record['alpha']:g} | "
            f"{record['prompt']} | {s['median_kldb_start']:.3f} -> {s['median_kldb']:.3f} | {100 * s['lowered']:.0f} % | "
            f"{s['median_pixel_l2']:.2f} | {ssim} | {100 * s['predicted_in_pair']:.0f} % | {100 * s['flipped']:.0f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results JSON (resumed when it exists)")
    parser.add_argument("--n", type=int, default=16, help="test images per source class (the split has 36-37)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--alpha", type=float, default=0.1, help="the paper's alpha")
    parser.add_argument("--prompt-strength", type=float, default=0.5, help="strength of the prompt comparison")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--beta", type=float, default=6.0)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    print(table(run(args)))


if __name__ == "__main__":
    main()
