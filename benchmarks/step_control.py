"""Step-size control against the paper's fixed alpha, on the digits world: which needs no alpha tuning.

For each class subset, the same seeds (one image per seed) are sampled prompt-only (alpha = 0), with the paper's fixed
alpha over a grid, with each step-size control (`kldb_step_control`) and with `kldb_guidance_scale="auto"`. Per option
it records every image's KLDB and the wall time, and reports:

- the median-KLDB drop against prompt-only, ``1 - median / median_prompt_only``;
- the share of images made worse: KLDB higher than the same seed's prompt-only image;
- the time against the fixed-alpha run at the paper's alpha 0.1 (same batch, same process);
- the oracle: the fixed alpha of the grid with the largest drop, per subset.

Results go to a JSON file written after every run (atomically), so a rerun resumes where it stopped; ``--table``
prints the Markdown table of a results file.

    python benchmarks/step_control.py --out benchmarks/results/step_control_digits.json
    python benchmarks/step_control.py --out benchmarks/results/step_control_digits.json --table
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

#: Pairs and a triple of the digits world: {3, 8} (the paper's kind of pair) and four others.
SUBSETS = ([3, 8], [4, 9], [1, 7], [5, 6], [3, 5, 8])
FIXED_GRID = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0)  # the paper's grid and two smaller values
#: The step controls, each from one alpha for every subset (they only ever shrink it, or scale it down).
CONTROLS = {
    "backtracking": {"kldb_guidance_scale": 0.2, "kldb_step_control": "backtracking", "kldb_max_halvings": 3},
    "trust_region": {"kldb_guidance_scale": 0.2, "kldb_step_control": "trust_region", "kldb_trust_radius": 0.1},
    "kldb_scaled": {"kldb_guidance_scale": 0.2, "kldb_step_control": "kldb_scaled", "kldb_step_temperature": 0.5},
    "auto": {"kldb_guidance_scale": "auto"},
}
REFERENCE = "fixed 0.1"  # the cost reference: the paper's alpha


def options() -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {"prompt-only": {"kldb_guidance_scale": 0.0}}
    runs.update({f"fixed {alpha:g}": {"kldb_guidance_scale": alpha} for alpha in FIXED_GRID})
    runs.update(CONTROLS)
    return runs


def run(out: Path, seeds: list[int], steps: int, beta: float, interval: int) -> dict[str, Any]:
    from kldb.digits import load_pipeline

    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    settings = {"seeds": seeds, "steps": steps, "beta": beta, "interval": interval, "world": "digits"}
    if results.get("settings", settings) != settings:
        raise ValueError(f"{out} holds results of other settings {results['settings']}; use another --out.")
    results["settings"] = settings
    results.setdefault("runs", {})
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for subset in SUBSETS:
        key = ",".join(map(str, subset))
        done = results["runs"].setdefault(key, {})
        for name, kwargs in options().items():
            if name in done:
                continue
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            start = time.perf_counter()
            result = pipe(
                classes=subset, num_inference_steps=steps, guidance_scale=beta, kldb_guidance_interval=interval,
                num_images_per_prompt=len(seeds), generator=generators, output_type="pt", **kwargs,
            )  # fmt: skip
            record = {"seconds": time.perf_counter() - start, "kldb": [float(v) for v in result.kldb]}
            if result.accepted_steps is not None:
                record["accepted"] = int(result.accepted_steps.sum())
                record["halvings"] = int(result.step_halvings.sum())
                record["rejected"] = int(result.rejected_steps.sum())
            if result.auto_guidance is not None:
                record["auto"] = result.auto_guidance
            done[name] = record
            atomic_write_json(out, results)
            print(f"{key:>6} {name:<14} median KLDB {statistics.median(record['kldb']):.4f} {record['seconds']:.1f} s")
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per subset and option: median, drop, share made worse, time ratio; and the oracle per subset."""
    summary: dict[str, Any] = {}
    for key, runs in results["runs"].items():
        base = runs["prompt-only"]["kldb"]
        base_median = statistics.median(base)
        rows = {}
        for name in [name for name in options() if name in runs]:
            record = runs[name]
            values = record["kldb"]
            rows[name] = {
                "median_kldb": statistics.median(values),
                "drop": 1 - statistics.median(values) / base_median,
                "worse": sum(v > b for v, b in zip(values, base)) / len(values),
                "time_ratio": record["seconds"] / runs[REFERENCE]["seconds"] if REFERENCE in runs else None,
                **{k: record[k] for k in ("accepted", "halvings", "rejected") if k in record},
                **({"auto_alpha": record["auto"]["kldb_guidance_scale"]} if "auto" in record else {}),
            }
        fixed = {name: row for name, row in rows.items() if name.startswith("fixed ")}
        oracle = max(fixed, key=lambda name: fixed[name]["drop"]) if fixed else None
        summary[key] = {"rows": rows, "oracle": oracle}
    return summary


def table(results: dict[str, Any]) -> str:
    summary = summarize(results)
    settings = results["settings"]
    lines = [
        f"Digits world, {len(settings['seeds'])} seeds per subset (seeds {settings['seeds'][0]}..{settings['seeds'][-1]}, "
        f"one image each), beta {settings['beta']}, {settings['steps']} k-LMS steps, guidance every "
        f"{settings['interval']}. Drop: median-KLDB drop against prompt-only; worse: share of images whose KLDB is "
        f"higher than the same seed's prompt-only image; time: against fixed alpha 0.1 in the same run.",
        "",
        "| subset | option | median KLDB | drop | worse | time | oracle gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, entry in summary.items():
        rows, oracle = entry["rows"], entry["oracle"]
        oracle_drop = rows[oracle]["drop"] if oracle else None
        for name, row in rows.items():
            label = name + (" (oracle)" if name == oracle else "") + (
                f" (chose {row['auto_alpha']:g})" if "auto_alpha" in row else ""
            )
            gap = f"{100 * (oracle_drop - row['drop']):+.1f} pts" if oracle_drop is not None and name != "prompt-only" else ""
            ratio = f"{row['time_ratio']:.2f}x" if row["time_ratio"] is not None else ""
            lines.append(
                f"| {{{key}}} | {label} | {row['median_kldb']:.4f} | {100 * row['drop']:.1f} % | "
                f"{100 * row['worse']:.1f} % | {ratio} | {gap} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON (resumed if it exists)")
    parser.add_argument("--seeds", type=int, default=64, help="images per subset and option, seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--beta", type=float, default=6.0)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    if args.seeds < 1:
        parser.error(f"Expected argument `--seeds` to be a positive integer but got {args.seeds}.")
    results = run(args.out, list(range(args.seeds)), args.steps, args.beta, args.interval)
    atomic_write_json(args.out.with_suffix(".summary.json"), summarize(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
