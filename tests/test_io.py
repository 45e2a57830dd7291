"""Atomic writes: whole files only, ordinary permissions, nothing left behind on failure."""

from __future__ import annotations

import json
import os
import stat

import PIL.Image
import pytest

from kldb.io import (
    atomic_write_bytes,
    atomic_write_json,
    default_mode,
    finite_or_none,
    json_safe,
    load_image,
    save_png,
)


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


def test_json_has_no_nan_null_in_its_place(tmp_path):
    result = {"median": float("nan"), "rows": [1.5, float("inf"), {"q": float("-inf")}], "pair": (2.0, None)}
    assert json_safe(result) == {"median": None, "rows": [1.5, None, {"q": None}], "pair": [2.0, None]}
    path = atomic_write_json(tmp_path / "r.json", result, indent=1)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.startswith('{\n "median": null')
    assert json.loads(text) == json_safe(result)
    assert [finite_or_none(v) for v in (0.25, float("nan"), float("inf"), None)] == [0.25, None, None, None]


def test_load_image_as_a_tensor_against_pil(tmp_path):
    import numpy as np
    import torch

    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.shape == (3, 6, 4) and image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0)
    resized = np.asarray(PIL.Image.fromarray(pixels).resize((2, 3), PIL.Image.BILINEAR), dtype=np.float32) / 255.0
    assert torch.equal(load_image(tmp_path / "a.png", size=(3, 2)), torch.from_numpy(resized).permute(2, 0, 1))
