"""The digits world: data split, calibration helpers, the training script (tiny) and the shipped folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import load_file

from kldb import digits
from kldb.digits.calibration import expected_calibration_error, fit_temperature
from kldb.digits.data import augment, load_digits_split, split_indices
from kldb.digits.guidance_decoder import GuidanceDecoderConfig
from kldb.digits.train import VOCABULARY_WORDS, WorldConfig, build_tokenizer, build_world
from kldb.metrics import frechet_distance

ACCURACY_MARGIN = 0.04


# --- data -------------------------------------------------------------------------------------------------------------


def test_split_is_a_deterministic_partition():
    first, second = split_indices(0), split_indices(0)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(first[name], second[name])
    everything = np.concatenate([first["train"], first["val"], first["test"]])
    assert len(everything) == 1797 and len(np.unique(everything)) == 1797
    assert not np.array_equal(split_indices(1)["test"], first["test"])


def test_load_digits_split_shapes_and_range():
    images, labels = load_digits_split("val")
    assert images.shape == (len(split_indices(0)["val"]), 3, 32, 32)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert set(labels.tolist()) == set(range(10))


def test_load_digits_split_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"Expected argument `split` to be one of \['train', 'val', 'test'\]"):
        load_digits_split("validation")


def test_augment_keeps_shape_and_identity_at_zero_strength():
    images, _ = load_digits_split("val")
    batch = images[:8]
    generator = torch.Generator().manual_seed(0)
    same = augment(batch, generator, max_shift=0.0, scale_range=(1.0, 1.0), max_rotation_degrees=0.0)
    torch.testing.assert_close(same, batch, atol=1e-5, rtol=0)
    moved = augment(batch, torch.Generator().manual_seed(0))
    assert moved.shape == batch.shape and not torch.allclose(moved, batch)


# --- calibration and FID ----------------------------------------------------------------------------------------------


def _reference_ece(logits: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    confidence, prediction = probabilities.max(1), probabilities.argmax(1)
    ece = 0.0
    for lower, upper in zip(np.linspace(0, 1, num_bins + 1)[:-1], np.linspace(0, 1, num_bins + 1)[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs((prediction[in_bin] == labels[in_bin]).mean() - confidence[in_bin].mean())
    return float(ece)


def test_expected_calibration_error_matches_numpy_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (500,), generator=generator)
    expected = _reference_ece(logits.double().numpy(), labels.numpy())
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_expected_calibration_error_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"Expected `logits` of shape \[N, n\] and `labels` of shape \[N\]"):
        expected_calibration_error(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_fit_temperature_recovers_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)


def test_frechet_distance_of_shifted_features_is_squared_shift():
    features = np.random.default_rng(0).normal(size=(400, 6))
    shift = np.arange(6, dtype=np.float64)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(features, features + shift) == pytest.approx(float((shift**2).sum()), rel=1e-8)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match=r"to be \[N, d\] arrays with the same d and N >= 2 but got \(5, 3\) and \(5, 4\)"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# --- tokenizer --------------------------------------------------------------------------------------------------------


def _assert_whole_words(tokenizer) -> None:
    encoded = tokenizer(
        "three and eight", padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    )
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[:5] == ["<|startoftext|>", "three</w>", "and</w>", "eight</w>", "<|endoftext|>"]
    for word in VOCABULARY_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    long_prompt = "a handwritten digit three and a handwritten digit eight"
    assert len(tokenizer(long_prompt).input_ids) == len(long_prompt.split()) + 2 <= tokenizer.model_max_length


def test_built_tokenizer_gives_whole_words(tmp_path: Path):
    _assert_whole_words(build_tokenizer(tmp_path, model_max_length=16))


# --- the training script, tiny ----------------------------------------------------------------------------------------


def test_training_script_runs_end_to_end_tiny(tmp_path: Path):
    info = build_world(tmp_path / "world", seed=0, config=WorldConfig.tiny(), guidance_decoder=GuidanceDecoderConfig.tiny())
    folder = tmp_path / "world"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["kldb_boundary", "KLDBBoundaryPipeline"]
    assert index["classifier"] == ["transformers", "ResNetForImageClassification"]
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    written = json.loads((folder / "world_info.json").read_text())
    assert written["seed"] == 0 and written["parameters"] == info["parameters"]
    assert index["guidance_vae"] == ["diffusers", "AutoencoderTiny"]
    assert set(written["guidance_vae"]["fidelity"]) >= {"gradient_cosine_median", "image_mse", "classifier_agreement"}
    pipeline = digits.load_pipeline(folder)
    assert isinstance(pipeline.guidance_vae, AutoencoderTiny)
    assert pipeline.unet.dtype == torch.float32 and pipeline.vae.config.scaling_factor == pytest.approx(
        written["vae"]["scaling_factor"]
    )
    output = pipeline("three and eight", num_inference_steps=2, output_type="pt", kldb_guidance_scale=0.0,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert output.images.shape == (1, 3, 32, 32)
    assert float(output.images.min()) >= 0.0 and float(output.images.max()) <= 1.0
    # the same seed rebuilds the same weights
    again = tmp_path / "again"
    build_world(again, seed=0, config=WorldConfig.tiny(), guidance_decoder=GuidanceDecoderConfig.tiny())
    for component, name in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("classifier", "model.safetensors"),
        ("guidance_vae", "diffusion_pytorch_model.safetensors"),
    ]:
        first, second = load_file(folder / component / name), load_file(again / component / name)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_load_pipeline_names_missing_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"No `model_index.json` in .*python -m kldb.digits.train"):
        digits.load_pipeline(tmp_path)


# --- the shipped world ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return digits.load_pipeline(), digits.world_info()


def test_shipped_world_loads_offline_and_generates(shipped):
    pipeline, info = shipped
    assert pipeline.unet.dtype == torch.float32 and pipeline.classifier is not None
    assert pipeline.classifier.config.id2label[3] == "three"
    output = pipeline(
        "three and eight", classes=[3, 8], num_inference_steps=2, kldb_guidance_scale=0.1, kldb_guidance_interval=1,
        guidance_scale=info["default_guidance_scale"], num_images_per_prompt=2, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert output.images.shape == (2, 3, 32, 32)
    assert output.kldb.shape == (2,) and output.probabilities.shape == (2, 10)


def test_shipped_tokenizer_gives_whole_words(shipped):
    _assert_whole_words(shipped[0].tokenizer)


def test_shipped_classifier_accuracy_on_test_slice(shipped):
    from pipeline_kldb_boundary import as_image_classifier

    pipeline, info = shipped
    images, labels = load_digits_split("test", info["seed"])
    adapter = as_image_classifier(pipeline.classifier, pipeline.classifier_processor)
    with torch.no_grad():
        accuracy = float((adapter(images[:180]).argmax(-1) == labels[:180]).float().mean())
    assert accuracy >= info["classifier"]["test_accuracy"] - ACCURACY_MARGIN


def test_shipped_folder_is_small_and_safetensors_only():
    files = [path for path in digits.WORLD_PATH.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 20 * 1024 * 1024
    assert not [path for path in files if path.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]


def test_shipped_world_exported_loads_as_custom_pipeline(shipped, tmp_path: Path):
    from diffusers import DiffusionPipeline

    from kldb.hub import write_pipeline_folder

    pipeline, info = shipped
    exported = write_pipeline_folder(pipeline, tmp_path / "exported")
    loaded = DiffusionPipeline.from_pretrained(exported, custom_pipeline="kldb_boundary", trust_remote_code=True)
    assert type(loaded).__name__ == "KLDBBoundaryPipeline" and loaded.classifier is not None
    output = loaded(
        "three", num_inference_steps=2, kldb_guidance_scale=0.0, guidance_scale=info["default_guidance_scale"],
        output_type="pt", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert output.images.shape == (1, 3, 32, 32) and output.predicted_class.shape == (1,)


def test_the_guidance_decoder_script_does_not_import_the_world_training_script():
    """train.py runs the guidance decoder stage; guidance_decoder.py needs only the shared helpers (no import cycle)."""
    import subprocess
    import sys

    code = "import sys, kldb.digits.guidance_decoder\nprint('kldb.digits.train' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "False"
