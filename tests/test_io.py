"""Atomic writes: whole files only, ordinary permissions, nothing left behind on failure."""

from __future__ import annotations

import json
import os
import stat

import PIL.Image
import pytest

from kldb.io import atomic_write_bytes, atomic_write_json, default_mode, save_png


def test_written_files_get_the_permissions_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 == default_mode()
        assert default_mode(directory=True) == 0o755
    finally:
        os.umask(old)


def test_png_metadata_round_trip(tmp_path):
    path = save_png(tmp_path / "sub" / "img.png", PIL.Image.new("RGB", (4, 4)), {"seed": 3, "prompt": "three"})
    with PIL.Image.open(path) as image:
        assert image.text == {"seed": "3", "prompt": "three"}
    assert [p.name for p in path.parent.iterdir()] == ["img.png"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "r.json", {"v": 1})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
