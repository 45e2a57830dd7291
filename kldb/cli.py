"""The ``kldb`` command: generate, sweep, report, compare and demo, a thin layer over the library.

Every command runs offline on the bundled digits world by default (``--preset digits``); ``--preset paper`` selects the
paper's setup (Stable Diffusion v1.4 and a torchvision ResNet-50; needs their weights). Options given on the command
line override the preset. ``kldb sweep`` is resumable (rerun the same command after an interruption) and shards over
processes under ``accelerate launch``::

    kldb sweep --out runs/digits                                # the paper's alpha x beta grid on the digits world
    accelerate launch --num_processes 2 -m kldb.cli sweep --out runs/digits
    kldb report runs/digits                                     # Table 1, plots, model-card section
    kldb compare runs/digits --classifier my.module:load_other  # does the ambiguity carry over?
    kldb validity runs/digits                                   # are the images still images of C?
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kldb.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    KLDBInputError,
    KLDBPathError,
    MissingExtraError,
    run_command,
)
from kldb.loading import DTYPES, resolve_dtype
from kldb.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from kldb.presets import PRESETS, get_preset
from pipeline_kldb_boundary import GRADIENT_MODES, GUIDANCE_DECODERS, STEP_CONTROLS

logger = logging.getLogger("kldb.cli")

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "GENERATION_OPTIONS", "build_parser", "main"]

#: The extra of ``kldb-boundary`` that installs each optional module a command may need (pyproject.toml).
EXTRA_FOR_MODULE = {
    "accelerate": "audit", "matplotlib": "audit", "torchmetrics": "audit", "sklearn": "train", "gradio": "app",
}  # fmt: skip
#: The optional modules each command needs whatever its options; checked before any work starts.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "generate": ("accelerate",),
    "sweep": ("accelerate",),
    "report": ("matplotlib", "torchmetrics"),
    "map": ("accelerate", "matplotlib"),
    "app": ("gradio",),
}


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
        raise KLDBInputError(
            f"Expected argument `{option}` to be a torch device such as 'cpu' or 'cuda:0' but got {device!r}."
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise KLDBInputError(
            f"Expected argument `{option}` to be a device of this machine but got {device!r}: no CUDA."
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise KLDBInputError(
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
        raise KLDBPathError(
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
                raise KLDBInputError(
                    f"Expected argument `{option}` to be a folder (new or existing) but {str(path)!r} {where}."
                )
            break
    return folder


def _preset_help() -> str:
    return "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())


# ----------------------------------------------------------------------------------------------------------------------
# `kldb generate` and `kldb sweep`: one table maps each option to the preset field that gives its default and the
# SweepConfig field it sets
# ----------------------------------------------------------------------------------------------------------------------


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class GenerationOption:
    """An option of ``kldb generate`` / ``kldb sweep``.

    Args:
        flag: the command-line flag; its ``argparse`` destination is the flag without dashes (``--num-images``:
            ``num_images``).
        help: what it means; options with a ``preset`` field get both presets' values appended.
        preset: the :class:`~kldb.presets.Preset` field that gives its default, or ``None`` (no preset default).
        config: the :class:`~kldb.sweep.SweepConfig` field it sets, or ``None`` (the seeds are made from
            ``--num-images`` and ``--seed`` together).
        grid: ``True`` for ``sweep`` only, ``False`` for ``generate`` only, ``None`` for both.
        from_preset: turns the preset's value into the form the parsed option has.
        to_config: turns the option's value into the config field's.
        argparse: further ``add_argument`` keywords (``type``, ``choices``, ``nargs``, ...).
    """

    flag: str
    help: str
    preset: str | None = None
    config: str | None = None
    grid: bool | None = None
    from_preset: Callable[[Any], Any] = _same
    to_config: Callable[[Any], Any] = _same
    argparse: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _alpha_value(text: str) -> float | str:
    """An alpha on the command line: a number, or ``auto`` (a pilot chooses it per class subset and beta)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto' but got {text!r}") from None


def _class_subsets(subsets: list[list[str]]) -> list[list[str | int]]:
    return [[int(c) if c.isdigit() else c for c in subset] for subset in subsets]


