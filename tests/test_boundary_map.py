"""The boundary map (`kldb map`, kldb.boundary_map): one sweep over every pair (and triple) of K classes, drawn as
K x K heatmaps, a ranked table and thumbnail grids; every number checked against the run folder's manifest lines."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from kldb import boundary_map as bm
from kldb import cli
from kldb.digits import LABELS
from kldb.runfolder import read_jsonl

TINY = {"pipeline": "kldb.testing:tiny_pipeline", "num_inference_steps": 4, "kldb_guidance_interval": 2}
CLASSES = ["zero", "one", "two"]  # the tiny classifier's labels are zero, one, two, three
ALPHAS = [0.0, 0.3, 0.6]
SEEDS = 3


def validity_of(run: Path, records) -> float:
    """A validity callable for the test: the share of images the audited classifier itself puts in C."""
    return sum(r.predicted_class in r.class_indices for r in records) / len(records)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """A 3-class map with triples on tiny components, drawn with a validity callable."""
    out = tmp_path_factory.mktemp("map") / "run"
    result = bm.boundary_map(
        out, CLASSES, triples=True, seeds=SEEDS, alphas=ALPHAS, beta=3.0, batch_size=3, validity=validity_of,
        progress=False, **TINY,
    )  # fmt: skip
    return out, result


def manifest_groups(out: Path) -> dict[tuple[int, ...], dict[float, list[dict]]]:
    """The manifest lines by class subset (indices, as recorded) and alpha."""
    groups: dict[tuple[int, ...], dict[float, list[dict]]] = {}
    for line in read_jsonl(out / "manifest.jsonl"):
        groups.setdefault(tuple(line["class_indices"]), {}).setdefault(float(line["alpha"]), []).append(line)
    return groups


def expected_row(lines_by_alpha: dict[float, list[dict]], validity: bool = True) -> dict:
    """The map's numbers of one class subset, recomputed from its manifest lines with numpy."""
    medians = {a: float(np.median([line["kldb"] for line in lines])) for a, lines in lines_by_alpha.items()}
    alpha = min((a for a in medians if a > 0), key=lambda a: (medians[a], a))
    chosen = lines_by_alpha[alpha]
    size = len(chosen[0]["class_indices"])

    def hit(line: dict) -> bool:
        return set(line["top_classes"][:size]) == set(line["class_indices"]) and line["top_probabilities"][0] < 0.6

    return {
        "alpha": alpha,
        "median_kldb": medians[alpha],
        "median_kldb_prompt_only": medians[0.0],
        "relative_drop": (medians[0.0] - medians[alpha]) / medians[0.0],
        "hit_rate": float(np.mean([hit(line) for line in chosen])),
        "hit_rate_prompt_only": float(np.mean([hit(line) for line in lines_by_alpha[0.0]])),
        "validity": float(np.mean([line["predicted_class"] in line["class_indices"] for line in chosen]))
        if validity
        else None,
    }


# ----------------------------------------------------------------------------------------------------------------------
# The numbers
# ----------------------------------------------------------------------------------------------------------------------


def test_a_map_is_one_sweep_of_every_pair_and_triple(mapped):
    out, result = mapped
    assert result.sweep.generated == result.sweep.total == 4 * len(ALPHAS) * SEEDS
    subsets = {tuple(line["class_indices"]) for line in read_jsonl(out / "manifest.jsonl")}
    assert subsets == {(0, 1), (0, 2), (1, 2), (0, 1, 2)}
    assert {line["beta"] for line in read_jsonl(out / "manifest.jsonl")} == {3.0}
    prompts = {tuple(line["class_indices"]): line["prompt"] for line in read_jsonl(out / "manifest.jsonl")}
    assert prompts[(0, 2)] == "zero and two" and prompts[(0, 1, 2)] == "zero and one and two"


