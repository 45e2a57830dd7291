"""The report renders from a small stored manifest; Table 1's numbers are the manifest's."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics

import numpy as np
import PIL.Image
import pytest
import scipy.stats
from sweep_fixtures import ALPHAS, BETAS, write_run

from kldb import cli, report
from kldb.report import run_metrics, setting_metrics, table1, write_report
from kldb.runfolder import ImageRecord


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
    # rows without bootstrap intervals (made elsewhere): the interval fields are there, and None
    for row in (first, second):
        assert row["median_kldb_best_low"] is row["relative_kldb_change_high"] is row["n_paired"] is None


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


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap intervals in the report (references: scipy.stats.bootstrap called here, a paired bootstrap in numpy)
# ----------------------------------------------------------------------------------------------------------------------


def scipy_median_interval(values, resamples, seed):
    result = scipy.stats.bootstrap(
        (np.asarray(values),), np.median, n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed)
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def numpy_paired_change_interval(guided_by_seed, baseline_by_seed, resamples, seed):
    seeds = sorted(set(guided_by_seed) & set(baseline_by_seed))
    guided = np.array([guided_by_seed[s] for s in seeds])
    baseline = np.array([baseline_by_seed[s] for s in seeds])
    indices = np.random.default_rng(seed).integers(0, len(seeds), size=(resamples, len(seeds)))
    changes = np.median(guided[indices], axis=1) / np.median(baseline[indices], axis=1) - 1.0
    return tuple(np.quantile(changes, [0.025, 0.975]))


def of_setting(records, alpha, beta):
    return [r for r in records if r["alpha"] == alpha and r["beta"] == beta]  # manifest order, as the report reads it


def test_table1_intervals_match_independent_bootstraps(stored_run):
    run, records, metrics = stored_run
    result = write_report(run, metrics=metrics, bootstrap_resamples=600, bootstrap_seed=9)
    written = json.loads((run / "report" / "table1.json").read_text())
    recorded = {k: written["bootstrap"][k] for k in ("resamples", "seed", "confidence", "method")}
    assert recorded == {"resamples": 600, "seed": 9, "confidence": 0.95, "method": "percentile"}
    assert json.loads((run / "report" / "metrics.json").read_text())["bootstrap"] == written["bootstrap"]
    assert written["rows"] == json.loads(json.dumps(result["table"]))
    for row in written["rows"]:
        for which, alpha in (("baseline", 0.0), ("best", row["alpha_best"])):
            group = of_setting(records, alpha, row["beta"])
            for name in ("kldb", "entropy"):
                expected = scipy_median_interval([r[name] for r in group], 600, 9)
                got = (row[f"median_{name}_{which}_low"], row[f"median_{name}_{which}_high"])
                assert got == pytest.approx(expected, abs=1e-12)
                assert got[0] <= row[f"median_{name}_{which}"] <= got[1]
        best, baseline = of_setting(records, row["alpha_best"], row["beta"]), of_setting(records, 0.0, row["beta"])
        for name in ("kldb", "entropy"):
            expected = numpy_paired_change_interval(
                {r["seed"]: r[name] for r in best}, {r["seed"]: r[name] for r in baseline}, 600, 9
            )
            got = (row[f"relative_{name}_change_low"], row[f"relative_{name}_change_high"])
            assert got == pytest.approx(expected, abs=1e-12)
        assert row["relative_entropy_change"] == pytest.approx(
            statistics.median(r["entropy"] for r in best) / statistics.median(r["entropy"] for r in baseline) - 1
        )
        assert row["n_paired"] == 5
    # the FID values of the given metrics are kept when the intervals are recomputed for another bootstrap
    assert [r["fid"] for r in result["settings"]] == [50.0 + i for i in range(len(result["settings"]))]
    # CSV: a _low and a _high column per interval, with the JSON's numbers
    with open(run / "report" / "table1.csv", newline="") as f:
        reader = csv.DictReader(f)
        csv_rows = list(reader)
    bounded = ("median_kldb_baseline", "median_kldb_best", "median_entropy_baseline", "median_entropy_best",
               "relative_kldb_change", "relative_entropy_change")  # fmt: skip
    interval_columns = [f"{k}_{end}" for k in bounded for end in ("low", "high")]
    assert {*interval_columns, "relative_entropy_change", "n_paired"} <= set(reader.fieldnames)
    for csv_row, row in zip(csv_rows, written["rows"]):
        assert [float(csv_row[c]) for c in interval_columns] == pytest.approx([row[c] for c in interval_columns])
    # Markdown: each median and the change with its bracket, and the note that says how they were made
    markdown = (run / "report" / "table1.md").read_text()
    for row in written["rows"]:
        low, high = row["median_kldb_best_low"], row["median_kldb_best_high"]
        assert f"{row['median_kldb_best']:.4f} [{low:.4f}, {high:.4f}]" in markdown
        low, high = row["relative_kldb_change_low"], row["relative_kldb_change_high"]
        assert f"{100 * row['relative_kldb_change']:+.1f}% [{100 * low:+.1f}%, {100 * high:+.1f}%]" in markdown
    assert "Brackets: 95% bootstrap intervals (percentile, 600 resamples, seed 9)" in markdown


def test_setting_rows_carry_intervals_and_paired_changes(stored_run):
    run, records, metrics = stored_run
    rows = {(r["alpha"], r["beta"]): r for r in metrics["settings"]}  # computed with the default bootstrap
    assert metrics["bootstrap"]["resamples"] == 2000 and metrics["bootstrap"]["seed"] == 0
    for (alpha, beta), row in rows.items():
        group = of_setting(records, alpha, beta)
        expected = scipy_median_interval([r["kldb"] for r in group], 2000, 0)
        assert (row["median_kldb_low"], row["median_kldb_high"]) == pytest.approx(expected, abs=1e-12)
        if alpha == 0.0:
            assert row["relative_kldb_change"] is None and row["relative_kldb_change_low"] is None
            assert row["n_paired"] is None
            continue
        baseline = rows[(0.0, beta)]
        change = (row["median_kldb"] - baseline["median_kldb"]) / baseline["median_kldb"]
        assert row["relative_kldb_change"] == pytest.approx(change, abs=1e-12)
        expected = numpy_paired_change_interval(
            {r["seed"]: r["kldb"] for r in group},
            {r["seed"]: r["kldb"] for r in of_setting(records, 0.0, beta)},
            2000,
            0,
        )
        assert (row["relative_kldb_change_low"], row["relative_kldb_change_high"]) == pytest.approx(
            expected, abs=1e-12
        )
    write_report(run, metrics=metrics, per_setting=1)
    with open(run / "report" / "settings.csv", newline="") as f:
        header = csv.DictReader(f).fieldnames
    for column in ("median_kldb_low", "median_kldb_high", "median_entropy_low", "median_entropy_high",
                   "relative_kldb_change", "relative_kldb_change_low", "relative_kldb_change_high", "n_paired"):  # fmt: skip
        assert column in header


def test_the_pairing_follows_the_seeds_of_the_records(stored_run):
    _, records, _ = stored_run
    objects = [ImageRecord.from_json(r) for r in records]
    rows = setting_metrics(objects)
    # the records of one setting in reverse order: the paired intervals stay (pairs by seed, not by position)
    guided = "three+eight_alpha0.5_beta6.0"
    reordered = [r for r in objects if r.setting != guided] + [r for r in objects if r.setting == guided][::-1]
    again = {r["setting"]: r for r in setting_metrics(reordered)}
    for row in rows:
        keys = ("relative_kldb_change_low", "relative_kldb_change_high", "n_paired")
        assert [again[row["setting"]][k] for k in keys] == [row[k] for k in keys]
    # the same images with their seeds permuted in the prompt-only setting: other pairs, another interval
    baseline = [r for r in objects if r.setting == "three+eight_alpha0.0_beta6.0"]
    permuted = {id(r): s for r, s in zip(baseline, [2, 0, 4, 1, 3])}
    moved = [dataclasses.replace(r, seed=permuted[id(r)]) if id(r) in permuted else r for r in objects]
    changed = {r["setting"]: r for r in setting_metrics(moved)}[guided]
    original = next(r for r in rows if r["setting"] == guided)
    assert changed["relative_kldb_change"] == pytest.approx(original["relative_kldb_change"])  # medians stay
    assert (changed["relative_kldb_change_low"], changed["relative_kldb_change_high"]) != (
        original["relative_kldb_change_low"],
        original["relative_kldb_change_high"],
    )


def test_a_rerun_gives_identical_numbers(tmp_path):
    write_run(tmp_path / "run", seeds=5)
    bootstrap = {"bootstrap_resamples": 50}  # with 2000, five images' interval is the same for most seeds
    first = write_report(
        tmp_path / "run", out_dir=tmp_path / "a", reference=None, per_setting=1, **bootstrap, bootstrap_seed=4
    )
    second = write_report(
        tmp_path / "run", out_dir=tmp_path / "b", reference=None, per_setting=1, **bootstrap, bootstrap_seed=4
    )
    for name in ("table1.json", "table1.csv", "table1.md", "settings.csv", "metrics.json", "model_card_section.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first["table"] == second["table"]
    other = write_report(
        tmp_path / "run", out_dir=tmp_path / "c", reference=None, per_setting=1, **bootstrap, bootstrap_seed=5
    )
    bounds = [k for k in other["settings"][0] if k.endswith(("_low", "_high"))]
    assert [[r[k] for k in bounds] for r in other["settings"]] != [[r[k] for k in bounds] for r in first["settings"]]
    assert [r["median_kldb_best"] for r in other["table"]] == [r["median_kldb_best"] for r in first["table"]]


def test_given_metrics_keep_their_recorded_bootstrap(stored_run):
    run, _, metrics = stored_run
    metrics = run_metrics(run, reference=None, bootstrap_resamples=300, bootstrap_seed=3)
    metrics["settings"][2]["median_kldb_low"] = 0.0123456  # a mark: the given rows are used as they are
    result = write_report(run, metrics=metrics, per_setting=1)
    assert (result["bootstrap"]["resamples"], result["bootstrap"]["seed"]) == (300, 3)
    assert result["settings"][2]["median_kldb_low"] == 0.0123456
    # metrics without a bootstrap record (an older metrics.json): the intervals are computed from the records
    old = {k: v for k, v in metrics.items() if k != "bootstrap"}
    old["settings"] = [{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))} for r in metrics["settings"]]
    result = write_report(run, metrics=old, per_setting=1)
    assert result["bootstrap"]["resamples"] == 2000 and result["settings"][2]["median_kldb_low"] != 0.0123456
    assert all(row["median_kldb_best_low"] is not None for row in result["table"])


def test_plot_draws_bootstrap_bars_and_the_iqr_band(stored_run, monkeypatch):
    from matplotlib.collections import PolyCollection
    from matplotlib.container import ErrorbarContainer

    _, _, metrics = stored_run
    figures = []
    monkeypatch.setattr(report, "_figure_bytes", lambda figure: figures.append(figure) or b"")
    rows = metrics["settings"]
    report.plot_median_kldb_vs_alpha(rows)
    (ax,) = figures[0].axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == len(BETAS)
    for container, beta in zip(bars, BETAS):
        spans = sorted((min(s[:, 1]), max(s[:, 1])) for s in container.lines[2][0].get_segments())
        expected = sorted((r["median_kldb_low"], r["median_kldb_high"]) for r in rows if r["beta"] == beta)
        assert np.array(spans) == pytest.approx(np.array(expected))
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) >= len(BETAS)  # one IQR band per beta
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "bars: 95% bootstrap CI of the median" in labels and "band: IQR of the images" in labels
    # rows without intervals (computed elsewhere) still plot, without bars
    report.plot_median_kldb_vs_alpha([{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))} for r in rows])
    assert not [c for c in figures[1].axes[0].containers if isinstance(c, ErrorbarContainer)]


def test_model_card_and_report_quote_the_intervals(stored_run):
    run, _, metrics = stored_run
    result = write_report(run, metrics=metrics, per_setting=1)
    card = (run / "report" / "model_card_section.md").read_text()
    page = (run / "report" / "report.md").read_text()
    for row in result["table"]:
        low, high = row["relative_kldb_change_low"], row["relative_kldb_change_high"]
        assert f"(95% interval {100 * low:+.1f}% to {100 * high:+.1f}%, paired over 5 seeds)" in card
        before = f"{row['median_kldb_baseline']:.4f} [{row['median_kldb_baseline_low']:.4f}, "
        assert f"changed the median KLDB from {before}" in card
    assert "Brackets: 95% bootstrap intervals (percentile, 2000 resamples, seed 0)" in card
    assert "| setting | n | median KLDB [CI] | KLDB IQR |" in page
    for row in result["settings"]:
        low, high = row["median_entropy_low"], row["median_entropy_high"]
        assert f"| {row['median_entropy']:.4f} [{low:.4f}, {high:.4f}] | {row['entropy_iqr']:.4f} |" in page


def test_report_bootstrap_argument_errors(stored_run):
    run, records, metrics = stored_run
    with pytest.raises(ValueError, match="Expected argument `bootstrap_resamples` to be a positive integer but got 0"):
        write_report(run, metrics=metrics, bootstrap_resamples=0)
    with pytest.raises(
        ValueError, match=r"Expected argument `bootstrap_confidence` to be a number in \(0, 1\) but got 1.5"
    ):
        write_report(run, metrics=metrics, bootstrap_confidence=1.5)
    with pytest.raises(ValueError, match="Expected argument `bootstrap_seed` to be an integer >= 0 but got -2"):
        run_metrics(run, reference=None, bootstrap_seed=-2)
    with pytest.raises(
        ValueError, match="Expected argument `bootstrap_resamples` to be a positive integer but got -1"
    ):
        setting_metrics([ImageRecord.from_json(r) for r in records], bootstrap_resamples=-1)
    assert not (run / "report").exists()


def test_cli_report_bootstrap_options(tmp_path, capsys):
    write_run(tmp_path / "run", seeds=4)
    argv = ["report", str(tmp_path / "run"), "--reference", "none", "--per-setting", "1"]
    assert cli.main([*argv, "--bootstrap-resamples", "300", "--bootstrap-seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "Brackets: 95% bootstrap intervals (percentile, 300 resamples, seed 5)" in out
    recorded = json.loads((tmp_path / "run" / "report" / "table1.json").read_text())["bootstrap"]
    assert (recorded["resamples"], recorded["seed"]) == (300, 5)
    assert json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())["bootstrap"] == recorded
    for flag, value, message in (
        ("--bootstrap-resamples", "0", "Expected argument `--bootstrap-resamples` to be a positive integer but got 0"),
        ("--bootstrap-seed", "-1", "Expected argument `--bootstrap-seed` to be an integer >= 0 but got -1"),
    ):
        assert cli.main([*argv, "--out", str(tmp_path / "bad"), flag, value]) == cli.EXIT_USAGE
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