GENERATION_OPTIONS: tuple[GenerationOption, ...] = (
    GenerationOption(
        "--pipeline",
        "pipeline: 'digits' (bundled world), 'package.module:function' returning a KLDBBoundaryPipeline, or a local "
        "folder / Hub model id",
        preset="pipeline",
        config="pipeline",
    ),
    GenerationOption(
        "--classifier",
        "classifier to audit, if not the pipeline's own: 'torchvision:<model>:<weights>', 'package.module:function' "
        "or a transformers model folder / Hub id",
        preset="classifier",
        config="classifier",
    ),
    GenerationOption(
        "--classes",
        "the class subset C, as label names or indices; repeat the option for several subsets (sweep)",
        preset="classes",
        config="class_subsets",
        from_preset=lambda classes: [list(classes)],
        to_config=_class_subsets,
        argparse={"nargs": "+", "action": "append", "metavar": "CLASS"},
    ),
    GenerationOption(
        "--prompt", "the prompt; default: the class names joined with ' and ' (the paper's)", config="prompt"
    ),
    GenerationOption("--negative-prompt", "negative prompt", preset="negative_prompt", config="negative_prompt"),
    GenerationOption(
        "--alphas",
        "KLDB guidance strengths; 0 is prompt-only; 'auto': a short pilot chooses alpha per class subset and beta "
        "(its seeds and cost go into the run folder's auto/ and the report)",
        preset="alphas",
        config="alphas",
        grid=True,
        from_preset=list,
        argparse={"nargs": "+", "type": _alpha_value, "metavar": "ALPHA"},
    ),
    GenerationOption(
        "--betas",
        "classifier-free guidance scales",
        preset="betas",
        config="betas",
        grid=True,
        from_preset=list,
        argparse={"nargs": "+", "type": float, "metavar": "BETA"},
    ),
    GenerationOption(
        "--alpha",
        "KLDB guidance strength; 0 is prompt-only; 'auto': a short pilot chooses it",
        preset="alpha",
        config="alphas",
        grid=False,
        to_config=lambda alpha: [alpha],
        argparse={"type": _alpha_value},
    ),
    GenerationOption(
        "--beta",
        "classifier-free guidance scale",
        preset="beta",
        config="betas",
        grid=False,
        to_config=lambda beta: [beta],
        argparse={"type": float},
    ),
    GenerationOption(
        "--num-images", "images per setting, seeds seed .. seed + n - 1", preset="num_images", argparse={"type": int}
    ),
    GenerationOption("--seed", "first seed", preset="seed", argparse={"type": int}),
    GenerationOption(
        "--init-images",
        "a folder of real images to start from instead of noise (image-to-image): every image file in it (any depth, "
        "sorted) is a source, run at every setting, strength and seed; the manifest records each source's file and "
        "SHA-256, and the report shows before/after pairs",
        config="init_images",
        argparse={"metavar": "DIR"},
    ),
    GenerationOption(
        "--strengths",
        "with --init-images: img2img strengths in (0, 1], the share of the k-LMS steps run from the noised image "
        "(default: 0.5)",
        config="strengths",
        argparse={"nargs": "+", "type": float, "metavar": "S"},
    ),
    GenerationOption(
        "--steps", "k-LMS steps T", preset="num_inference_steps", config="num_inference_steps", argparse={"type": int}
    ),
    GenerationOption(
        "--interval",
        "KLDB guidance every k steps",
        preset="kldb_guidance_interval",
        config="kldb_guidance_interval",
        argparse={"type": int},
    ),
    GenerationOption(
        "--gradient",
        "'unet': gradient through the noise prediction (the authors' code); 'detached': the step's own noise "
        "prediction without its Jacobian, cheaper",
        preset="kldb_gradient",
        config="kldb_gradient",
        argparse={"choices": GRADIENT_MODES},
    ),
    GenerationOption(
        "--guidance-decoder",
        "whose decoder the guidance gradient goes through: 'vae' (the paper's), 'guidance_vae' (the pipeline's small "
        "one), 'auto' (guidance_vae when the pipeline has one)",
        preset="kldb_guidance_decoder",
        config="kldb_guidance_decoder",
        argparse={"choices": GUIDANCE_DECODERS},
    ),
    GenerationOption(
        "--auto-grid",
        "alpha 'auto': the alphas its pilot tries (default: 0.01 0.03 0.1 0.3)",
        config="auto_grid",
        argparse={"nargs": "+", "type": float, "metavar": "ALPHA"},
    ),
    GenerationOption(
        "--auto-seeds",
        "alpha 'auto': its pilot's seeds, moved off the run's seeds where they meet (default: four seeds above 10**6)",
        config="auto_seeds",
        argparse={"nargs": "+", "type": int, "metavar": "SEED"},
    ),
    GenerationOption(
        "--step-control",
        "how each guided step is sized: 'fixed' (the paper's step alpha), 'backtracking' (halve alpha until the KLDB "
        "of the predicted clean image drops), 'trust_region' (halve until the class probabilities move at most "
        "--trust-radius), 'kldb_scaled' (alpha * min(1, KLDB / --step-temperature))",
        preset="kldb_step_control",
        config="kldb_step_control",
        argparse={"choices": STEP_CONTROLS},
    ),
    GenerationOption(
        "--max-halvings",
        "backtracking / trust_region: halvings before a step is refused (default: 3)",
        config="kldb_max_halvings",
        argparse={"type": int},
    ),
    GenerationOption(
        "--trust-radius",
        "trust_region: the largest change of the class probabilities (total variation) a step may make (default: 0.1)",
        config="kldb_trust_radius",
        argparse={"type": float},
    ),
    GenerationOption(
        "--step-temperature",
        "kldb_scaled: the KLDB below which steps shrink (default: 0.5)",
        config="kldb_step_temperature",
        argparse={"type": float},
    ),
    GenerationOption(
        "--guidance-vae",
        "a small decoder for the guidance gradient, given to the pipeline as its guidance_vae: an AutoencoderTiny "
        "folder or Hub id (e.g. madebyollin/taesd for Stable Diffusion v1) or package.module:function (default: the "
        "pipeline's own; the digits world ships one)",
        config="guidance_vae",
    ),
    GenerationOption(
        "--guidance-rescale",
        "Lin et al. (2024) CFG rescale",
        preset="guidance_rescale",
        config="guidance_rescale",
        argparse={"type": float},
    ),
    GenerationOption(
        "--timestep-spacing",
        "k-LMS timestep spacing; default: the scheduler's own",
        preset="timestep_spacing",
        config="timestep_spacing",
        argparse={"choices": ("leading", "linspace", "trailing")},
    ),
    GenerationOption(
        "--karras",
        "Karras et al. (2022) noise levels",
        preset="use_karras_sigmas",
        config="use_karras_sigmas",
        argparse={"action": argparse.BooleanOptionalAction, "default": None},
    ),
    GenerationOption("--height", "image height; default: the model's", config="height", argparse={"type": int}),
    GenerationOption("--width", "image width; default: the model's", config="width", argparse={"type": int}),
    GenerationOption(
        "--batch-size", "images per pipeline call", preset="batch_size", config="batch_size", argparse={"type": int}
    ),
    GenerationOption(
        "--dtype",
        "weights dtype; auto: float16 on a GPU, float32 on a CPU",
        preset="dtype",
        config="dtype",
        argparse={"choices": ("auto", *DTYPES)},
    ),
    GenerationOption(
        "--device",
        "device, e.g. cpu or cuda:0; default: the one accelerate assigns to this process",
        config="device",
    ),
)


