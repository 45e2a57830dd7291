"""The report renders from a small stored manifest; Table 1's numbers are the manifest's."""

from __future__ import annotations

import csv
import json
import statistics

import PIL.Image
import pytest
from sweep_fixtures import ALPHAS, BETAS, write_run

from kldb.report import run_metrics, table1, write_report


@pytest.fixture
def stored_run(tmp_path):
    records = write_run(tmp_path / "run", seeds=5)
    metrics = run_metrics(tmp_path / "run", reference=None)
    for i, row in enumerate(metrics["settings"]):  # FID values as a reference set would give them
        row["fid"] = 50.0 + i
    return tmp_path / "run", records, metrics


def test_table1_numbers_come_from_the_manifest(stored_run):
    run, records, metrics = stored_run
    result = write_report(run, metrics=metrics)
    table = json.loads((run / "report" / "table1.json").read_text())["rows"]
    assert table == json.loads(json.dumps(result["table"]))
    assert [row["beta"] for row in table] == list(BETAS)
    fid = {(r["beta"], r["alpha"]): r["fid"] for r in metrics["settings"]}
    for row in table:

        def of(alpha, beta=row["beta"]):
            return [r for r in records if r["alpha"] == alpha and r["beta"] == beta]

        medians = {a: statistics.median(r["kldb"] for r in of(a)) for a in ALPHAS}
        best = min((a for a in ALPHAS if a > 0), key=lambda a: medians[a])
        assert row["alpha_baseline"] == 0.0 and row["alpha_best"] == best
        assert row["median_kldb_baseline"] == pytest.approx(medians[0.0], abs=1e-12)
        assert row["median_kldb_best"] == pytest.approx(medians[best], abs=1e-12)
        assert row["median_entropy_best"] == pytest.approx(statistics.median(r["entropy"] for r in of(best)))
        assert row["relative_kldb_change"] == pytest.approx((medians[best] - medians[0.0]) / medians[0.0])
        assert (row["fid_baseline"], row["fid_best"]) == (fid[(row["beta"], 0.0)], fid[(row["beta"], best)])
        assert row["n_baseline"] == row["n_best"] == 5
    # the CSV says the same
    with open(run / "report" / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["median_kldb_best"]) for r in rows] == pytest.approx([r["median_kldb_best"] for r in table])
    assert [r["classes"] for r in rows] == ["three+eight", "three+eight"]
    # and the Markdown, in the paper's layout: one line for alpha = 0, one for the best alpha
    markdown = (run / "report" / "table1.md").read_text()
    assert "| classes | β | α | FID ↓ | M(KLDB) ↓ | M(Entropy) ↑ | KLDB change |" in markdown
    for row in table:
        assert (
            f"{row['median_kldb_best']:.4f}" in markdown and f"{100 * row['relative_kldb_change']:+.1f}%" in markdown
        )


def test_plots_grid_and_model_card(stored_run):
    run, records, metrics = stored_run
    files = write_report(run, metrics=metrics, per_setting=2)["files"]
    for name in ("kldb_distribution.png", "median_kldb_vs_alpha.png", "ambiguous_images.png"):
        with PIL.Image.open(files[name]) as image:
            image.load()
            assert image.width > 200 and image.height > 150
    with PIL.Image.open(files["ambiguous_images.png"]) as grid:
        assert grid.height > 6 * 96  # six settings, one row each
    card = (run / "report" / "model_card_section.md").read_text()
    for heading in ("### Evaluation data", "### Quantitative analyses", "### Boundary images", "### Caveats"):
        assert heading in card
    lowest = min(records, key=lambda r: r["kldb"])
    assert f"`{lowest['file']}`" in card and lowest["predicted_label"] in card
    report = (run / "report" / "report.md").read_text()
    assert "![KLDB distribution](kldb_distribution.png)" in report and "## Table 1" in report
    assert not list((run / "report").glob(".*.tmp"))


def test_table1_without_baseline_or_guided_settings():
    rows = [
        {
            "classes": ["a", "b"],
            "beta": 3.0,
            "alpha": 0.1,
            "median_kldb": 1.0,
            "median_entropy": 0.5,
            "fid": 1,
            "n": 2,
        },
        {
            "classes": ["a", "b"],
            "beta": 6.0,
            "alpha": 0.0,
            "median_kldb": 2.0,
            "median_entropy": 0.4,
            "fid": 2,
            "n": 2,
        },
    ]
    first, second = table1(rows)
    assert first["alpha_baseline"] is None and first["alpha_best"] == 0.1 and first["relative_kldb_change"] is None
    assert second["alpha_baseline"] == 0.0 and second["alpha_best"] is None and second["relative_kldb_change"] is None


def test_report_argument_errors(stored_run, tmp_path):
    run, _, metrics = stored_run
    with pytest.raises(ValueError, match="Expected argument `per_setting` to be a positive integer but got 0"):
        write_report(run, metrics=metrics, per_setting=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="Expected argument `run` to hold at least one manifest line"):
        write_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="Expected argument `run` to be a run folder or a manifest file"):
        write_report(tmp_path / "missing")
