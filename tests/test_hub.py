"""Hub export and publishing, offline: round trips of exported folders, the security scan, the stand-in Hub API."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import gen
from diffusers import DiffusionPipeline

import pipeline_kldb_boundary
from kldb import hub, hub_cli
from kldb.hub import (
    CARD_REPO_ID,
    RESULTS_END,
    RESULTS_START,
    export_folder,
    list_files,
    publish,
    render_model_card,
    scan_folder,
    write_pipeline_folder,
)
from pipeline_kldb_boundary import KLDBBoundaryPipeline

KWARGS = {"classes": [3, 2], "num_inference_steps": 4, "kldb_guidance_interval": 2, "output_type": "pt"}
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # the shape of a user access token, not a real one
WORLD_INFO = {
    "seed": 0,
    "script_version": "1.0.0",
    "default_guidance_scale": 7.5,
    "split_sizes": {"train": 1257, "val": 270, "test": 270},
    "training_seconds": {"total": 4321.0},
    "parameters": {"vae": 1000, "unet": 2000},
    "unet_dtype": "float16",
    "classifier": {"temperature": 1.25, "test_accuracy": 0.985, "test_ece_before": 0.03, "test_ece_after": 0.01},
    "vae": {"test_reconstruction_mse": 0.0042, "classifier_accuracy_on_test_reconstructions": 0.97},
    "folder_bytes": 12_500_000,
}


class FakeHubApi:
    """A local stand-in for ``huggingface_hub.HfApi``: records calls and what ``upload_folder`` would send."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        allowed = set(kwargs["allow_patterns"])
        self.uploaded = [path for path, _ in list_files(kwargs["folder_path"]) if path in allowed]
        return "commit-info"


def run(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=gen(0), **KWARGS)


@pytest.fixture(scope="module")
def exported(tiny_pipe, tmp_path_factory):
    return export_folder(tiny_pipe, tmp_path_factory.mktemp("hub") / "export", repo_id="someone/kldb-tiny")


@pytest.fixture
def exported_copy(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "copy"))


@pytest.fixture
def saved(tiny_pipe, tmp_path):
    """A saved pipeline folder, as the digits world is shipped."""
    return write_pipeline_folder(tiny_pipe, tmp_path / "saved")


# ----------------------------------------------------------------------------------------------------------------------
# export_folder
# ----------------------------------------------------------------------------------------------------------------------


def test_exported_folder_layout(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"README.md", "model_index.json", "pipeline.py", "kldb_boundary.py", "unet", "vae", "classifier"} <= names
    source = Path(pipeline_kldb_boundary.__file__).read_text(encoding="utf-8")
    assert (exported / "pipeline.py").read_text(encoding="utf-8") == source
    assert (exported / "kldb_boundary.py").read_text(encoding="utf-8") == source
    assert list(exported.rglob("*.safetensors"))
    assert scan_folder(exported) == []
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert "someone/kldb-tiny" in card and CARD_REPO_ID not in card
    assert "Not measured for these weights" in card  # a pipeline object carries no world_info.json


def test_exported_folder_loads_by_name(exported, tiny_pipe):
    pipe = DiffusionPipeline.from_pretrained(exported, custom_pipeline="kldb_boundary", trust_remote_code=True)
    assert type(pipe).__name__ == "KLDBBoundaryPipeline"
    # same weights and configs; a reloaded transformers/diffusers module may round differently in the last bit
    torch.testing.assert_close(run(pipe).images, run(tiny_pipe).images, rtol=0, atol=1e-5)


def test_exported_folder_loads_as_custom_pipeline_folder(exported):
    pipe = DiffusionPipeline.from_pretrained(exported, custom_pipeline=str(exported), trust_remote_code=True)
    assert type(pipe).__name__ == "KLDBBoundaryPipeline"
    assert run(pipe).kldb.shape == (1,)
    # the model card's GPU snippet takes the adapter from the loaded pipeline's module
    assert hasattr(sys.modules[type(pipe).__module__], "ImageClassifier")


