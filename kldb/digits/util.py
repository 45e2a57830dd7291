"""What the digits world's training scripts share (:mod:`kldb.digits.train`, :mod:`kldb.digits.guidance_decoder`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch


def count_parameters(module: torch.nn.Module) -> int:
    """The number of parameters of ``module``."""
    return sum(parameter.numel() for parameter in module.parameters())


def folder_size_bytes(folder: Path) -> int:
    """The size of every file below ``folder``, in bytes."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def setup_process(threads: int | None) -> None:
    """Logging to stderr, the torch thread count, and flush-to-zero for the training scripts' processes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if threads is not None:
        torch.set_num_threads(threads)
    # denormal floats slow CPU training down several-fold; set here, for this process only (it is global state)
    torch.set_flush_denormal(True)
