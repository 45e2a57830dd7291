"""A run folder as a Hugging Face dataset (kldb.dataset): loaded with the `datasets` library offline, published through
a local stand-in for the Hub."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shlex
import shutil
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: it reads this once

import datasets
import numpy as np
import PIL.Image
import pytest
import yaml
from sweep_fixtures import write_run

from kldb import cli
from kldb.dataset import (
    CARD_MARKER,
    METADATA_NAME,
    dataset_card,
    metadata_rows,
    publish_run,
    split_name_paths,
    sweep_command,
    write_imagefolder_metadata,
)
from kldb.errors import KLDBInputError, KLDBPathError
from kldb.hub import list_files
from kldb.sweep import SweepConfig, run_sweep

MINI_RUN = Path(__file__).parent / "data" / "mini_run"
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # the shape of a user access token, not a real one

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()


class StandInHub:
    """A local stand-in for ``huggingface_hub.HfApi``: a repo is a folder under ``root/<repo_type>s/<repo_id>``;
    ``upload_folder`` copies the files ``allow_patterns`` admit, as the Hub stores them; ``snapshot_download`` gives
    the repo's folder, as a download of it would."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, dict]] = []

    def _repo(self, repo_id: str, repo_type: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        self._repo(kwargs["repo_id"], kwargs["repo_type"]).mkdir(parents=True, exist_ok=kwargs["exist_ok"])
        return f"https://huggingface.co/{kwargs['repo_type']}s/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        repo = self._repo(kwargs["repo_id"], kwargs["repo_type"])
        assert repo.is_dir(), "upload to a repo that was not created"
        source = Path(kwargs["folder_path"])
        for path, _ in list_files(source):
            if any(fnmatch.fnmatch(path, pattern) for pattern in kwargs["allow_patterns"]):
                (repo / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / path, repo / path)
        return "commit-info"

    def snapshot_download(self, repo_id: str, repo_type: str) -> str:
        return str(self._repo(repo_id, repo_type))


@pytest.fixture
def mini_run(tmp_path):
    """The stored mini run (4 images of the tiny pipeline), copied, with a stray PNG and JSONL beside its images."""
    run = Path(shutil.copytree(MINI_RUN, tmp_path / "mini"))
    (run / "report").mkdir()
    PIL.Image.new("RGB", (40, 30), (200, 10, 10)).save(run / "report" / "plot.png")  # not an image of the audit
    return run


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may contact the Hub here")

    monkeypatch.setattr("huggingface_hub.HfApi", refuse)


def manifest(run: Path) -> dict[str, dict]:
    """The run's manifest lines by file, read as plain JSON (the reference)."""
    lines = [json.loads(line) for line in (run / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    return {line["file"]: line for line in lines}


def load(tmp_path: Path, *args, **kwargs) -> datasets.Dataset:
    return datasets.load_dataset(*args, split="train", cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def relative_file(row_image: dict, root: Path) -> str:
    return Path(row_image["path"]).resolve().relative_to(root.resolve()).as_posix()


def assert_rows_match_run(ds: datasets.Dataset, run: Path, root: Path | None = None) -> None:
    """One row per manifest line of ``run``; each row's fields are its line's, its pixels its PNG's."""
    root = root or run
    expected = manifest(run)
    assert ds.num_rows == len(expected)
    paths = ds.cast_column("image", datasets.Image(decode=False))["image"]
    files = [relative_file(image, root) for image in paths]
    assert sorted(files) == sorted(expected)
    for row, file in zip(ds, files):
        line = expected[file]
        for key in ("kldb", "entropy", "seed", "alpha", "beta", "setting", "classes", "class_indices", "prompt",
                    "class_probabilities", "top_labels", "top_probabilities", "predicted_label", "sha256"):  # fmt: skip
            assert row[key] == line[key], (file, key)
        np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(PIL.Image.open(root / file)))


# ----------------------------------------------------------------------------------------------------------------------
# metadata.jsonl and the imagefolder loader
# ----------------------------------------------------------------------------------------------------------------------


def test_imagefolder_loads_one_row_per_image_with_its_record(mini_run, tmp_path):
    path = write_imagefolder_metadata(mini_run)
    assert path == mini_run / METADATA_NAME
    ds = load(tmp_path, "imagefolder", data_dir=str(mini_run))
    assert_rows_match_run(ds, mini_run)  # report/plot.png and manifest.jsonl are not rows
    features = ds.features
    assert isinstance(features["image"], datasets.Image)
    assert features["kldb"] == datasets.Value("float64") and features["seed"] == datasets.Value("int64")
    assert features["class_probabilities"] == datasets.List(datasets.Value("float64"))
    assert features["classes"] == datasets.List(datasets.Value("string"))
    assert "file" not in features and "file_name" not in features


def test_metadata_is_made_again_from_the_manifest(mini_run, tmp_path):
    path = write_imagefolder_metadata(mini_run)
    first, stamp = path.read_bytes(), path.stat().st_mtime_ns
    assert write_imagefolder_metadata(mini_run).read_bytes() == first
    assert path.stat().st_mtime_ns == stamp  # nothing new: not rewritten
    lines = [json.loads(line) for line in first.decode().splitlines()]
    # manifest order, but the first guided image (the first with a `kldb_guidance_decoder`) moved up to line 2
    files = list(manifest(mini_run))
    assert [line["file_name"] for line in lines] == [files[0], files[2], files[1], files[3]]
    assert [line["kldb_guidance_decoder"] for line in lines] == [None, "vae", None, "vae"]
    # more images made: a new manifest line and its PNG
    line = dict(manifest(mini_run)["images/three+two_alpha0.3_beta3.0/seed000001.png"])
    line.update(seed=2, kldb=0.125, file="images/three+two_alpha0.3_beta3.0/seed000002.png")
    PIL.Image.new("RGB", (32, 32), (1, 2, 3)).save(mini_run / line["file"])
    line["bytes"] = (mini_run / line["file"]).stat().st_size
    with open(mini_run / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    write_imagefolder_metadata(mini_run)
    assert len(path.read_text().splitlines()) == 5
    assert_rows_match_run(load(tmp_path, "imagefolder", data_dir=str(mini_run)), mini_run)


def test_metadata_of_a_sweep(tmp_path):
    """A run made by the sweep itself, with every field it writes today, loads as made."""
    run = tmp_path / "run"
    config = SweepConfig(
        run, pipeline="kldb.testing:tiny_pipeline", class_subsets=[["three", "two"]], alphas=[0.0, 0.3], betas=[3.0],
        seeds=[0, 1], num_inference_steps=4, kldb_guidance_interval=2, batch_size=2,
    )  # fmt: skip
    run_sweep(config, progress=False)
    write_imagefolder_metadata(run)
    ds = load(tmp_path, "imagefolder", data_dir=str(run))
    assert_rows_match_run(ds, run)
    by_alpha = {row["alpha"]: row["kldb_guidance_decoder"] for row in ds.remove_columns("image")}
    assert by_alpha[0.0] is None and by_alpha[0.3] is not None


@pytest.mark.slow
def test_first_lines_give_every_column_a_type(tmp_path):
    """The loader types each column from the first ~10 MB of metadata.jsonl: a column null there can hold no value
    later. 7,000 lines of 1.6 kB, the one image with a decoder and an `alpha_mode` last in the manifest."""
    run = tmp_path / "big"
    write_run(run, seeds=1)
    lines = list(manifest(run).values())
    base = lines[0]
    with open(run / "manifest.jsonl", "w", encoding="utf-8") as f:
        for seed in range(7000):
            line = {**base, "seed": seed, "kldb_guidance_decoder": None, "note": "x" * 1300}
            if seed == 6999:
                line.update(kldb_guidance_decoder="vae", alpha_mode="auto")
            f.write(json.dumps(line) + "\n")
    assert (run / "manifest.jsonl").stat().st_size > 10 << 20
    write_imagefolder_metadata(run)
    ds = load(tmp_path, "imagefolder", data_dir=str(run)).remove_columns("image")
    first = [json.loads(line) for line in (run / METADATA_NAME).read_text().splitlines()[:3]]
    assert [line["seed"] for line in first] == [0, 6999, 1]  # the only image with a decoder moved up to line 2
    assert ds.num_rows == 7000 and sorted(ds["seed"]) == list(range(7000))
    assert ds.features["kldb_guidance_decoder"] == datasets.Value("string")
    assert ds["alpha_mode"].count("auto") == 1


def test_typed_first_keeps_the_manifest_order_otherwise(tmp_path):
    run = tmp_path / "run"
    write_run(run, seeds=2)
    files = list(manifest(run))
    rows = metadata_rows(run)
    assert [row["file_name"] for row in rows] == files  # every column typed by the first line: order kept
    lines = manifest(run)
    for row in rows:
        line = lines[row["file_name"]]
        assert all(row[key] == value for key, value in line.items() if key != "file")
        assert all(value is None for key, value in row.items() if key not in line and key != "file_name")


def test_split_names_in_folder_names_are_warned_about(mini_run, tmp_path, caplog):
    """A class named "bullet train" makes `datasets` take "-train_" in a folder name for a split."""
    old, new = "three+two_alpha0.0_beta3.0", "three+bullet-train_alpha0.0_beta3.0"
    (mini_run / "images" / old).rename(mini_run / "images" / new)
    text = (mini_run / "manifest.jsonl").read_text().replace(f"images/{old}/", f"images/{new}/")
    (mini_run / "manifest.jsonl").write_text(text)
    with caplog.at_level(logging.WARNING, logger="kldb.dataset"):
        write_imagefolder_metadata(mini_run)
    assert f"would take split names from images/{new}/ and leave the metadata out" in caplog.text
    assert "data_files='metadata.jsonl'" in caplog.text
    plain = load(tmp_path, "imagefolder", data_dir=str(mini_run))
    assert list(plain.features) == ["image"]  # what the warning is about: the metadata is left out
    assert_rows_match_run(load(tmp_path, "imagefolder", data_dir=str(mini_run), data_files=METADATA_NAME), mini_run)
    publish_run(mini_run, "someone/mini-audit", dry_run=True)  # the card's configs name the files
    assert_rows_match_run(load(tmp_path, str(mini_run)), mini_run)


@pytest.mark.parametrize(
    ("path", "split"),
    [
        ("images/three+bullet-train_alpha0.1_beta6.0/seed000000.png", True),
        ("images/train+two_alpha0.1_beta6.0/seed000000.png", False),  # "+" does not set a word off
        ("images/test/seed000000.png", True),
        ("images/three+dev_alpha0.1_beta6.0/seed000000.png", False),
        ("images/three+data-dev_alpha0.1_beta6.0/seed000000.png", True),
        ("images/evaluation-set+two_alpha0.1_beta6.0/seed000000.png", True),
        ("images/three+validity_alpha0.1_beta6.0/seed000000.png", False),
        ("map/validity.png", False),
        ("map/valid_share.png", True),
        ("report/val.png", True),
        ("report/table1.md", False),
        ("report/run.eval", True),
        ("report/Train_curve.png", False),  # case matters
        (".cache/test-1/x.png", False),  # hidden: skipped
        ("__pycache__/test_x.png", False),
        ("report/__test_x.png", True),  # a file starting with "__" is read
    ],
)
def test_split_names_as_datasets_finds_them(tmp_path, path, split):
    """split_name_paths against `datasets`' own inference of a data_dir's splits, on a run with one more file."""
    from datasets.data_files import get_data_patterns

    run = Path(shutil.copytree(MINI_RUN, tmp_path / "run"))
    (run / path).parent.mkdir(parents=True, exist_ok=True)
    (run / path).write_bytes(b"x")
    assert (get_data_patterns(str(run)) != {"train": ["**"]}) is split
    assert bool(split_name_paths(run)) is split


def test_metadata_errors(tmp_path):
    with pytest.raises(
        KLDBPathError, match=r"Expected argument `run_dir` to be an existing run folder but got '.*missing'"
    ):
        write_imagefolder_metadata(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        KLDBPathError, match=r"`run_dir` to be a run folder written by `kldb sweep` \(with sweep.json and "
    ):
        write_imagefolder_metadata(tmp_path / "empty")
    with pytest.raises(TypeError, match=r"Expected argument `run_dir` to be a path but got int"):
        write_imagefolder_metadata(3)
    run = Path(shutil.copytree(MINI_RUN, tmp_path / "run"))
    (run / "manifest.jsonl").write_text("")
    with pytest.raises(KLDBInputError, match=r"`run_dir` to hold at least one image record but"):
        write_imagefolder_metadata(run)
    shutil.copy(MINI_RUN / "manifest.jsonl", run / "manifest.jsonl")
    shutil.rmtree(run / "images")
    with pytest.raises(KLDBInputError, match=r"`run_dir` to hold at least one image file named by its manifest"):
        write_imagefolder_metadata(run)
    assert not (run / METADATA_NAME).exists()


# ----------------------------------------------------------------------------------------------------------------------
# The card and the dry run
# ----------------------------------------------------------------------------------------------------------------------


def card_header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---\n", 4)])


def test_dry_run_writes_the_card_and_sends_nothing(mini_run, no_hub):
    hub = StandInHub(mini_run.parent / "hub")
    result = publish_run(mini_run, "someone/mini-audit", dry_run=True, api=hub)
    assert hub.calls == [] and not (mini_run.parent / "hub").exists()
    assert result.dry_run and result.repo_id == "someone/mini-audit"
    expected = sorted(p.relative_to(mini_run).as_posix() for p in mini_run.rglob("*") if p.is_file())
    assert [path for path, _ in result.files] == expected
    assert {"README.md", METADATA_NAME, "manifest.jsonl", "sweep.json", "report/plot.png"} <= set(expected)
    card = (mini_run / "README.md").read_text(encoding="utf-8")
    header = card_header(card)
    assert header["license"] == "apache-2.0" and header["task_categories"] == ["image-classification"]
    assert header["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": [METADATA_NAME, "images/**/*.png"]}]}
    ]
    assert "| class subsets C | three + two (indices 3, 2) |" in card
    assert "| its classes | 4: zero, one, two, three |" in card
    assert (
        "| seeds | 0..1 (2 seeds) |" in card and "| alpha (KLDB guidance strength; 0 = prompt-only) | 0, 0.3 |" in card
    )
    assert 'load_dataset("someone/mini-audit", split="train")' in card
    assert "Missing: this run had no `report/table1.md`" in card


def test_the_card_reproduces_the_sweep_command(mini_run):
    """The command in the card, parsed by the `kldb` command line, gives the run's last config (sweep.json)."""
    write_imagefolder_metadata(mini_run)
    card = dataset_card(mini_run)
    command, notes = sweep_command(mini_run)
    assert f"```bash\n{command}\nkldb report mini\n```" in card
    argv = shlex.split(command)
    assert argv[:4] == ["kldb", "sweep", "--out", "mini"]
    parsed = cli.sweep_config_from_args(cli.build_parser().parse_args(argv[1:]), grid=True)
    last = json.loads((mini_run / "sweep.json").read_text())["last_config"]
    for name, value in last.items():
        if name not in ("out_dir", "device"):
            assert getattr(parsed, name) == value, name
    # what the old sweep.json of the stored run did not record is said, not guessed
    assert any("did not record" in note and "kldb_step_control" in note for note in notes)
    assert "kldb_step_control" in card and "--step-control" not in command


def test_a_none_the_command_line_cannot_say_is_noted(mini_run, monkeypatch):
    """A setting left None where the default preset has a value: leaving the option out would not give None."""
    import dataclasses

    from kldb import presets

    monkeypatch.setitem(presets.PRESETS, "digits", dataclasses.replace(presets.PRESETS["digits"], negative_prompt="x"))
    command, notes = sweep_command(mini_run)
    assert "--negative-prompt" not in command
    assert "`negative_prompt` was None, which no value of --negative-prompt says (Python API)." in notes


def test_sweep_command_for_a_run_of_today(tmp_path):
    run = tmp_path / "run"
    config = SweepConfig(
        run, pipeline="kldb.testing:tiny_pipeline", class_subsets=[["three", "two"], [0, 1]], alphas=[0.0, 0.3],
        betas=[3.0, 5.0], seeds=[4, 5], num_inference_steps=4, kldb_guidance_interval=2, batch_size=2,
        negative_prompt="blurry", use_karras_sigmas=True,
    )  # fmt: skip
    run_sweep(config, progress=False)
    command, notes = sweep_command(run, out="again")
    assert notes == []
    parsed = cli.sweep_config_from_args(cli.build_parser().parse_args(shlex.split(command)[1:]), grid=True)
    for name in ("pipeline", "alphas", "betas", "seeds", "negative_prompt", "use_karras_sigmas", "batch_size",
                 "kldb_step_control", "num_inference_steps", "dtype"):  # fmt: skip
        assert getattr(parsed, name) == getattr(config, name), name
    assert parsed.class_subsets == [["three", "two"], [0, 1]] and str(parsed.out_dir) == "again"
    # images of settings the last command does not name are said to be there
    smaller = SweepConfig(**{**config.__dict__, "alphas": [0.3], "seeds": [4]})
    run_sweep(smaller, progress=False)
    _, notes = sweep_command(run)
    assert len(notes) == 1 and "did not name (settings three+two_alpha0.0_beta3.0" in notes[0]


def test_card_includes_table1_and_the_plots_of_the_report(mini_run):
    from kldb.report import write_report

    write_report(mini_run, reference=None, per_setting=2)
    table = (mini_run / "report" / "table1.md").read_text(encoding="utf-8").strip()
    card = dataset_card(mini_run, repo_id="someone/mini-audit")
    assert table in card and "Missing:" not in card
    assert "![median kldb vs alpha](report/median_kldb_vs_alpha.png)" in card
    assert "## The boundary map" not in card
    (mini_run / "map").mkdir()  # as `kldb map` writes it
    for name in ("median_kldb.png", "hit_rate.png"):
        shutil.copy(mini_run / "report" / "plot.png", mini_run / "map" / name)
    (mini_run / "map" / "map.md").write_text("| pair | median KLDB |\n")
    card = dataset_card(mini_run)
    assert "## The boundary map\n\n![hit rate](map/hit_rate.png)\n![median kldb](map/median_kldb.png)" in card
    assert "[map/map.md](map/map.md)" in card


def test_a_card_not_written_by_kldb_is_kept(mini_run, caplog):
    (mini_run / "README.md").write_text("# my own card\n")
    with caplog.at_level(logging.WARNING, logger="kldb.dataset"):
        publish_run(mini_run, "someone/mini-audit", dry_run=True)
    assert (mini_run / "README.md").read_text() == "# my own card\n"
    assert "was not written by kldb" in caplog.text
    (mini_run / "README.md").write_text(f"old\n{CARD_MARKER}\n")
    publish_run(mini_run, "someone/mini-audit", dry_run=True)
    assert "## How to reproduce it" in (mini_run / "README.md").read_text()


def test_stable_diffusion_images_get_its_licence(mini_run):
    info = json.loads((mini_run / "sweep.json").read_text())
    info["fixed"]["pipeline"] = "CompVis/stable-diffusion-v1-4"
    (mini_run / "sweep.json").write_text(json.dumps(info))
    assert card_header(dataset_card(mini_run))["license"] == "creativeml-openrail-m"
    assert card_header(dataset_card(mini_run, license="mit"))["license"] == "mit"


# ----------------------------------------------------------------------------------------------------------------------
# Publishing through the stand-in Hub, then loading what was published
# ----------------------------------------------------------------------------------------------------------------------


def test_publish_creates_a_dataset_repo_that_loads(mini_run, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = StandInHub(tmp_path / "hub")
    result = publish_run(mini_run, "someone/mini-audit", token="hf_write_token_for_test", private=True, api=hub)
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1] == {
        "repo_id": "someone/mini-audit",
        "token": "hf_write_token_for_test",
        "private": True,
        "repo_type": "dataset",
        "exist_ok": True,
    }
    assert hub.calls[1][1]["repo_type"] == "dataset" and hub.calls[1][1]["token"] == "hf_write_token_for_test"
    assert result.url == "https://huggingface.co/datasets/someone/mini-audit" and result.commit == "commit-info"
    snapshot = Path(hub.snapshot_download("someone/mini-audit", repo_type="dataset"))
    uploaded = list_files(snapshot)
    assert uploaded == result.files
    assert [path for path, _ in uploaded] == [path for path, _ in list_files(mini_run)]
    for path, _ in uploaded:
        if path != "sweep.json":
            assert (snapshot / path).read_bytes() == (mini_run / path).read_bytes(), path
    published, local = (json.loads((root / "sweep.json").read_text()) for root in (snapshot, mini_run))
    assert published["last_config"].pop("out_dir") == "mini" and local["last_config"].pop("out_dir") == "runs/mini"
    assert published == local
    assert not [p for p in mini_run.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    # the downloaded repo loads by its card's configs, and as an imagefolder
    assert_rows_match_run(load(tmp_path, str(snapshot)), snapshot)
    assert_rows_match_run(load(tmp_path, "imagefolder", data_dir=str(snapshot)), snapshot)


def test_publish_uploads_the_run_path_as_its_name(tmp_path):
    """sweep.json records where the run was written on this machine; the Hub copy names the folder only."""
    run = Path(shutil.copytree(MINI_RUN, tmp_path / "run"))
    info = json.loads((run / "sweep.json").read_text())
    info["last_config"]["out_dir"] = str(run.resolve())
    (run / "sweep.json").write_text(json.dumps(info))
    hub = StandInHub(tmp_path / "hub")
    publish_run(run, "someone/run", api=hub)
    published = json.loads((Path(hub.snapshot_download("someone/run", "dataset")) / "sweep.json").read_text())
    assert published["last_config"]["out_dir"] == "run"
    assert {k: v for k, v in published.items() if k != "last_config"} == {
        k: v for k, v in info.items() if k != "last_config"
    }
    assert json.loads((run / "sweep.json").read_text()) == info  # the run itself is left as it was


def test_publish_refuses_before_contacting_the_hub(mini_run, tmp_path, no_hub):
    hub = StandInHub(tmp_path / "hub")
    for bad in ("", "a/b/c", "has space/x", 7):
        with pytest.raises(ValueError, match=r"Expected argument `repo_id` to be a Hub repo id"):
            publish_run(mini_run, bad, api=hub)
    with pytest.raises(KLDBPathError, match=r"`run_dir` to be an existing run folder but got"):
        publish_run(tmp_path / "missing", "someone/x", api=hub)
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(KLDBPathError, match=r"`run_dir` to be a run folder written by `kldb sweep`"):
        publish_run(tmp_path / "not-a-run", "someone/x", api=hub)
    with pytest.raises(ValueError, match=r"Expected argument `license` to be a Hub licence identifier"):
        publish_run(mini_run, "someone/x", license="Apache 2", api=hub)
    (mini_run / "manifest.rank1.jsonl").write_text("")
    with pytest.raises(KLDBInputError, match=r"`run_dir` to be a finished run but .* still has manifest.rank1.jsonl"):
        publish_run(mini_run, "someone/x", api=hub)
    (mini_run / "manifest.rank1.jsonl").unlink()
    (mini_run / "report" / "notes.md").write_text(f"token {FAKE_TOKEN}")
    with pytest.raises(
        ValueError, match=r"Refusing to publish .*\n  - report/notes.md: contains a Hugging Face token"
    ):
        publish_run(mini_run, "someone/x", api=hub)
    assert hub.calls == []


# ----------------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_publish_run(mini_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: pytest.fail("a dry run made a Hub client"))
    assert cli.main(["publish-run", str(mini_run), "someone/mini-audit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "Would upload 9 files" in out and "metadata.jsonl" in out and f"Dataset card: {mini_run / 'README.md'}" in out
    )
    hub = StandInHub(tmp_path / "hub")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: hub)
    assert cli.main(["publish-run", str(mini_run), "someone/mini-audit", "--private", "--license", "mit"]) == 0
    assert "Done: https://huggingface.co/datasets/someone/mini-audit" in capsys.readouterr().out
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["repo_type"] == "dataset"
    assert card_header((mini_run / "README.md").read_text())["license"] == "mit"
    assert cli.main(["publish-run", str(mini_run), "not a repo", "--dry-run"]) == 2
    assert "error: Expected argument `repo_id`" in capsys.readouterr().err
    assert cli.main(["publish-run", str(tmp_path / "missing"), "someone/x", "--dry-run"]) == 2
    assert "error: Expected argument `run_dir`" in capsys.readouterr().err
