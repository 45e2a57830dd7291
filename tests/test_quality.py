"""kldb.quality against independent references: numpy/scipy FID, KID and k-NN precision / recall, and the run folder."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from sweep_fixtures import LABELS, write_run

from kldb.digits import load_digits_split
from kldb.quality import (
    InceptionFeatures,
    PixelFeatures,
    feature_quality,
    kernel_inception_distance,
    precision_recall,
    quality_metrics,
    run_quality,
)
from kldb.testing import tiny_classifier
from pipeline_kldb_boundary import as_image_classifier


def gaussian(
    n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0, mixing_seed: int | None = None
) -> np.ndarray:
    """n draws of a d-dimensional Gaussian with a non-diagonal covariance (chosen by `mixing_seed`, else `seed`)."""
    mixing = np.random.default_rng(seed if mixing_seed is None else mixing_seed).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng([seed, 1]).normal(size=(n, d)) @ mixing * scale + shift


# --- references --------------------------------------------------------------------------------------------------------


def fid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to the rows of x and y, with scipy's matrix square root."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    sigma_x, sigma_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_x @ sigma_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(sigma_x + sigma_y - 2.0 * root))


def mmd_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with the kernel (x.y / d + 1)^3, written out with loops over the index pairs."""
    m, d = x.shape
    kernel = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    same = sum(kernel(x[i], x[j]) + kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return same / (m * (m - 1)) - 2.0 * cross / m**2


def precision_recall_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 by brute force: balls to the k-th nearest *other* point of the same set."""

    def radii(points: np.ndarray) -> np.ndarray:
        out = []
        for i, p in enumerate(points):
            others = sorted(float(np.linalg.norm(p - q)) for j, q in enumerate(points) if j != i)
            out.append(others[k - 1])
        return np.array(out)

    def covered(points: np.ndarray, centres: np.ndarray, radius: np.ndarray) -> float:
        inside = [any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radius)) for p in points]
        return float(np.mean(inside))

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


# --- FID ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "shift"), [(60, 4, 0.0), (80, 8, 0.7), (40, 16, 2.0)])
def test_fid_equals_scipy_sqrtm_reference_on_gaussians(n, d, shift):
    real, fake = gaussian(n, d, seed=d), gaussian(n + 7, d, seed=d + 1, shift=shift, scale=1.3)
    result = feature_quality(real, fake, k=3, kid_subsets=2, kid_subset_size=20)
    assert result["fid"] == pytest.approx(fid_reference(real, fake), rel=1e-6, abs=1e-8)
    assert result["num_features"] == d


def test_fid_of_identical_sets_is_about_zero():
    features = gaussian(100, 8, seed=0)
    assert abs(feature_quality(features, features)["fid"]) < 1e-6
    assert feature_quality(features, features + 1.0)["fid"] == pytest.approx(8.0, rel=1e-6)  # |mean shift|^2


# --- KID ---------------------------------------------------------------------------------------------------------------


def test_kid_on_whole_sets_equals_the_unbiased_mmd_written_out():
    real, fake = gaussian(30, 5, seed=1), gaussian(30, 5, seed=2, shift=0.4)
    mean, std = kernel_inception_distance(real, fake, subsets=3, subset_size=30)
    assert mean == pytest.approx(mmd_reference(real, fake), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_kid_of_identical_sets_is_about_zero():
    """The estimator assumes independent sets: shared points bias it by O(1/n) below 0, small for large sets."""
    features = gaussian(4000, 8, seed=3)
    same_mean, _ = kernel_inception_distance(features, features, subsets=20)
    shifted_mean, _ = kernel_inception_distance(features, features + 0.5, subsets=20)
    assert abs(same_mean) < 0.01 * shifted_mean
    small = features[:40]
    assert kernel_inception_distance(small, small, subsets=1)[0] == pytest.approx(
        mmd_reference(small, small), rel=1e-9
    )


def test_kid_of_two_samples_of_one_distribution_is_about_zero():
    first, second = gaussian(3000, 8, seed=4), gaussian(3000, 8, seed=5, mixing_seed=4)
    mean, _ = kernel_inception_distance(first, second, subsets=20)
    shifted_mean, _ = kernel_inception_distance(first, second + 0.5, subsets=20)
    assert abs(mean) < 0.01 * shifted_mean


def test_kid_is_seeded_and_leaves_the_global_random_state_alone():
    real, fake = gaussian(100, 4, seed=4), gaussian(100, 4, seed=5, shift=0.3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = kernel_inception_distance(real, fake, subsets=10, subset_size=30, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    assert kernel_inception_distance(real, fake, subsets=10, subset_size=30, seed=7) == first
    assert kernel_inception_distance(real, fake, subsets=10, subset_size=30, seed=8) != first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subsets": 0}, r"Expected arguments `subsets` >= 1 and `subset_size` >= 2 to be ints but got 0 and 1000"),
        ({"subset_size": 1}, r"Expected arguments `subsets` >= 1 and `subset_size` >= 2 to be ints but got 100 and 1"),
    ],
)
def test_kid_refuses_bad_subsets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernel_inception_distance(gaussian(10, 2, 0), gaussian(10, 2, 1), **kwargs)


# --- precision and recall ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_real", "n_fake", "d", "k", "seed"), [(12, 9, 2, 3, 0), (20, 25, 3, 1, 1), (15, 15, 5, 4, 2)]
)
def test_precision_recall_equal_a_brute_force_reference(n_real, n_fake, d, k, seed):
    real = gaussian(n_real, d, seed)
    fake = gaussian(n_fake, d, seed + 100, shift=0.8, scale=0.7)  # partly overlapping
    expected = precision_recall_reference(real, fake, k)
    assert 0.0 < expected[0] < 1.0 or 0.0 < expected[1] < 1.0  # a case that is not all or nothing
    assert precision_recall(real, fake, k) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_obvious_cases():
    points = gaussian(30, 4, seed=0)
    assert precision_recall(points, points) == (1.0, 1.0)
    assert precision_recall(points, points + 1000.0) == (0.0, 0.0)
    # generated points = one of two far-apart real clusters: all precise, half of the real set covered
    real = np.concatenate([gaussian(20, 2, 1), gaussian(20, 2, 2) + 100.0])
    assert precision_recall(real, real[:20]) == (1.0, 0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros((5, 2)), np.zeros((5, 3))), r"Expected arguments `real_features` and `fake_features` to have the same width d"),
        ((np.zeros((1, 2)), np.zeros((5, 2))), r"Expected argument `real_features` to be a finite \[N >= 2, d\] array but got shape \(1, 2\)"),
        ((np.zeros((5, 2)), np.full((5, 2), np.nan)), r"Expected argument `fake_features` to be a finite .* with non-finite values"),
        ((np.zeros((5, 2)), np.zeros((5, 2)), 5), r"Expected argument `k` to be an int in \[1, 4\] .* but got 5"),
        ((np.zeros((5, 2)), np.zeros((5, 2)), 0), r"Expected argument `k` to be an int in \[1, 4\] .* but got 0"),
    ],
)  # fmt: skip
def test_precision_recall_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        precision_recall(*args)


# --- feature spaces ----------------------------------------------------------------------------------------------------


def test_pixel_space_refuses_large_images():
    images = torch.rand(4, 3, 96, 96)
    with pytest.raises(
        ValueError, match=r"Expected images of at most 64x64 pixels for the 'pixels' space but got 96x96"
    ):
        quality_metrics(images, images, spaces=("pixels",))
    with pytest.raises(ValueError, match=r"at most 64x64 pixels for the 'pixels' space but got 96x65"):
        PixelFeatures()(torch.rand(2, 3, 96, 65))


def test_pixel_space_averages_each_channel_to_16x16():
    images = torch.rand(3, 3, 32, 32)
    expected = images.reshape(3, 3, 16, 2, 16, 2).mean(dim=(3, 5)).flatten(1).double()
    assert torch.allclose(PixelFeatures()(images), expected, atol=1e-6)
    assert PixelFeatures()(torch.rand(2, 3, 8, 8)).shape == (2, 192)  # smaller images keep their pixels


def test_inception_without_weights_says_how_to_provide_them(tmp_path):
    large = torch.rand(4, 3, 96, 96)
    with pytest.raises(ValueError, match=r"Expected argument `inception_weights` to be a local file with the FID "
                       r"InceptionV3 weights .* but got None; kldb never downloads them: fetch https://"):  # fmt: skip
        quality_metrics(large, large, spaces=("independent",))  # "auto" picks InceptionV3 above 64x64
    with pytest.raises(
        FileNotFoundError, match=r"`inception_weights` .* but got '/nonexistent/w.pth' \(no such file\)"
    ):
        quality_metrics(large, large, spaces=("independent",), inception_weights="/nonexistent/w.pth")
    not_tensors = tmp_path / "weights.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, not_tensors)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"Expected argument `inception_weights` to be a file of tensors"):
        InceptionFeatures(not_tensors)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"spaces": ("pixels", "pixels")}, ValueError, r"Expected argument `spaces` to be a non-empty sequence of distinct names"),
        ({"spaces": "pixels"}, ValueError, r"Expected argument `spaces` to be a non-empty sequence"),
        ({"spaces": ("inception",)}, ValueError, r"Expected argument `spaces` .* from \['classifier', 'independent', 'pixels'\] but got \('inception',\)"),
        ({"spaces": ("classifier",)}, ValueError, r"Expected argument `classifier` \(the audited classifier\) with 'classifier' in `spaces` but got None"),
        ({"spaces": ("independent",), "independent": "vgg"}, ValueError, r"Expected argument `independent` to be 'auto', 'feature_net', 'inception' or a torch.nn.Module but got 'vgg'"),
        ({"spaces": {"mine": "not a module"}}, TypeError, r"Expected argument `spaces` as a mapping to map names to torch.nn.Module"),
    ],
)  # fmt: skip
def test_quality_metrics_refuses_bad_spaces(kwargs, error, message):
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(error, match=message):
        quality_metrics(images, images, **kwargs)


@pytest.mark.parametrize(
    ("real", "fake", "message"),
    [
        (torch.rand(1, 3, 8, 8), torch.rand(4, 3, 8, 8), r"Expected argument `real_images` to be a \[N >= 2, 3, H, W\] tensor in \[0, 1\] but got \(1, 3, 8, 8\)"),
        (torch.rand(4, 3, 8, 8), np.zeros((4, 3, 8, 8)), r"Expected argument `fake_images` .* but got ndarray"),
        (torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 16), r"the same height and width but got \(8, 8\) and \(8, 16\)"),
    ],
)  # fmt: skip
def test_quality_metrics_refuses_bad_images(real, fake, message):
    with pytest.raises(ValueError, match=message):
        quality_metrics(real, fake, spaces=("pixels",))


# --- images and run folders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """Real threes and eights of the test split (the reference) and other image sets from the training split."""
    test_images, test_labels = load_digits_split("test")
    train_images, train_labels = load_digits_split("train")
    return {
        "reference": test_images[torch.isin(test_labels, torch.tensor([3, 8]))],
        "threes_and_eights": train_images[torch.isin(train_labels, torch.tensor([3, 8]))],  # another real sample
        "threes": train_images[train_labels == 3],  # half of C dropped
        "all_digits": train_images[:300],  # mostly other classes
        "noise": torch.rand(100, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    }


def test_quality_metrics_in_three_spaces_rank_real_digits_above_dropped_modes_other_classes_and_noise(digits):
    classifier = as_image_classifier(*tiny_classifier(num_labels=10))
    results = {
        name: quality_metrics(digits["reference"], images, classifier=classifier, kid_subset_size=50)
        for name, images in digits.items()
        if name != "reference"
    }
    same = results["threes_and_eights"]
    assert list(same["spaces"]) == ["classifier", "independent", "pixels"]
    assert (same["n_real"], same["n_fake"], same["k"], same["kid_seed"]) == (72, 249, 3, 0)
    assert same["spaces"]["independent"]["num_features"] == 64  # the digits feature net ("auto" for 32x32 images)
    for space in same["spaces"]:
        assert same["spaces"][space]["kid_subset_size"] == 50
        assert same["spaces"][space]["fid"] < results["threes"]["spaces"][space]["fid"], space
        for worse in ("threes", "all_digits", "noise"):
            assert same["spaces"][space]["kid_mean"] < results[worse]["spaces"][space]["kid_mean"], (space, worse)
        assert results["all_digits"]["spaces"][space]["fid"] < results["noise"]["spaces"][space]["fid"], space
    independent = {name: result["spaces"]["independent"] for name, result in results.items()}
    assert independent["threes_and_eights"]["precision"] > 0.75 and independent["threes_and_eights"]["recall"] > 0.75
    # a dropped mode costs recall, not precision; other classes cost precision; noise is nowhere near
    assert independent["threes"]["precision"] > 0.75 and independent["threes"]["recall"] < 0.6
    assert independent["all_digits"]["precision"] < 0.6
    assert (independent["noise"]["precision"], independent["noise"]["recall"]) == (0.0, 0.0)


def test_quality_metrics_with_own_modules_equals_feature_quality_of_their_features(digits):
    from kldb.digits.feature_net import load_feature_net

    real, fake = digits["reference"], digits["threes_and_eights"]
    net = load_feature_net()
    result = quality_metrics(real, fake, spaces={"mine": net}, kid_subsets=5, kid_subset_size=40, seed=3)
    with torch.no_grad():
        expected = feature_quality(net(real), net(fake), kid_subsets=5, kid_subset_size=40, seed=3)
    assert result["spaces"]["mine"] == pytest.approx(expected, rel=1e-9)


def test_run_quality_matches_quality_metrics_per_setting(tmp_path):
    from kldb.report import reference_images
    from kldb.runfolder import iter_settings, load_run_images, read_run

    records = write_run(tmp_path / "run", seeds=6)
    classifier = as_image_classifier(*tiny_classifier(num_labels=10))
    result = run_quality(tmp_path / "run", classifier=classifier, kid_subsets=4, reference_limit=40)
    assert result["spaces"] == ["classifier", "independent", "pixels"] and result["reference"] == "digits"
    groups = iter_settings(read_run(tmp_path / "run"))
    assert (
        [row["setting"] for row in result["settings"]]
        == list(groups)
        == list(dict.fromkeys(r["setting"] for r in records))
    )
    real = reference_images("digits", (3, 8), LABELS, (32, 32), 40)
    for row in result["settings"][:2]:
        assert (row["n"], row["n_reference"], row["class_indices"]) == (6, 40, [3, 8])
        fake = load_run_images(tmp_path / "run", groups[row["setting"]])
        expected = quality_metrics(real, fake, classifier=classifier, independent="feature_net", kid_subsets=4)
        for space in result["spaces"]:
            assert row["quality"][space] == pytest.approx(expected["spaces"][space], rel=1e-9), space


def test_run_quality_skips_settings_with_too_few_images(tmp_path):
    write_run(tmp_path / "run", seeds=3)
    result = run_quality(tmp_path / "run", spaces=("pixels",), k=3)
    assert all(row["quality"] is None and row["n"] == 3 for row in result["settings"])
