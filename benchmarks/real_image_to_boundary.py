"""Real digits pushed toward a boundary (issue 15): KLDB before and after, and how far each image moved.

Test-split digits of one class are edited toward the boundary of a pair ({3, 8} from 3s, {4, 9} from 4s) with the
pipeline's image-to-image call (``image=``, ``strength=``), one generator per image (seed = the image's index). Per
setting (source class, strength, alpha, prompt) it records every image's KLDB before (``kldb_start``) and after, its
pixel L2 and SSIM to the input, its predicted class before and after, and the wall time; the summary gives medians,
the share of images whose KLDB went down, and the share predicted inside the pair.

Two prompt modes: ``classes`` (the paper's "three and eight") and ``empty`` ("": unconditional editing).

Results go to a JSON file written after every setting (atomically), so a rerun resumes, and the images of each
setting to ``<out stem>_images/`` (8-bit ``.npz``); ``--table`` prints the Markdown table of a results file, ``--plot``
draws median KLDB after against median distance per strength, ``--grid`` a captioned before/after grid. Measured on a
shared, busy 2-core CPU: times are not speed claims.

    python benchmarks/real_image_to_boundary.py --out benchmarks/results/real_image_to_boundary_digits.json
    python benchmarks/real_image_to_boundary.py --out benchmarks/results/real_image_to_boundary_digits.json --table \
        --plot docs/real_image_to_boundary.png --grid docs/real_image_to_boundary_grid.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
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


def images_dir(out: Path) -> Path:
    return out.with_name(f"{out.stem}_images")


def slug(key: str) -> str:
    return key.replace(" ", "_")


def save_images(path: Path, images: torch.Tensor) -> None:
    """``(n, 3, H, W)`` in [0, 1] as 8-bit ``(n, H, W, 3)`` in an ``.npz``, written atomically."""
    import io

    from kldb.io import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=(images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    atomic_write_bytes(path, buffer.getvalue())


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
            if not (images_dir(out) / f"input_{source}.npz").is_file():
                save_images(images_dir(out) / f"input_{source}.npz", inputs)
            key = name(source, setting)
            if key in runs and (images_dir(out) / f"{slug(key)}.npz").is_file():
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
            save_images(images_dir(out) / f"{slug(key)}.npz", out_.images.float().cpu())
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
        "median_feature_l2": statistics.median(record["feature_l2"]) if record.get("feature_l2") else None,
        "valid": sum(c in record["classes"] for c in record["oracle_top1"]) / len(after)
        if record.get("oracle_top1")
        else None,
        "off_manifold": sum(
            c not in record["classes"] or p < 0.5
            for c, p in zip(record["oracle_top1"], record["oracle_max_probability"])
        )
        / len(after)
        if record.get("oracle_top1")
        else None,
    }


@torch.no_grad()
def add_independent_measures(results: dict[str, Any], out: Path) -> None:
    """Measures by networks the guidance does not see, from the saved 8-bit images, added to each record:
    ``feature_l2`` (distance of every edited image to its input in the digits world's independent feature space,
    :mod:`kldb.digits.feature_net`) and the validity oracle's top-1 class and maximum probability
    (``kldb/digits/world/validity_classifier``, :mod:`kldb.validity`: valid = top-1 in the pair, off-manifold = top-1
    outside it or maximum probability below 0.5)."""
    from kldb.digits.feature_net import load_feature_net
    from kldb.loading import load_classifier
    from kldb.validity import digits_validity_classifier_path

    feature_net = load_feature_net()
    oracle = load_classifier(str(digits_validity_classifier_path()), "cpu")

    def features(path: Path) -> torch.Tensor:
        images = torch.from_numpy(np.load(path)["images"]).permute(0, 3, 1, 2).float() / 255
        return feature_net(images).double()

    folder = images_dir(out)
    for key, record in results["runs"].items():
        if (folder / f"{slug(key)}.npz").is_file():
            edited, inputs = features(folder / f"{slug(key)}.npz"), features(folder / f"input_{record['source']}.npz")
            record["feature_l2"] = (edited - inputs).norm(dim=1).tolist()
            images = torch.from_numpy(np.load(folder / f"{slug(key)}.npz")["images"]).permute(0, 3, 1, 2).float() / 255
            probabilities = torch.softmax(oracle(images), dim=-1)
            record["oracle_top1"] = probabilities.argmax(dim=-1).tolist()
            record["oracle_max_probability"] = probabilities.max(dim=-1).values.tolist()


def table(results: dict[str, Any]) -> str:
    lines = [
        "| source -> pair | strength | alpha | prompt | median KLDB before -> after | KLDB lowered | median pixel L2 | "
        "median SSIM | median feature L2 | predicted in pair | class changed | valid (oracle) | off-manifold (oracle) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in results["runs"].values():
        s = summary(record)
        ssim = f"{s['median_ssim']:.3f}" if s["median_ssim"] is not None else "-"
        feature = f"{s['median_feature_l2']:.2f}" if s["median_feature_l2"] is not None else "-"
        valid = f"{100 * s['valid']:.0f} %" if s["valid"] is not None else "-"
        off = f"{100 * s['off_manifold']:.0f} %" if s["off_manifold"] is not None else "-"
        lines.append(
            f"| {record['source']} -> {{{', '.join(map(str, record['classes']))}}} | {record['strength']:g} | {record['alpha']:g} | "
            f"{record['prompt']} | {s['median_kldb_start']:.3f} -> {s['median_kldb']:.3f} | {100 * s['lowered']:.0f} % | "
            f"{s['median_pixel_l2']:.2f} | {ssim} | {feature} | {100 * s['predicted_in_pair']:.0f} % | {100 * s['flipped']:.0f} % | {valid} | {off} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Median KLDB after against median pixel L2 per strength (class prompt, the run's alpha), one line per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for source, pair in TASKS:
        records = sorted(
            (
                r
                for r in results["runs"].values()
                if r["source"] == source and r["prompt"] == "classes" and r["alpha"] > 0
            ),
            key=lambda r: r["strength"],
        )
        if not records:
            continue
        points = [summary(r) for r in records]
        xs, ys = [p["median_pixel_l2"] for p in points], [p["median_kldb"] for p in points]
        line = ax.plot(xs, ys, marker="o", label=f"{source} -> {{{pair[0]}, {pair[1]}}}")[0]
        for r, x, y in zip(records, xs, ys):
            ax.annotate(f"s={r['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(points[0]["median_kldb_start"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("median pixel L2 to the input image")
    ax.set_ylabel("median KLDB after (nats); dashed: before")
    n, alpha = results["settings"]["n"], next(iter(results["runs"].values()))["alpha"]
    ax.set_title(
        f"Real test digits edited toward a boundary ({n} per class, alpha {alpha:g}, class prompt)", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid(results: dict[str, Any], out: Path, path: Path, per_class: int = 4) -> None:
    """Inputs and their edits at each strength (class prompt), ``per_class`` images of each source class, captioned."""
    import PIL.Image

    from kldb.digits import LABELS
    from kldb.io import save_png
    from kldb.render import captioned_grid, labelled

    def pil(array: np.ndarray) -> PIL.Image.Image:
        return PIL.Image.fromarray(array)

    folder = images_dir(out)
    rows = [("input", [], [])]
    done = [
        {
            r["strength"]
            for r in results["runs"].values()
            if r["source"] == source and r["prompt"] == "classes" and r["alpha"] > 0
        }
        for source, _ in TASKS
    ]
    strengths = sorted(set.intersection(*done))  # the strengths done for every source class
    rows += [(f"strength {s:g}", [], []) for s in strengths]
    for source, _ in TASKS:
        inputs = np.load(folder / f"input_{source}.npz")["images"]
        first = next(r for r in results["runs"].values() if r["source"] == source)
        for i in range(per_class):
            rows[0][1].append(pil(inputs[i]))
            rows[0][2].append(
                [labelled("KLDB", first["kldb_start"][i], 2), f"class {LABELS[first['predicted_class_start'][i]]}"]
            )
        for row, strength in zip(rows[1:], strengths):
            key = next(
                k for k, r in results["runs"].items()
                if r["source"] == source and r["strength"] == strength and r["prompt"] == "classes" and r["alpha"] > 0
            )  # fmt: skip
            edited = np.load(folder / f"{slug(key)}.npz")["images"]
            record = results["runs"][key]
            for i in range(per_class):
                row[1].append(pil(edited[i]))
                row[2].append(
                    [labelled("KLDB", record["kldb"][i], 2), f"class {LABELS[record['predicted_class'][i]]}",
                     labelled("L2", record["pixel_l2"][i], 1)]
                )  # fmt: skip
    save_png(path, captioned_grid(rows, cell=64))


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
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop (no sampling)")
    parser.add_argument("--plot", type=Path, help="with --table: draw the strength plot to this PNG")
    parser.add_argument("--grid", type=Path, help="with --table: draw the before/after grid to this PNG")
    args = parser.parse_args(argv)
    if args.table:
        results = json.loads(Path(args.out).read_text())
        add_independent_measures(results, Path(args.out))
        print(table(results))
        summaries = {key: {**summary(record), "seconds": record["seconds"]} for key, record in results["runs"].items()}
        atomic_write_json(Path(args.out).with_suffix(".summary.json"), summaries)
        if args.plot is not None:
            plot(results, args.plot)
        if args.grid is not None:
            grid(results, Path(args.out), args.grid)
        return
    print(table(run(args)))


if __name__ == "__main__":
    main()
