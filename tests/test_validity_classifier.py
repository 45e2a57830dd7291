"""The digits world's validity classifier: the shipped folder and the script that trains it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kldb.digits import WORLD_PATH, world_info
from kldb.digits.data import LABELS, load_digits_split
from kldb.digits.validity_classifier import main, outlier_images
from kldb.loading import load_classifier

FOLDER = WORLD_PATH / "validity_classifier"


def test_shipped_classifier_loads_without_pickle_and_reproduces_its_test_accuracy(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    recorded = world_info()["validity_classifier"]
    oracle = load_classifier(str(FOLDER))
    assert oracle.labels == list(LABELS)
    images, labels = load_digits_split("test", recorded["split_seed"])
    with torch.no_grad():
        accuracy = float((oracle(images).argmax(dim=-1) == labels).float().mean())
    assert accuracy == pytest.approx(recorded["test_accuracy"], abs=1e-9)
    assert accuracy >= 0.97


def test_shipped_folder_is_small_safetensors_and_independent_of_the_audited_classifier():
    files = sorted(path.name for path in FOLDER.iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert sum(path.stat().st_size for path in FOLDER.iterdir()) < 1024 * 1024
    info = world_info()
    recorded = info["validity_classifier"]
    assert recorded["parameters"] == sum(t.numel() for t in load_file(FOLDER / "model.safetensors").values())
    config = json.loads((FOLDER / "config.json").read_text())
    audited = json.loads((WORLD_PATH / "classifier" / "config.json").read_text())
    assert config["model_type"] == "convnext" != audited["model_type"]
    assert recorded["architecture"]["class"] == config["architectures"][0] == "ConvNextForImageClassification"
    assert recorded["seed"] != info["seed"] and recorded["split_seed"] == info["seed"]
    assert recorded["training_seconds"] > 0


def test_outliers_are_the_digits_blocks_shuffled_or_smooth_noise():
    images, _ = load_digits_split("train")
    images = images[:6]
    outliers = outlier_images(images, torch.Generator().manual_seed(0))
    assert outliers.shape == images.shape and outliers.min() >= 0.0 and outliers.max() <= 1.0

    def blocks(image: torch.Tensor) -> list[tuple[float, ...]]:
        return sorted(tuple(image[:, r : r + 4, c : c + 4].flatten().tolist()) for r in range(0, 32, 4)
                      for c in range(0, 32, 4))  # fmt: skip

    for source, shuffled in zip(images[:3], outliers[:3]):
        assert blocks(shuffled) == blocks(source) and not torch.equal(shuffled, source)
    for noise in outliers[3:]:
        assert torch.equal(noise[0], noise[1]) and torch.equal(noise[1], noise[2])  # grey
        assert (noise[0, :, 1:] - noise[0, :, :-1]).abs().max() < 0.2  # smooth


@pytest.fixture
def denormals_restored():
    """The script's `main` sets flush-to-zero for its process (kldb.digits.util.setup_process); undo it after."""
    yield
    torch.set_flush_denormal(False)


def test_training_script_is_deterministic_and_records_only_its_key(tmp_path: Path, denormals_restored):
    info_path = tmp_path / "world_info.json"
    info_path.write_text(json.dumps({"seed": 0, "feature_net": {"parameters": 7}}, indent=2) + "\n")
    entry = main(["--out", str(tmp_path / "a" / "validity_classifier"), "--tiny", "--world-info", str(info_path)])
    again = main(
        ["--out", str(tmp_path / "b" / "validity_classifier"), "--tiny", "--world-info", str(tmp_path / "no")]
    )
    info = json.loads(info_path.read_text())
    assert list(info) == ["seed", "feature_net", "validity_classifier"] and info["feature_net"] == {"parameters": 7}
    assert info["validity_classifier"] == json.loads(json.dumps(entry))
    assert not (tmp_path / "no").exists()
    first = load_file(tmp_path / "a" / "validity_classifier" / "model.safetensors")
    second = load_file(tmp_path / "b" / "validity_classifier" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert entry["test_accuracy"] == again["test_accuracy"] and entry["seed"] == 1
    oracle = load_classifier(str(tmp_path / "a" / "validity_classifier"))
    images, labels = load_digits_split("test")
    with torch.no_grad():
        accuracy = float((oracle(images).argmax(dim=-1) == labels).float().mean())
    assert accuracy == pytest.approx(entry["test_accuracy"], abs=1e-9)
    assert entry["parameters"] == sum(t.numel() for t in first.values())
