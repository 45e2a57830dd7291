"""The embedded digits world: a small latent diffusion model and classifier trained on scikit-learn's digits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kldb.digits.data import LABELS, load_digits_split, split_indices

if TYPE_CHECKING:
    from pipeline_kldb_boundary import KLDBBoundaryPipeline

logger = logging.getLogger(__name__)

WORLD_PATH = Path(__file__).resolve().parent / "world"

__all__ = ["LABELS", "WORLD_PATH", "load_digits_split", "load_pipeline", "split_indices", "world_info"]


def world_info(path: str | Path = WORLD_PATH) -> dict[str, Any]:
    """The ``world_info.json`` of a world folder: seed, script version, training times, quality figures."""
    import json

    info_path = Path(path) / "world_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"No `world_info.json` in {str(path)!r}; train the world with `python -m kldb.digits.train`."
        )
    return json.loads(info_path.read_text(encoding="utf-8"))


def load_pipeline(
    path: str | Path = WORLD_PATH,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> KLDBBoundaryPipeline:
    """Load the digits world (by default the shipped one) as a `KLDBBoundaryPipeline` with its classifier, offline.

    This is :func:`kldb.loading.load_pipeline` for the folder, offline (``local_files_only``): every module is cast to
    `torch_dtype` (the UNet is stored in float16) and moved to `device`; further keyword arguments go to
    `KLDBBoundaryPipeline.from_pretrained`.
    """
    from kldb.loading import load_pipeline as load_spec

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No `model_index.json` in {str(folder)!r}; train the world with `python -m kldb.digits.train --out {folder}`."
        )
    kwargs.setdefault("local_files_only", True)
    return load_spec(str(folder.resolve()), device=device, dtype=torch_dtype, **kwargs)  # a path, never a spec name
