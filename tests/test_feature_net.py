"""The digits world's independent feature network: the shipped one reproduces its record; training is seeded."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kldb.digits import WORLD_PATH, world_info
from kldb.digits.feature_net import (
    CONFIG_NAME,
    DEFAULT_PATH,
    WEIGHTS_NAME,
    DenoisingAutoencoder,
    FeatureNetConfig,
    FeatureNetTraining,
    evaluate_feature_net,
    load_feature_net,
    main,
    save_feature_net,
    train_feature_net,
)
from kldb.digits.util import count_parameters


@pytest.fixture(scope="module")
def shipped() -> tuple[DenoisingAutoencoder, dict]:
    return load_feature_net(), world_info()["feature_net"]


def test_shipped_feature_net_is_safetensors_under_one_megabyte(shipped):
    _, record = shipped
    assert WORLD_PATH / record["path"] == DEFAULT_PATH
    assert sorted(path.name for path in DEFAULT_PATH.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    weights = (DEFAULT_PATH / WEIGHTS_NAME).read_bytes()
    assert len(weights) == record["weights_bytes"] < 1024 * 1024
    assert hashlib.sha256(weights).hexdigest() == record["weights_sha256"]


def test_shipped_feature_net_loads_and_reproduces_its_recorded_figures(shipped):
    model, record = shipped
    state = load_file(DEFAULT_PATH / WEIGHTS_NAME)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert not model.training and not any(parameter.requires_grad for parameter in model.parameters())
    figures = evaluate_feature_net(model, record["split_seed"])
    for key in ("test_knn_accuracy", "test_linear_probe_accuracy"):
        assert figures[key] == pytest.approx(record[key], abs=1.0 / record["test_size"] + 1e-9), key
    for key in ("val_reconstruction_mse", "val_denoising_mse"):
        assert figures[key] == pytest.approx(record[key], rel=1e-4), key
    assert record["test_knn_accuracy"] > 0.95 and record["test_linear_probe_accuracy"] > 0.95


def test_shipped_feature_net_differs_from_the_audited_classifier(shipped):
    model, record = shipped
    info = world_info()
    assert record["seed"] != info["seed"] and record["split_seed"] == info["seed"]
    assert record["parameters"] == {"encoder": model.encoder_parameters(), "total": count_parameters(model)}
    classifier_config = json.loads((WORLD_PATH / "classifier" / "config.json").read_text())
    assert classifier_config["model_type"] == "resnet"
    assert not any("resnet" in type(module).__name__.lower() for module in model.modules())
    assert record["objective"].startswith("denoising reconstruction") and "no labels" in record["objective"]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, record["config"]["embedding_dim"]) == (2, model.num_features)


def test_features_of_other_sizes_are_resized_to_the_training_size(shipped):
    model, _ = shipped
    images = torch.rand(2, 3, 32, 32)
    larger = torch.nn.functional.interpolate(images, size=(48, 48), mode="bilinear", align_corners=False)
    expected = model(torch.nn.functional.interpolate(larger, size=(32, 32), mode="bilinear", align_corners=False))
    assert torch.allclose(model(larger), expected)


def test_training_is_deterministic_from_its_seed():
    first, record = train_feature_net(seed=3, training=FeatureNetTraining.tiny(), evaluate=False)
    second, _ = train_feature_net(seed=3, training=FeatureNetTraining.tiny(), evaluate=False)
    other, _ = train_feature_net(seed=4, training=FeatureNetTraining.tiny(), evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
    assert record["seed"] == 3 and record["training"]["iterations"] == FeatureNetTraining.tiny().iterations


@pytest.mark.slow
def test_command_line_writes_a_loadable_net_and_keeps_other_world_info_keys(tmp_path: Path):
    world = tmp_path / "world"
    world.mkdir()
    others = {"seed": 0, "validity_classifier": {"test_accuracy": 0.99, "seed": 2}, "feature_net": {"old": True}}
    (world / "world_info.json").write_text(json.dumps(others, indent=2) + "\n", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "kldb.digits.feature_net",
        "--out",
        str(world / "feature_net"),
        "--tiny",
        "--seed",
        "5",
    ]
    subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    text = (world / "world_info.json").read_text(encoding="utf-8")
    info = json.loads(text)
    assert text == json.dumps(info, indent=2) + "\n"  # the file's indentation
    assert {key: info[key] for key in ("seed", "validity_classifier")} == {
        key: others[key] for key in ("seed", "validity_classifier")
    }
    record = info["feature_net"]
    assert "old" not in record and record["seed"] == 5 and record["path"] == "feature_net"
    model = load_feature_net(world / "feature_net")
    retrained, _ = train_feature_net(seed=5, training=FeatureNetTraining.tiny(), evaluate=False)
    images = torch.rand(3, 3, 32, 32)
    assert torch.allclose(model(images), retrained(images), atol=1e-6)  # another process (flush-to-zero floats)
    assert evaluate_feature_net(model)["test_knn_accuracy"] == record["test_knn_accuracy"]


def test_save_and_load_round_trip_another_architecture(tmp_path: Path):
    model = DenoisingAutoencoder(FeatureNetConfig(channels=(8, 8), embedding_dim=16, norm_groups=4))
    save_feature_net(model, tmp_path / "net")
    loaded = load_feature_net(tmp_path / "net")
    assert loaded.config == model.config and loaded.num_features == 16
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(images), model.eval()(images))
    assert torch.equal(loaded.reconstruct(images), model.reconstruct(images))


def test_load_refuses_a_missing_folder_and_another_class(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"Expected argument `path` to be a folder with model.safetensors and "
                       r"config.json but got .*; train one with `python -m kldb.digits.feature_net --out"):  # fmt: skip
        load_feature_net(tmp_path / "missing")
    save_feature_net(DenoisingAutoencoder(FeatureNetConfig(channels=(4,), embedding_dim=4, norm_groups=1)), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "class": "ResNet"}))
    with pytest.raises(ValueError, match=r"describe a DenoisingAutoencoder but got class 'ResNet'"):
        load_feature_net(tmp_path)


def test_config_refuses_an_image_size_its_strides_do_not_divide():
    with pytest.raises(
        ValueError, match=r"Expected argument `image_size` to be divisible by 2 \*\* len\(channels\) = 8 but got 28"
    ):
        FeatureNetConfig(image_size=28)


def test_command_line_refuses_a_missing_world_info(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"Expected argument `--world-info` to be an existing file but got"):
        main(["--out", str(tmp_path / "net"), "--tiny", "--world-info", str(tmp_path / "missing.json")])
    assert not (tmp_path / "net").exists()  # refused before training
