"""Command line for Hub export and publishing: ``export`` writes a Hub-ready folder, ``publish`` uploads it.

    python -m kldb.hub_cli export digits exported/kldb-digits --repo-id me/kldb-digits
    python -m kldb.hub_cli export my-sd-audit exported/sd --base-model CompVis/stable-diffusion-v1-4
    python -m kldb.hub_cli export --community proposal/   # kldb_boundary.py + README row and section for diffusers
    python -m kldb.hub_cli export --space space/          # a Gradio Space running the app on the digits world
    python -m kldb.hub_cli publish exported/kldb-digits me/kldb-digits --dry-run   # lists files, uploads nothing
    python -m kldb.hub_cli publish exported/kldb-digits me/kldb-digits             # token: HF_TOKEN or `hf auth login`

There is deliberately no ``--token`` option: a token on the command line ends up in shell histories and process
lists. ``publish`` uses ``HF_TOKEN`` or the stored login, as ``huggingface_hub`` does.

The main ``kldb`` command mounts these with :func:`add_hub_commands`; :func:`main` runs them on their own, with the
same exit statuses (:func:`kldb.errors.run_command`: 2 for refused input, 1 for I/O or Hub errors).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kldb.errors import KLDBInputError, run_command
from kldb.hub import DEFAULT_LICENSE, SD_V1_LICENSE, export_folder, publish

logger = logging.getLogger(__name__)

#: Source names `export` accepts besides a folder path.
DIGITS_SOURCE = "digits"


def add_hub_commands(subparsers: Any) -> None:
    """Add the ``export`` and ``publish`` subcommands to an ``argparse`` subparsers object.

    Each subcommand sets ``handler`` (a function of the parsed arguments returning an exit status).
    """
    export = subparsers.add_parser(
        "export",
        help="write a Hub-ready folder (weights, pipeline.py, kldb_boundary.py, README.md model card), or with "
        "--community the files for diffusers' community folder",
        description="Write a Hub-ready folder from a saved pipeline folder, after a security scan; with --community, "
        "also (or only) the files that propose the pipeline to diffusers' examples/community.",
    )
    export.add_argument(
        "source",
        nargs="?",
        help=f"a saved pipeline folder (with model_index.json), or {DIGITS_SOURCE!r} for the digits world",
    )
    export.add_argument("out", type=Path, nargs="?", help="destination folder (replaced if it exists)")
    export.add_argument("--repo-id", default=None, help="the Hub repo the folder is meant for; named in the card")
    card = export.add_mutually_exclusive_group()
    card.add_argument("--no-model-card", action="store_true", help="write no README.md")
    card.add_argument("--model-card", type=Path, default=None, help="card template instead of model_card.md")
    export.add_argument("--world-info", type=Path, default=None, help="world_info.json for the card's results")
    export.add_argument(
        "--results",
        type=Path,
        action="append",
        default=None,
        help="a kldb.demo report.json or a markdown file for the card's results section (repeatable)",
    )
    _add_card_metadata_options(export, default_note=f"default: {SD_V1_LICENSE} for Stable Diffusion v1 weights, "
                               f"else {DEFAULT_LICENSE}")  # fmt: skip
    export.add_argument(
        "--community",
        type=Path,
        default=None,
        metavar="DIR",
        help="write kldb_boundary.py, README_row.md and README_section.md for diffusers' examples/community into DIR "
        "(other files there are left alone); SOURCE and OUT may then be left out",
    )
    export.add_argument(
        "--author", default=None, help="with --community: the README row's Author (default: kldb-boundary developers)"
    )
    export.add_argument("--author-url", default=None, help="with --community: an https:// address for the author")
    export.add_argument(
        "--space",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a Hugging Face Space into DIR (app.py, requirements.txt, README.md with the Space header) that "
        "runs `kldb app` on the digits world; SOURCE and OUT may then be left out (kldb.space)",
    )
    export.add_argument(
        "--space-requirement",
        default=None,
        help="with --space: the requirements.txt line that installs kldb-boundary (default: kldb-boundary[app]==<this "
        "version>; e.g. a git URL)",
    )
    export.set_defaults(handler=run_export)

    upload = subparsers.add_parser(
        "publish",
        help="upload an exported folder (or a Space written by `export --space`) to the Hub (create_repo + "
        "upload_folder); --dry-run lists the files",
        description="Upload an exported folder to the Hugging Face Hub after a security scan.",
    )
    upload.add_argument("folder", type=Path, help="a folder written by `export`")
    upload.add_argument("repo_id", help="namespace/name of the model repo (created if missing)")
    upload.add_argument("--private", action="store_true", help="create the repo private")
    upload.add_argument("--revision", default=None, help="branch to upload to (created if missing; default: main)")
    upload.add_argument("--commit-message", default=None, help="commit message of the upload")
    upload.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded (path, size); send nothing"
    )
    _add_card_metadata_options(upload, default_note="default: the card's own")
    upload.set_defaults(handler=run_publish)


def _add_card_metadata_options(parser: argparse.ArgumentParser, default_note: str) -> None:
    parser.add_argument(
        "--license",
        default=None,
        help=f"Hub licence identifier for the model card's YAML header, e.g. {SD_V1_LICENSE} ({default_note})",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the model the weights come from, for the card's YAML header, e.g. CompVis/stable-diffusion-v1-4 "
        "(default: the Stable Diffusion v1 repo the configs name, if any)",
    )


def run_export(args: argparse.Namespace) -> int:
    """``export``: :func:`kldb.hub.export_folder` from a folder or the digits world; ``--community`` files."""
    _check_export_arguments(args)
    if args.source is not None:
        source: str | Path = args.source
        if args.source == DIGITS_SOURCE:
            from kldb.digits import WORLD_PATH

            if not (WORLD_PATH / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"The digits world is not trained yet (no model_index.json in {WORLD_PATH}); train it with "
                    f"`python -m kldb.digits.train --out {WORLD_PATH}` first."
                )
            source = WORLD_PATH
        model_card: bool | Path = False if args.no_model_card else (args.model_card or True)
        results = args.results if args.results is None or len(args.results) > 1 else args.results[0]
        folder = export_folder(
            source,
            args.out,
            model_card=model_card,
            repo_id=args.repo_id,
            world_info=args.world_info,
            results=results,
            license=args.license,
            base_model=args.base_model,
        )
        print(f"Exported {source} to {folder}. Check it with `publish {folder} <repo_id> --dry-run`.")
    if args.space is not None:
        from kldb.space import write_space

        folder = write_space(args.space, requirement=args.space_requirement)
        print(
            f"Wrote a Gradio Space to {folder} (app.py, requirements.txt, README.md). Try it with `python app.py` there; "
            f"check the upload with `publish {folder} <user>/<space> --dry-run`."
        )
    if args.community is not None:
        from kldb.community import DEFAULT_AUTHOR, write_community_files

        folder = write_community_files(
            args.community, author=args.author or DEFAULT_AUTHOR, author_url=args.author_url
        )
        print(
            f"Wrote kldb_boundary.py, README_row.md and README_section.md to {folder}: copy kldb_boundary.py to "
            "examples/community/ of a diffusers checkout, add the row to the table of examples/community/README.md "
            "and the section under its 'Example usages' (see docs/hub.md)."
        )
    return 0


#: ``export`` options that only make sense with a SOURCE to export.
_EXPORT_OPTIONS = ("repo_id", "model_card", "world_info", "results", "license", "base_model")


def _check_export_arguments(args: argparse.Namespace) -> None:
    """Refuse ``export`` arguments that disagree, before anything is written."""
    if (args.author is not None or args.author_url is not None) and args.community is None:
        raise KLDBInputError(
            "Expected `--author` and `--author-url` only with `--community`, whose README row they fill."
        )
    if args.space_requirement is not None and args.space is None:
        raise KLDBInputError("Expected `--space-requirement` only with `--space`, whose requirements.txt it fills.")
    if (args.community is None and args.space is None) or args.source is not None:
        if args.source is None or args.out is None:
            raise KLDBInputError(
                "Expected the arguments SOURCE and OUT (a saved pipeline folder or 'digits', and the destination "
                "folder), or `--community DIR` / `--space DIR` alone."
            )
    else:
        given = [name for name in _EXPORT_OPTIONS if getattr(args, name) not in (None, False)]
        if args.no_model_card:
            given.append("no_model_card")
        if given:
            options = ", ".join(f"`--{name.replace('_', '-')}`" for name in given)
            alone = "community" if args.community is not None else "space"
            raise KLDBInputError(
                f"Expected {options} only with SOURCE and OUT: `--{alone} DIR` alone exports no weights."
            )
    if args.community is not None and args.out is not None:
        out, community = args.out.resolve(), args.community.resolve()
        if out == community or out in community.parents or community in out.parents:
            raise KLDBInputError(
                "Expected `--community` and OUT to be separate folders (the export replaces OUT) but got "
                f"{str(args.community)!r} and {str(args.out)!r}."
            )


def run_publish(args: argparse.Namespace) -> int:
    """``publish``: :func:`kldb.hub.publish`; the listing goes to stdout."""
    kwargs: dict[str, Any] = {
        "private": args.private,
        "revision": args.revision,
        "dry_run": args.dry_run,
        "license": args.license,
        "base_model": args.base_model,
    }
    if args.commit_message:
        kwargs["commit_message"] = args.commit_message
    result = publish(args.folder, args.repo_id, **kwargs)
    print(result.listing())
    if not args.dry_run:
        print(f"Done: {result.url or args.repo_id}")
    return 0


def build_parser(prog: str = "python -m kldb.hub_cli") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_hub_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m kldb.hub_cli") -> int:
    """Run ``export`` or ``publish``; returns the exit status, as ``kldb export`` / ``kldb publish`` do."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(f"{prog} {args.command}", lambda: args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
