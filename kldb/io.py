"""Files in and out: atomic writes (a reader, or a rerun after a crash, sees the old file or the new one, never half of
one), strict JSON (no NaN), and images as tensors."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open`` / ``mkdir`` would give under the current umask (``mkstemp`` gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(value: float | None) -> float | None:
    """``value`` if it is a finite number, else ``None`` (JSON has no NaN or Infinity).

    Example:
        >>> finite_or_none(0.5), finite_or_none(float("nan")), finite_or_none(None)
        (0.5, None, None)
    """
    return value if value is not None and math.isfinite(value) else None


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float, in dicts, lists and tuples at any depth, replaced by ``None``.

    Example:
        >>> json_safe({"a": [1.0, float("inf")], "b": (float("nan"), "x")})
        {'a': [1.0, None], 'b': [None, 'x']}
    """
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (non-finite floats as ``null``, see :func:`json_safe`) atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, sort_keys=False, allow_nan=False) + "\n")


def save_png(path: str | os.PathLike[str], image: PIL.Image.Image, metadata: dict[str, Any] | None = None) -> Path:
    """Save a PNG atomically; ``metadata`` values go into text chunks (non-strings as JSON)."""
    import io

    info = PIL.PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())


def load_image(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as ``[3, H, W]`` in ``[0, 1]`` (RGB; resized bilinearly to ``size = (H, W)`` if given)."""
    with PIL.Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), PIL.Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)
