"""The ``kldb`` command: generate, sweep, report, compare and demo, a thin layer over the library.

Every command runs offline on the bundled digits world by default (``--preset digits``); ``--preset paper`` selects the
paper's setup (Stable Diffusion v1.4 and a torchvision ResNet-50; needs their weights). Options given on the command
line override the preset. ``kldb sweep`` is resumable (rerun the same command after an interruption) and shards over
processes under ``accelerate launch``::

    kldb sweep --out runs/digits                                # the paper's alpha x beta grid on the digits world
    accelerate launch --num_processes 2 -m kldb.cli sweep --out runs/digits
    kldb report runs/digits                                     # Table 1, plots, model-card section
    kldb compare runs/digits --classifier my.module:load_other  # does the ambiguity carry over?
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kldb.presets import PRESETS, Preset, get_preset
from pipeline_kldb_boundary import GRADIENT_MODES, GUIDANCE_DECODERS

logger = logging.getLogger("kldb.cli")

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

#: The extra of ``kldb-boundary`` that installs each optional module a command may need (pyproject.toml).
EXTRA_FOR_MODULE = {"accelerate": "audit", "matplotlib": "audit", "torchmetrics": "audit", "sklearn": "train"}
#: The optional modules each command needs whatever its options; checked before any work starts.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "generate": ("accelerate",),
    "sweep": ("accelerate",),
    "report": ("matplotlib", "torchmetrics"),
}


class MissingExtraError(ImportError):
    """A command needs optional modules that the base install leaves out; the message names the extra."""


def missing_extra_message(command: str, modules: Iterable[str]) -> str:
    """``kldb <command> needs ...: pip install "kldb-boundary[<extras>]"`` for the given missing modules."""
    modules = sorted(set(modules))
    extras = ",".join(sorted({EXTRA_FOR_MODULE[m] for m in modules}))
    return (
        f"`kldb {command}` needs {', '.join(modules)}, which a plain install of kldb-boundary leaves out; install "
        f'them with: pip install "kldb-boundary[{extras}]"'
    )


def require_modules(command: str, modules: Iterable[str]) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install when any of ``modules`` cannot be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(missing_extra_message(command, missing))


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a device string torch does not parse, or a CUDA device this machine does not have."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Expected argument `{option}` to be a torch device such as 'cpu' or 'cuda:0' but got {device!r}."
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Expected argument `{option}` to be a device of this machine but got {device!r}: no CUDA.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(
            f"Expected argument `{option}` to be a device of this machine but got {device!r}: it has "
            f"{torch.cuda.device_count()} CUDA device(s)."
        )


def check_local_path_spec(value: str | None, option: str) -> None:
    """Refuse a model spec written as a local path that does not exist, before a Hub lookup hides the mistake.

    A spec counts as a path when it starts with ``/``, ``./``, ``../`` or ``~``, or has more than one ``/`` (a Hub id
    has one).
    """
    if value is None or ":" in value:  # module:function and torchvision:<model>:<weights> specs
        return
    looks_local = value.startswith(("/", "./", "../", "~", ".\\")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().exists():
        raise ValueError(
            f"Expected argument `{option}` to be an existing local folder, a Hub id or package.module:function but "
            f"got {value!r}, a path that does not exist."
        )


def check_output_folder(path: str | Path, option: str) -> Path:
    """Refuse an output folder that names an existing file or lies inside one, before any work starts."""
    folder = Path(path)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == folder else f"lies inside the file {str(candidate)!r}"
                raise ValueError(
                    f"Expected argument `{option}` to be a folder (new or existing) but {str(path)!r} {where}."
                )
            break
    return folder


def _preset_help() -> str:
    return "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())


def _add_generation_options(parser: argparse.ArgumentParser, grid: bool) -> None:
    """Options shared by ``generate`` and ``sweep``; ``None`` defaults are filled from the preset."""
    digits, paper = PRESETS["digits"], PRESETS["paper"]

    def both(name: str) -> str:
        return f"(digits preset: {getattr(digits, name)!r}; paper preset: {getattr(paper, name)!r})"

    parser.add_argument(
        "--preset", default="digits", choices=sorted(PRESETS), help=f"named setup: {_preset_help()}. Default: digits."
    )
    parser.add_argument("--out", required=True, help="output folder; an existing run in it is resumed")
    parser.add_argument(
        "--pipeline",
        help="pipeline: 'digits' (bundled world), 'tiny' (random toy components, for tests), 'package.module:function' "
        f"returning a KLDBBoundaryPipeline, or a local folder / Hub model id {both('pipeline')}",
    )
    parser.add_argument(
        "--classifier",
        help="classifier to audit, if not the pipeline's own: 'torchvision:<model>:<weights>', 'package.module:function' "
        f"or a transformers model folder / Hub id {both('classifier')}",
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        action="append",
        metavar="CLASS",
        help="the class subset C, as label names or indices; "
        + ("repeat the option for several subsets " if grid else "")
        + f"{both('classes')}",
    )
    parser.add_argument("--prompt", help="the prompt; default: the class names joined with ' and ' (the paper's)")
    parser.add_argument("--negative-prompt", help=f"negative prompt {both('negative_prompt')}")
    if grid:
        parser.add_argument(
            "--alphas",
            nargs="+",
            type=float,
            metavar="ALPHA",
            help=f"KLDB guidance strengths; 0 is prompt-only {both('alphas')}",
        )
        parser.add_argument(
            "--betas", nargs="+", type=float, metavar="BETA", help=f"classifier-free guidance scales {both('betas')}"
        )
    else:
        parser.add_argument("--alpha", type=float, help=f"KLDB guidance strength; 0 is prompt-only {both('alpha')}")
        parser.add_argument("--beta", type=float, help=f"classifier-free guidance scale {both('beta')}")
    parser.add_argument(
        "--num-images", type=int, help=f"images per setting, seeds seed .. seed + n - 1 {both('num_images')}"
    )
    parser.add_argument("--seed", type=int, help=f"first seed {both('seed')}")
    parser.add_argument("--steps", type=int, help=f"k-LMS steps T {both('num_inference_steps')}")
    parser.add_argument("--interval", type=int, help=f"KLDB guidance every k steps {both('kldb_guidance_interval')}")
    parser.add_argument(
        "--gradient",
        choices=GRADIENT_MODES,
        help="'unet': gradient through the noise prediction (the authors' code); 'detached': the step's own noise "
        f"prediction without its Jacobian, cheaper {both('kldb_gradient')}",
    )
    parser.add_argument(
        "--guidance-decoder",
        choices=GUIDANCE_DECODERS,
        help="whose decoder the guidance gradient goes through: 'vae' (the paper's), 'guidance_vae' (the pipeline's "
        f"small one), 'auto' (guidance_vae when the pipeline has one) {both('kldb_guidance_decoder')}",
    )
    parser.add_argument(
        "--guidance-vae",
        help="a small decoder for the guidance gradient, given to the pipeline as its guidance_vae: an AutoencoderTiny "
        "folder or Hub id (e.g. madebyollin/taesd for Stable Diffusion v1) or package.module:function (default: the "
        "pipeline's own; the digits world ships one)",
    )
    parser.add_argument(
        "--guidance-rescale", type=float, help=f"Lin et al. (2024) CFG rescale {both('guidance_rescale')}"
    )
    parser.add_argument(
        "--timestep-spacing",
        choices=("leading", "linspace", "trailing"),
        help=f"k-LMS timestep spacing; default: the scheduler's own {both('timestep_spacing')}",
    )
    parser.add_argument(
        "--karras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"Karras et al. (2022) noise levels {both('use_karras_sigmas')}",
    )
    parser.add_argument("--height", type=int, help="image height; default: the model's")
    parser.add_argument("--width", type=int, help="image width; default: the model's")
    parser.add_argument("--batch-size", type=int, help=f"images per pipeline call {both('batch_size')}")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        help=f"weights dtype; auto: float16 on a GPU, float32 on a CPU {both('dtype')}",
    )
    parser.add_argument(
        "--device", help="device, e.g. cpu or cuda:0; default: the one accelerate assigns to this process"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``kldb`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="kldb",
        description="Generate images on an image classifier's decision boundary (KLDB-guided latent diffusion) and audit "
        "the classifier with them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("::", 1)[1] if "::" in __doc__ else None,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="images for one setting (one alpha, one beta)",
        description="Generate --num-images images for one class subset, one alpha and one beta, written as a "
        "resumable run folder (PNGs with metadata and manifest.jsonl), and print their KLDB statistics.",
    )
    _add_generation_options(generate, grid=False)

    sweep = commands.add_parser(
        "sweep",
        help="images for a grid: class subsets x alphas x betas x seeds (resumable, shardable)",
        description="Run the grid class subsets x alphas x betas, --num-images seeds each. Every image is written as it "
        "is made, with one manifest line; rerun the same command to resume after an interruption. Under "
        "`accelerate launch` the work is split between the processes and merged into one manifest.",
    )
    _add_generation_options(sweep, grid=True)

    report = commands.add_parser(
        "report",
        help="Table 1, plots, most ambiguous images and a model-card section for a run",
        description="Compute the metrics of a run folder (median and IQR of KLDB and entropy, top-|C| share, class "
        "margin, FID) and write Table 1 (Markdown, CSV, JSON), plots, a grid of the most ambiguous images and a "
        "model-card section.",
    )
    report.add_argument("run", help="a run folder written by `kldb sweep` or `kldb generate`")
    report.add_argument("--out", help="output folder (default: RUN/report)")
    report.add_argument(
        "--reference",
        help="real images for FID: 'digits' (the digits test split), a folder of images (with one subfolder per class "
        "name, or all images), or 'none'. Default: 'digits' for a run of the digits world, else none",
    )
    report.add_argument(
        "--feature",
        choices=("classifier", "inception"),
        default="classifier",
        help="FID features: the audited classifier's penultimate layer (default, offline) or InceptionV3 (needs "
        "torch-fidelity and --inception-weights)",
    )
    report.add_argument(
        "--inception-weights", help="local file with the FID InceptionV3 weights (pt_inception-2015-12-05)"
    )
    report.add_argument("--reference-limit", type=int, help="at most this many reference images per class subset")
    report.add_argument(
        "--per-setting", type=int, default=6, help="images per setting in the ambiguous-image grid (default: 6)"
    )

    compare = commands.add_parser(
        "compare",
        help="score a run's images with a second classifier: does the ambiguity carry over?",
        description="Score every image of a run with a second classifier of the same label space and report KLDB and "
        "entropy under both, their Spearman rank correlation and the agreement of the top-|C| class sets.",
    )
    compare.add_argument("run", help="a run folder")
    compare.add_argument(
        "--classifier",
        required=True,
        help="the second classifier: 'torchvision:<model>:<weights>', 'package.module:function' or a transformers model",
    )
    compare.add_argument("--out", help="output folder (default: RUN/compare)")
    compare.add_argument("--batch-size", type=int, default=64, help="images per classifier pass (default: 64)")
    compare.add_argument("--device", default="cpu", help="device of the second classifier (default: cpu)")

    demo = commands.add_parser(
        "demo",
        help="prompt-only vs KLDB-guided images from the same seeds (the main job)",
        description="Generate prompt-only (alpha = 0) and guided images for two classes of the digits world from the same "
        "seeds; write the images, a captioned grid and a report (kldb.demo).",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--num-images", type=int, default=16, help="images per setting (default: 16)")
    demo.add_argument(
        "--alpha", type=float, default=0.1, help="KLDB guidance strength of the guided row (default: 0.1)"
    )
    demo.add_argument("--beta", type=float, default=None, help="classifier-free guidance scale (default: 6)")
    demo.add_argument("--steps", type=int, default=40, help="k-LMS steps (default: 40)")
    demo.add_argument("--interval", type=int, default=5, help="guidance every k steps (default: 5)")
    demo.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i (default: 0)")
    demo.add_argument("--tiny", action="store_true", help="tiny random components instead of the digits world")

    from kldb.hub_cli import add_hub_commands

    add_hub_commands(commands)  # `kldb export` and `kldb publish`
    return parser


def _resolve_dtype(dtype: str, device: str | None) -> str:
    if dtype != "auto":
        return dtype
    import torch

    on_gpu = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    return "float16" if on_gpu else "float32"


def sweep_config_from_args(args: argparse.Namespace, grid: bool) -> Any:
    """A :class:`~kldb.sweep.SweepConfig` from parsed ``generate`` / ``sweep`` arguments and their preset."""
    from kldb.sweep import SweepConfig

    preset: Preset = get_preset(args.preset)
    check_output_folder(args.out, "--out")
    check_device(args.device)
    for option in ("pipeline", "classifier", "guidance_vae"):
        check_local_path_spec(getattr(args, option), f"--{option.replace('_', '-')}")

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    num_images = pick(args.num_images, preset.num_images)
    seed = pick(args.seed, preset.seed)
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"Expected argument `--num-images` to be a positive integer but got {num_images!r}.")
    if seed < 0:
        raise ValueError(f"Expected argument `--seed` to be a non-negative integer but got {seed!r}.")
    if grid:
        alphas, betas = pick(args.alphas, list(preset.alphas)), pick(args.betas, list(preset.betas))
    else:
        alphas, betas = [pick(args.alpha, preset.alpha)], [pick(args.beta, preset.beta)]
    pipeline = pick(args.pipeline, preset.pipeline)
    # a pipeline given without a classifier audits the pipeline's own classifier
    classifier = (
        args.classifier if args.classifier is not None else (preset.classifier if args.pipeline is None else None)
    )
    classes = args.classes if args.classes is not None else [list(preset.classes)]
    return SweepConfig(
        out_dir=args.out,
        pipeline=pipeline,
        classifier=classifier,
        class_subsets=[[int(c) if c.isdigit() else c for c in subset] for subset in classes],
        alphas=alphas,
        betas=betas,
        seeds=list(range(seed, seed + num_images)),
        prompt=args.prompt,
        negative_prompt=pick(args.negative_prompt, preset.negative_prompt),
        num_inference_steps=pick(args.steps, preset.num_inference_steps),
        kldb_guidance_interval=pick(args.interval, preset.kldb_guidance_interval),
        kldb_gradient=pick(args.gradient, preset.kldb_gradient),
        kldb_guidance_decoder=pick(args.guidance_decoder, preset.kldb_guidance_decoder),
        guidance_vae=args.guidance_vae,
        guidance_rescale=pick(args.guidance_rescale, preset.guidance_rescale),
        timestep_spacing=pick(args.timestep_spacing, preset.timestep_spacing),
        use_karras_sigmas=pick(args.karras, preset.use_karras_sigmas),
        height=args.height,
        width=args.width,
        batch_size=pick(args.batch_size, preset.batch_size),
        dtype=_resolve_dtype(pick(args.dtype, preset.dtype), args.device),
        device=args.device,
    )


def _settings_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| setting | n | median KLDB | KLDB IQR | median entropy | top-|C| = C |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['n']} | {r['median_kldb']:.4f} | {r['kldb_iqr']:.4f} | {r['median_entropy']:.4f} | "
            f"{100 * r['top_set_share']:.0f}% |"
        )
    return "\n".join(lines)


def _run_generation(args: argparse.Namespace, grid: bool) -> int:
    from kldb.metrics import setting_metrics
    from kldb.sweep import read_manifest, run_sweep

    config = sweep_config_from_args(args, grid)
    result = run_sweep(config, progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        keep = set(result.settings)
        rows = [r for r in setting_metrics(read_manifest(result.out_dir)) if r["setting"] in keep]
        print(_settings_table(rows))
        print(
            f"\n{result.total} images in {result.out_dir} ({result.already_done} were already there); manifest: "
            f"{result.manifest}"
        )
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from kldb.metrics import run_info
    from kldb.report import table1_markdown, write_report

    if args.out is not None:
        check_output_folder(args.out, "--out")
    if args.per_setting < 1:
        raise ValueError(f"Expected argument `--per-setting` to be a positive integer but got {args.per_setting!r}.")
    if args.reference_limit is not None and args.reference_limit < 2:
        raise ValueError(
            f"Expected argument `--reference-limit` to be an integer >= 2 but got {args.reference_limit!r}."
        )
    reference = args.reference
    if reference is None:
        reference = "digits" if run_info(args.run)["fixed"].get("pipeline") == "digits" else None
    elif reference.lower() == "none":
        reference = None
    if reference == "digits":
        require_modules("report --reference digits", ["sklearn"])  # the digits test split comes from scikit-learn
    result = write_report(
        args.run,
        out_dir=args.out,
        per_setting=args.per_setting,
        reference=reference,
        feature=args.feature,
        inception_weights=args.inception_weights,
        reference_limit=args.reference_limit,
    )
    print(table1_markdown(result["table"]))
    print(f"Wrote {', '.join(sorted(result['files']))} to {Path(result['files']['report.md']).parent}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from kldb.compare import compare_run, summary_markdown

    if args.batch_size < 1:
        raise ValueError(f"Expected argument `--batch-size` to be a positive integer but got {args.batch_size!r}.")
    if args.out is not None:
        check_output_folder(args.out, "--out")
    check_device(args.device)
    check_local_path_spec(args.classifier, "--classifier")
    result = compare_run(args.run, args.classifier, out_dir=args.out, batch_size=args.batch_size, device=args.device)
    print(summary_markdown(result))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from kldb.demo import render_markdown, run_demo

    check_output_folder(args.out, "--out")
    report = run_demo(
        args.out, args.num_images, args.alpha, args.beta, args.steps, args.interval, args.seed, args.tiny
    )
    print(render_markdown(report))
    print(f"Wrote {Path(args.out) / 'grid.png'}, the images and report.json / report.md.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kldb`` console script; returns the exit status."""
    from kldb.sweep import SweepDiskFullError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    prog = f"kldb {args.command}"
    try:
        require_modules(args.command, COMMAND_MODULES.get(args.command, ()))
        if args.command in ("generate", "sweep"):
            return _run_generation(args, grid=args.command == "sweep")
        if args.command == "report":
            return _run_report(args)
        if args.command == "compare":
            return _run_compare(args)
        if args.command == "demo":
            return _run_demo(args)
        return args.handler(args)  # export, publish
    except SweepDiskFullError as error:
        print(f"{prog}: error: {error.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    except ModuleNotFoundError as error:
        # an optional dependency needed only by some options (e.g. scikit-learn for the digits reference images)
        module = (error.name or "").split(".")[0]
        message = missing_extra_message(args.command, [module]) if module in EXTRA_FOR_MODULE else str(error)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a model that cannot be read or downloaded, a folder that cannot be written
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; what was written is complete. Rerun the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED


def console_main() -> None:
    """``sys.exit(main())``, for ``python -m kldb.cli``."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