def generation_options(grid: bool) -> list[GenerationOption]:
    """The options of ``kldb sweep`` (``grid``) or ``kldb generate``."""
    return [option for option in GENERATION_OPTIONS if option.grid in (None, grid)]


def map_options() -> list[GenerationOption]:
    """The generation options of ``kldb map``: those of ``kldb sweep`` with ``--beta`` for ``--betas``, ``--seeds`` for
    ``--num-images``, and the map's own defaults (:mod:`kldb.boundary_map`) for ``--classes`` and ``--alphas``."""
    import dataclasses

    own = {
        "--classes": "the K classes to map, as label names or indices; every pair of them is audited (default: all ten "
        "digits on the digits world; required otherwise, or --group)",
        "--alphas": "alpha 0 (prompt-only) and the guided alphas (default: 0 and 0.2 under a step control such as the "
        "digits preset's backtracking, else 0, 0.02 and 0.05)",
        "--num-images": "seeds per setting, --seed .. --seed + N - 1 (default: 32)",
    }
    options = []
    for option in GENERATION_OPTIONS:
        if option.flag in own:
            flag = "--seeds" if option.flag == "--num-images" else option.flag
            options.append(dataclasses.replace(option, flag=flag, help=own[option.flag], preset=None))
        elif option.grid is None or option.flag == "--beta":
            options.append(option)
    return options


