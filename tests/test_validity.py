"""Validity of a run's images under an independent oracle, against shares recomputed by hand with numpy/scipy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL.Image
import pytest
import scipy.special
import torch
from sweep_fixtures import CLASSES, LABELS, write_run

from kldb import cli
from kldb.io import atomic_write_json, save_png
from kldb.runfolder import CONFIG_NAME, read_jsonl
from kldb.validity import clip_oracle, most_ambiguous_valid, run_validity

QUADRANT_WEIGHTS = torch.randn(10, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 60.0
QUADRANT_BIAS = torch.tensor([0.0, 0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0], dtype=torch.float64)


class QuadrantOracle(torch.nn.Module):
    """An analytic oracle over the digit labels: logits = W (quadrant channel means - 0.5) + b."""

    labels: ClassVar[list[str]] = LABELS

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(QUADRANT_WEIGHTS.clone())  # float64: the images are cast to it
        self.bias = torch.nn.Parameter(QUADRANT_BIAS.clone())
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.avg_pool2d(images, 16).flatten(1) - 0.5  # (B, 12): channel, row, column
        return features @ self.weight.T + self.bias


def quadrant_oracle() -> QuadrantOracle:
    return QuadrantOracle()


def png_pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)


def quadrant_probabilities(path: Path) -> np.ndarray:
    """The oracle's probabilities for one PNG, in numpy."""
    pixels = png_pixels(path)
    quadrants = pixels.reshape(2, 16, 2, 16, 3).mean(axis=(1, 3))  # (row, column, channel)
    features = quadrants.transpose(2, 0, 1).reshape(12) - 0.5
    return scipy.special.softmax(QUADRANT_WEIGHTS.numpy() @ features + QUADRANT_BIAS.numpy())


def hand_validity(records: list[dict], probabilities: list[np.ndarray], threshold: float) -> dict[str, dict]:
    """Per setting and over all images: counts and shares of valid and off-manifold images."""
    groups: dict[str, list[tuple[bool, bool]]] = {}
    for record, p in zip(records, probabilities):
        valid = int(np.argmax(p)) in record["class_indices"]
        groups.setdefault(record["setting"], []).append((valid, (not valid) or p.max() < threshold))
    groups["**all**"] = [flags for name in list(groups) for flags in groups[name]]
    return {
        name: {
            "n": len(flags),
            "valid_count": sum(v for v, _ in flags),
            "off_manifold_count": sum(o for _, o in flags),
            "valid_share": np.mean([v for v, _ in flags]),
            "off_manifold_share": np.mean([o for _, o in flags]),
        }
        for name, flags in groups.items()
    }


def assert_matches(result: dict, hand: dict[str, dict]) -> None:
    rows = {row["setting"]: row for row in result["settings"]} | {"**all**": result["overall"]}
    assert list(rows) == list(hand)
    for name, expected in hand.items():
        for key, value in expected.items():
            assert rows[name][key] == pytest.approx(value, abs=1e-12), (name, key)


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory) -> Path:
    """sweep_fixtures' stored mini-run: 6 settings of C = {three, eight} x 6 seeds, random-pixel PNGs."""
    out = tmp_path_factory.mktemp("validity") / "run"
    write_run(out, seeds=6)
    return out