def test_heatmap_numbers_equal_the_manifest_records(mapped):
    out, _ = mapped
    document = json.loads((out / "map" / "map.json").read_text())
    assert document["classes"] == CLASSES and document["class_indices"] == [0, 1, 2]
    groups = manifest_groups(out)
    checked = 0
    for i, j in itertools.combinations(range(3), 2):
        expected = expected_row(groups[(i, j)])
        for metric in ("median_kldb", "hit_rate", "relative_drop", "validity"):
            assert document["matrices"][metric][i][j] == pytest.approx(expected[metric], abs=1e-12), (metric, i, j)
            checked += 1
    assert checked == 12
    # the same numbers in the ranked rows, the CSV, and for the triple
    for row in document["rows"]:
        expected = expected_row(groups[tuple(row["class_indices"])])
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-12), (row["classes"], key)
    with open(out / "map" / "map.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["classes"] for r in table] == ["+".join(r["classes"]) for r in document["rows"]]
    assert [float(r["median_kldb"]) for r in table] == pytest.approx([r["median_kldb"] for r in document["rows"]])


def test_rows_carry_the_reports_bootstrap_intervals(mapped):
    out, _ = mapped
    from kldb.report import setting_metrics
    from kldb.runfolder import read_run

    by_setting = {r["setting"]: r for r in setting_metrics(read_run(out))}
    for row in json.loads((out / "map" / "map.json").read_text())["rows"]:
        chosen = by_setting[row["setting"]]
        assert (row["median_kldb_low"], row["median_kldb_high"]) == (
            chosen["median_kldb_low"],
            chosen["median_kldb_high"],
        )
        assert row["median_kldb_low"] <= row["median_kldb"] <= row["median_kldb_high"]
        # the drop's interval is the paired interval of the relative change, negated
        assert row["relative_drop_low"] == -chosen["relative_kldb_change_high"]
        assert row["relative_drop_high"] == -chosen["relative_kldb_change_low"]
        assert row["relative_drop_low"] <= row["relative_drop"] <= row["relative_drop_high"]
        assert row["n_paired"] == SEEDS


def test_heatmaps_are_symmetric_with_an_empty_diagonal(mapped):
    out, _ = mapped
    matrices = json.loads((out / "map" / "map.json").read_text())["matrices"]
    assert set(matrices) == {"median_kldb", "hit_rate", "relative_drop", "validity"}
    for metric, matrix in matrices.items():
        assert len(matrix) == 3 and all(len(line) == 3 for line in matrix)
        for i in range(3):
            assert matrix[i][i] is None, metric
            for j in range(3):
                if i != j:
                    assert matrix[i][j] is not None and matrix[i][j] == matrix[j][i], (metric, i, j)


def test_ranking_follows_the_fragility_rule(mapped):
    out, _ = mapped
    rows = json.loads((out / "map" / "map.json").read_text())["rows"]
    pairs = [r for r in rows if len(r["class_indices"]) == 2]
    triples = [r for r in rows if len(r["class_indices"]) == 3]
    assert rows == pairs + triples, "pairs first, then triples"
    groups = manifest_groups(out)
    # the rule, from the manifest: lowest median KLDB reached, then highest hit rate, then the map's order
    map_order = [(0, 1), (0, 2), (1, 2)]
    expected = sorted(
        map_order,
        key=lambda s: (
            expected_row(groups[s])["median_kldb"],
            -expected_row(groups[s])["hit_rate"],
            map_order.index(s),
        ),
    )
    assert [tuple(r["class_indices"]) for r in pairs] == expected
    assert [r["rank"] for r in pairs] == [1, 2, 3] and [r["rank"] for r in triples] == [1]
    markdown = (out / "map" / "map.md").read_text()
    positions = [markdown.index(f"| {r['rank']} | {' / '.join(r['classes'])} |") for r in pairs]
    assert positions == sorted(positions)


def test_ties_go_to_the_higher_hit_rate_then_the_map_order():
    def row(classes, median, hit):
        return {"class_indices": classes, "median_kldb": median, "hit_rate": hit}

    rows = [row([0, 1], 0.5, 0.1), row([0, 2], 0.5, 0.4), row([1, 2], 0.2, 0.0), row([0, 3], 0.5, 0.4)]
    ranked = bm.rank_boundaries(rows)
    assert [r["class_indices"] for r in ranked] == [[1, 2], [0, 2], [0, 3], [0, 1]]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]


