"""Write a pipeline folder that diffusers loads as a community pipeline, locally or from the Hub."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pipeline_kldb_boundary

#: The names diffusers resolves: ``custom_pipeline="kldb_boundary"`` looks for ``kldb_boundary.py`` in the model
#: folder, and a Hub repo id or local folder given as ``custom_pipeline`` is read through its ``pipeline.py``.
PIPELINE_FILE_NAMES = ("kldb_boundary.py", "pipeline.py")


def pipeline_source() -> str:
    """The source of ``pipeline_kldb_boundary.py``, the one file that defines the pipeline."""
    return inspect.getsource(pipeline_kldb_boundary)


def write_pipeline_folder(pipe: Any, folder: str | os.PathLike[str], **save_kwargs: Any) -> Path:
    """Save ``pipe`` with ``save_pretrained`` and add the pipeline file under the names diffusers resolves.

    The folder then loads with ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="kldb_boundary",
    trust_remote_code=True)``, with ``custom_pipeline=folder``, or with ``custom_pipeline=folder/"pipeline.py"``.
    The folder is written next to its destination and moved into place, so an interrupted export never leaves a
    half-written folder behind.

    Args:
        pipe: a :class:`~pipeline_kldb_boundary.KLDBBoundaryPipeline`.
        folder: destination; replaced if it exists.
        save_kwargs: passed to ``save_pretrained`` (``safe_serialization`` is always on).

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    destination = Path(folder)
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_kwargs["safe_serialization"] = True
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        pipe.save_pretrained(staging, **save_kwargs)
        source = pipeline_source()
        for name in PIPELINE_FILE_NAMES:
            (staging / name).write_text(source, encoding="utf-8")
        if destination.exists():
            backup = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            destination.rename(backup)
            staging.rename(destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination
