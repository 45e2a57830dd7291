"""kldb.counterfactual and `kldb edit`: distances against library references, the nearest-boundary choice rule, the
grid against direct pipeline calls, files written atomically, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import gen
from torchmetrics.functional.image import structural_similarity_index_measure

from kldb import cli
from kldb.counterfactual import (
    Candidate,
    counterfactual,
    nearest_boundary,
    to_pil,
    write_counterfactual,
)
from kldb.errors import KLDBInputError
from kldb.testing import tiny_pipeline
from pipeline_kldb_boundary import pixel_l2, structural_similarity

CLASSES = [3, 2]
FAST = {"num_inference_steps": 4, "kldb_guidance_interval": 1, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def photo(seed: int = 0, batch: int = 1) -> torch.Tensor:
    coarse = torch.rand(batch, 3, 8, 8, generator=gen(seed))
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Distances against library references
# ----------------------------------------------------------------------------------------------------------------------


def test_pixel_l2_is_numpy_s_euclidean_distance():
    a, b = photo(1, batch=3), photo(2, batch=3)
    expected = np.linalg.norm((a.double().numpy() - b.double().numpy()).reshape(3, -1), axis=1)
    np.testing.assert_allclose(pixel_l2(a, b).numpy(), expected, rtol=1e-6)


def test_ssim_is_torchmetrics_ssim_per_image():
    a, b = photo(3, batch=3), photo(4, batch=3)
    b[1] = a[1]  # one identical pair: SSIM 1
    expected = torch.stack(
        [structural_similarity_index_measure(a[i : i + 1], b[i : i + 1], data_range=1.0) for i in range(3)]
    )
    torch.testing.assert_close(structural_similarity(a, b), expected, rtol=1e-5, atol=1e-6)
    assert abs(float(structural_similarity(a, b)[1]) - 1.0) < 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# The choice rule
# ----------------------------------------------------------------------------------------------------------------------


def candidate(strength: float, alpha: float, kldb: float, distance: float) -> Candidate:
    return Candidate(strength, alpha, kldb, 1.0, distance, None, distance, 0, 0, [], [])


def test_nearest_boundary_is_the_least_distance_below_the_threshold():
    grid = [
        candidate(0.3, 0.1, kldb=0.50, distance=1.0),  # closest, but not on the boundary
        candidate(0.5, 0.1, kldb=0.05, distance=3.0),
        candidate(0.7, 0.1, kldb=0.01, distance=2.5),  # on the boundary and closer: chosen
        candidate(0.9, 0.1, kldb=0.005, distance=9.0),
    ]
    assert nearest_boundary(grid, threshold=0.1) == 2
    assert nearest_boundary(grid, threshold=0.02) == 2
    assert nearest_boundary(grid, threshold=0.01) == 3  # strictly below
    assert nearest_boundary(grid, threshold=1.0) == 0
    assert nearest_boundary(grid, threshold=0.001) is None


def test_ties_go_to_the_gentler_edit_and_non_finite_values_are_never_chosen():
    tied = [candidate(0.7, 0.1, 0.0, 2.0), candidate(0.5, 0.3, 0.0, 2.0), candidate(0.5, 0.1, 0.0, 2.0)]
    assert nearest_boundary(tied, threshold=0.1) == 2
    broken = [candidate(0.3, 0.1, math.nan, 0.5), candidate(0.5, 0.1, 0.0, math.inf), candidate(0.7, 0.1, 0.0, 4.0)]
    assert nearest_boundary(broken, threshold=0.1) == 2


# ----------------------------------------------------------------------------------------------------------------------
# The grid on tiny components, against the calls a user would make
# ----------------------------------------------------------------------------------------------------------------------


def test_counterfactual_runs_the_grid_as_direct_calls_and_picks_by_the_rule(pipe):
    image = photo(5)[0]
    strengths, alphas = (0.5, 1.0), (0.0, 0.5)
    first = counterfactual(pipe, image, CLASSES, strengths=strengths, alphas=alphas, threshold=10.0, seed=3, **FAST)
    assert [(c.strength, c.alpha) for c in first.candidates] == [(s, a) for s in strengths for a in alphas]
    # every cell is the pipeline call with that setting and the seed
    for k, c in enumerate(first.candidates):
        out = pipe(
            image=image, strength=c.strength, classes=CLASSES, kldb_guidance_scale=c.alpha, generator=gen(3),
            output_type="pt", **FAST,
        )  # fmt: skip
        assert torch.equal(first.images[k], out.images[0])
        assert (c.kldb, c.kldb_start, c.pixel_l2) == (
            float(out.kldb[0]),
            float(out.kldb_start[0]),
            float(out.pixel_l2[0]),
        )
        assert c.distance == c.pixel_l2 and c.ssim == pytest.approx(float(out.ssim[0]))
        assert (c.predicted_class, c.predicted_class_start) == (
            int(out.predicted_class[0]),
            int(out.predicted_class_start[0]),
        )
    assert len({c.kldb_start for c in first.candidates}) == 1  # the same input everywhere
    # threshold 10: every candidate qualifies, the least distance wins
    distances = [c.pixel_l2 for c in first.candidates]
    assert first.nearest == int(np.argmin(distances)) and first.found
    assert torch.equal(first.nearest_image, first.images[first.nearest])
    # a threshold between the candidates' KLDB: the closest of those strictly below it
    kldbs = sorted(c.kldb for c in first.candidates)
    threshold = (kldbs[1] + kldbs[2]) / 2
    second = counterfactual(
        pipe, image, CLASSES, strengths=strengths, alphas=alphas, threshold=threshold, seed=3, **FAST
    )
    below = [k for k, c in enumerate(second.candidates) if c.kldb < threshold]
    assert len(below) == 2 and second.nearest == min(below, key=lambda k: second.candidates[k].pixel_l2)
    # below every candidate: none
    none = counterfactual(pipe, image, CLASSES, strengths=(0.5,), alphas=(0.0,), threshold=1e-6, seed=3, **FAST)
    assert none.nearest is None and not none.found and none.nearest_image is None


def test_ssim_distance_is_one_minus_ssim(pipe):
    image = photo(6)[0]
    result = counterfactual(
        pipe, image, CLASSES, strengths=(0.5, 1.0), alphas=(0.5,), threshold=10.0, distance="ssim", seed=1, **FAST
    )
    for c in result.candidates:
        assert c.distance == pytest.approx(1.0 - c.ssim)
    assert result.nearest == int(np.argmax([c.ssim for c in result.candidates]))


def test_feature_distance_in_a_given_feature_space(pipe):
    torch.manual_seed(0)
    feature_net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    image = photo(9)[0]
    result = counterfactual(
        pipe, image, CLASSES, strengths=(0.5, 1.0), alphas=(0.0, 0.5), threshold=10.0, distance="feature", seed=4,
        feature_net=feature_net, **FAST,
    )  # fmt: skip
    with torch.no_grad():
        reference = feature_net(image[None]).double().numpy()
        features = feature_net(result.images).double().numpy()
    expected = np.linalg.norm(features - reference, axis=1)
    np.testing.assert_allclose([c.feature_distance for c in result.candidates], expected, rtol=1e-6)
    assert [c.distance for c in result.candidates] == [c.feature_distance for c in result.candidates]
    assert result.nearest == int(np.argmin(expected))
    plain = counterfactual(pipe, image, CLASSES, strengths=(0.5,), alphas=(0.0,), **FAST)
    assert plain.candidates[0].feature_distance is None  # no feature network, no feature distance


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def test_write_counterfactual_writes_every_candidate_the_nearest_and_a_record(pipe, tmp_path):
    image = photo(7)[0]
    result = counterfactual(pipe, image, CLASSES, strengths=(0.5, 1.0), alphas=(0.5,), threshold=10.0, **FAST)
    paths = write_counterfactual(result, tmp_path)
    record = json.loads((tmp_path / "counterfactual.json").read_text())
    assert record["nearest"] == result.nearest and record["classes"] == CLASSES
    assert len(record["candidates"]) == 2 and record["files"]["nearest"] == "nearest.png"
    nearest = np.asarray(PIL.Image.open(tmp_path / "nearest.png"))
    assert np.array_equal(nearest, np.asarray(to_pil(result.images[result.nearest])))
    for name in record["files"]["candidates"]:
        assert (tmp_path / name).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    assert paths["record"] == tmp_path / "counterfactual.json"
    # a search that finds none removes an earlier nearest.png
    none = counterfactual(pipe, image, CLASSES, strengths=(0.5,), alphas=(0.0,), threshold=1e-6, **FAST)
    write_counterfactual(none, tmp_path)
    assert not (tmp_path / "nearest.png").exists()
    assert json.loads((tmp_path / "counterfactual.json").read_text())["files"]["nearest"] is None


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strengths": []}, r"`strengths` to be a non-empty sequence of numbers in \(0, 1\] but got \[\]"),
        ({"strengths": (0.5, 1.5)}, r"`strengths` to be a non-empty sequence of numbers in \(0, 1\] but got \(0.5, 1.5\)"),
        ({"strengths": (0.5, 0.5)}, r"`strengths` to hold distinct values but got \[0.5, 0.5\]"),
        ({"alphas": (-0.1,)}, r"`alphas` to be a non-empty sequence of finite numbers >= 0 but got \(-0.1,\)"),
        ({"alphas": "0.1"}, r"`alphas` to be a non-empty sequence of finite numbers >= 0 but got '0.1'"),
        ({"threshold": 0.0}, r"`threshold` to be a positive finite KLDB \(nats\) but got 0.0"),
        ({"distance": "lpips"}, r"`distance` to be one of \('pixel_l2', 'ssim', 'feature'\) but got 'lpips'"),
        ({"distance": "feature"}, r"Expected argument `feature_net` \(a callable images -> features\) with distance='feature'"),
        ({"feature_net": "net"}, r"Expected argument `feature_net` to be callable but got str"),
        ({"feature_net": lambda x: x.mean()}, r"`feature_net` to return features of shape \[1, d\] but it returned \(\)"),
        ({"seed": -1}, r"`seed` to be a non-negative int but got -1"),
        ({"strength": 0.5}, r"Expected no argument the grid sets itself .* but got \['strength'\]"),
        ({"image": photo(1, batch=2)}, r"Expected argument `image` to be one image but it holds 2"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused(pipe, kwargs, match):
    call = {"image": photo(0)[0], "classes": CLASSES} | kwargs
    with pytest.raises(KLDBInputError, match=match):
        counterfactual(pipe, **call)


# ----------------------------------------------------------------------------------------------------------------------
# `kldb edit`
# ----------------------------------------------------------------------------------------------------------------------

TINY = ["--pipeline", "kldb.testing:tiny_pipeline", "--classes", "three", "two", "--steps", "4", "--interval", "1"]


def save(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    to_pil(photo(8)[0]).resize(size[::-1]).save(path)
    return path


def test_kldb_edit_writes_the_search_and_prints_the_table(tmp_path, capsys):
    image = save(tmp_path / "photo.png")
    out = tmp_path / "edit"
    argv = ["edit", str(image), "--out", str(out), *TINY, "--strengths", "0.5", "1.0", "--alphas", "0.5",
            "--threshold", "10", "--seed", "2", "--beta", "5"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "counterfactual.json").read_text())
    assert record["seed"] == 2 and len(record["candidates"]) == 2 and (out / "nearest.png").is_file()
    assert "(nearest)" in printed and "Nearest boundary image" in printed
    # the same search through the library, on the image as the command read it
    from kldb.io import load_image

    pipe = tiny_pipeline()
    expected = counterfactual(
        pipe, load_image(image), ["three", "two"], strengths=(0.5, 1.0), alphas=(0.5,), threshold=10.0, seed=2,
        num_inference_steps=4, kldb_guidance_interval=1, guidance_scale=5.0, guidance_rescale=0.0,
    )  # fmt: skip
    assert [c["kldb"] for c in record["candidates"]] == [c.kldb for c in expected.candidates]
    assert record["nearest"] == expected.nearest


def test_kldb_edit_refuses_a_size_the_vae_cannot_take_unless_resized(tmp_path, capsys):
    image = save(tmp_path / "odd.png", size=(33, 32))
    argv = ["edit", str(image), "--out", str(tmp_path / "x"), *TINY, "--strengths", "0.5", "--alphas", "0"]
    assert cli.main(argv) == 2
    assert "Expected argument `image` to have a height and width divisible by the VAE factor 2 but it is 33x32" in (
        capsys.readouterr().err
    )
    assert cli.main([*argv, "--size", "32", "32"]) == 0
    assert (tmp_path / "x" / "counterfactual.json").is_file()


def test_kldb_edit_refuses_a_missing_image(tmp_path, capsys):
    assert cli.main(["edit", str(tmp_path / "nope.png"), "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "Expected argument `image` to be an image file but got" in capsys.readouterr().err


def test_kldb_edit_measures_distance_in_the_digits_feature_space(tmp_path):
    from kldb.digits.feature_net import load_feature_net

    image = save(tmp_path / "photo.png")
    out = tmp_path / "edit"
    argv = ["edit", str(image), "--out", str(out), *TINY, "--strengths", "0.5", "1.0", "--alphas", "0.5",
            "--threshold", "10", "--distance", "feature"]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "counterfactual.json").read_text())
    distances = [c["feature_distance"] for c in record["candidates"]]
    assert record["distance"] == "feature" and [c["distance"] for c in record["candidates"]] == distances
    assert record["nearest"] == int(np.argmin(distances))
    feature_net = load_feature_net()
    with torch.no_grad():
        from kldb.io import load_image

        reference = feature_net(load_image(out / "input.png")[None]).double()
        nearest = feature_net(load_image(out / "nearest.png")[None]).double()
    # the PNGs are 8-bit: the distance recomputed from them agrees to the rounding of the images
    assert abs(float((nearest - reference).norm()) - distances[record["nearest"]]) < 0.05 * (
        1 + distances[record["nearest"]]
    )