def test_a_fixed_alpha_is_reported_for_every_pair(mapped, tmp_path):
    out, _ = mapped
    drawn = bm.write_map(out, alpha=0.3, out_dir=tmp_path / "at03")
    groups = manifest_groups(out)
    for row in drawn["rows"]:
        lines = groups[tuple(row["class_indices"])]
        assert row["alpha"] == 0.3
        assert row["median_kldb"] == pytest.approx(float(np.median([line["kldb"] for line in lines[0.3]])))
    with pytest.raises(
        ValueError, match=r"hold alpha 0 and the guided alpha 0.45 but they hold alphas \[0.0, 0.3, 0.6\]"
    ):
        bm.write_map(out, alpha=0.45, out_dir=tmp_path / "none")


def test_is_boundary_hit():
    assert bm.is_boundary_hit([3, 8, 1], [0.59, 0.39, 0.01], [8, 3])
    assert not bm.is_boundary_hit([3, 8, 1], [0.6, 0.38, 0.01], [8, 3])  # max probability must be below 0.6
    assert not bm.is_boundary_hit([3, 1, 8], [0.45, 0.44, 0.1], [8, 3])  # top-2 is not the pair
    assert not bm.is_boundary_hit([3, 8, 1], [None, 0.3, 0.1], [8, 3])  # a non-finite score is a miss
    assert bm.is_boundary_hit([2, 0, 1, 3], [0.35, 0.33, 0.3, 0.02], [0, 1, 2])
    assert bm.is_boundary_hit([3, 8, 1], [0.65, 0.3, 0.05], [8, 3], threshold=0.7)


# ----------------------------------------------------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------------------------------------------------


def test_files_written(mapped):
    out, result = mapped
    folder = out / "map"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert names == {
        "median_kldb.png", "hit_rate.png", "kldb_drop.png", "validity.png", "map.md", "map.csv", "map.json",
        "grids/zero+one.png", "grids/zero+two.png", "grids/one+two.png", "grids/zero+one+two.png",
    }  # fmt: skip
    assert set(result.files) == names
    for name in names:
        if name.endswith(".png"):
            with PIL.Image.open(folder / name) as image:
                image.load()
    markdown = (folder / "map.md").read_text()
    for name in ("median_kldb.png", "hit_rate.png", "kldb_drop.png", "validity.png", "grids/zero+one+two.png"):
        assert f"({name})" in markdown
    assert bm.FRAGILITY_RULE in markdown