def test_shares_against_a_hand_computation(noise_run, tmp_path):
    records = read_jsonl(noise_run / "manifest.jsonl")
    probabilities = [quadrant_probabilities(noise_run / r["file"]) for r in records]
    maxima = np.array([p.max() for p in probabilities])
    threshold = float(np.median(maxima))
    hand = hand_validity(records, probabilities, threshold)
    overall = hand["**all**"]
    # the run exercises both criteria: some images are valid, some valid ones fall below the threshold
    assert 0 < overall["valid_count"] < overall["n"]
    assert overall["off_manifold_count"] > overall["n"] - overall["valid_count"]

    result = run_validity(noise_run, oracle=QuadrantOracle(), threshold=threshold, out_dir=tmp_path / "v")
    assert_matches(result, hand)
    images = result["images"]
    assert [i["file"] for i in images] == [r["file"] for r in records]
    assert [i["oracle_top1"] for i in images] == [int(np.argmax(p)) for p in probabilities]
    np.testing.assert_allclose([i["oracle_max_probability"] for i in images], maxima, atol=1e-6)
    np.testing.assert_allclose(
        [i["oracle_class_mass"] for i in images], [p[list(CLASSES)].sum() for p in probabilities], atol=1e-6
    )
    valid_low = sum(int(np.argmax(p)) in CLASSES and p.max() < threshold for p in probabilities)
    assert result["overall"]["low_confidence_count"] == valid_low
    assert result["overall"]["median_oracle_max_probability"] == pytest.approx(np.median(maxima), abs=1e-6)
    first = {}
    for r in records:
        first.setdefault(r["setting"], (r["classes"], r["class_indices"], r["alpha"], r["beta"]))
    assert [(s["classes"], s["class_indices"], s["alpha"], s["beta"]) for s in result["settings"]] == list(
        first.values()
    )

    # at threshold 0 only the top-1 criterion is left; at 1 every image is off-manifold
    assert_matches(run_validity(noise_run, oracle=QuadrantOracle(), threshold=0.0, out_dir=tmp_path / "v0"),
                   hand_validity(records, probabilities, 0.0))  # fmt: skip
    assert (
        run_validity(noise_run, oracle=QuadrantOracle(), threshold=1.0, out_dir=tmp_path / "v1")["overall"][
            "off_manifold_share"
        ]
        == 1.0
    )


