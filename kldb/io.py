"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.PngImagePlugin


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


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_png(path: str | os.PathLike[str], image: PIL.Image.Image, metadata: dict[str, Any] | None = None) -> Path:
    """Save a PNG atomically; ``metadata`` values go into text chunks (non-strings as JSON)."""
    import io

    info = PIL.PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())
