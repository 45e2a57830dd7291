"""Shared fixtures: tiny components built in code, nothing downloaded."""

from __future__ import annotations

import os
import tempfile
from typing import ClassVar

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# dynamic modules (custom pipelines) are copied here, not into the user's cache
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="kldb-hf-modules-")
# tiny models gain nothing from threads; one per test process avoids oversubscribing the cores under xdist
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_pipe():
    from kldb.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


class MeanBrightnessClassifier(torch.nn.Module):
    """Two classes split by mean brightness: logits = (+w, -w) * (mean(image) - 0.5).

    The decision boundary is known in closed form: mean brightness 0.5. KLDB for {0, 1} is 0 exactly there.
    """

    labels: ClassVar[list[str]] = ["dark", "bright"]

    def __init__(self, weight: float = 20.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(weight))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = images.mean(dim=(1, 2, 3)) - 0.5  # (B,)
        return torch.stack([-self.weight * m, self.weight * m], dim=1)  # (B, 2)


@pytest.fixture
def brightness_classifier():
    return MeanBrightnessClassifier()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