def test_files_and_the_grid_of_the_most_ambiguous_valid_images(noise_run, tmp_path):
    records = read_jsonl(noise_run / "manifest.jsonl")
    result = run_validity(noise_run, oracle=QuadrantOracle(), threshold=0.3, out_dir=tmp_path / "v", per_setting=2)
    written = json.loads((tmp_path / "v" / "validity.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert set(result["files"]) == {"validity.json", "validity.md", "validity_ambiguous_valid.png"}
    markdown = (tmp_path / "v" / "validity.md").read_text()
    all_row = result["overall"]
    assert f"| **all** | 36 | {100 * all_row['valid_share']:.1f}% ({all_row['valid_count']}) |" in markdown
    # by hand: per setting, the valid images (oracle top-1 in C) with the lowest KLDB in the manifest
    expected = {}
    for record in records:
        if int(np.argmax(quadrant_probabilities(noise_run / record["file"]))) in CLASSES:
            expected.setdefault(record["setting"], []).append((record["kldb"], record["seed"]))
    chosen = most_ambiguous_valid(result["images"], 2)
    for setting, images in chosen.items():
        assert [(i["kldb"], i["seed"]) for i in images] == sorted(expected.get(setting, []))[:2]
    with PIL.Image.open(tmp_path / "v" / "validity_ambiguous_valid.png") as grid:
        assert grid.height > 6 * 96  # one row per setting


def test_default_out_dir_is_the_report_folder(noise_run):
    result = run_validity(noise_run, oracle=QuadrantOracle(), threshold=0.3)
    assert Path(result["files"]["validity.json"]) == noise_run / "report" / "validity.json"
    assert (noise_run / "report" / "validity.md").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# The digits world's validity classifier, the default oracle of a digits run
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """The mini-run with real test-split digits as its PNGs: threes and eights, fives, and no digits (shuffled
    blocks, smooth noise)."""
    from kldb.digits.data import load_digits_split
    from kldb.digits.validity_classifier import outlier_images

    out = tmp_path_factory.mktemp("validity_digits") / "run"
    records = write_run(out, seeds=4)
    info = json.loads((out / CONFIG_NAME).read_text())
    info["fixed"]["pipeline"] = "digits"
    atomic_write_json(out / CONFIG_NAME, info)
    images, labels = load_digits_split("test")
    threes_eights = images[(labels == 3) | (labels == 8)][:8]
    fives = images[labels == 5][:4]
    noise = outlier_images(images[:4], torch.Generator().manual_seed(0))
    pictures = torch.cat([threes_eights, fives, noise, threes_eights[:4], fives])  # 24 images, 4 per setting
    for record, picture in zip(records, pictures):
        array = (picture.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        save_png(out / record["file"], PIL.Image.fromarray(array))
    return out


def test_digits_run_uses_the_world_validity_classifier_by_default(digits_run, tmp_path):
    from transformers import AutoImageProcessor, ConvNextForImageClassification

    from kldb.digits import WORLD_PATH

    folder = WORLD_PATH / "validity_classifier"
    result = run_validity(digits_run, out_dir=tmp_path / "v")
    assert result["oracle"] == str(folder) and result["oracle_kind"] == "classifier"
    # by hand: the shipped model through transformers and its own image processor (PIL), softmax in scipy
    model = ConvNextForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    records = read_jsonl(digits_run / "manifest.jsonl")
    pictures = []
    for record in records:
        with PIL.Image.open(digits_run / record["file"]) as image:
            pictures.append(image.convert("RGB"))
    with torch.no_grad():
        logits = model(**processor(images=pictures, return_tensors="pt")).logits.double().numpy()
    probabilities = list(scipy.special.softmax(logits, axis=1))
    assert_matches(result, hand_validity(records, probabilities, 0.5))
    shares = [row["valid_share"] for row in result["settings"]]
    off = [row["off_manifold_share"] for row in result["settings"]]
    # 4 images per setting; the oracle errs on about 2 % of the test split
    assert min(shares[0], shares[1], shares[4]) >= 0.75  # threes and eights
    assert max(shares[2], shares[5]) <= 0.25  # fives
    assert off[3] >= 0.75  # no digit


def test_command_line(digits_run, noise_run, tmp_path, capsys):
    status = cli.main(["validity", str(digits_run), "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert status == 0 and "| **all** | 24 |" in out
    assert (
        json.loads((tmp_path / "cli" / "validity.json").read_text())["overall"]
        == run_validity(digits_run, out_dir=tmp_path / "py")["overall"]
    )
    status = cli.main(["validity", str(noise_run), "--oracle", "test_validity:quadrant_oracle", "--threshold", "0.3",
                       "--out", str(tmp_path / "q")])  # fmt: skip
    assert status == 0
    written = json.loads((tmp_path / "q" / "validity.json").read_text())
    assert written["overall"] == run_validity(noise_run, QuadrantOracle(), 0.3, out_dir=tmp_path / "qq")["overall"]
    status = cli.main(["validity", str(noise_run), "--oracle", "test_validity:quadrant_oracle", "--threshold", "2"])
    assert status == cli.EXIT_USAGE
    assert "Expected argument `threshold` to be a number in [0, 1] but got 2.0" in capsys.readouterr().err
    status = cli.main(["validity", str(noise_run), "--oracle", str(tmp_path / "nowhere")])
    assert status == cli.EXIT_USAGE and "Expected argument `--oracle` to be an existing local folder" in (
        capsys.readouterr().err
    )


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot CLIP on tiny random-weight components
# ----------------------------------------------------------------------------------------------------------------------


def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from kldb.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(model_max_length=16)
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    vision_config = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model, processor = tiny_clip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def hand_clip_probabilities(model, processor, pictures, texts) -> np.ndarray:
    """softmax over texts of logit_scale * cos(image embedding, text embedding), from the model's parts."""
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text = model.text_projection(model.text_model(**tokens).pooler_output).double().numpy()  # (n, d)
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double().numpy()
        scale = float(model.logit_scale.exp())
    cosine = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (
        text / np.linalg.norm(text, axis=1, keepdims=True)
    ).T
    return scipy.special.softmax(scale * cosine, axis=1)  # (B, n)


def test_clip_oracle_against_a_hand_computation(noise_run, clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPProcessor.from_pretrained(clip_folder)
    records = read_jsonl(noise_run / "manifest.jsonl")
    pictures = []
    for record in records:
        with PIL.Image.open(noise_run / record["file"]) as image:
            pictures.append(image.convert("RGB"))
    texts = [f"a drawing of the digit {name}" for name in LABELS]
    hand = hand_clip_probabilities(model, processor, pictures, texts)
    assert hand.max(axis=1).std() > 1e-3  # the tiny model does not give every image the same answer

    oracle = clip_oracle(model, processor, LABELS, "a drawing of the digit {name}")
    images = torch.stack(
        [torch.from_numpy(np.asarray(p, dtype=np.float32) / 255.0).permute(2, 0, 1) for p in pictures]
    )
    with torch.no_grad():
        np.testing.assert_allclose(oracle(images).double().softmax(-1).numpy(), hand, atol=1e-5)

    threshold = float(np.median(hand.max(axis=1)))
    result = run_validity(noise_run, oracle=f"clip:{clip_folder}", threshold=threshold, out_dir=tmp_path / "v",
                          clip_template="a drawing of the digit {name}")  # fmt: skip
    assert result["oracle_kind"] == "clip" and result["clip_template"] == "a drawing of the digit {name}"
    np.testing.assert_allclose([i["oracle_max_probability"] for i in result["images"]], hand.max(axis=1), atol=1e-5)
    assert_matches(result, hand_validity(records, list(hand), threshold))


def test_clip_default_template(noise_run, clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPProcessor.from_pretrained(clip_folder)
    record = read_jsonl(noise_run / "manifest.jsonl")[0]
    with PIL.Image.open(noise_run / record["file"]) as image:
        picture = image.convert("RGB")
    hand = hand_clip_probabilities(model, processor, [picture], [f"a photo of a {name}" for name in LABELS])[0]
    result = run_validity(noise_run, oracle=f"clip:{clip_folder}", out_dir=tmp_path / "v")
    assert result["clip_template"] == "a photo of a {name}"
    assert result["images"][0]["oracle_max_probability"] == pytest.approx(hand.max(), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Refused input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan"), True, "0.5"])
def test_threshold_outside_the_unit_interval(noise_run, threshold):
    with pytest.raises(ValueError, match=r"Expected argument `threshold` to be a number in \[0, 1\] but got"):
        run_validity(noise_run, oracle=QuadrantOracle(), threshold=threshold)


def test_unknown_oracles(noise_run, tmp_path):
    with pytest.raises(
        ValueError, match=r"Expected argument `oracle` to be a classifier spec .* but got 'no_such_module:f'"
    ):
        run_validity(noise_run, oracle="no_such_module:f")
    with pytest.raises(ValueError, match=r"Expected argument `oracle` to be a classifier spec .* but got ''"):
        run_validity(noise_run, oracle="")
    with pytest.raises(ValueError, match="Expected argument `oracle` to look like 'clip:<folder or Hub id>'"):
        run_validity(noise_run, oracle="clip:")
    with pytest.raises(ValueError, match="Expected argument `oracle` to name a CLIPModel with its CLIPProcessor"):
        run_validity(noise_run, oracle=f"clip:{tmp_path / 'nowhere'}")
    with pytest.raises(TypeError, match=r"Expected argument `oracle` to be a classifier spec .* but got 3"):
        run_validity(noise_run, oracle=3)
    with pytest.raises(
        ValueError, match=r"Expected argument `oracle` .* but got None, and run .* was not made with the"
    ):
        run_validity(noise_run)


def test_label_space_mismatch(noise_run):
    from kldb.testing import tiny_classifier
    from pipeline_kldb_boundary import as_image_classifier

    with pytest.raises(
        ValueError, match="Expected argument `oracle` to have the run's 10 classes but it returns 4 logits"
    ):
        run_validity(noise_run, oracle="kldb.testing:tiny_classifier")
    with pytest.raises(
        ValueError, match="Expected argument `oracle` to have the run's label names but class 0 is 'class_0'"
    ):
        run_validity(noise_run, oracle=as_image_classifier(*tiny_classifier(num_labels=10)))


def test_other_bad_arguments(noise_run, clip_folder):
    with pytest.raises(ValueError, match="Expected argument `clip_template` to be a string with the field"):
        run_validity(noise_run, oracle=f"clip:{clip_folder}", clip_template="a photo of a {label}")
    with pytest.raises(ValueError, match="Expected argument `clip_template` to be a string with the field"):
        run_validity(noise_run, oracle=f"clip:{clip_folder}", clip_template="a photo")
    with pytest.raises(ValueError, match="Expected argument `per_setting` to be a positive integer but got 0"):
        run_validity(noise_run, oracle=QuadrantOracle(), per_setting=0)
    with pytest.raises(ValueError, match="Expected argument `batch_size` to be a positive integer but got 0"):
        run_validity(noise_run, oracle=QuadrantOracle(), batch_size=0)