def test_heatmap_figure_shows_the_numbers_and_the_class_names():
    matrix = [[None, 0.1234, 0.5], [0.1234, None, 2.0], [0.5, 2.0, None]]
    figure = bm.heatmap_figure(matrix, ["zero", "one", "two"], "median_kldb")
    (ax, _) = figure.axes  # the heatmap and its colour bar
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(0, 1): "0.12", (1, 0): "0.12", (0, 2): "0.50", (2, 0): "0.50", (1, 2): "2.00", (2, 1): "2.00"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["zero", "one", "two"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["zero", "one", "two"]
    shares = bm.heatmap_figure([[None, 0.25], [0.25, None]], ["a", "b"], "hit_rate")
    assert sorted(t.get_text() for t in shares.axes[0].texts) == ["25%", "25%"]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_grid_shows_the_lowest_kldb_guided_images_over_prompt_only(mapped, monkeypatch):
    out, _ = mapped
    from kldb import render

    captured = {}
    original = render.captioned_grid

    def spy(rows, *args, **kwargs):
        captured["rows"] = rows
        return original(rows, *args, **kwargs)

    monkeypatch.setattr(render, "captioned_grid", spy)
    row = next(r for r in json.loads((out / "map" / "map.json").read_text())["rows"] if r["class_indices"] == [0, 1])
    lines = manifest_groups(out)[(0, 1)]
    from kldb.runfolder import ImageRecord

    guided = [ImageRecord.from_json(line) for line in lines[row["alpha"]]]
    baseline = [ImageRecord.from_json(line) for line in lines[0.0]]
    bm.subset_grid(out, guided, baseline, per_row=2)
    (title, _, captions), (_, _, captions_baseline) = captured["rows"]
    lowest = sorted(lines[row["alpha"]], key=lambda line: (line["kldb"], line["seed"]))[:2]
    assert title.startswith("zero / one")
    assert [c[0] for c in captions] == [f"KLDB = {line['kldb']:.3f}" for line in lowest]
    assert (
        [c[-1] for c in captions]
        == [c[-1] for c in captions_baseline]
        == [f"seed = {line['seed']}" for line in lowest]
    )


# ----------------------------------------------------------------------------------------------------------------------
# Resuming, redrawing, validity
# ----------------------------------------------------------------------------------------------------------------------


def test_a_rerun_resumes_and_makes_no_new_image(mapped, tmp_path):
    source, _ = mapped
    out = tmp_path / "run"
    shutil.copytree(source, out)
    before = (out / "manifest.jsonl").read_bytes()
    result = bm.boundary_map(
        out, CLASSES, triples=True, seeds=SEEDS, alphas=ALPHAS, beta=3.0, batch_size=3, progress=False, **TINY
    )
    assert (result.sweep.generated, result.sweep.already_done) == (0, 4 * len(ALPHAS) * SEEDS)
    assert (out / "manifest.jsonl").read_bytes() == before
    # drawn again without a validity result: no validity heatmap (the stale one is removed), no validity numbers
    assert not (out / "map" / "validity.png").exists()
    document = json.loads((out / "map" / "map.json").read_text())
    assert all(v is None for line in document["matrices"]["validity"] for v in line)
    assert (
        document["matrices"]["median_kldb"]
        == json.loads((source / "map" / "map.json").read_text())["matrices"]["median_kldb"]
    )


def test_report_only_redraws_and_refuses_a_run_with_missing_images(mapped, tmp_path):
    source, _ = mapped
    out = tmp_path / "run"
    shutil.copytree(source, out)
    shutil.rmtree(out / "map")
    config = bm.map_config(out, CLASSES, triples=True, seeds=SEEDS, alphas=ALPHAS, beta=3.0, **TINY)
    shares = {f"zero+one_alpha{a!r}_beta3.0": 0.5 for a in ALPHAS}
    result = bm.run_map(config, report_only=True, validity=shares)
    assert result.sweep is None and (out / "map" / "validity.png").is_file()
    assert result.matrices["validity"][0][1] == 0.5 and result.matrices["validity"][0][2] is None
    bigger = bm.map_config(out, CLASSES, triples=True, seeds=SEEDS + 1, alphas=ALPHAS, beta=3.0, **TINY)
    with pytest.raises(
        ValueError, match=r"Expected argument `run` to hold every image of the map \(48\) but .* lacks 12"
    ):
        bm.run_map(bigger, report_only=True)
    other = bm.map_config(
        out, CLASSES, triples=True, seeds=SEEDS, alphas=ALPHAS, beta=3.0, **{**TINY, "num_inference_steps": 5}
    )
    with pytest.raises(
        ValueError, match=r"Expected argument `num_inference_steps` to be 4, as in the run being resumed"
    ):
        bm.run_map(other, report_only=True)


def test_validity_as_the_result_of_run_validity(mapped, tmp_path):
    out, _ = mapped
    result = {"run": str(out), "settings": [{"setting": "one+two_alpha0.3_beta3.0", "valid_share": 0.5, "n": SEEDS}]}
    drawn = bm.write_map(out, alpha=0.3, validity=result, out_dir=tmp_path / "map")
    assert drawn["matrices"]["validity"][1][2] == drawn["matrices"]["validity"][2][1] == 0.5
    assert drawn["matrices"]["validity"][0][1] is None
    with pytest.raises(ValueError, match=r"Expected argument `validity` to be \{setting name: share\} or the result"):
        bm.write_map(out, validity={"settings": [{"valid_share": 1.0}]}, out_dir=tmp_path / "map")


def test_validity_from_the_json_of_kldb_validity(tmp_path):
    path = tmp_path / "validity.json"
    path.write_text(json.dumps({"settings": [{"setting": "a_alpha0.0_beta6.0", "valid_share": 0.75, "n": 4}]}))
    assert bm.read_validity(path) == {"a_alpha0.0_beta6.0": 0.75}
    path.write_text(json.dumps({"a_alpha0.0_beta6.0": 1.0}))
    assert bm.read_validity(path) == {"a_alpha0.0_beta6.0": 1.0}
    path.write_text(json.dumps([0.5]))
    with pytest.raises(
        ValueError, match=r"Expected argument `validity` to be a validity\.json written by `kldb validity`"
    ):
        bm.read_validity(path)
    with pytest.raises(FileNotFoundError, match="Expected argument `validity` to be a JSON file"):
        bm.read_validity(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("validity", "error", "message"),
    [
        ({"zero+one_alpha0.3_beta3.0": 1.5}, ValueError, "Expected argument `validity` to give shares in [0, 1] (or None) but got 1.5 for 'zero+one_alpha0.3_beta3.0'."),
        (lambda run, records: float("nan"), ValueError, "Expected argument `validity` to give shares in [0, 1] (or None) but got nan"),
        (0.9, TypeError, "Expected argument `validity` to be None, a {setting name: share} mapping or a callable (run folder, records) -> share but got float."),
    ],
    ids=["share-above-1", "nan-from-callable", "not-a-mapping"],
)  # fmt: skip
def test_bad_validity(mapped, tmp_path, validity, error, message):
    out, _ = mapped
    with pytest.raises(error, match=re.escape(message)):
        bm.write_map(out, validity=validity, out_dir=tmp_path / "map")


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def test_digits_defaults(tmp_path):
    config = bm.map_config(tmp_path / "run")
    assert config.pipeline == "digits" and config.classifier is None
    assert config.class_subsets == [list(pair) for pair in itertools.combinations(LABELS, 2)]
    assert len(config.class_subsets) == 45
    assert config.seeds == list(range(32)) and config.betas == [6.0] and config.batch_size == 16
    assert config.kldb_step_control == "backtracking" and config.alphas == [0.0, 0.2]
    fixed = bm.map_config(tmp_path / "run", step_control="fixed")
    assert fixed.kldb_step_control == "fixed" and fixed.alphas == [0.0, 0.02, 0.05]
    triples = bm.map_config(tmp_path / "run", ["one", "four", "seven", "nine"], triples=True)
    assert triples.class_subsets[-4:] == [["one", "four", "seven"], ["one", "four", "nine"], ["one", "seven", "nine"],
                                          ["four", "seven", "nine"]]  # fmt: skip
    assert len(triples.class_subsets) == 6 + 4
    assert not (tmp_path / "run").exists(), "building the config writes nothing"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"classes": ["zero"]}, ValueError, "Expected argument `classes` to hold at least 2 classes but got ['zero']."),
        ({"classes": ["zero", "one", "Zero"]}, ValueError, "Expected argument `classes` to hold distinct classes but got ['zero', 'one', 'Zero']: ['Zero', 'zero'] twice."),
        ({"classes": [1, 2, 2]}, ValueError, "Expected argument `classes` to hold distinct classes but got [1, 2, 2]: [2] twice."),
        ({"classes": "zero one"}, TypeError, "Expected argument `classes` to be a list of at least 2 label names or indices but got 'zero one'."),
        ({"classes": ["zero", 1]}, TypeError, "Expected argument `classes` to be all label names or all indices >= 0 but got ['zero', 1]."),
        ({"classes": ["zero", "one"], "triples": True}, ValueError, "Expected argument `classes` to hold at least 3 classes with `triples=True` but got ['zero', 'one']."),
        ({"alphas": [0.1, 0.2]}, ValueError, "Expected argument `alphas` to hold 0 (prompt-only, the baseline of the drop) and at least one guided alpha > 0 but got [0.1, 0.2]."),
        ({"alphas": [0.0]}, ValueError, "Expected argument `alphas` to hold 0 (prompt-only, the baseline of the drop) and at least one guided alpha > 0 but got [0.0]."),
        ({"seeds": 0}, ValueError, "Expected argument `seeds` to be a positive integer or a list of seeds but got 0."),
        ({"beta": "6"}, TypeError, "Expected argument `beta` to be a number but got '6'."),
        ({"pipeline": "kldb.testing:tiny_pipeline"}, ValueError, "Expected argument `classes` (at least 2 label names or indices of the classifier) but got None: the default, all ten digits, is the digits world's, and this map audits pipeline 'kldb.testing:tiny_pipeline'."),
        ({"step_control": "sometimes"}, ValueError, "`kldb_step_control` has to be one of"),
        ({"betas": [3.0]}, TypeError, "Expected the map's own arguments (classes, alphas, beta, seeds, step_control) instead of the sweep fields ['betas']."),
    ],
    ids=["one-class", "duplicate-names", "duplicate-indices", "a-string", "mixed", "triples-of-two", "no-zero", "no-guided", "no-seeds", "beta-str", "no-default-classes", "step-control", "sweep-field"],
)  # fmt: skip
def test_bad_arguments_name_the_argument(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        bm.map_config(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_unknown_class_name_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"`classes` contains 'eleven', which is not among the classifier's labels"):
        bm.boundary_map(tmp_path / "run", ["zero", "eleven"], seeds=1, alphas=[0, 0.3], progress=False, **TINY)
    assert not (tmp_path / "run").exists()


def test_run_map_arguments(tmp_path):
    config = bm.map_config(tmp_path / "run", CLASSES, seeds=1, alphas=[0.0, 0.3], **TINY)
    with pytest.raises(
        ValueError,
        match=r"Expected argument `alpha` to be None or one of the map's guided alphas \[0.3\] but got 0.5.",
    ):
        bm.run_map(config, alpha=0.5)
    with pytest.raises(ValueError, match=r"Expected argument `per_subset` to be a positive integer but got 0."):
        bm.run_map(config, per_subset=0)
    config.betas = [3.0, 6.0]
    with pytest.raises(ValueError, match=r"Expected a map to have one beta \(argument `beta`\) but got \[3.0, 6.0\]."):
        bm.run_map(config)
    assert not (tmp_path / "run").exists()


def test_read_group(tmp_path):
    group = tmp_path / "dogs.txt"
    group.write_text(
        "# toy dogs, from LOC_synset_mapping.txt\n"
        "n02085620 Chihuahua\n"
        "n02086910 papillon\n\n"
        "Maltese dog  # a name alone\n"
        "207\n"
    )
    assert bm.read_group(group) == ["Chihuahua", "papillon", "Maltese dog", 207]
    group.write_text("n02085620\n")
    with pytest.raises(
        ValueError, match="Expected argument `group` to give a label name after the WordNet id 'n02085620' on line 1"
    ):
        bm.read_group(group)
    with pytest.raises(FileNotFoundError, match="Expected argument `group` to be a file with one class per line"):
        bm.read_group(tmp_path / "none.txt")


# ----------------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------------

CLI_TINY = ["--pipeline", "kldb.testing:tiny_pipeline", "--steps", "4", "--interval", "2", "--batch-size", "2",
            "--alphas", "0", "0.3", "--seeds", "2", "--beta", "3", "--no-progress"]  # fmt: skip


def test_kldb_map_command(tmp_path, capsys):
    group = tmp_path / "group.txt"
    group.write_text("zero\none\nthree\n")
    out = tmp_path / "run"
    assert cli.main(["map", "--out", str(out), "--group", str(group), *CLI_TINY]) == 0
    printed = capsys.readouterr().out
    document = json.loads((out / "map" / "map.json").read_text())
    assert document["classes"] == ["zero", "one", "three"] and document["beta"] == 3.0 and document["seeds"] == 2
    first = document["rows"][0]
    assert f"| 1 | {' / '.join(first['classes'])} | 0.3 | {first['median_kldb']:.4f}" in printed
    assert "12 images made" in printed
    lines = read_jsonl(out / "manifest.jsonl")
    assert len(lines) == 3 * 2 * 2 and {line["seed"] for line in lines} == {0, 1}
    # rerun: nothing made; --report-only: the map redrawn from the records, with a validity result from a file
    assert cli.main(["map", "--out", str(out), "--group", str(group), *CLI_TINY]) == 0
    assert "0 images made" in capsys.readouterr().out
    shares = tmp_path / "validity.json"
    shares.write_text(json.dumps({first["setting"]: 0.25}))
    argv = ["map", "--out", str(out), "--classes", "zero", "one", "three", *CLI_TINY, "--report-only"]
    assert cli.main([*argv, "--validity", str(shares)]) == 0
    assert "images made" not in capsys.readouterr().out
    redrawn = json.loads((out / "map" / "map.json").read_text())
    i, j = (redrawn["class_indices"].index(c) for c in first["class_indices"])
    assert redrawn["matrices"]["validity"][i][j] == 0.25 and (out / "map" / "validity.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--classes", "zero"], "Expected argument `classes` to hold at least 2 classes but got ['zero']."),
        (["--classes", "zero", "one", "one"], "Expected argument `classes` to hold distinct classes but got ['zero', 'one', 'one']: ['one'] twice."),
        (["--classes", "zero", "eleven"], "`classes` contains 'eleven', which is not among the classifier's labels."),
        (["--classes", "zero", "one", "--group", "g.txt"], "Expected argument `--classes` or `--group` but got both"),
        (["--classes", "zero", "one", "--seeds", "0"], "Expected argument `--seeds` to be a positive integer but got 0."),
        (["--classes", "zero", "one", "--per-subset", "0"], "Expected argument `--per-subset` to be a positive integer but got 0."),
        (["--classes", "zero", "one", "--alphas", "0.1"], "Expected argument `alphas` to hold 0 (prompt-only, the baseline of the drop) and at least one guided alpha > 0 but got [0.1]."),
        (["--classes", "zero", "one", "--at-alpha", "0.2"], "Expected argument `--at-alpha` to be one of the map's guided alphas [0.3] but got 0.2."),
        (["--classes", "zero", "one", "--report-only"], "Expected argument `run` to be a run folder or a manifest file"),
    ],
    ids=["one-class", "duplicates", "unknown", "classes-and-group", "seeds", "per-subset", "alphas", "at-alpha", "report-only-without-run"],
)  # fmt: skip
def test_kldb_map_errors(tmp_path, capsys, argv, message):
    status = cli.main(["map", "--out", str(tmp_path / "run"), *CLI_TINY, *argv])  # the last value of an option wins
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE and f"kldb map: error: {message}" in err, err
    assert not (tmp_path / "run" / "manifest.jsonl").exists()


@pytest.mark.slow
def test_a_map_shards_over_two_processes_like_a_sweep(tmp_path):
    from collections import Counter

    from test_accelerate import free_port
    from test_sweep import _environment

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    out = tmp_path / "run"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "kldb.cli", "map", "--out", str(out), "--classes", "zero", "one", "two", *CLI_TINY, "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_jsonl(out / "manifest.jsonl")
    assert len(lines) == len({(tuple(line["class_indices"]), line["alpha"], line["seed"]) for line in lines}) == 12
    assert Counter(line["process_index"] for line in lines) == {0: 6, 1: 6}, "each process made half of the images"
    assert result.stdout.count("map in ") == 1, "only the main process draws and prints the map"
    document = json.loads((out / "map" / "map.json").read_text())
    assert document["classes"] == CLASSES and len(document["rows"]) == 3
