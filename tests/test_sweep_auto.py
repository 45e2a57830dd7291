"""Sweeps with step-size control and ``"auto"`` alphas: the pilot per class subset and beta, its seeds and its cost."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest
import torch

from kldb.cli import build_parser, sweep_config_from_args
from kldb.runfolder import AUTO, Setting, read_jsonl, record_key
from kldb.sweep import SweepConfig, auto_pilots, run_sweep
from kldb.testing import tiny_pipeline

BASE = {
    "pipeline": "kldb.testing:tiny_pipeline",
    "class_subsets": [["three", "two"]],
    "betas": [3.0],
    "num_inference_steps": 4,
    "kldb_guidance_interval": 2,
    "batch_size": 2,
}
GRID = [0.05, 0.6]
PILOT_SEEDS = [0, 1]


def config(out: Path, **overrides) -> SweepConfig:
    kwargs = {**BASE, "alphas": [0.0, "auto"], "seeds": [0, 1, 2], "auto_grid": GRID, "auto_seeds": PILOT_SEEDS}
    return SweepConfig(out, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "run"
    cfg = config(out)
    result = run_sweep(cfg, progress=False)
    return cfg, out, result


def test_the_pilot_chooses_alpha_by_median_kldb_on_seeds_off_the_sweeps(auto_run):
    cfg, out, result = auto_run
    assert result.settings == ["three+two_alpha0.0_beta3.0", "three+two_alphaauto_beta3.0"]
    pilot = json.loads((out / "auto" / "three+two_alphaauto_beta3.0.json").read_text())
    # the pilot's seeds were moved off the sweep's seeds 0, 1, 2
    assert not set(pilot["seeds"]) & set(cfg.seeds) and len(pilot["seeds"]) == len(PILOT_SEEDS)
    assert pilot["grid"] == GRID
    # the medians recomputed by hand: each grid alpha, one image per pilot seed, the sweep's other settings
    pipe = tiny_pipeline()
    for alpha, median in zip(GRID, pilot["median_kldb"]):
        output = pipe(
            prompt="three and two", classes=[3, 2], num_images_per_prompt=len(pilot["seeds"]),
            generator=[torch.Generator().manual_seed(s) for s in pilot["seeds"]], num_inference_steps=4,
            guidance_scale=3.0, kldb_guidance_scale=alpha, kldb_guidance_interval=2,
            kldb_step_control=cfg.kldb_step_control, output_type="pt",
        )  # fmt: skip
        assert median == pytest.approx(float(output.kldb.float().median()), rel=1e-5)
    best = min(range(len(GRID)), key=lambda i: (pilot["median_kldb"][i], GRID[i]))
    assert pilot["kldb_guidance_scale"] == GRID[best]


def test_auto_images_are_the_fixed_runs_at_the_chosen_alpha(auto_run, tmp_path):
    _, out, _ = auto_run
    chosen = json.loads((out / "auto" / "three+two_alphaauto_beta3.0.json").read_text())["kldb_guidance_scale"]
    lines = read_jsonl(out / "manifest.jsonl")
    auto = [r for r in lines if r.get("alpha_mode") == AUTO]
    assert [r["seed"] for r in auto] == [0, 1, 2]
    assert all(r["alpha"] == chosen and r["setting"] == "three+two_alphaauto_beta3.0" for r in auto)
    assert {record_key(r)[1] for r in auto} == {AUTO}
    fixed = tmp_path / "fixed"
    run_sweep(config(fixed, alphas=[chosen]), progress=False)
    same = {r["seed"]: r for r in read_jsonl(fixed / "manifest.jsonl")}
    for record in auto:
        assert record["kldb"] == same[record["seed"]]["kldb"]
        with PIL.Image.open(out / record["file"]) as a, PIL.Image.open(fixed / same[record["seed"]]["file"]) as b:
            assert a.tobytes() == b.tobytes()  # the same pixels (the PNG's text names its setting)


def test_a_rerun_reuses_the_pilot_and_makes_nothing(auto_run):
    cfg, out, _ = auto_run
    path = out / "auto" / "three+two_alphaauto_beta3.0.json"
    before = path.read_bytes()
    again = run_sweep(cfg, progress=False)
    assert (again.generated, again.already_done) == (0, 6)
    assert path.read_bytes() == before


def test_the_pilot_cost_is_set_against_the_images(auto_run):
    _, out, _ = auto_run
    (row,) = auto_pilots(out)
    pilot = json.loads((out / "auto" / f"{row['setting']}.json").read_text())
    lines = [r for r in read_jsonl(out / "manifest.jsonl") if r["setting"] == row["setting"]]
    images = sum(r["batch_seconds"] / r["batch_size"] for r in lines)
    assert row["images"] == 3
    assert row["pilot_seconds"] == pytest.approx(pilot["seconds"], abs=1e-3) and row["pilot_seconds"] > 0
    assert row["image_seconds"] == pytest.approx(images, abs=1e-3)
    assert row["cost_ratio"] == pytest.approx((images + pilot["seconds"]) / images, rel=1e-2)
    assert auto_pilots(out.parent / "nothing-here") == []


@pytest.mark.parametrize("control", ["fixed", "backtracking", "trust_region", "kldb_scaled"])
def test_each_image_records_its_step_control_counts(tmp_path, control):
    out = tmp_path / control
    run_sweep(config(out, alphas=[0.0, 0.6], seeds=[0, 1], kldb_step_control=control), progress=False)
    lines = read_jsonl(out / "manifest.jsonl")
    pipe = tiny_pipeline()
    output = pipe(
        prompt="three and two", classes=[3, 2], num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)], num_inference_steps=4, guidance_scale=3.0,
        kldb_guidance_scale=0.6, kldb_guidance_interval=2, kldb_step_control=control, output_type="pt",
    )  # fmt: skip
    guided = [r for r in lines if r["alpha"] == 0.6]
    for i, record in enumerate(guided):
        assert record["kldb_step_control"] == control
        assert record["accepted_steps"] == int(output.accepted_steps[i])
        assert record["step_halvings"] == int(output.step_halvings[i])
        assert record["rejected_steps"] == int(output.rejected_steps[i])
        assert record["kldb"] == pytest.approx(float(output.kldb[i]), rel=1e-5)
        if control == "fixed":
            assert (record["step_halvings"], record["rejected_steps"]) == (0, 0)
    for record in (r for r in lines if r["alpha"] == 0.0):  # prompt-only lines leave the step fields out
        assert not {"kldb_step_control", "accepted_steps", "step_halvings", "rejected_steps"} & set(record)


def test_a_run_resumed_with_another_step_control_is_refused(tmp_path):
    run_sweep(config(tmp_path / "run", alphas=[0.3], seeds=[0], kldb_step_control="fixed"), progress=False)
    with pytest.raises(ValueError, match=r"Expected argument `kldb_step_control` to be 'fixed', as in the run"):
        run_sweep(config(tmp_path / "run", alphas=[0.3], seeds=[0], kldb_step_control="backtracking"), progress=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"alphas": [0.0, "automatic"]}, r"Expected argument `alphas` to be .* \(or \"auto\"\) but got \[0.0, 'automatic'\]"),
        ({"alphas": ["auto", "auto"]}, r"`alphas` .* but got \['auto', 'auto'\]"),
        ({"auto_grid": []}, r"Expected argument `auto_grid` to be a non-empty list of distinct positive finite alphas"),
        ({"auto_grid": [0.1, 0.0]}, r"`auto_grid` .* but got \[0.1, 0.0\]"),
        ({"auto_seeds": [-1]}, r"Expected argument `auto_seeds` to be .* but got \[-1\]"),
        ({"kldb_step_control": "adam"}, r"`kldb_step_control` has to be one of .* but is 'adam'"),
        ({"kldb_max_halvings": -1}, r"`kldb_max_halvings` has to be a non-negative integer but is -1"),
        ({"kldb_trust_radius": 0.0}, r"`kldb_trust_radius` has to be a positive finite number but is 0.0"),
    ],
)
def test_bad_auto_or_step_control_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_sweep(config(tmp_path / "run", **overrides), progress=False)
    assert not (tmp_path / "run").exists()


def parse(argv: list[str]):
    args = build_parser().parse_args(argv)
    return sweep_config_from_args(args, grid=args.command == "sweep")


def test_the_cli_takes_auto_and_the_step_controls(tmp_path):
    cfg = parse(["sweep", "--out", str(tmp_path / "a"), "--alphas", "0", "AUTO", "0.1", "--step-control", "trust_region",
                 "--max-halvings", "2", "--trust-radius", "0.05"])  # fmt: skip
    assert cfg.alphas == [0.0, "auto", 0.1]
    assert (cfg.kldb_step_control, cfg.kldb_max_halvings, cfg.kldb_trust_radius) == ("trust_region", 2, 0.05)
    assert cfg.kldb_step_temperature == SweepConfig(tmp_path).kldb_step_temperature  # not given: the default
    single = parse(["generate", "--out", str(tmp_path / "b"), "--alpha", "auto"])
    assert single.alphas == ["auto"]


def test_the_digits_preset_uses_the_measured_setting_and_the_paper_preset_the_papers(tmp_path):
    digits = parse(["generate", "--out", str(tmp_path / "a")])
    assert (digits.alphas, digits.kldb_step_control) == ([0.2], "backtracking")
    paper = parse(["generate", "--out", str(tmp_path / "b"), "--preset", "paper"])
    assert (paper.alphas, paper.kldb_step_control) == ([0.1], "fixed")
    explicit = parse(["generate", "--out", str(tmp_path / "c"), "--step-control", "fixed", "--alpha", "0.1"])
    assert (explicit.alphas, explicit.kldb_step_control) == ([0.1], "fixed")


def test_a_bad_alpha_on_the_cli_names_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--out", str(tmp_path), "--alphas", "0", "lots"])
    assert "argument --alphas: expected a number or 'auto' but got 'lots'" in capsys.readouterr().err


def test_setting_names_and_keys_of_auto():
    setting = Setting((3, 8), ("three", "eight"), AUTO, 6.0)
    assert setting.name == "three+eight_alphaauto_beta6.0" and setting.is_auto and setting.guided
    assert setting.key(5) == ((3, 8), "auto", 6.0, 5)
    assert not Setting((3, 8), ("three", "eight"), 0.0, 6.0).guided


def test_the_report_shows_the_pilots_and_the_step_counts(auto_run, tmp_path):
    from kldb.report import write_report

    _, out, _ = auto_run
    result = write_report(out, out_dir=tmp_path / "report")
    (row,) = json.loads((tmp_path / "report" / "auto_pilots.json").read_text())
    assert row == auto_pilots(out)[0]
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Alpha chosen by a pilot (`auto`)" in page
    assert f"| {row['setting']} | {row['alpha']:g} |" in page and f"{row['cost_ratio']:.2f}x" in page
    rows = {r["setting"]: r for r in result["settings"]}
    auto = rows["three+two_alphaauto_beta3.0"]
    lines = [r for r in read_jsonl(out / "manifest.jsonl") if r["setting"] == "three+two_alphaauto_beta3.0"]
    assert (auto["alpha_mode"], auto["step_control"], auto["alpha"]) == ("auto", "backtracking", row["alpha"])
    assert auto["mean_step_halvings"] == pytest.approx(sum(r["step_halvings"] for r in lines) / len(lines))
    tried = sum(r["accepted_steps"] + r["rejected_steps"] for r in lines)
    assert auto["rejected_step_share"] == pytest.approx(sum(r["rejected_steps"] for r in lines) / tried)
    prompt_only = rows["three+two_alpha0.0_beta3.0"]
    assert prompt_only["alpha_mode"] is None and prompt_only["mean_step_halvings"] is None
    (table,) = result["table"]
    assert (table["alpha_best"], table["alpha_mode_best"]) == (row["alpha"], "auto")  # the only guided setting
    assert f"| | | auto ({row['alpha']:g}) |" in (tmp_path / "report" / "table1.md").read_text()


def test_a_finished_sweep_is_an_imagefolder_dataset(auto_run):
    _, out, _ = auto_run
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    lines = read_jsonl(out / "manifest.jsonl")
    by_file = {r["file_name"]: r for r in rows}  # in the order the loader needs (typed columns first)
    assert sorted(by_file) == sorted(r["file"] for r in lines) and len(rows) == len(lines)
    for line in lines:
        row = by_file[line["file"]]
        assert (row["seed"], row["kldb"], row["alpha"]) == (line["seed"], line["kldb"], line["alpha"])
