"""Metrics against independent references: statistics and scipy for medians and IQR, closed-form FID cases."""

from __future__ import annotations

import statistics
import sys

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import scipy.stats
import torch
import torchvision
from sweep_fixtures import LABELS, write_run

from kldb import metrics, report
from kldb.metrics import ClassifierFeatures, frechet_distance, summary_statistics
from kldb.report import setting_metrics
from kldb.runfolder import ImageRecord
from kldb.testing import tiny_classifier
from pipeline_kldb_boundary import ImageClassifier, as_image_classifier


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_summary_statistics_against_scipy_and_statistics(n):
    values = np.random.default_rng(n).gamma(2.0, size=n).tolist()
    stats = summary_statistics(values)
    assert stats["median"] == pytest.approx(statistics.median(values), abs=1e-12)
    assert stats["iqr"] == pytest.approx(scipy.stats.iqr(values), abs=1e-12)
    if n > 1:
        q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive")
        assert (stats["q25"], stats["q75"]) == pytest.approx((q25, q75), abs=1e-12)


@pytest.mark.parametrize("values", [[], [1.0, float("nan")], [[1.0]]])
def test_summary_statistics_refuses_bad_values(values):
    with pytest.raises(
        ValueError, match="Expected argument `values` to be a non-empty 1-d sequence of finite numbers"
    ):
        summary_statistics(values)


def test_setting_metrics_match_the_manifest(tmp_path):
    records = write_run(tmp_path / "run")
    rows = setting_metrics([ImageRecord.from_json(r) for r in records])
    assert [(r["beta"], r["alpha"]) for r in rows] == [(b, a) for b in (3.0, 6.0) for a in (0.0, 0.1, 0.5)]
    for row in rows:
        group = [r for r in records if r["setting"] == row["setting"]]
        kldb = [r["kldb"] for r in group]
        ent = [r["entropy"] for r in group]
        assert row["n"] == len(group) == 6
        assert row["median_kldb"] == pytest.approx(statistics.median(kldb), abs=1e-12)
        assert row["kldb_iqr"] == pytest.approx(scipy.stats.iqr(kldb), abs=1e-12)
        assert row["median_entropy"] == pytest.approx(statistics.median(ent), abs=1e-12)
        assert row["entropy_iqr"] == pytest.approx(scipy.stats.iqr(ent), abs=1e-12)
        # C = {3, 8} are the top two iff both beat every other recorded probability
        exact = [
            min(r["class_probabilities"])
            > max(p for c, p in zip(r["top_classes"], r["top_probabilities"]) if c not in (3, 8))
            for r in group
        ]
        assert row["top_set_share"] == pytest.approx(sum(exact) / len(exact))
        margins = [abs(r["class_probabilities"][0] - r["class_probabilities"][1]) for r in group]
        assert row["mean_class_margin"] == pytest.approx(float(np.mean(margins)), abs=1e-12)


def test_images_without_finite_scores_are_left_out(tmp_path):
    records = write_run(tmp_path / "run", seeds=5)[:5]
    records[0] = {**records[0], "kldb": None, "entropy": None}
    row = setting_metrics([ImageRecord.from_json(r) for r in records])[0]
    assert (row["n"], row["n_scored"]) == (5, 4)
    assert row["median_kldb"] == pytest.approx(statistics.median(r["kldb"] for r in records[1:]))


def test_top_set_and_margin_by_hand():
    record = {"class_indices": [2, 0], "top_classes": [0, 2, 1], "class_probabilities": [0.3, 0.5]}
    assert metrics.top_set_is_classes(record["top_classes"], record["class_indices"]) is True
    assert metrics.class_margin(record["class_probabilities"]) == pytest.approx(0.2)
    assert metrics.top_set_is_classes([0, 1, 2], record["class_indices"]) is False
    assert metrics.class_margin([0.9]) is None
    with pytest.raises(ValueError, match=r"Expected the record's `top_classes` to hold at least \|C\| = 2 classes"):
        metrics.top_set_is_classes([0], record["class_indices"])