def _add_generation_options(
    parser: argparse.ArgumentParser, grid: bool, options: Sequence[GenerationOption] | None = None
) -> None:
    """The options of ``generate`` and ``sweep`` (or ``options``) from :data:`GENERATION_OPTIONS`; ``None`` defaults
    come from the preset."""
    digits, paper = PRESETS["digits"], PRESETS["paper"]
    parser.add_argument(
        "--preset", default="digits", choices=sorted(PRESETS), help=f"named setup: {_preset_help()}. Default: digits."
    )
    parser.add_argument("--out", required=True, help="output folder; an existing run in it is resumed")
    for option in generation_options(grid) if options is None else options:
        text = option.help
        if option.preset is not None:
            text += (
                f" (digits preset: {getattr(digits, option.preset)!r}; paper preset: "
                f"{getattr(paper, option.preset)!r})"
            )
        parser.add_argument(option.flag, help=text, **option.argparse)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def sweep_config_from_args(
    args: argparse.Namespace, grid: bool, options: Sequence[GenerationOption] | None = None
) -> Any:
    """A :class:`~kldb.sweep.SweepConfig` from parsed ``generate`` / ``sweep`` arguments (or ``options``, which must
    include ``--num-images`` and ``--seed``) and their preset."""
    from kldb.sweep import SweepConfig

    options = generation_options(grid) if options is None else options
    preset = get_preset(args.preset)
    check_output_folder(args.out, "--out")
    check_device(args.device)
    for option in ("pipeline", "classifier", "guidance_vae"):
        check_local_path_spec(getattr(args, option), f"--{option.replace('_', '-')}")
    values: dict[str, Any] = {}
    for option in options:
        value = getattr(args, option.dest)
        if value is None and option.preset is not None:
            value = option.from_preset(getattr(preset, option.preset))
        values[option.dest] = value
    if args.pipeline is not None and args.classifier is None:
        values["classifier"] = None  # a pipeline given without a classifier audits the pipeline's own classifier
    num_images, seed = values["num_images"], values["seed"]
    if not isinstance(num_images, int) or num_images < 1:
        raise KLDBInputError(f"Expected argument `--num-images` to be a positive integer but got {num_images!r}.")
    if seed < 0:
        raise KLDBInputError(f"Expected argument `--seed` to be a non-negative integer but got {seed!r}.")
    # an option without a preset default that is not given leaves its field to SweepConfig's default
    fields = {
        option.config: option.to_config(values[option.dest])
        for option in options
        if option.config is not None and (values[option.dest] is not None or option.preset is not None)
    }
    fields["dtype"] = resolve_dtype(fields["dtype"], args.device)
    return SweepConfig(out_dir=args.out, seeds=list(range(seed, seed + num_images)), **fields)


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

    boundary = commands.add_parser(
        "map",
        help="the boundary map: every pair (or triple) of K classes in one resumable, shardable sweep",
        description="Audit every pair of K classes (and with --triples every triple): alpha 0 and a few guided alphas "
        "at one beta, --seeds images each, as one sweep (resumable; shardable under `accelerate launch`). Then draw "
        "into OUT/map: K x K heatmaps of the median KLDB reached, the boundary-hit rate, the drop against prompt-only "
        "and (with --validity) the validity share; a ranked table, most fragile boundaries first (map.md, map.csv, "
        "map.json); a thumbnail grid per class subset (kldb.boundary_map).",
    )
    _add_generation_options(boundary, grid=True, options=map_options())
    boundary.add_argument(
        "--group",
        help="a file with the K classes, one per line (label name or index; '#' comments; a leading WordNet id such as "
        "n02085620 is dropped, so lines of ImageNet's LOC_synset_mapping.txt work); instead of --classes",
    )
    boundary.add_argument("--triples", action="store_true", help="also every triple of the classes (ranked apart)")
    boundary.add_argument(
        "--at-alpha",
        type=float,
        help="report this guided alpha for every class subset (default: per subset, the one with the lowest median KLDB)",
    )
    boundary.add_argument(
        "--validity",
        help="a validity result to draw the validity heatmap from: the validity.json of `kldb validity OUT`, or a JSON "
        "object {setting name: share}",
    )
    boundary.add_argument(
        "--per-subset", type=int, default=8, help="images per row of each class subset's grid (default: 8)"
    )
    boundary.add_argument(
        "--report-only",
        action="store_true",
        help="make no image: redraw the map of OUT, which must hold every image of the map",
    )

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
        "--per-setting",
        type=int,
        default=6,
        help="images per setting in the ambiguous-image grid, and sources per setting in the before/after grid of an "
        "--init-images run (default: 6)",
    )
    report.add_argument(
        "--bootstrap-resamples",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        help=f"resamples of each bootstrap 95%% interval (default: {BOOTSTRAP_RESAMPLES})",
    )
    report.add_argument(
        "--bootstrap-seed",
        type=int,
        default=BOOTSTRAP_SEED,
        help=f"seed of the bootstrap resampling, recorded in the report (default: {BOOTSTRAP_SEED})",
    )
    report.add_argument(
        "--quality",
        action="store_true",
        help="also FID, KID and precision / recall against the reference images in three feature spaces: the audited "
        "classifier's, an independent network's (the digits world's feature net; InceptionV3 with "
        "--inception-weights) and pixels (kldb.quality)",
    )
    report.add_argument(
        "--validity",
        nargs="?",
        const="default",
        metavar="ORACLE",
        help="also judge every image with an independent oracle (kldb validity): a classifier spec or 'clip:<path>'; "
        "alone, the digits world's validity classifier. Without it, a validity.json that `kldb validity` wrote into the "
        "report folder is used",
    )
    report.add_argument(
        "--validity-threshold", type=float, help="oracle maximum probability below which an image is off-manifold"
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

    from kldb.validity import DEFAULT_CLIP_TEMPLATE, DEFAULT_THRESHOLD

    validity = commands.add_parser(
        "validity",
        help="are a run's images still images of C? an independent oracle labels every image",
        description="Label every image of a run with an independent classifier (the oracle) and report per setting the "
        "share whose oracle top-1 class is in C (valid), the share judged off-manifold (top-1 outside C, or oracle "
        "maximum probability below --threshold), and a grid of the most ambiguous valid images (kldb.validity).",
    )
    validity.add_argument("run", help="a run folder")
    validity.add_argument(
        "--oracle",
        help="the oracle: a classifier spec ('torchvision:<model>:<weights>', 'package.module:function', a classifier "
        "folder or Hub id) with the run's label space, or 'clip:<folder or Hub id>' (zero-shot CLIP over the run's "
        "label names). Default: the digits world's validity classifier for a digits run",
    )
    validity.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"oracle maximum probability below which an image is off-manifold, in [0, 1] (default: {DEFAULT_THRESHOLD})",
    )
    validity.add_argument(
        "--clip-template",
        default=DEFAULT_CLIP_TEMPLATE,
        help=f"CLIP text per class, with the field {{name}} (default: {DEFAULT_CLIP_TEMPLATE!r})",
    )
    validity.add_argument("--out", help="output folder (default: RUN/report)")
    validity.add_argument(
        "--per-setting", type=int, default=6, help="valid images per setting in the grid (default: 6)"
    )
    validity.add_argument("--batch-size", type=int, default=64, help="images per oracle pass (default: 64)")
    validity.add_argument("--device", default="cpu", help="device of the oracle (default: cpu)")

    edit = commands.add_parser(
        "edit",
        help="from a photo to its nearest boundary image: a strength x alpha grid of guided edits (kldb.counterfactual)",
        description="Edit one image toward the decision boundary of --classes: the pipeline starts from the image "
        "noised to each --strengths and runs KLDB guidance at each --alphas, same seed everywhere. Writes every "
        "candidate, the nearest boundary image (least distance to the input among those with KLDB below --threshold; "
        "none if no candidate gets there) and counterfactual.json into --out, each file atomically.",
    )
    edit.add_argument("image", help="the image file (RGB; height and width divisible by the VAE factor, or --size)")
    edit.add_argument("--out", required=True, help="output folder")
    edit.add_argument(
        "--preset", default="digits", choices=sorted(PRESETS), help=f"named setup: {_preset_help()}. Default: digits."
    )
    edit.add_argument("--pipeline", help="pipeline spec, as for `kldb generate` (default: the preset's)")
    edit.add_argument("--classes", nargs="+", metavar="CLASS", help="the class subset C (default: the preset's)")
    edit.add_argument("--prompt", help="the prompt (default: the class names joined with ' and '; '' for none)")
    edit.add_argument(
        "--strengths", nargs="+", type=float, metavar="S", help="img2img strengths in (0, 1] (default: 0.3 0.5 0.7)"
    )
    edit.add_argument(
        "--alphas",
        nargs="+",
        type=float,
        metavar="ALPHA",
        help="KLDB guidance strengths (default: the preset's alpha)",
    )
    edit.add_argument(
        "--threshold", type=float, help="KLDB (nats) below which an image is on the boundary (default: 0.1)"
    )
    edit.add_argument(
        "--distance",
        choices=("pixel_l2", "ssim", "feature"),
        default="pixel_l2",
        help="distance to the input: pixel L2, 1 - SSIM, or L2 in the --feature-net space (default: pixel_l2)",
    )
    edit.add_argument(
        "--feature-net",
        help="with --distance feature: a feature network folder (default: the digits world's independent one)",
    )
    edit.add_argument(
        "--size", nargs=2, type=int, metavar=("H", "W"), help="resize the image to H x W first (bilinear)"
    )
    edit.add_argument("--seed", type=int, default=0, help="generator seed of every call (default: 0)")
    edit.add_argument("--steps", type=int, help="k-LMS steps T before strength (default: the preset's)")
    edit.add_argument("--beta", type=float, help="classifier-free guidance scale (default: the preset's)")
    edit.add_argument("--interval", type=int, help="KLDB guidance every k steps run (default: the preset's)")
    edit.add_argument("--dtype", choices=("auto", *DTYPES), help="weights dtype (default: the preset's)")
    edit.add_argument("--device", default="cpu", help="device (default: cpu)")

    app = commands.add_parser(
        "app",
        help="serve the web app (Gradio, the app extra): explore boundaries, audit with a small sweep (kldb.app)",
        description="Serve a Gradio app over the library on the digits world by default (or --pipeline / --classifier "
        "as for kldb generate), on 127.0.0.1 unless --host says otherwise.",
    )
    from kldb.app import add_app_arguments

    add_app_arguments(app)

    demo = commands.add_parser(
        "demo",
        help="prompt-only vs KLDB-guided images from the same seeds (the main job)",
        description="Generate prompt-only (alpha = 0) and guided images for two classes of the digits world from the same "
        "seeds; write the images, a captioned grid and a report (kldb.demo).",
    )
    from kldb.demo import add_demo_arguments

    add_demo_arguments(demo)

    from kldb.hub_cli import add_hub_commands

    add_hub_commands(commands)  # `kldb export` and `kldb publish`

    publish_run = commands.add_parser(
        "publish-run",
        help="upload a run folder as a Hugging Face dataset (images, metadata.jsonl, card); --dry-run lists the files",
        description="Write metadata.jsonl (the run loads with datasets.load_dataset('imagefolder', data_dir=RUN)) and "
        "a dataset card (README.md) into a finished run folder, then upload the folder as a dataset repo, after a "
        "security scan. The token is HF_TOKEN or the stored login (`hf auth login`), never an option.",
    )
    publish_run.add_argument("run", help="a finished run folder written by `kldb sweep` (run `kldb report` first)")
    publish_run.add_argument("repo_id", help="namespace/name of the dataset repo (created if missing)")
    publish_run.add_argument(
        "--dry-run",
        action="store_true",
        help="write metadata.jsonl and README.md into RUN and list what would be uploaded; send nothing",
    )
    publish_run.add_argument("--private", action="store_true", help="create the repo private")
    publish_run.add_argument(
        "--license",
        default=None,
        help="Hub licence identifier for the card (default: creativeml-openrail-m for Stable Diffusion v1, else "
        "apache-2.0)",
    )
    publish_run.add_argument("--commit-message", default=None, help="commit message of the upload")
    return parser


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
    from kldb.report import setting_metrics
    from kldb.runfolder import read_manifest
    from kldb.sweep import run_sweep

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


