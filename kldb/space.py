"""A Hugging Face Space that runs the app (:mod:`kldb.app`) on the digits world: ``kldb export --space DIR``.

The folder holds three files: ``app.py`` (builds the app over the digits world and serves it), ``requirements.txt``
(kldb-boundary with its ``app`` extra; the digits world ships inside the package, so the Space needs no other file)
and ``README.md`` with the Space's YAML header (``sdk: gradio``, ``sdk_version``: the Gradio release it was exported
with, ``app_file: app.py``). ``kldb publish DIR me/kldb-explorer --dry-run`` lists what would be uploaded; without
``--dry-run`` it creates a Gradio Space repo and uploads the folder.

The Space installs kldb-boundary as ``requirements.txt`` says: by default ``kldb-boundary[app]==<this version>`` from
the package index; ``requirement=`` gives another pip requirement, such as a git URL of the repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kldb.errors import KLDBInputError
from kldb.io import atomic_write_text

__all__ = ["SPACE_FILES", "default_requirement", "is_space_folder", "write_space"]

SPACE_FILES = ("app.py", "requirements.txt", "README.md")
SPACE_TITLE = "KLDB boundary explorer"

APP_PY = '''"""{title}: images on a classifier's decision boundary, by KLDB-guided latent diffusion (kldb-boundary).

Runs on the digits world that ships inside the kldb package (a small latent diffusion model and classifier trained on
scikit-learn's digits), on a CPU. Written by `kldb export --space`.
"""

from kldb.app import build_app, launch, load_world

demo = build_app(load_world("digits"), max_queue={max_queue})

if __name__ == "__main__":
    launch(demo, host=None, port=None)  # a Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; else 127.0.0.1:7860
'''

README = """---
title: {title}
emoji: 🎯
colorFrom: indigo
colorTo: gray
sdk: gradio
sdk_version: {sdk_version}
python_version: "3.11"
app_file: app.py
pinned: false
license: apache-2.0
short_description: Images on a classifier's decision boundary (KLDB guidance)
---

# {title}

Generates images that a classifier finds ambiguous between the classes you pick: Stable-Diffusion-style latent
diffusion guided toward the classifier's decision boundary by the KL divergence to the uniform distribution over those
classes (KLDB). This Space runs the small *digits world* that ships with the `kldb-boundary` package (a latent
diffusion model and a classifier trained on scikit-learn's 8x8 digits), on a CPU.

- **Explore**: pick classes, then compare prompt-only and KLDB-guided images from the same seeds, each with its KLDB
  and top class probabilities; download the images and their records.
- **From an image**: push an uploaded image toward the boundary of the chosen classes.
- **Audit**: run a small alpha x beta sweep and read its Table 1 and plots.

Run it locally: `pip install -r requirements.txt && python app.py`, or `kldb app` from an install of
`kldb-boundary[app]`.
"""


def default_requirement() -> str:
    """``kldb-boundary[app]==<installed version>``: how the Space installs the package by default."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kldb-boundary[app]=={version('kldb-boundary')}"
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "kldb-boundary[app]"


def gradio_version() -> str:
    """The installed Gradio release (the Space's ``sdk_version``); the ``app`` extra installs it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        from kldb.errors import MissingExtraError

        raise MissingExtraError(
            'Exporting a Space needs gradio (its sdk_version is the installed release): pip install "kldb-boundary[app]"'
        ) from None


def write_space(
    folder: str | os.PathLike[str],
    requirement: str | None = None,
    title: str = SPACE_TITLE,
    max_queue: int = 16,
) -> Path:
    """Write ``app.py``, ``requirements.txt`` and ``README.md`` of a Gradio Space into ``folder`` (created).

    Other files in ``folder`` are left alone; the three files are replaced, each atomically.

    Args:
        folder: the Space folder.
        requirement: the pip requirement that installs kldb-boundary with its ``app`` extra (default:
            :func:`default_requirement`), e.g. ``"kldb-boundary[app] @ git+https://github.com/ORG/kldb-boundary@v0.1.0"``.
        title: the Space's title.
        max_queue: requests that may wait for the pipeline.

    Returns:
        The folder.
    """
    requirement = default_requirement() if requirement is None else requirement
    if not isinstance(requirement, str) or not requirement.strip() or "\n" in requirement:
        raise KLDBInputError(
            f"Expected argument `requirement` to be one pip requirement line (such as 'kldb-boundary[app]==0.1.0') but "
            f"got {requirement!r}."
        )
    if not isinstance(title, str) or not title.strip() or "\n" in title or ":" in title:
        raise KLDBInputError(f"Expected argument `title` to be one line without ':' but got {title!r}.")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise KLDBInputError(f"Expected argument `max_queue` to be a positive integer but got {max_queue!r}.")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise KLDBInputError(
            f"Expected argument `folder` to be a folder (new or existing) but {str(folder)!r} is a file."
        )
    sdk_version = gradio_version()
    atomic_write_text(root / "app.py", APP_PY.format(title=title, max_queue=max_queue))
    atomic_write_text(root / "requirements.txt", f"{requirement.strip()}\n")
    atomic_write_text(root / "README.md", README.format(title=title, sdk_version=sdk_version))
    return root


_SDK_LINE = re.compile(r"^sdk:\s*\S+", re.MULTILINE)


def is_space_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a Space: its ``README.md`` starts with a YAML header that names an ``sdk``."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return False
    end = text.find("\n---", 4)
    return end != -1 and _SDK_LINE.search(text[4:end]) is not None
