"""The report with quality in three feature spaces and the validity of its images (issue 14, parts 2, 3 and 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sweep_fixtures import write_run
from test_validity import quadrant_oracle

from kldb import cli
from kldb.quality import run_quality
from kldb.report import MIN_VALID_SHARE, write_report
from kldb.validity import run_validity


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("science") / "run"
    write_run(out, seeds=8)
    return out


def _validity_with_shares(run, shares: dict[str, float]) -> dict:
    """A validity result (the shape of kldb.validity.run_validity) whose settings have the given valid shares."""
    result = run_validity(run, oracle=quadrant_oracle(), out_dir=run / "scratch")
    for row in result["settings"]:
        row["valid_share"] = shares[row["setting"]]
    return result


def test_validity_comes_into_rows_and_table1(run, tmp_path):
    result = run_validity(run, oracle=quadrant_oracle(), out_dir=tmp_path / "v")
    report = write_report(run, out_dir=tmp_path / "report", validity=result)
    judged = {r["setting"]: r for r in result["settings"]}
    for row in report["settings"]:
        assert row["valid_share"] == judged[row["setting"]]["valid_share"]
        assert row["off_manifold_share"] == judged[row["setting"]]["off_manifold_share"]
    rows = {(r["beta"], r["alpha"]): r for r in report["settings"]}
    for line in report["table"]:
        assert line["valid_share_baseline"] == rows[(line["beta"], 0.0)]["valid_share"]
        assert line["valid_share_best"] == rows[(line["beta"], line["alpha_best"])]["valid_share"]
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Validity: are the images still images of C?" in page
    csv_header = (tmp_path / "report" / "table1.csv").read_text().splitlines()[0].split(",")
    assert {"valid_share_baseline", "valid_share_best", "alpha_valid"} <= set(csv_header)


def test_the_best_alpha_that_keeps_validity_is_named_when_the_best_costs_it(run, tmp_path):
    # beta 3: the best alpha for KLDB gets a valid share of 0.5; beta 6: every guided alpha is valid
    base = write_report(run, out_dir=tmp_path / "plain")
    shares = {}
    for line in base["table"]:
        for row in base["settings"]:
            if row["beta"] != line["beta"]:
                continue
            costly = line["beta"] == 3.0 and row["alpha"] == line["alpha_best"]
            shares[row["setting"]] = 0.5 if costly else 0.95
    report = write_report(run, out_dir=tmp_path / "report", validity=_validity_with_shares(run, shares))
    by_beta = {line["beta"]: line for line in report["table"]}
    # by hand: among guided settings with valid share >= 0.9, the lowest median KLDB
    for beta, line in by_beta.items():
        guided = [r for r in base["settings"] if r["beta"] == beta and r["alpha"] > 0]
        ok = [r for r in guided if shares[r["setting"]] >= MIN_VALID_SHARE]
        expected = min(ok, key=lambda r: (r["median_kldb"], r["alpha"]))
        assert line["alpha_valid"] == expected["alpha"]
        assert line["median_kldb_valid"] == expected["median_kldb"]
    assert by_beta[6.0]["alpha_valid"] == by_beta[6.0]["alpha_best"]
    assert by_beta[3.0]["alpha_valid"] != by_beta[3.0]["alpha_best"]
    page = (tmp_path / "report" / "report.md").read_text()
    assert f"β 3: the best alpha for KLDB ({by_beta[3.0]['alpha_best']:g}) costs validity: 50.0 %" in page
    assert f"the best alpha that keeps at least 90 % valid is {by_beta[3.0]['alpha_valid']:g}" in page
    assert "β 6: the best alpha for KLDB" not in page


def test_kldb_validity_output_is_picked_up_by_the_report(run, tmp_path):
    out = tmp_path / "report"
    result = run_validity(run, oracle=quadrant_oracle(), out_dir=out)  # as `kldb validity RUN --out ...` leaves it
    report = write_report(run, out_dir=out)
    assert report["validity"]["overall"] == json.loads(json.dumps(result["overall"]))
    assert all(r["valid_share"] is not None for r in report["settings"])
    # a validity.json of another set of images is not used
    stale = json.loads((out / "validity.json").read_text())
    stale["overall"]["n"] += 1
    (out / "validity.json").write_text(json.dumps(stale))
    assert write_report(run, out_dir=out)["validity"] is None


def test_quality_in_three_spaces_comes_into_rows_and_table1(run, tmp_path):
    quality = run_quality(run, reference="digits", spaces=["pixels"], kid_subsets=10, reference_limit=40)
    report = write_report(run, out_dir=tmp_path / "report", quality=quality)
    measured = {r["setting"]: r["quality"]["pixels"] for r in quality["settings"]}
    for row in report["settings"]:
        for measure in ("fid", "kid_mean", "kid_std", "precision", "recall"):
            assert row[f"{measure}_pixels"] == measured[row["setting"]][measure]
    rows = {(r["beta"], r["alpha"]): r for r in report["settings"]}
    for line in report["table"]:
        best = rows[(line["beta"], line["alpha_best"])]
        assert line["fid_pixels_best"] == best["fid_pixels"]
        assert line["precision_pixels_baseline"] == rows[(line["beta"], 0.0)]["precision_pixels"]
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Quality in three feature spaces" in page
    first = report["table"][0]
    kid = first["kid_mean_pixels_baseline"]
    assert f"| pixels | {first['fid_pixels_baseline']:.2f} | {1e3 * kid:.2f} ±" in page
    stored = json.loads((tmp_path / "report" / "quality.json").read_text())
    assert np.isclose(stored["settings"][0]["quality"]["pixels"]["fid"], quality["settings"][0]["quality"]["pixels"]["fid"])


def test_report_argument_errors(run, tmp_path):
    with pytest.raises(TypeError, match=r"Expected argument `quality` to be a bool or a dict but got 'yes'"):
        write_report(run, out_dir=tmp_path / "a", quality="yes")
    with pytest.raises(TypeError, match=r"Expected argument `validity` to be a bool, an oracle spec or a dict but got 3"):
        write_report(run, out_dir=tmp_path / "b", validity=3)
    with pytest.raises(ValueError, match=r"Expected argument `reference` to name real images"):
        write_report(run, out_dir=tmp_path / "c", quality=True, reference=None)


def test_the_report_command_takes_quality_and_validity():
    args = cli.build_parser().parse_args(["report", "RUN", "--quality", "--validity"])
    assert (args.quality, args.validity) == (True, "default")
    args = cli.build_parser().parse_args(["report", "RUN", "--validity", "clip:/models/clip"])
    assert args.validity == "clip:/models/clip" and not args.quality