def gaussian_sample(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` points whose sample mean and (unbiased) sample covariance are exactly ``mean`` and ``cov``."""
    x = np.random.default_rng(seed).normal(size=(n, len(mean)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # sample covariance = I
    return x @ np.linalg.cholesky(cov).T + mean


def test_fid_of_identical_feature_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 16))
    assert abs(frechet_distance(features, features)) < 1e-8


def test_fid_of_two_gaussians_in_closed_form():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    d = 6
    mean_1, mean_2 = np.zeros(d), np.arange(d) / 2.0
    var_1, var_2 = np.linspace(0.5, 2.0, d), np.linspace(3.0, 0.2, d)
    a = gaussian_sample(mean_1, np.diag(var_1), 300, seed=1)
    b = gaussian_sample(mean_2, np.diag(var_2), 400, seed=2)
    expected = ((mean_1 - mean_2) ** 2).sum() + ((np.sqrt(var_1) - np.sqrt(var_2)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_of_two_gaussians_with_full_covariances():
    """General covariances, against the formula evaluated with scipy's matrix square root."""
    rng = np.random.default_rng(3)
    d = 5
    m1, m2 = rng.normal(size=(2, 5)) @ rng.normal(size=(5, d)) / 3.0, rng.normal(size=(7, d))
    cov_1, cov_2 = m1.T @ m1 + np.eye(d), m2.T @ m2 / 7.0 + 0.5 * np.eye(d)
    mean_1, mean_2 = rng.normal(size=d), rng.normal(size=d)
    a, b = gaussian_sample(mean_1, cov_1, 250, seed=4), gaussian_sample(mean_2, cov_2, 250, seed=5)
    root = np.real(scipy.linalg.sqrtm(cov_1 @ cov_2))
    expected = ((mean_1 - mean_2) ** 2).sum() + np.trace(cov_1 + cov_2 - 2.0 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_refuses_mismatched_features():
    with pytest.raises(ValueError, match=r"the same d and N >= 2 but got \(4, 3\) and \(4, 2\)"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_classifier_features_are_the_transformers_resnet_pooler_output():
    model, processor = tiny_classifier()
    adapter = as_image_classifier(model, processor)
    features = ClassifierFeatures(adapter, (32, 32))
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.resnet(adapter.preprocess(images)).pooler_output.flatten(1)
    assert features.num_features == 16
    torch.testing.assert_close(features(images), expected.double())
    assert not model.classifier[-1]._forward_hooks, "the hook lives only during a feature pass"


def test_classifier_features_of_a_torchvision_resnet_are_the_input_of_fc():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    features = ClassifierFeatures(ImageClassifier(model), (32, 32))
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        expected = torch.flatten(model.avgpool(x), 1)
    torch.testing.assert_close(features(images), expected.double())


def test_classifier_without_linear_head_needs_a_layer():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match=r"to end in a torch\.nn\.Linear head but it has none; pass `layer=`"):
        ClassifierFeatures(ImageClassifier(conv), (8, 8))
    features = ClassifierFeatures(ImageClassifier(conv), (8, 8), layer=conv[2])
    assert features.num_features == 2


def test_fid_on_images_with_classifier_features():
    model, processor = tiny_classifier()
    features = ClassifierFeatures(as_image_classifier(model, processor), (32, 32))
    generator = torch.Generator().manual_seed(1)
    real = torch.rand(40, 3, 32, 32, generator=generator)
    assert abs(metrics.fid(real, real, feature=features)) < 1e-6
    darker = real * 0.3
    assert metrics.fid(real, darker, feature=features) > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "Expected exactly one of the arguments `feature` and `inception_weights` but got neither"),
        ({"inception_weights": "/nonexistent/pt_inception.pth"}, FileNotFoundError, "Expected argument `inception_weights` to be a local file"),
    ],
)  # fmt: skip
def test_fid_argument_errors(kwargs, error, match):
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(error, match=match):
        metrics.fid(images, images, **kwargs)


def test_fid_needs_image_batches():
    model, processor = tiny_classifier()
    features = ClassifierFeatures(as_image_classifier(model, processor), (32, 32))
    with pytest.raises(ValueError, match=r"Expected argument `fake_images` to be a \[N >= 2, 3, H, W\] tensor"):
        metrics.fid(torch.rand(4, 3, 32, 32), torch.rand(1, 3, 32, 32), feature=features)


def test_inception_needs_torch_fidelity_or_says_so(tmp_path, monkeypatch):
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if it were not installed: `import` raises
    with pytest.raises(ImportError, match=r"FID on InceptionV3 features needs torch-fidelity: `pip install \"kldb-boundary\[audit\]\"`"):
        metrics.inception_fid_metric(weights)


def test_run_metrics_with_a_reference_folder(tmp_path):
    """FID per setting on a stored run, the tiny classifier's features, a folder with one subfolder per class."""
    records = write_run(tmp_path / "run", seeds=4)
    rng = np.random.default_rng(0)
    for name in ("three", "eight", "five"):
        for i in range(3):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            (tmp_path / "real" / name).mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(pixels).save(tmp_path / "real" / name / f"{i}.png")
    model, processor = tiny_classifier(num_labels=10)
    result = report.run_metrics(
        tmp_path / "run", reference=tmp_path / "real", classifier=as_image_classifier(model, processor)
    )
    assert result["fid_feature"] == "classifier"
    assert [row["setting"] for row in result["settings"]] == list(dict.fromkeys(r["setting"] for r in records))
    assert all(np.isfinite(row["fid"]) and row["fid"] >= -1e-9 for row in result["settings"])
    # the reference is the 6 images of "three" and "eight", not "five"
    reference = report.reference_images(tmp_path / "real", [3, 8], LABELS, (32, 32))
    assert reference.shape == (6, 3, 32, 32)


def test_run_metrics_errors(tmp_path):
    write_run(tmp_path / "run", seeds=2)
    with pytest.raises(
        ValueError, match=r"Expected argument `feature` to be one of \['classifier', 'inception'\] but got 'vgg'"
    ):
        report.run_metrics(tmp_path / "run", feature="vgg")
    with pytest.raises(FileNotFoundError, match="Expected argument `reference` to be 'digits' or a folder of images"):
        report.run_metrics(
            tmp_path / "run",
            reference=tmp_path / "nowhere",
            classifier=as_image_classifier(*tiny_classifier(num_labels=10)),
        )
    with pytest.raises(ValueError, match=r"Expected argument `inception_weights` \(a local file\)"):
        report.run_metrics(tmp_path / "run", feature="inception")
    result = report.run_metrics(tmp_path / "run", reference=None)
    assert all(row["fid"] is None for row in result["settings"])


def test_metrics_import_nothing_that_loads_models_or_reads_run_folders():
    """kldb.metrics is pure (numbers, arrays and tensors in, numbers out): it imports none of the loaders."""
    import subprocess
    import sys

    code = (
        "import sys, kldb.metrics\n"
        "print(sorted(m for m in sys.modules if m.startswith('kldb.') and m not in ('kldb.metrics', 'kldb.errors', "
        "'kldb.hub', 'kldb.io')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"  # no kldb.sweep, kldb.runfolder, kldb.loading, kldb.digits, ...
