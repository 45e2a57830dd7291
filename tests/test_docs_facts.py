"""Facts the documentation states: the paper's title and citation, addresses, and how diffusers resolves the pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from kldb.community import PAPER_TITLE, readme_row, readme_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "model_card.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = [ROOT / "pyproject.toml", ROOT / "pipeline_kldb_boundary.py", *sorted((ROOT / "kldb").rglob("*.py")),
           *sorted((ROOT / "examples").rglob("*.py"))]  # fmt: skip
#: The paper's title page, as the paper itself gives it.
AUTHORS = ["Gomes, In{\\^e}s", "Restivo, Andr{\\'e}", "Santos, Mois{\\'e}s", "Soares, Carlos", "van Rijn, Jan N.",
           "Teixeira, Lu{\\'i}s F."]  # fmt: skip
#: The only address the paper gives (its footnote to the authors' code).
PAPER_CODE_URL = "https://anonymous.4open.science/r/diffusion-boundary-4214/README.md"
#: Addresses of the projects the docs point to; anything else would be made up.
KNOWN_ADDRESSES = (PAPER_CODE_URL, "https://github.com/huggingface/diffusers")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_the_papers_title_is_quoted_exactly():
    assert PAPER_TITLE == "Stress Testing Classifiers around the Decision Boundary with Latent Diffusion"
    for path in (ROOT / "README.md", ROOT / "model_card.md"):
        assert PAPER_TITLE in re.sub(r"\s+", " ", read(path)), path
    for path in DOCS + SOURCES:
        text = re.sub(r"\s+", " ", read(path))
        assert not re.search(r"(?i)stress[- ]testing the decision boundary", text), path  # the old misquote
        for match in re.finditer(r"(?i)stress[- ]testing classifiers around\b.{0,60}", text):
            assert match.group(0).startswith(PAPER_TITLE), (path, match.group(0))


def test_the_citation_is_the_title_page():
    card = read(ROOT / "model_card.md")
    bibtex = re.search(r"```bibtex\n(.*?)```", card, flags=re.DOTALL).group(1)
    fields = {k: re.sub(r"\s+", " ", v) for k, v in re.findall(r"(\w+)\s*=\s*\{((?:[^{}]|\{[^{}]*\})*)\}", bibtex)}
    assert bibtex.startswith("@misc{")  # the paper states no venue or year
    assert fields["title"] == PAPER_TITLE
    assert fields["author"].split(" and ") == AUTHORS
    assert fields["note"] == f"Authors' code: {PAPER_CODE_URL}"
    assert "year" not in fields and "booktitle" not in fields


def test_no_invented_addresses():
    assert "urls" not in tomllib.loads(read(ROOT / "pyproject.toml"))["project"]
    texts = {path.name: read(path) for path in [*DOCS, ROOT / "pyproject.toml"]}
    texts["community README"] = readme_row() + "\n" + readme_section()
    for name, text in texts.items():
        for url in re.findall(r"https?://[^\s)>\]}\"'`]+", text):
            assert url.startswith(KNOWN_ADDRESSES) or "<" in url, (name, url)  # "<...>": a placeholder to fill


@pytest.mark.parametrize("path", ["docs/hub.md", "model_card.md", "README.md"])
def test_docs_give_diffusers_custom_revision_rules(path):
    """custom_revision takes a release without "v" or "main" for a community name (tests/test_community.py shows it)."""
    text = re.sub(r"\s+", " ", read(ROOT / path))
    assert "version or commit you tested" not in text
    assert 'custom_revision="main"' in text and "until the next diffusers release" in text
    assert '"0.42.1"' in text


def test_hub_docs_load_with_the_hubs_own_snippet_first():
    hub = read(ROOT / "docs" / "hub.md")
    loading = hub[hub.index("## Loading what you published") :]
    first = re.search(r"```python\n(.*?)```", loading, flags=re.DOTALL).group(1)
    assert 'DiffusionPipeline.from_pretrained("me/kldb-digits", trust_remote_code=True' in first
    assert "custom_pipeline" not in first
    text = re.sub(r"\s+", " ", hub)
    for claim in ("v0.42.1", "a commit hash", "ValueError: custom_revision: ... does not exist"):
        assert claim in text, claim
