"""The files that propose the pipeline to diffusers' community folder, ``examples/community`` of diffusers.

:func:`write_community_files` writes, into a folder of their own:

* ``kldb_boundary.py``: the pipeline file, under the name that ``custom_pipeline="kldb_boundary"`` resolves to once
  it is in diffusers' community folder;
* ``README_row.md``: the row for the table of ``examples/community/README.md``, whose columns are
  Example | Description | Code Example | Colab | Author;
* ``README_section.md``: the section under "Example usages" that the row's Code Example links to, with a runnable
  example.

docs/hub.md says where each goes in a diffusers checkout. The pipeline file passes diffusers' ruff settings
(``tests/diffusers_ruff.toml``, checked by ``tests/test_community.py``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kldb.hub import _check_destination, pipeline_source
from kldb.io import atomic_write_text

#: The ``custom_pipeline`` name, and so the file name in ``examples/community``.
COMMUNITY_NAME = "kldb_boundary"
COMMUNITY_FILE = f"{COMMUNITY_NAME}.py"
README_ROW_FILE = "README_row.md"
README_SECTION_FILE = "README_section.md"
#: The row's Example column and the section's heading.
EXAMPLE_TITLE = "KLDB Decision Boundary Guidance"
DEFAULT_AUTHOR = "kldb-boundary developers"
#: The paper the pipeline implements, as its title page gives it.
PAPER_TITLE = "Stress Testing Classifiers around the Decision Boundary with Latent Diffusion"

DESCRIPTION = (
    "Generates images on an image classifier's decision boundary, for any subset of its classes, to stress-test the "
    "classifier (*" + PAPER_TITLE + "*). Stable Diffusion samples with k-LMS from a prompt naming the classes, and "
    "every few steps the latent takes a step against the normalised gradient of KLDB, the KL divergence from the "
    "uniform distribution over the chosen classes to the classifier's softmax. Each image comes with its KLDB, "
    "entropy and class probabilities."
)

#: The section's example: every keyword is an argument of ``KLDBBoundaryPipeline`` (checked by the tests).
EXAMPLE_CODE = """import torch
from diffusers import DiffusionPipeline
from transformers import AutoImageProcessor, AutoModelForImageClassification

# the classifier to audit: any transformers image classifier
classifier = AutoModelForImageClassification.from_pretrained("microsoft/resnet-50")
processor = AutoImageProcessor.from_pretrained("microsoft/resnet-50")

pipe = DiffusionPipeline.from_pretrained(
    "CompVis/stable-diffusion-v1-4",
    custom_pipeline="kldb_boundary",
    classifier=classifier,
    classifier_processor=processor,
    torch_dtype=torch.float16,
).to("cuda")
pipe.set_lms_scheduler(timestep_spacing="trailing", use_karras_sigmas=True)

out = pipe(
    classes=["Chihuahua", "papillon"],  # label names (or indices); the prompt defaults to "Chihuahua and papillon"
    kldb_guidance_scale=0.1,  # strength of the KLDB correction; 0 samples from the prompt alone
    kldb_guidance_interval=5,  # correct the latent every 5 steps
    num_inference_steps=40,
    guidance_scale=6.0,
    guidance_rescale=0.7,
    num_images_per_prompt=4,
    generator=torch.Generator("cuda").manual_seed(28),
)
for i, image in enumerate(out.images):
    image.save(f"boundary_{i}.png")
print(out.kldb)  # one value per image: 0 when the chosen classes share the probability equally
print(out.probabilities[:, out.classes])
"""


def github_anchor(title: str) -> str:
    """The ``#anchor`` GitHub gives a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return "#" + re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _check_author(author: object, author_url: object) -> None:
    if not isinstance(author, str) or not author.strip() or re.search(r"[|\n\r\[\]]", author):
        raise ValueError(
            "Expected argument `author` to be a non-empty name without '|', '[', ']' or line breaks (it goes into a "
            f"markdown table cell) but got {author!r}."
        )
    if author_url is not None and (
        not isinstance(author_url, str) or not re.fullmatch(r"https://[^\s()<>|]+", author_url)
    ):
        raise ValueError(
            f"Expected argument `author_url` to be None or an https:// address without spaces but got {author_url!r}."
        )


def readme_row(author: str = DEFAULT_AUTHOR, author_url: str | None = None) -> str:
    """The row of the table in diffusers' ``examples/community/README.md`` (Example, Description, Code Example, ...).

    The columns are Example | Description | Code Example | Colab | Author; the Code Example links to
    :func:`readme_section`'s heading, and there is no Colab.
    """
    _check_author(author, author_url)
    credit = f"[{author}]({author_url})" if author_url else author
    code_example = f"[{EXAMPLE_TITLE}]({github_anchor(EXAMPLE_TITLE)})"
    return f"| {EXAMPLE_TITLE} | {DESCRIPTION} | {code_example} | - | {credit} |"


def readme_section() -> str:
    """The section of diffusers' ``examples/community/README.md`` that the table row links to."""
    return "\n".join(
        [
            f"### {EXAMPLE_TITLE}",
            "",
            "This pipeline stress-tests an image classifier: it generates images on the classifier's decision "
            "boundary for any subset of its classes, as in *" + PAPER_TITLE + "*. It is a "
            "`StableDiffusionPipeline` with a `classifier` component. The prompt names the classes; every "
            "`kldb_guidance_interval` steps the latent moves against the normalised gradient of KLDB, the "
            "Kullback-Leibler divergence from the uniform distribution over `classes` to the classifier's softmax "
            "(0 exactly on their decision boundary). The gradient flows through the VAE decoder and the classifier, "
            "so a guided step costs a decoder and classifier backward pass on top of the usual UNet call.",
            "",
            "The following example audits a ResNet-50 on the pair Chihuahua / papillon with the settings of the "
            "paper (k-LMS, 40 steps, a correction every 5 steps). It needs a CUDA GPU.",
            "",
            "```python",
            EXAMPLE_CODE.rstrip("\n"),
            "```",
            "",
            "`out.images` sit near the boundary between the chosen classes. `out.kldb`, `out.entropy` and "
            "`out.probabilities` give, for each image, how far it is from that boundary and what the classifier "
            "predicts. `kldb_guidance_scale=0` gives the prompt-only images from the same seeds for comparison. "
            "Until the first diffusers release after this pipeline was merged, load it with "
            '`custom_revision="main"`.',
            "",
        ]
    )


def write_community_files(
    folder: str | os.PathLike[str], author: str = DEFAULT_AUTHOR, author_url: str | None = None
) -> Path:
    """Write ``kldb_boundary.py``, ``README_row.md`` and ``README_section.md`` into ``folder``.

    Each file is written atomically; other files in ``folder`` are left alone.

    Args:
        folder: destination folder, created if missing.
        author: the Author column: the name of whoever proposes the pipeline.
        author_url: an https:// address the name links to (such as a GitHub profile), or ``None``.

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.
    """
    destination = _check_destination(folder)
    row = readme_row(author, author_url)
    atomic_write_text(destination / COMMUNITY_FILE, pipeline_source())
    atomic_write_text(destination / README_ROW_FILE, row + "\n")
    atomic_write_text(destination / README_SECTION_FILE, readme_section())
    return destination
