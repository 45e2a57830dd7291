"""The app's handlers without a browser (kldb.app), ``kldb app``'s argument checks, and the Space export (kldb.space).

The handlers run on tiny random components labelled like the digits world; the Space export is started with
``python app.py`` on the real digits world. The browser test is tests/test_app_browser.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kldb import app as kldb_app
from kldb import cli
from kldb.errors import KLDBPathError
from kldb.hub import publish
from kldb.space import SPACE_FILES, is_space_folder, write_space

CLASSES = ["three", "eight"]


@pytest.fixture(scope="module")
def world():
    return kldb_app.load_world(tiny=True)


def reference_output(world, seeds, alpha, steps=2, interval=2):
    """The pipeline called directly, as a user would, with the seeds and settings of one row of the app."""
    return world.pipe(
        prompt="three and eight",
        classes=[3, 8],
        num_inference_steps=steps,
        guidance_scale=world.preset.beta,
        kldb_guidance_interval=interval,
        kldb_guidance_scale=alpha,
        kldb_step_control="backtracking" if alpha > 0 else "fixed",
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pil",
    )


def expected_caption(kldb: float, probabilities: list[float], labels: list[str]) -> str:
    top = np.argsort(-np.asarray(probabilities), kind="stable")[:2]
    return ", ".join([f"KLDB = {kldb:.3f}"] + [f"{labels[i]} = {probabilities[i]:.2f}" for i in top])


# ----------------------------------------------------------------------------------------------------------------------
# Explore
# ----------------------------------------------------------------------------------------------------------------------


def test_generate_rows_come_from_the_same_seeds_and_match_their_records(world, tmp_path):
    result = kldb_app.generate(
        world, CLASSES, steps=2, interval=2, seed=5, num_images=3, alpha=0.2, session=str(tmp_path)
    )
    assert {row: len(images) for row, images in result.galleries.items()} == {"prompt_only": 3, "guided": 3}

    # the zip holds every image and the same records as the call returned
    with zipfile.ZipFile(result.zip_path) as archive:
        names = set(archive.namelist())
        records = json.loads(archive.read(kldb_app.RESULTS_NAME))
    assert records == result.results == kldb_app.read_zip_results(result.zip_path)
    assert {image["file"] for image in records["images"]} <= names and len(records["images"]) == 6
    assert records["settings"]["prompt"] == "three and eight" and records["settings"]["seeds"] == [5, 6, 7]

    # against the pipeline called directly with the same seeds: alpha 0 for the first row, the guided step for the other
    for row, alpha in (("prompt_only", 0.0), ("guided", 0.2)):
        reference = reference_output(world, [5, 6, 7], alpha)
        recorded = [image for image in records["images"] if image["row"] == row]
        np.testing.assert_allclose([r["kldb"] for r in recorded], reference.kldb.numpy(), rtol=1e-5)
        assert [r["seed"] for r in recorded] == [5, 6, 7]
        captions = [caption for _, caption in result.galleries[row]]
        assert captions == [r["caption"] for r in recorded]
        assert captions == [
            expected_caption(float(k), p.tolist(), world.labels)
            for k, p in zip(reference.kldb, reference.probabilities)
        ]
        median = {m[0]: m[2] for m in result.medians}[row]
        assert median == pytest.approx(float(np.median(reference.kldb.numpy())), abs=1e-4)
    assert "per seed:" in result.summary and "of 3 images moved toward the boundary" in result.summary


def test_generate_reports_every_step_to_the_progress_bar(world, tmp_path):
    calls = []
    kldb_app.generate(
        world, CLASSES, steps=3, interval=3, num_images=1, session=str(tmp_path), progress=lambda *c: calls.append(c)
    )
    assert [done for done, _, _ in calls] == list(range(1, 7))
    assert {total for _, total, _ in calls} == {6}
    assert [row for _, _, row in calls] == ["prompt_only"] * 3 + ["guided"] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": []}, r"Expected argument `classes` to name at least one class of the classifier but got none"),
        (
            {"classes": ["thre"]},
            r"`classes` contains 'thre', which is not among the classifier's labels. Close matches",
        ),
        ({"num_images": 0}, r"Expected argument `num_images` to be a positive integer in \[1, 64\] but got 0"),
        ({"num_images": 65}, r"Expected argument `num_images` to be a positive integer in \[1, 64\] but got 65"),
        ({"steps": 1.5}, r"Expected argument `steps` to be a positive integer in \[1, 1000\] but got 1.5"),
        ({"alpha": -0.1}, r"Expected argument `alpha` to be a finite number >= 0 but got -0.1"),
        ({"beta": float("nan")}, r"Expected argument `beta` to be a finite number >= 0 but got nan"),
        ({"seed": -1}, r"Expected argument `seed` to be a non-negative integer but got -1"),
        ({"step_control": "bold"}, r"Expected argument `step_control` to be one of \['fixed', .*\] but got 'bold'"),
        ({"interval": 0}, r"Expected argument `interval` to be a positive integer but got 0"),
    ],
)
def test_generate_refuses_bad_input_with_a_message_and_writes_nothing(world, tmp_path, kwargs, message):
    arguments = {"classes": CLASSES, "steps": 2, "interval": 2, "num_images": 1, "session": str(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=message):
        kldb_app.generate(world, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_each_session_keeps_its_own_latest_results(world, tmp_path):
    first, second = tmp_path / "kldb-app-a", tmp_path / "kldb-app-b"
    first.mkdir(), second.mkdir()
    a1 = kldb_app.generate(world, CLASSES, steps=2, interval=2, num_images=1, session=str(first))
    b = kldb_app.generate(world, ["zero", "one"], steps=2, interval=2, num_images=2, session=str(second))
    a2 = kldb_app.generate(world, CLASSES, steps=2, interval=2, num_images=1, seed=3, session=str(first))
    assert not a1.out_dir.exists() and not a1.zip_path.exists()  # a session's newer call replaces its older one
    assert a2.zip_path.is_file() and b.zip_path.is_file()
    assert kldb_app.read_zip_results(b.zip_path)["settings"]["classes"] == ["zero", "one"]
    assert kldb_app.read_zip_results(a2.zip_path)["settings"]["seeds"] == [3]
    kldb_app.remove_session_dir(str(first))
    assert not first.exists() and second.exists()
    kldb_app.remove_session_dir(str(tmp_path))  # not a session folder: left alone
    assert tmp_path.exists()


def test_the_prompt_follows_the_picked_classes(world):
    assert kldb_app.prompt_for(world, ["eight", "three"]) == "eight and three"
    assert kldb_app.prompt_for(world, ["seven"]) == "seven"
    assert kldb_app.prompt_for(world, ["thre"]) == "" and kldb_app.prompt_for(world, []) == ""
    assert world.default_classes == CLASSES


# ----------------------------------------------------------------------------------------------------------------------
# From an image
# ----------------------------------------------------------------------------------------------------------------------


def test_edit_image_scores_before_and_after(world):
    from kldb.render import caption_lines

    image = reference_output(world, [0], 0.0).images[0].resize((20, 24))
    start, edited, scores = kldb_app.edit_image(world, image, CLASSES, strength=0.5, steps=4, interval=2)
    assert start.size == edited.size == (32, 32)
    with torch.no_grad():
        logits = world.classifier(torch.from_numpy(np.asarray(start, dtype=np.float32) / 255).permute(2, 0, 1)[None])
    p = logits.softmax(-1)[0]
    expected_start = float(-np.log(2) - (p[3].log() + p[8].log()) / 2)
    assert scores["kldb_start"] == pytest.approx(expected_start, abs=1e-4)
    assert scores["before"] == ", ".join(caption_lines(scores["kldb_start"], p.tolist(), world.labels, 2))
    assert scores["pixel_l2"] > 0


def test_edit_image_refuses_bad_input(world):
    with pytest.raises(ValueError, match=r"Expected argument `image` to be an uploaded image but got none"):
        kldb_app.edit_image(world, None, CLASSES)
    image = reference_output(world, [0], 0.0).images[0]
    with pytest.raises(ValueError, match=r"Expected argument `strength` to be in \(0, 1\] but got 1.5"):
        kldb_app.edit_image(world, image, CLASSES, strength=1.5)


# ----------------------------------------------------------------------------------------------------------------------
# Audit
# ----------------------------------------------------------------------------------------------------------------------


def test_a_sweep_runs_in_the_background_and_its_report_opens(world, tmp_path):
    from kldb.runfolder import read_manifest

    run = tmp_path / "run"
    job = kldb_app.start_sweep(world, CLASSES, "0, 0.2", "6", 2, steps=5, run_dir=str(run))
    assert job.total == 4
    job.thread.join(timeout=600)
    assert job.error is None and not job.running
    assert kldb_app.count_done(run) == len(read_manifest(run)) == 4
    line, over = kldb_app.sweep_status(job)
    assert over and f"Sweep done in `{run}`: 4 of 4 images" in line
    table, plots = kldb_app.open_run(str(run))
    assert table.startswith("### Table 1: run") and (run / "report" / "table1.md").read_text() in table
    assert [Path(path).name for path, _ in plots] == [name for name, _ in kldb_app.REPORT_PLOTS]


def test_sweep_status_shows_a_failed_sweep(tmp_path):
    job = kldb_app.SweepJob(run_dir=tmp_path, total=4, error="ValueError: no")
    assert kldb_app.sweep_status(job) == (f"**The sweep failed:** ValueError: no (run folder `{tmp_path}`).", True)
    assert kldb_app.sweep_status(None) == ("No sweep started in this session.", True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([], "0", "6", 2), r"Expected argument `classes` to name at least one class"),
        ((CLASSES, "0, x", "6", 2), r"Expected argument `alphas` to be numbers >= 0 separated by commas.*'0, x'"),
        ((CLASSES, "0", "-1", 2), r"Expected argument `betas` to be numbers >= 0 separated by commas.*'-1'"),
        ((CLASSES, "0", "6", 0), r"Expected argument `num_seeds` to be a positive integer in \[1, 256\] but got 0"),
        (
            (CLASSES, "0 0.1 0.2 0.3", "3 6 9", 30),
            r"Expected a sweep of at most 256 images from the page but got 360 \(4 alphas x 3 betas x 30 seeds\)",
        ),
    ],
)
def test_start_sweep_refuses_bad_input_before_starting(world, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        kldb_app.start_sweep(world, *args, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_open_run_refuses_what_is_not_a_run_folder(tmp_path):
    with pytest.raises(
        KLDBPathError, match=r"Expected argument `run_dir` to be an existing run folder but got '.*nope'"
    ):
        kldb_app.open_run(str(tmp_path / "nope"))
    with pytest.raises(KLDBPathError, match=r"Expected argument `run_dir` to be an existing run folder but got ''"):
        kldb_app.open_run("")
    with pytest.raises(KLDBPathError, match=r"written by `kldb sweep` \(with sweep.json\) but '.*' has none"):
        kldb_app.open_run(str(tmp_path))


def test_parse_numbers():
    assert kldb_app.parse_numbers(" 0,0.1  0.1, 1e-1 2", "alphas") == [0.0, 0.1, 2.0]
    with pytest.raises(ValueError, match=r"Expected argument `betas` to be numbers >= 0 .* but got ''"):
        kldb_app.parse_numbers("", "betas")
    with pytest.raises(ValueError, match=r"but got 'inf'"):
        kldb_app.parse_numbers("inf", "alphas")


# ----------------------------------------------------------------------------------------------------------------------
# The page and the command line
# ----------------------------------------------------------------------------------------------------------------------


def test_the_page_has_its_tabs_and_a_bounded_queue(world):
    import gradio as gr

    demo = kldb_app.build_app(world, max_queue=3)
    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["Explore", "From an image", "Audit"] and kldb_app.has_image_mode()
    assert demo._queue.max_size == 3
    generate = next(fn for fn in demo.fns.values() if fn.name == "on_generate")
    assert generate.concurrency_limit == 1 and generate.concurrency_id == "pipeline"


def test_the_image_tab_is_left_out_when_the_pipeline_takes_no_image(world, monkeypatch):
    import gradio as gr

    monkeypatch.setattr(kldb_app, "has_image_mode", lambda: False)
    demo = kldb_app.build_app(world)
    assert [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)] == ["Explore", "Audit"]
    assert all(fn.name != "on_edit" for fn in demo.fns.values())


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def test_kldb_app_refuses_bad_options_before_loading(capsys, tmp_path):
    status, err = run_cli(capsys, "app", "--max-queue", "0")
    assert status == cli.EXIT_USAGE and "Expected argument `--max-queue` to be a positive integer but got 0" in err
    status, err = run_cli(capsys, "app", "--port", "70000")
    assert (
        status == cli.EXIT_USAGE
        and "Expected argument `--port` to be a port number in [1, 65535] but got 70000" in err
    )
    status, err = run_cli(capsys, "app", "--pipeline", str(tmp_path / "missing") + "/")
    assert status == cli.EXIT_USAGE and "Expected argument `--pipeline` to be an existing local folder" in err


def test_kldb_app_names_the_app_extra_when_gradio_is_missing(capsys, monkeypatch):
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a)
    )
    status, err = run_cli(capsys, "app")
    assert status == cli.EXIT_USAGE
    assert "`kldb app` needs gradio" in err and 'pip install "kldb-boundary[app]"' in err


# ----------------------------------------------------------------------------------------------------------------------
# The Space export
# ----------------------------------------------------------------------------------------------------------------------


def space_header(folder: Path) -> dict[str, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header = text[4 : text.index("\n---", 4)]
    return dict(line.split(": ", 1) for line in header.splitlines())


def test_kldb_export_space_writes_app_requirements_and_the_space_header(capsys, tmp_path):
    import gradio

    status = cli.main(["export", "--space", str(tmp_path / "space")])
    assert status == 0 and "Wrote a Gradio Space" in capsys.readouterr().out
    folder = tmp_path / "space"
    assert sorted(p.name for p in folder.iterdir()) == sorted(SPACE_FILES)
    header = space_header(folder)
    assert header["sdk"] == "gradio" and header["sdk_version"] == gradio.__version__ and header["app_file"] == "app.py"
    assert (folder / "requirements.txt").read_text() == "kldb-boundary[app]==0.1.0\n"
    assert is_space_folder(folder) and not is_space_folder(tmp_path)
    compile((folder / "app.py").read_text(), "app.py", "exec")

    status = cli.main(
        [
            "export",
            "--space",
            str(tmp_path / "git"),
            "--space-requirement",
            "kldb-boundary[app] @ git+https://github.com/o/kldb-boundary@v0.1.0",
        ]
    )
    assert status == 0 and (tmp_path / "git" / "requirements.txt").read_text().startswith("kldb-boundary[app] @ git+")


def test_kldb_export_space_refuses_options_that_do_not_fit(capsys, tmp_path):
    status, err = run_cli(capsys, "export", "--space-requirement", "x")
    assert status == cli.EXIT_USAGE and "Expected `--space-requirement` only with `--space`" in err
    status, err = run_cli(capsys, "export", "--space", str(tmp_path / "s"), "--repo-id", "me/x")
    assert status == cli.EXIT_USAGE
    assert "Expected `--repo-id` only with SOURCE and OUT: `--space DIR` alone exports no weights." in err
    with pytest.raises(
        ValueError, match=r"Expected argument `requirement` to be one pip requirement line .* but got ''"
    ):
        write_space(tmp_path / "s", requirement="")
    (tmp_path / "file").write_text("")
    with pytest.raises(
        ValueError, match=r"Expected argument `folder` to be a folder \(new or existing\) but '.*file' is a file"
    ):
        write_space(tmp_path / "file")
    assert not (tmp_path / "s").exists()


class FakeHubApi:
    """Records what ``publish`` asks of the Hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/spaces/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "commit"