def _run_map(args: argparse.Namespace) -> int:
    import dataclasses

    from kldb.boundary_map import MAP_SEEDS, map_config, map_table_markdown, read_group, read_validity, run_map

    if args.classes is not None and args.group is not None:
        raise KLDBInputError(
            f"Expected argument `--classes` or `--group` but got both: {args.classes!r} and {args.group!r}."
        )
    if args.seeds is not None and args.seeds < 1:
        raise KLDBInputError(f"Expected argument `--seeds` to be a positive integer but got {args.seeds!r}.")
    if args.per_subset < 1:
        raise KLDBInputError(f"Expected argument `--per-subset` to be a positive integer but got {args.per_subset!r}.")
    if args.group is not None:
        classes = read_group(args.group)
    else:
        classes = [c for subset in _class_subsets(args.classes) for c in subset] if args.classes else None
    validity = read_validity(args.validity) if args.validity is not None else None
    args.num_images = MAP_SEEDS if args.seeds is None else args.seeds
    options = [o for o in map_options() if o.flag not in ("--classes", "--seeds")]
    options += [o for o in GENERATION_OPTIONS if o.flag == "--num-images"]
    base = sweep_config_from_args(args, grid=True, options=options)
    mapped = ("out_dir", "class_subsets", "alphas", "betas", "seeds", "kldb_step_control")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name not in mapped}
    config = map_config(
        args.out,
        classes,
        triples=args.triples,
        seeds=base.seeds,
        alphas=args.alphas,
        beta=base.betas[0],
        step_control=base.kldb_step_control,
        **fields,
    )
    guided = [a for a in config.alphas if a > 0]
    if args.at_alpha is not None and args.at_alpha not in guided:
        raise KLDBInputError(
            f"Expected argument `--at-alpha` to be one of the map's guided alphas {guided} but got {args.at_alpha!r}."
        )
    result = run_map(
        config,
        validity=validity,
        alpha=args.at_alpha,
        per_subset=args.per_subset,
        progress=not args.no_progress,
        report_only=args.report_only,
    )
    if result.files:  # the main process
        print(map_table_markdown(result.rows))
        made = "" if result.sweep is None else f"{result.sweep.generated} images made, "
        print(f"{made}map in {result.map_dir}: {', '.join(sorted(result.files))}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from kldb.report import table1_markdown, write_report
    from kldb.runfolder import run_info

    if args.out is not None:
        check_output_folder(args.out, "--out")
    if args.per_setting < 1:
        raise KLDBInputError(
            f"Expected argument `--per-setting` to be a positive integer but got {args.per_setting!r}."
        )
    if args.reference_limit is not None and args.reference_limit < 2:
        raise KLDBInputError(
            f"Expected argument `--reference-limit` to be an integer >= 2 but got {args.reference_limit!r}."
        )
    if args.bootstrap_resamples < 1:
        raise KLDBInputError(
            f"Expected argument `--bootstrap-resamples` to be a positive integer but got {args.bootstrap_resamples!r}."
        )
    if args.bootstrap_seed < 0:
        raise KLDBInputError(
            f"Expected argument `--bootstrap-seed` to be an integer >= 0 but got {args.bootstrap_seed!r}."
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
        bootstrap_resamples=args.bootstrap_resamples,
        bootstrap_seed=args.bootstrap_seed,
        quality=args.quality,
        validity=True if args.validity == "default" else args.validity,
        validity_threshold=args.validity_threshold,
    )
    print(table1_markdown(result["table"], result["bootstrap"]))
    print(f"Wrote {', '.join(sorted(result['files']))} to {Path(result['files']['report.md']).parent}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from kldb.compare import compare_run, summary_markdown

    if args.batch_size < 1:
        raise KLDBInputError(f"Expected argument `--batch-size` to be a positive integer but got {args.batch_size!r}.")
    if args.out is not None:
        check_output_folder(args.out, "--out")
    check_device(args.device)
    check_local_path_spec(args.classifier, "--classifier")
    result = compare_run(args.run, args.classifier, out_dir=args.out, batch_size=args.batch_size, device=args.device)
    print(summary_markdown(result))
    return 0


def _run_validity(args: argparse.Namespace) -> int:
    from kldb.validity import run_validity, validity_markdown

    if args.out is not None:
        check_output_folder(args.out, "--out")
    check_device(args.device)
    if args.oracle is not None and args.oracle.startswith("clip:"):
        check_local_path_spec(args.oracle[len("clip:") :], "--oracle")
    else:
        check_local_path_spec(args.oracle, "--oracle")
    result = run_validity(
        args.run,
        oracle=args.oracle,
        threshold=args.threshold,
        out_dir=args.out,
        clip_template=args.clip_template,
        per_setting=args.per_setting,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(validity_markdown(result))
    print(f"Wrote {', '.join(sorted(result['files']))} to {Path(result['files']['validity.json']).parent}")
    return 0


def _run_edit(args: argparse.Namespace) -> int:
    from kldb.counterfactual import DEFAULT_STRENGTHS, DEFAULT_THRESHOLD, counterfactual, write_counterfactual
    from kldb.io import load_image
    from kldb.loading import load_pipeline

    preset = get_preset(args.preset)
    check_output_folder(args.out, "--out")
    check_device(args.device)
    check_local_path_spec(args.pipeline, "--pipeline")
    if not Path(args.image).is_file():
        raise KLDBPathError(f"Expected argument `image` to be an image file but got {args.image!r}.")
    if args.size is not None and min(args.size) < 1:
        raise KLDBInputError(f"Expected argument `--size` to be two positive integers but got {args.size!r}.")
    pipe = load_pipeline(
        args.pipeline or preset.pipeline,
        device=args.device,
        dtype=resolve_dtype(args.dtype or preset.dtype, args.device),
    )
    overrides = {"timestep_spacing": preset.timestep_spacing} if preset.timestep_spacing else {}
    if preset.use_karras_sigmas:
        overrides["use_karras_sigmas"] = True
    if overrides:
        pipe.set_lms_scheduler(**overrides)
    pipe.set_progress_bar_config(disable=True)
    image = load_image(args.image, size=tuple(args.size) if args.size is not None else None)  # (3, H, W) in [0, 1]
    feature_net = None
    if args.distance == "feature" or args.feature_net is not None:
        from kldb.digits.feature_net import load_feature_net

        feature_net = load_feature_net(args.feature_net, device=args.device)
    result = counterfactual(
        pipe,
        image,
        _class_subsets([args.classes or list(preset.classes)])[0],
        strengths=args.strengths or DEFAULT_STRENGTHS,
        alphas=args.alphas or [preset.alpha],
        threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
        distance=args.distance,
        seed=args.seed,
        feature_net=feature_net,
        prompt=args.prompt,
        num_inference_steps=args.steps or preset.num_inference_steps,
        guidance_scale=preset.beta if args.beta is None else args.beta,
        kldb_guidance_interval=args.interval or preset.kldb_guidance_interval,
        guidance_rescale=preset.guidance_rescale,
        negative_prompt=preset.negative_prompt,
    )
    write_counterfactual(result, args.out)
    print("| strength | alpha | KLDB start | KLDB | pixel L2 | SSIM | class before -> after |")
    print("|---|---|---|---|---|---|---|")
    for k, c in enumerate(result.candidates):
        ssim = f"{c.ssim:.3f}" if c.ssim is not None else "-"
        mark = " (nearest)" if k == result.nearest else ""
        print(
            f"| {c.strength:g} | {c.alpha:g} | {c.kldb_start:.3f} | {c.kldb:.3f}{mark} | {c.pixel_l2:.3f} | {ssim} | "
            f"{c.predicted_class_start} -> {c.predicted_class} |"
        )
    if result.found:
        print(f"\nNearest boundary image: {Path(args.out) / 'nearest.png'}")
    else:
        print(f"\nNo candidate reached KLDB < {result.threshold:g}; try larger strengths or alphas.")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from kldb.demo import run_demo_command

    check_output_folder(args.out, "--out")
    return run_demo_command(args)


def _run_publish_run(args: argparse.Namespace) -> int:
    from kldb.dataset import CARD_NAME, publish_run

    kwargs: dict[str, Any] = {"dry_run": args.dry_run, "private": args.private, "license": args.license}
    if args.commit_message:
        kwargs["commit_message"] = args.commit_message
    result = publish_run(args.run, args.repo_id, **kwargs)
    print(result.listing())
    print(f"Dataset card: {Path(args.run) / CARD_NAME}")
    if not args.dry_run:
        print(f"Done: {result.url or args.repo_id}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; an optional module found missing late becomes a :class:`MissingExtraError`."""
    try:
        require_modules(args.command, COMMAND_MODULES.get(args.command, ()))
        if args.command in ("generate", "sweep"):
            return _run_generation(args, grid=args.command == "sweep")
        if args.command == "report":
            return _run_report(args)
        if args.command == "map":
            return _run_map(args)
        if args.command == "compare":
            return _run_compare(args)
        if args.command == "validity":
            return _run_validity(args)
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "app":
            from kldb.app import run_app_command

            return run_app_command(args)
        if args.command == "edit":
            return _run_edit(args)
        if args.command == "publish-run":
            return _run_publish_run(args)
        return args.handler(args)  # export, publish
    except ModuleNotFoundError as error:
        # an optional dependency needed only by some options (e.g. scikit-learn for the digits reference images)
        module = (error.name or "").split(".")[0]
        if module in EXTRA_FOR_MODULE:
            raise MissingExtraError(missing_extra_message(args.command, [module])) from error
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kldb`` console script; returns the exit status (see :mod:`kldb.errors`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(
        f"kldb {args.command}",
        lambda: _dispatch(args),
        interrupted="interrupted; what was written is complete. Rerun the same command to resume.",
    )


def console_main() -> None:
    """``sys.exit(main())``, for ``python -m kldb.cli``."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