def test_export_removes_local_paths_recorded_by_save_pretrained(saved, tmp_path):
    reloaded = KLDBBoundaryPipeline.from_pretrained(saved)  # its configs now record `_name_or_path` = saved/...
    plain = tmp_path / "plain"
    reloaded.save_pretrained(plain)
    assert str(saved) in (plain / "model_index.json").read_text(encoding="utf-8")
    folder = export_folder(reloaded, tmp_path / "export")
    for path in folder.rglob("*.json"):
        text = path.read_text(encoding="utf-8")
        assert "_name_or_path" not in text and str(tmp_path) not in text, path
    assert scan_folder(folder) == []


def test_export_from_saved_folder_fills_results(saved, tmp_path):
    (saved / "world_info.json").write_text(json.dumps(WORLD_INFO), encoding="utf-8")
    (saved / "RESULTS.md").write_text("| beta | alpha | median KLDB |\n|---|---|---|\n| 6 | 0.1 | 0.123 |\n")
    folder = export_folder(saved, tmp_path / "export", repo_id="someone/kldb-digits")
    card = (folder / "README.md").read_text(encoding="utf-8")
    results = card[card.index(RESULTS_START) : card.index(RESULTS_END)]
    assert "Not measured" not in results
    assert (
        "| classifier accuracy on the held-out test digits (split sizes: train 1257, val 270, test 270) | 98.50 % |"
        in results
    )
    assert (
        "| expected calibration error on the test split, before / after temperature scaling | 0.03 / 0.01 |" in results
    )
    assert "| 6 | 0.1 | 0.123 |" in results
    assert "someone/kldb-digits" in card
    assert json.loads((folder / "world_info.json").read_text()) == WORLD_INFO
    source_files = {p for p, _ in list_files(saved)} - {"README.md", "RESULTS.md"}
    assert source_files <= {p for p, _ in list_files(folder)}  # everything copied, byte for byte
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        saved / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_export_renders_a_demo_report(tiny_pipe, tmp_path):
    row = {"alpha": 0.0, "median_kldb": 2.5, "median_entropy": 0.1, "predicted_class_mix": {"three": 3}, "seconds": 4}
    report = {
        "world": "digits world",
        "prompt": "three and eight",
        "beta": 7.5,
        "steps": 40,
        "interval": 5,
        "seeds": [0, 1, 2],
        "settings": {"prompt_only": row, "guided": {**row, "alpha": 0.1, "median_kldb": 1.0}},
        "relative_kldb_change": -0.6,
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    folder = export_folder(tiny_pipe, tmp_path / "export", results=path)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "| guided | 0.1 | 1.0000 | 0.1000 | three: 3 | 4 |" in card
    assert "Median KLDB change with guidance: -60.0 %." in card
    assert "3 images per setting from seeds 0..2" in card


def test_export_without_model_card(tiny_pipe, tmp_path):
    folder = export_folder(tiny_pipe, tmp_path / "export", model_card=False)
    assert not (folder / "README.md").exists() and (folder / "pipeline.py").is_file()


def test_export_leaves_caches_behind(saved, tmp_path):
    (saved / "__pycache__").mkdir()
    (saved / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (saved / ".cache" / "huggingface").mkdir(parents=True)
    (saved / ".cache" / "huggingface" / "upload.metadata").write_text("x")
    (saved / "unet" / "weights.lock").write_text("")
    folder = export_folder(saved, tmp_path / "export")
    names = {p for p, _ in list_files(folder)}
    assert not any("__pycache__" in p or ".cache" in p or p.endswith(".lock") for p in names)


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        (lambda d: (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle"), "pickle-capable files"),
        (lambda d: (d / "notes.txt").write_text(f"trained in {Path.home()}/runs"), "contains the local path"),
        (lambda d: (d / "notes.txt").write_text(f"token={FAKE_TOKEN}"), "contains a Hugging Face token"),
    ],
    ids=["bin", "home-path", "token"],
)
def test_export_refuses_unsafe_source_and_leaves_destination_alone(saved, tmp_path, plant, message):
    plant(saved)
    destination = tmp_path / "export"
    with pytest.raises(ValueError, match=message):
        export_folder(saved, destination)
    assert not destination.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_errors(saved, tiny_pipe, tmp_path):
    with pytest.raises(TypeError, match=r"Expected argument `pipe_or_path` to be a pipeline .* but got int"):
        export_folder(3, tmp_path / "x")
    with pytest.raises(ValueError, match=r"`pipe_or_path` to be a saved pipeline folder with a model_index.json"):
        export_folder(tmp_path, tmp_path / "x")
    with pytest.raises(ValueError, match=r"`folder` to lie outside the source folder"):
        export_folder(saved, saved / "export")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`folder` to be a folder \(new or existing\) but got the file"):
        export_folder(tiny_pipe, tmp_path / "file")
    with pytest.raises(TypeError, match=r"`model_card` to be a bool or a path but got int"):
        export_folder(tiny_pipe, tmp_path / "x", model_card=1)
    with pytest.raises(FileNotFoundError, match=r"`model_card` to name an existing file"):
        export_folder(tiny_pipe, tmp_path / "x", model_card=tmp_path / "missing.md")
    with pytest.raises(ValueError, match=r"`results` to be an existing .json or .md file but got"):
        export_folder(tiny_pipe, tmp_path / "x", results=tmp_path / "missing.json")
    with pytest.raises(TypeError, match=r"`results` to be a demo report dict or a path .* but got int"):
        export_folder(tiny_pipe, tmp_path / "x", results=5)
    with pytest.raises(ValueError, match=r"`results` to be a `kldb.demo` report .* but it lacks 'settings'"):
        export_folder(tiny_pipe, tmp_path / "x", results={"world": "w"})
    with pytest.raises(ValueError, match=r"`world_info` to be a dict or an existing JSON file"):
        export_folder(tiny_pipe, tmp_path / "x", world_info=tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"`repo_id` to be a Hub repo id"):
        export_folder(tiny_pipe, tmp_path / "x", repo_id="not a repo")
    assert not (tmp_path / "x").exists()


def test_model_card_without_markers_is_refused():
    with pytest.raises(ValueError, match="to contain the markers"):
        render_model_card("# card", world_info=WORLD_INFO)
    with pytest.raises(ValueError, match="to contain the markers"):
        render_model_card("# card")  # nothing measured: the section still has to say so


def test_unmeasured_weights_never_show_the_repositorys_figures():
    from kldb.hub import MODEL_CARD_PATH, NOT_MEASURED, RESULTS_END, RESULTS_START

    template = MODEL_CARD_PATH.read_text(encoding="utf-8")
    assert "three and eight" in template.split(RESULTS_START)[1].split(RESULTS_END)[0]  # the digits world's figures
    card = render_model_card(template)
    section = card.split(RESULTS_START)[1].split(RESULTS_END)[0]
    assert section.strip() == NOT_MEASURED


# ----------------------------------------------------------------------------------------------------------------------
# The security scan
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plant", "finding"),
    [
        (lambda d: (d / "README.md").write_text(f"use {FAKE_TOKEN}"), "README.md: contains a Hugging Face token"),
        (
            lambda d: (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x"),
            "unet/diffusion_pytorch_model.bin: pickle",
        ),
        (lambda d: (d / "extra.pkl").write_bytes(b"x"), "extra.pkl: pickle"),
        (lambda d: (d / "model.ckpt").write_bytes(b"x"), "model.ckpt: pickle"),
        (lambda d: (d / "__pycache__").mkdir(), "__pycache__: cache"),
        (lambda d: (d / ".cache" / "huggingface").mkdir(parents=True), ".cache: cache"),
        (lambda d: (d / "vae" / "x.lock").write_text(""), "vae/x.lock: cache"),
        (lambda d: (d / "link.json").symlink_to(d / "model_index.json"), "link.json: symbolic link"),
        (lambda d: (d / "notes.md").write_text(f"see {d.parent}/weights"), "notes.md: contains the local path"),
        (lambda d: (d / "notes.md").write_text("cached in /tmp/hub"), "notes.md: contains the local path '/tmp'"),
    ],
    ids=["token", "bin", "pkl", "ckpt", "pycache", "cache", "lock", "symlink", "tmp-path", "tmp-literal"],
)
def test_scan_finds_planted_problems(exported_copy, plant, finding):
    plant(exported_copy)
    findings = scan_folder(exported_copy)
    assert any(f.startswith(finding) for f in findings), findings


def test_scan_finds_local_name_or_path(exported_copy):
    index = json.loads((exported_copy / "model_index.json").read_text())
    index["_name_or_path"] = "./my-local-run"
    (exported_copy / "model_index.json").write_text(json.dumps(index))
    assert scan_folder(exported_copy) == ["model_index.json: `_name_or_path` names the local folder './my-local-run'"]


def test_scan_finds_the_given_token_and_hf_token_env(exported_copy, monkeypatch):
    (exported_copy / "notes.txt").write_text("plain-secret-1234 and env-secret-5678")
    assert scan_folder(exported_copy) == []
    assert scan_folder(exported_copy, token="plain-secret-1234") == ["notes.txt: contains a Hugging Face token"]
    monkeypatch.setenv("HF_TOKEN", "env-secret-5678")
    assert scan_folder(exported_copy) == ["notes.txt: contains a Hugging Face token"]


def test_scan_ignores_paths_that_only_start_alike(exported_copy):
    (exported_copy / "notes.md").write_text("a /tmpfs mount and https://huggingface.co/some/repo")
    assert scan_folder(exported_copy) == []


# ----------------------------------------------------------------------------------------------------------------------
# publish, against a local stand-in for the Hub API
# ----------------------------------------------------------------------------------------------------------------------


def test_publish_dry_run_lists_and_sends_nothing(exported, monkeypatch, caplog):
    def no_hub(*args, **kwargs):
        raise AssertionError("a dry run must not create a Hub client")

    monkeypatch.setattr("huggingface_hub.HfApi", no_hub)
    api = FakeHubApi()
    with caplog.at_level(logging.INFO, logger="kldb.hub"):
        result = publish(exported, "someone/kldb-tiny", dry_run=True, api=api)
        result_default_api = publish(exported, "someone/kldb-tiny", dry_run=True)
    assert api.calls == []
    expected = [
        (p.relative_to(exported).as_posix(), p.stat().st_size) for p in sorted(exported.rglob("*")) if p.is_file()
    ]
    assert result.files == expected == result_default_api.files
    assert result.total_bytes == sum(size for _, size in expected)
    listing = result.listing()
    assert listing.startswith(
        f"Would upload {len(expected)} files ({result.total_bytes:,} bytes) to someone/kldb-tiny:"
    )
    for path, size in expected:
        assert f"{size:,} B  {path}" in listing
    assert "Dry run: would upload" in caplog.text and "nothing was sent" in caplog.text


def test_publish_uploads_exactly_the_listed_files(exported, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    api = FakeHubApi()
    result = publish(exported, "someone/kldb-tiny", token="hf_write_token_for_test", private=True, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create, upload = api.calls[0][1], api.calls[1][1]
    assert create == {
        "repo_id": "someone/kldb-tiny",
        "token": "hf_write_token_for_test",
        "private": True,
        "repo_type": "model",
        "exist_ok": True,
    }
    assert upload["repo_id"] == "someone/kldb-tiny" and upload["folder_path"] == str(exported)
    assert upload["revision"] is None and upload["token"] == "hf_write_token_for_test"
    assert upload["repo_type"] == "model" and upload["commit_message"]
    assert api.uploaded == [path for path, _ in result.files] == [path for path, _ in list_files(exported)]
    assert result.commit == "commit-info" and result.url == "https://huggingface.co/someone/kldb-tiny"
    assert not result.dry_run
    assert scan_folder(exported, token="hf_write_token_for_test") == []  # the token went to the API only


def test_publish_to_a_branch_creates_it_first(exported):
    api = FakeHubApi()
    publish(exported, "someone/kldb-tiny", revision="v0.1", api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1]["branch"] == "v0.1" and api.calls[1][1]["exist_ok"] is True
    assert api.calls[2][1]["revision"] == "v0.1"


def test_publish_builds_hf_api_with_the_token(exported, monkeypatch):
    built: list[FakeHubApi] = []

    def factory(token=None):
        built.append(FakeHubApi(token))
        return built[-1]

    monkeypatch.setattr("huggingface_hub.HfApi", factory)
    publish(exported, "someone/kldb-tiny", token="hf_write_token_for_test")
    assert len(built) == 1 and built[0].token == "hf_write_token_for_test"
    assert [name for name, _ in built[0].calls] == ["create_repo", "upload_folder"]


def test_publish_refuses_unsafe_folder_before_contacting_the_hub(exported_copy):
    (exported_copy / "README.md").write_text(f"token {FAKE_TOKEN}")
    (exported_copy / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    api = FakeHubApi()
    with pytest.raises(ValueError, match=r"Refusing to publish .*\n  - README.md: contains a Hugging Face token"):
        publish(exported_copy, "someone/kldb-tiny", api=api)
    with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model.bin: pickle-capable file"):
        publish(exported_copy, "someone/kldb-tiny", api=api, dry_run=True)
    assert api.calls == []


def test_publish_warns_when_the_card_still_shows_the_placeholder(tiny_pipe, tmp_path, caplog):
    folder = export_folder(tiny_pipe, tmp_path / "export")
    with caplog.at_level(logging.WARNING, logger="kldb.hub"):
        publish(folder, "someone/kldb-tiny", dry_run=True)
    assert f"README.md still shows {CARD_REPO_ID}" in caplog.text


def test_publish_errors(exported, tmp_path):
    api = FakeHubApi()
    for bad in ("", "a/b/c", "has space/x", "-x/y", "x/y.", 7):
        with pytest.raises(ValueError, match=r"Expected argument `repo_id` to be a Hub repo id"):
            publish(exported, bad, api=api)
    with pytest.raises(ValueError, match=r"`folder` to be an existing folder but got"):
        publish(tmp_path / "missing", "someone/x", api=api)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`folder` to be a folder written by `export_folder` \(with a pipeline.py\)"):
        publish(tmp_path / "empty", "someone/x", api=api)
    with pytest.raises(ValueError, match=r"`revision` to be a branch name without spaces but got 'my branch'"):
        publish(exported, "someone/x", revision="my branch", api=api)
    assert api.calls == []


# ----------------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_export_then_dry_run(saved, tmp_path, capsys):
    out = tmp_path / "export"
    assert hub_cli.main(["export", str(saved), str(out), "--repo-id", "someone/kldb-cli"]) == 0
    assert "someone/kldb-cli" in (out / "README.md").read_text(encoding="utf-8")
    assert hub_cli.main(["publish", str(out), "someone/kldb-cli", "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    assert "Would upload" in stdout and "kldb_boundary.py" in stdout and "unet/config.json" in stdout


def test_cli_publish_uses_the_hub_api(exported, monkeypatch, capsys):
    api = FakeHubApi()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: api)
    assert hub_cli.main(["publish", str(exported), "someone/kldb-cli", "--private", "--revision", "dev"]) == 0
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1]["private"] is True
    assert "Uploaded" in capsys.readouterr().out


def test_cli_reports_refused_input(exported, tmp_path, capsys):
    assert hub_cli.main(["publish", str(exported), "not a repo", "--dry-run"]) == 2
    assert "error: Expected argument `repo_id`" in capsys.readouterr().err
    assert hub_cli.main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_cli_export_digits_before_the_world_is_trained(monkeypatch, tmp_path, capsys):
    from kldb import digits

    monkeypatch.setattr(digits, "WORLD_PATH", tmp_path / "world")
    assert hub_cli.main(["export", "digits", str(tmp_path / "out")]) == 1
    assert "error: The digits world is not trained yet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_mounts_into_another_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="kldb")
    hub_cli.add_hub_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["publish", "folder", "someone/x", "--dry-run"])
    assert args.handler is hub_cli.run_publish and args.dry_run and args.repo_id == "someone/x"
    assert hub.PIPELINE_FILE_NAMES == ("kldb_boundary.py", "pipeline.py")


def test_kldb_console_script_has_export_and_publish(saved, tmp_path, capsys):
    from kldb import cli

    out = tmp_path / "export-via-kldb"
    assert cli.main(["export", str(saved), str(out), "--repo-id", "someone/kldb-main-cli"]) == 0
    assert (out / "kldb_boundary.py").is_file() and (out / "pipeline.py").is_file()
    assert cli.main(["publish", str(out), "someone/kldb-main-cli", "--dry-run"]) == 0
    assert "Would upload" in capsys.readouterr().out
    assert cli.main(["publish", str(tmp_path / "missing"), "someone/x", "--dry-run"]) != 0


# ----------------------------------------------------------------------------------------------------------------------
# The card's licence and base model
# ----------------------------------------------------------------------------------------------------------------------

SD_V1_UNET = {"cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280]}


def card_header(folder: Path) -> list[str]:
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    return card[4 : card.index("\n---\n", 3)].split("\n")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_our_own_weights_keep_apache(exported, saved, tmp_path):
    header = card_header(exported)
    assert "license: apache-2.0" in header and not any(line.startswith("base_model") for line in header)
    assert hub.detect_base_model(saved) == hub.BaseModelInfo(sd_v1=False, base_model=None, evidence=None)
    from kldb.digits import WORLD_PATH

    if (WORLD_PATH / "model_index.json").is_file():
        assert not hub.detect_base_model(WORLD_PATH).sd_v1


@pytest.mark.parametrize(
    ("where", "name", "base_model"),
    [
        ("model_index.json", "CompVis/stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-4"),
        ("model_index.json", "runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
        (
            "unet/config.json",
            "{home}/.cache/huggingface/hub/models--stable-diffusion-v1-5--stable-diffusion-v1-5/snapshots/0a1b/unet",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ),
    ],
    ids=["sd14", "sd15-runwayml", "sd15-cache-path"],
)
def test_export_of_sd_v1_weights_defaults_to_openrail(saved, tmp_path, where, name, base_model):
    edit_json(saved / where, _name_or_path=name.format(home=Path.home()))
    folder = export_folder(saved, tmp_path / "export")
    header = card_header(folder)
    assert "license: creativeml-openrail-m" in header and f"base_model: {base_model}" in header
    assert sum(line.startswith("license:") for line in header) == 1
    assert scan_folder(folder) == []  # a cache path is still stripped from the exported configs


def test_export_of_a_pipeline_object_loaded_from_sd_v1(saved, tmp_path):
    pipe = KLDBBoundaryPipeline.from_pretrained(saved)
    pipe.register_to_config(_name_or_path="CompVis/stable-diffusion-v1-4")  # what from_pretrained(repo id) records
    header = card_header(export_folder(pipe, tmp_path / "export"))
    assert "license: creativeml-openrail-m" in header and "base_model: CompVis/stable-diffusion-v1-4" in header


def test_sd_v1_unet_without_a_name_gets_openrail_and_asks_for_the_base_model(saved, tmp_path, caplog):
    edit_json(saved / "unet" / "config.json", **SD_V1_UNET)  # a locally saved SD v1 fine-tune: no repo id anywhere
    with caplog.at_level(logging.WARNING, logger="kldb.hub"):
        header = card_header(export_folder(saved, tmp_path / "export"))
    assert "license: creativeml-openrail-m" in header and not any(line.startswith("base_model") for line in header)
    assert "no config names the repo they come from; pass `base_model` (`--base-model`)" in caplog.text
    header = card_header(export_folder(saved, tmp_path / "named", base_model="CompVis/stable-diffusion-v1-4"))
    assert "base_model: CompVis/stable-diffusion-v1-4" in header


def test_given_license_and_base_model_win(tiny_pipe, saved, tmp_path, caplog):
    header = card_header(export_folder(tiny_pipe, tmp_path / "export", license="mit", base_model="someone/base"))
    assert [line for line in header if line.startswith(("license", "base_model"))] == [
        "license: mit",
        "base_model: someone/base",
    ]
    edit_json(saved / "model_index.json", _name_or_path="CompVis/stable-diffusion-v1-4")
    with caplog.at_level(logging.WARNING, logger="kldb.hub"):
        header = card_header(export_folder(saved, tmp_path / "sd", license="apache-2.0"))
    assert "license: apache-2.0" in header
    assert "look like Stable Diffusion v1 weights" in caplog.text and "creativeml-openrail-m" in caplog.text


def test_license_and_base_model_errors(tiny_pipe, tmp_path):
    for bad in ("Apache 2.0", "", "MIT", 3):
        with pytest.raises(ValueError, match=r"Expected argument `license` to be a Hub licence identifier"):
            export_folder(tiny_pipe, tmp_path / "x", license=bad)
    for bad in ("not an id", "a/b/c", "", 3):
        with pytest.raises(ValueError, match=r"Expected argument `base_model` to be the Hub id of the model"):
            export_folder(tiny_pipe, tmp_path / "x", base_model=bad)
    with pytest.raises(ValueError, match=r"Expected no `license`, `base_model` with `model_card=False`: they go only"):
        export_folder(tiny_pipe, tmp_path / "x", model_card=False, license="mit", base_model="a/b")
    with pytest.raises(ValueError, match=r"Expected no `repo_id` with `model_card=False`: it goes only"):
        export_folder(tiny_pipe, tmp_path / "x", model_card=False, repo_id="a/b")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`folder` to be a folder \(new or existing\) but .* lies inside the file"):
        export_folder(tiny_pipe, tmp_path / "file" / "x")
    assert not (tmp_path / "x").exists()


def test_render_model_card_sets_the_yaml_header():
    template = f"# card\n{RESULTS_START}\n{RESULTS_END}\n"
    card = render_model_card(template, license="creativeml-openrail-m", base_model="CompVis/stable-diffusion-v1-4")
    assert card.startswith("---\nlicense: creativeml-openrail-m\nbase_model: CompVis/stable-diffusion-v1-4\n---\n")
    listed = "---\nlicense: mit\nbase_model:\n- a/b\n- c/d\ntags:\n- x\n---\n" + template
    card = render_model_card(listed, base_model="e/f")
    assert card.startswith("---\nlicense: mit\nbase_model: e/f\ntags:\n- x\n---\n")
    assert render_model_card(template) == template.replace(RESULTS_END, f"{hub.NOT_MEASURED}\n{RESULTS_END}")


def test_publish_sets_license_and_base_model(exported_copy, caplog):
    readme = exported_copy / "README.md"
    before = readme.read_text(encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="kldb.hub"):
        publish(exported_copy, "someone/x", dry_run=True, license="mit", base_model="someone/base", api=FakeHubApi())
    assert readme.read_text(encoding="utf-8") == before  # a dry run changes nothing
    assert "Dry run: would set {'license': 'mit', 'base_model': 'someone/base'} in README.md." in caplog.text
    api = FakeHubApi()
    publish(exported_copy, "someone/x", license="mit", base_model="someone/base", api=api)
    header = card_header(exported_copy)
    assert "license: mit" in header and "base_model: someone/base" in header
    assert "README.md" in api.uploaded


def test_publish_warns_when_sd_v1_weights_carry_another_license(exported_copy, caplog):
    edit_json(exported_copy / "unet" / "config.json", **SD_V1_UNET)
    with caplog.at_level(logging.WARNING, logger="kldb.hub"):
        publish(exported_copy, "someone/x", dry_run=True)
    assert "README.md gives the licence apache-2.0, but these look like Stable Diffusion v1 weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kldb.hub"):
        publish(exported_copy, "someone/x", license="creativeml-openrail-m", api=FakeHubApi())
    assert "look like Stable Diffusion v1" not in caplog.text


def test_publish_license_errors(exported_copy):
    api = FakeHubApi()
    with pytest.raises(ValueError, match=r"Expected argument `license` to be a Hub licence identifier"):
        publish(exported_copy, "someone/x", license="Apache 2", api=api)
    (exported_copy / "README.md").unlink()
    with pytest.raises(ValueError, match=r"`folder` to hold a README.md model card to set license in"):
        publish(exported_copy, "someone/x", license="mit", api=api)
    assert api.calls == []


def test_cli_export_and_publish_take_license_and_base_model(saved, tmp_path, capsys):
    out = tmp_path / "export"
    argv = ["export", str(saved), str(out), "--license", "openrail", "--base-model", "someone/base"]
    assert hub_cli.main(argv) == 0
    assert {"license: openrail", "base_model: someone/base"} <= set(card_header(out))
    assert hub_cli.main(["publish", str(out), "someone/x", "--dry-run", "--license", "mit"]) == 0
    assert "license: openrail" in card_header(out)
    assert hub_cli.main(["export", str(saved), str(tmp_path / "bad"), "--license", "Apache 2"]) == 2
    assert "error: Expected argument `license` to be a Hub licence identifier" in capsys.readouterr().err


def test_scan_and_card_refuse_inputs_of_the_wrong_kind(tmp_path):
    for bad in (tmp_path / "missing", tmp_path / "file.txt"):
        (tmp_path / "file.txt").write_text("")
        with pytest.raises(ValueError, match=r"Expected argument `folder` to be an existing folder but got '"):
            scan_folder(bad)  # a folder that is not there must not pass as "nothing found"
    with pytest.raises(ValueError, match=r"Expected argument `folder` to be an existing folder"):
        hub.check_folder_is_safe(tmp_path / "missing")
    with pytest.raises(TypeError, match=r"Expected argument `template` to be the model card's text but got NoneType"):
        render_model_card(None)