def test_a_space_publishes_as_a_gradio_space_after_a_dry_run(tmp_path):
    folder = write_space(tmp_path / "space")
    dry = publish(folder, "me/kldb-explorer", dry_run=True)
    assert sorted(path for path, _ in dry.files) == sorted(SPACE_FILES) and "Would upload 3 files" in dry.listing()
    api = FakeHubApi()
    publish(folder, "me/kldb-explorer", api=api)
    (_, create), (_, upload) = api.calls
    assert create["repo_type"] == "space" and create["space_sdk"] == "gradio"
    assert upload["repo_type"] == "space" and sorted(upload["allow_patterns"]) == sorted(SPACE_FILES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode("utf-8")
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the app did not answer at {url} within {timeout} s")


@pytest.mark.slow
def test_the_exported_space_starts_with_python_app_py(tmp_path):
    """The Space as the Hub runs it: `python app.py` in its folder (outside the checkout), the port from the env."""
    from kldb.digits import WORLD_PATH

    if not (WORLD_PATH / "model_index.json").is_file():
        pytest.skip("the digits world is not trained in this checkout")
    folder = write_space(tmp_path / "space")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        page = wait_for_page(f"http://127.0.0.1:{port}/config", process, timeout=300)
        config = json.loads(page)
        assert config["title"] == "KLDB boundary explorer"
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert {"Prompt only (alpha = 0)", "KLDB-guided"} <= labels
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl+C
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
