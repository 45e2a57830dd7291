"""Comparing classifiers on the same boundary, against an independent numpy/scipy computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from kldb.compare import compare_run
from kldb.io import load_image
from kldb.runfolder import read_jsonl
from kldb.sweep import SweepConfig, run_sweep
from kldb.testing import tiny_classifier
from pipeline_kldb_boundary import as_image_classifier


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    run_sweep(
        SweepConfig(out, pipeline="kldb.testing:tiny_pipeline", class_subsets=[["three", "two"], ["zero", "one", "two"]], alphas=[0.0, 0.4],
                    betas=[3.0], seeds=list(range(4)), num_inference_steps=4, kldb_guidance_interval=2, batch_size=4),
        progress=False,
    )  # fmt: skip
    return out


def test_second_classifier_against_numpy_and_scipy(tiny_run, tmp_path):
    model, processor = tiny_classifier(seed=1)
    result = compare_run(tiny_run, as_image_classifier(model, processor), out_dir=tmp_path / "c")
    records = read_jsonl(tiny_run / "manifest.jsonl")
    adapter = as_image_classifier(model, processor)
    with torch.no_grad():
        logits = adapter(torch.stack([load_image(tiny_run / r["file"]) for r in records])).double().numpy()
    log_p = scipy.special.log_softmax(logits, axis=1)
    kldb_b = np.array(
        [-np.log(len(r["class_indices"])) - log_p[i, r["class_indices"]].mean() for i, r in enumerate(records)]
    )
    entropy_b = -(np.exp(log_p) * log_p).sum(axis=1)
    kldb_a = np.array([r["kldb"] for r in records])
    overall = result["overall"]
    assert overall["n"] == len(records) == 16
    assert overall["median_kldb_b"] == pytest.approx(np.median(kldb_b), abs=1e-5)
    assert overall["median_entropy_b"] == pytest.approx(np.median(entropy_b), abs=1e-5)
    assert overall["kldb_spearman"] == pytest.approx(scipy.stats.spearmanr(kldb_a, kldb_b).statistic, abs=1e-9)
    top_b = [set(np.argsort(-logits[i])[: len(r["class_indices"])].tolist()) for i, r in enumerate(records)]
    same = [top_b[i] == set(r["top_classes"][: len(r["class_indices"])]) for i, r in enumerate(records)]
    assert overall["top_set_agreement"] == pytest.approx(np.mean(same))
    assert overall["prediction_agreement"] == pytest.approx(
        np.mean(logits.argmax(1) == [r["predicted_class"] for r in records])
    )
    assert [s["setting"] for s in result["settings"]] == list(dict.fromkeys(r["setting"] for r in records))
    assert (tmp_path / "c" / "per_image.csv").read_text().count("\n") == 17
    assert "| **all** | 16 |" in (tmp_path / "c" / "summary.md").read_text()


def test_the_same_classifier_agrees_with_itself(tiny_run, tmp_path):
    result = compare_run(tiny_run, "kldb.testing:tiny_classifier", out_dir=tmp_path / "c")
    overall = result["overall"]
    assert overall["kldb_spearman"] > 0.99  # PNG quantisation only
    assert overall["median_kldb_b"] == pytest.approx(overall["median_kldb_a"], abs=2e-3)
    assert overall["top_set_agreement"] == 1.0 and overall["a_top_set_share"] == overall["b_top_set_share"]


def test_compare_argument_errors(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="Expected argument `batch_size` to be a positive integer but got 0"):
        compare_run(tiny_run, "kldb.testing:tiny_classifier", batch_size=0)
    with pytest.raises(
        ValueError, match="Expected the second classifier to have the run's 4 classes but it returns 10"
    ):
        compare_run(tiny_run, as_image_classifier(*tiny_classifier(num_labels=10)), out_dir=tmp_path / "c")
