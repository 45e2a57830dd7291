"""The `kldb` command: help for every option, presets, clear errors for bad input, and each subcommand end to end."""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kldb import cli, runfolder, sweep
from kldb.presets import PAPER_ALPHAS, PAPER_BETAS, PAPER_NEGATIVE_PROMPT, PRESETS, get_preset

TINY = ["--pipeline", "kldb.testing:tiny_pipeline", "--classes", "three", "two", "--steps", "4", "--interval", "2",
        "--batch-size", "2"]  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help():
    commands = subparsers()
    assert set(commands) == {"generate", "sweep", "report", "compare", "validity", "demo", "export", "publish", "publish-run", "map", "app", "edit"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and len(action.help) > 10, f"`kldb {name} {action.option_strings}` has no help"
        assert parser.description


def test_console_script_is_installed():
    script = shutil.which("kldb", path=str(Path(sys.executable).parent))
    assert script is not None, "run `pip install -e .` to install the `kldb` console script"
    result = subprocess.run([script, "sweep", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--alphas" in result.stdout and "paper preset" in result.stdout


def test_digits_preset_is_the_default():
    config = cli.sweep_config_from_args(parse("sweep", "--out", "x"), grid=True)
    assert config.pipeline == "digits" and config.classifier is None
    assert config.class_subsets == [["three", "eight"]]
    assert config.alphas == list(PAPER_ALPHAS) and config.betas == list(PAPER_BETAS)
    assert config.seeds == list(range(16)) and config.dtype == "float32"


def test_paper_preset():
    config = cli.sweep_config_from_args(
        parse("sweep", "--out", "x", "--preset", "paper", "--dtype", "float32"), grid=True
    )
    assert config.pipeline == "CompVis/stable-diffusion-v1-4"
    assert config.classifier == "torchvision:resnet50:IMAGENET1K_V2"
    assert config.class_subsets == [["Chihuahua", "papillon"]]
    assert (config.num_inference_steps, config.kldb_guidance_interval) == (40, 5)
    assert config.alphas == [0.0, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0] and config.betas == [3.0, 6.0, 9.0]
    assert config.guidance_rescale == 0.7
    assert config.timestep_spacing == "trailing" and config.use_karras_sigmas is True
    assert (
        config.negative_prompt
        == PAPER_NEGATIVE_PROMPT
        == "blurry, deformed, low quality, watermark, text, extra limbs, ugly"
    )
    assert config.seeds[0] == 28 and config.kldb_gradient == "unet"


def test_command_line_overrides_the_preset():
    args = parse("generate", "--out", "x", "--preset", "paper", "--pipeline", "kldb.testing:tiny_pipeline", "--alpha", "0.3", "--no-karras",
                 "--classes", "3", "2", "--num-images", "2", "--seed", "5")  # fmt: skip
    config = cli.sweep_config_from_args(args, grid=False)
    # a pipeline given: its own classifier
    assert config.pipeline == "kldb.testing:tiny_pipeline" and config.classifier is None
    assert config.alphas == [0.3] and config.betas == [get_preset("paper").beta]
    assert config.use_karras_sigmas is False and config.class_subsets == [[3, 2]] and config.seeds == [5, 6]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alphas", "0", "-0.1"], r'Expected argument `alphas` to be a non-empty list of distinct finite numbers >= 0 (or "auto") but got [0.0, -0.1]'),
        (["--alphas", "nan"], 'Expected argument `alphas` to be a non-empty list of distinct finite numbers >= 0 (or "auto") but got [nan]'),
        (["--betas", "3", "3"], "Expected argument `betas` to be a non-empty list of distinct finite numbers >= 0 but got [3.0, 3.0]"),
        (["--num-images", "0"], "Expected argument `--num-images` to be a positive integer but got 0"),
        (["--seed", "-1"], "Expected argument `--seed` to be a non-negative integer but got -1"),
        (["--steps", "0"], "Expected argument `num_inference_steps` to be a positive integer but got 0"),
        (["--interval", "9"], "Expected argument `kldb_guidance_interval` to be at most num_inference_steps=4 but got 9"),
        (["--batch-size", "0"], "Expected argument `batch_size` to be a positive integer but got 0"),
        (["--guidance-rescale", "2"], "Expected argument `guidance_rescale` to be a number in [0, 1] but got 2.0"),
        (["--height", "33"], "`height` and `width` have to be divisible by the VAE factor 2 but are 33 and 32."),
        (["--classes", "three", "eleven"], "`classes` contains 'eleven', which is not among the classifier's labels"),
        (["--classes", "three", "three"], "Expected argument `classes` to be a non-empty sequence of distinct ints in [0, 4) but got [3, 3]"),
        (["--classes", "3", "7"], "Expected argument `classes` to be a non-empty sequence of distinct ints in [0, 4) but got [3, 7]"),
        (["--pipeline", "no_such_module:make"], "Expected argument `pipeline` to name an importable `module:function` but got 'no_such_module:make'"),
        (["--classifier", "torchvision:resnet50:NOPE"], "Expected argument `classifier` to name weights of resnet50 among ['IMAGENET1K_V1', 'IMAGENET1K_V2'] but got 'NOPE'"),
        (["--classifier", "torchvision:resnet50"], "Expected argument `classifier` to look like 'torchvision:<model>:<weights>'"),
    ],
)  # fmt: skip
def test_sweep_input_errors(tmp_path, capsys, argv, message):
    status, _, err = run_cli(
        capsys, "sweep", "--out", str(tmp_path / "run"), *TINY, "--alphas", "0", "0.3", "--num-images", "2", *argv
    )
    assert status == cli.EXIT_USAGE
    assert f"kldb sweep: error: {message}" in err
    assert not (tmp_path / "run" / "manifest.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "fast"], "argument --preset: invalid choice: 'fast'"),
        (["--alphas", "abc"], "argument --alphas: expected a number or 'auto' but got 'abc'"),
        (["--gradient", "exact"], "argument --gradient: invalid choice: 'exact'"),
    ],
)
def test_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "--out", "x", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_sweep_report_compare(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "generate", "--out", str(tmp_path / "one"), *TINY, "--alpha", "0.3", "--beta", "3",
                             "--num-images", "3", "--no-progress")  # fmt: skip
    assert status == 0 and "| three+two_alpha0.3_beta3.0 | 3 |" in out
    assert len(runfolder.read_jsonl(tmp_path / "one" / "manifest.jsonl")) == 3

    run = tmp_path / "grid"
    status, out, _ = run_cli(capsys, "sweep", "--out", str(run), *TINY, "--alphas", "0", "0.3", "--betas", "3",
                             "--num-images", "3", "--no-progress")  # fmt: skip
    assert status == 0 and "6 images in" in out
    # the reference images for FID: real images of the classes, one folder per class name
    for name in ("three", "two"):
        (tmp_path / "real" / name).mkdir(parents=True)
        for i, record in enumerate(runfolder.read_jsonl(run / "manifest.jsonl")[:3]):
            shutil.copy(run / record["file"], tmp_path / "real" / name / f"{i}.png")
    status, out, _ = run_cli(capsys, "report", str(run), "--reference", str(tmp_path / "real"), "--per-setting", "2")
    assert status == 0 and "| three / two | 3 | 0 |" in out
    table = json.loads((run / "report" / "table1.json").read_text())
    assert table["fid_feature"] == "classifier"
    assert all(isinstance(table["rows"][0][k], float) for k in ("fid_baseline", "fid_best"))

    # the same classifier as the pipeline's: the ambiguity carries over exactly (up to PNG quantisation)
    status, out, _ = run_cli(capsys, "compare", str(run), "--classifier", "kldb.testing:tiny_classifier")
    assert status == 0
    summary = json.loads((run / "compare" / "summary.json").read_text())
    assert summary["overall"]["kldb_spearman"] == pytest.approx(1.0)
    assert summary["overall"]["top_set_agreement"] == 1.0 and summary["overall"]["prediction_agreement"] == 1.0
    assert "| **all** | 6 |" in out


def test_report_and_compare_errors(tmp_path, capsys):
    status, _, err = run_cli(capsys, "report", str(tmp_path / "missing"))
    assert status == cli.EXIT_USAGE and "Expected argument `run` to be a sweep folder with a sweep.json" in err
    run = tmp_path / "run"
    assert (
        run_cli(capsys, "sweep", "--out", str(run), *TINY, "--alphas", "0", "--num-images", "2", "--no-progress")[0]
        == 0
    )
    status, _, err = run_cli(capsys, "report", str(run), "--reference-limit", "1")
    assert status == cli.EXIT_USAGE and "Expected argument `--reference-limit` to be an integer >= 2 but got 1" in err
    status, _, err = run_cli(capsys, "report", str(run), "--reference", str(tmp_path / "nowhere"))
    assert status == cli.EXIT_USAGE and "Expected argument `reference` to be 'digits' or a folder of images" in err
    status, _, err = run_cli(
        capsys, "compare", str(run), "--classifier", "kldb.testing:tiny_classifier", "--batch-size", "0"
    )
    assert status == cli.EXIT_USAGE and "Expected argument `--batch-size` to be a positive integer but got 0" in err
    status, _, err = run_cli(capsys, "compare", str(run), "--classifier", "sweep_fixtures:ten_class_classifier")
    assert status == cli.EXIT_USAGE
    assert "Expected the second classifier to have the run's 4 classes but it returns 10 logits" in err
    status, _, err = run_cli(capsys, "compare", str(run), "--classifier", "sweep_fixtures:renamed_classifier")
    assert status == cli.EXIT_USAGE
    assert "Expected the second classifier to have the run's label names but class 0 is 'nought'" in err


def test_full_disk_stops_with_a_clear_message(tmp_path, capsys, monkeypatch):
    def write(writer, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.ManifestWriter, "_write", write)
    status, _, err = run_cli(
        capsys, "sweep", "--out", str(tmp_path / "run"), *TINY, "--alphas", "0", "--num-images", "2"
    )
    assert status == cli.EXIT_FAILURE
    assert "kldb sweep: error: No space left on the device while writing" in err
    assert "rerun the same command to resume" in err
    assert (tmp_path / "run" / "manifest.rank0.jsonl").read_bytes() == b""


def test_demo_subcommand(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "demo", "--tiny", "--out", str(tmp_path / "demo"), "--num-images", "2",
                             "--steps", "2", "--interval", "1")  # fmt: skip
    assert status == 0 and "Median KLDB change with guidance" in out
    assert (tmp_path / "demo" / "grid.png").is_file() and (tmp_path / "demo" / "report.json").is_file()


@pytest.mark.slow
def test_ctrl_c_then_resume(tmp_path):
    """SIGINT (Ctrl-C) in the middle of a CLI sweep: exit 130 with a message, a consistent folder, and a resume."""
    import signal
    import time

    from test_sweep import _environment, _lines_written, assert_complete, assert_consistent, config

    out = tmp_path / "run"
    images = 24
    argv = [sys.executable, "-m", "kldb.cli", "sweep", "--out", str(out), *TINY, "--alphas", "0", "0.3", "--betas", "3",
            "--num-images", str(images), "--no-progress"]  # fmt: skip

    def default_sigint() -> None:
        # as in a terminal: a test run started in the background by a non-interactive shell inherits SIGINT ignored,
        # and Python then leaves it ignored in the child, which would finish instead of stopping
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(argv, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)  # fmt: skip
    deadline = time.monotonic() + 240
    while process.poll() is None and _lines_written(out) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the sweep ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == cli.EXIT_INTERRUPTED, err
    assert "interrupted; what was written is complete. Rerun the same command to resume." in err
    assert 5 <= len(assert_consistent(out)) < 2 * images
    finished = subprocess.run(argv, env=_environment(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert_complete(out, config(out, seeds=images))


def test_guidance_decoder_options():
    args = parse("sweep", "--out", "x", "--preset", "paper", "--guidance-vae", "madebyollin/taesd",
                 "--guidance-decoder", "guidance_vae")  # fmt: skip
    config = cli.sweep_config_from_args(args, grid=True)
    assert config.guidance_vae == "madebyollin/taesd" and config.kldb_guidance_decoder == "guidance_vae"
    default = cli.sweep_config_from_args(parse("generate", "--out", "x"), grid=False)
    assert default.guidance_vae is None and default.kldb_guidance_decoder == "auto"
    with pytest.raises(SystemExit):
        parse("generate", "--out", "x", "--guidance-decoder", "taesd")


# ----------------------------------------------------------------------------------------------------------------------
# Output folders of the wrong kind
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sweep", "generate"])
@pytest.mark.parametrize("inside", [False, True], ids=["file", "inside-file"])
def test_out_naming_a_file_is_a_usage_error(tmp_path, capsys, command, inside):
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" / "run" if inside else tmp_path / "taken"
    status, _, err = run_cli(capsys, command, "--out", str(out), *TINY, "--num-images", "1", "--no-progress")
    assert status == cli.EXIT_USAGE
    where = f"lies inside the file {str(tmp_path / 'taken')!r}" if inside else "is a file"
    assert (
        f"kldb {command}: error: Expected argument `--out` to be a folder (new or existing) but {str(out)!r} {where}."
        in err
    )
    assert "Traceback" not in err and (tmp_path / "taken").read_text() == "not a folder"


def test_run_sweep_refuses_an_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    config = cli.sweep_config_from_args(parse("sweep", "--out", str(tmp_path / "free"), *TINY), grid=True)
    for out, where in ((tmp_path / "taken", "is a file"), (tmp_path / "taken" / "x", "lies inside the file")):
        config.out_dir = out
        with pytest.raises(
            ValueError, match=rf"Expected argument `out_dir` to be a folder \(new, or a run to resume\) but .* {where}"
        ):
            sweep.run_sweep(config, progress=False)
    config.out_dir = 7
    with pytest.raises(TypeError, match="Expected argument `out_dir` to be a path but got int"):
        sweep.check_config(config)


def test_report_compare_demo_refuse_an_out_that_is_a_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        run_cli(capsys, "sweep", "--out", str(run), *TINY, "--alphas", "0", "--num-images", "2", "--no-progress")[0]
        == 0
    )
    (tmp_path / "taken").write_text("")
    taken = str(tmp_path / "taken")
    message = f"Expected argument `--out` to be a folder (new or existing) but {taken!r} is a file."
    for argv in (["report", str(run), "--out", taken], ["compare", str(run), "--classifier", "kldb.testing:tiny_classifier", "--out", taken],
                 ["demo", "--tiny", "--out", taken, "--num-images", "1", "--steps", "2", "--interval", "1"]):  # fmt: skip
        status, _, err = run_cli(capsys, *argv)
        assert status == cli.EXIT_USAGE and f"kldb {argv[0]}: error: {message}" in err, err
    status, _, err = run_cli(capsys, "report", str(run), "--per-setting", "0")
    assert status == cli.EXIT_USAGE and "Expected argument `--per-setting` to be a positive integer but got 0" in err
    assert not (run / "report").exists()


# ----------------------------------------------------------------------------------------------------------------------
# A plain install: each command works without the extras or names the extra it needs
# ----------------------------------------------------------------------------------------------------------------------

EXTRA_MODULES = ("accelerate", "matplotlib", "torchmetrics", "sklearn", "gradio")


def hide_modules(monkeypatch, *names: str) -> None:
    """Make ``import name`` fail as it does when the package is not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("command", ["sweep", "generate"])
def test_generation_without_accelerate_names_the_audit_extra(tmp_path, capsys, monkeypatch, command):
    hide_modules(monkeypatch, "accelerate")
    status, _, err = run_cli(capsys, command, "--out", str(tmp_path / "run"), *TINY, "--num-images", "1")
    assert status == cli.EXIT_USAGE
    assert (
        f"kldb {command}: error: `kldb {command}` needs accelerate, which a plain install of kldb-boundary leaves "
        'out; install them with: pip install "kldb-boundary[audit]"'
    ) in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_report_names_the_extras_it_needs(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert (
        run_cli(capsys, "sweep", "--out", str(run), *TINY, "--alphas", "0", "--num-images", "2", "--no-progress")[0]
        == 0
    )
    with monkeypatch.context() as patch:
        hide_modules(patch, "matplotlib", "torchmetrics")
        status, _, err = run_cli(capsys, "report", str(run), "--reference", "none")
        assert status == cli.EXIT_USAGE
        assert "`kldb report` needs matplotlib, torchmetrics, which a plain install" in err
        assert 'pip install "kldb-boundary[audit]"' in err
    with monkeypatch.context() as patch:
        hide_modules(patch, "sklearn")  # the digits test split, the reference images of a digits run
        status, _, err = run_cli(capsys, "report", str(run), "--reference", "digits")
        assert status == cli.EXIT_USAGE
        assert "`kldb report --reference digits` needs sklearn" in err and 'pip install "kldb-boundary[train]"' in err
    assert not (run / "report").exists()


def test_a_missing_module_found_late_still_names_its_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", {})  # no check up front: the import inside the sweep fails
    hide_modules(monkeypatch, "accelerate")
    status, _, err = run_cli(capsys, "sweep", "--out", str(tmp_path / "run"), *TINY, "--num-images", "1")
    assert status == cli.EXIT_USAGE and 'pip install "kldb-boundary[audit]"' in err and "Traceback" not in err


def test_demo_compare_export_publish_need_no_extra(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert (
        run_cli(capsys, "sweep", "--out", str(run), *TINY, "--alphas", "0", "--num-images", "2", "--no-progress")[0]
        == 0
    )
    hide_modules(monkeypatch, *EXTRA_MODULES)
    status, out, err = run_cli(capsys, "demo", "--tiny", "--out", str(tmp_path / "demo"), "--num-images", "1",
                               "--steps", "2", "--interval", "1")  # fmt: skip
    assert status == 0, err
    status, out, err = run_cli(capsys, "compare", str(run), "--classifier", "kldb.testing:tiny_classifier")
    assert status == 0 and "| **all** | 6 |" in out, err  # 3 betas x 2 seeds
    from kldb.testing import tiny_pipeline

    export = tmp_path / "export"
    status, _, err = run_cli(capsys, "export", str(tiny_saved(tiny_pipeline(), tmp_path / "saved")), str(export))
    assert status == 0, err
    status, out, err = run_cli(capsys, "publish", str(export), "someone/x", "--dry-run")
    assert status == 0 and "Would upload" in out, err


def tiny_saved(pipe, folder: Path) -> Path:
    from kldb.hub import write_pipeline_folder

    return write_pipeline_folder(pipe, folder)


def test_every_command_is_covered_by_the_extras_table():
    assert set(cli.COMMAND_MODULES) <= set(subparsers())
    assert set(cli.EXTRA_FOR_MODULE) == set(EXTRA_MODULES)
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    distribution = {"sklearn": "scikit-learn"}
    for module, extra in cli.EXTRA_FOR_MODULE.items():
        assert any(req.startswith(distribution.get(module, module)) for req in extras[extra]), (module, extra)


# ----------------------------------------------------------------------------------------------------------------------
# Devices and model paths of the wrong kind
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "nonsense"], "Expected argument `--device` to be a torch device such as 'cpu' or 'cuda:0' but got 'nonsense'."),
        (["--classifier", "/no/such/classifier"], "Expected argument `--classifier` to be an existing local folder, a Hub id or package.module:function but got '/no/such/classifier', a path that does not exist."),
        (["--guidance-vae", "./no-such-taesd"], "Expected argument `--guidance-vae` to be an existing local folder, a Hub id or package.module:function but got './no-such-taesd', a path that does not exist."),
        (["--pipeline", "runs/no/such/pipeline"], "Expected argument `--pipeline` to be an existing local folder, a Hub id or package.module:function but got 'runs/no/such/pipeline', a path that does not exist."),
    ],
    ids=["device", "classifier-path", "guidance-vae-path", "pipeline-path"],
)  # fmt: skip
def test_devices_and_model_paths_are_checked_first(tmp_path, capsys, argv, message):
    status, _, err = run_cli(capsys, "generate", "--out", str(tmp_path / "run"), *TINY, "--num-images", "1", *argv)
    assert status == cli.EXIT_USAGE and f"kldb generate: error: {message}" in err, err
    assert not (tmp_path / "run").exists()


def test_a_cuda_device_on_a_machine_without_one(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = run_cli(capsys, "sweep", "--out", str(tmp_path / "run"), *TINY, "--device", "cuda:0")
    assert status == cli.EXIT_USAGE
    assert "Expected argument `--device` to be a device of this machine but got 'cuda:0': no CUDA." in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    status, _, err = run_cli(capsys, "sweep", "--out", str(tmp_path / "run"), *TINY, "--device", "cuda:3")
    assert status == cli.EXIT_USAGE and "got 'cuda:3': it has 1 CUDA device(s)." in err


def test_compare_checks_device_and_classifier_path(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        run_cli(capsys, "sweep", "--out", str(run), *TINY, "--alphas", "0", "--num-images", "2", "--no-progress")[0]
        == 0
    )
    status, _, err = run_cli(
        capsys, "compare", str(run), "--classifier", "kldb.testing:tiny_classifier", "--device", "gpu"
    )
    assert status == cli.EXIT_USAGE and "Expected argument `--device` to be a torch device" in err
    status, _, err = run_cli(capsys, "compare", str(run), "--classifier", "~/no-such-classifier")
    assert status == cli.EXIT_USAGE and "Expected argument `--classifier` to be an existing local folder" in err
    assert not (run / "compare").exists()


def test_a_model_that_cannot_be_read_is_an_error_message_not_a_traceback(tmp_path, capsys):
    status, _, err = run_cli(capsys, "generate", "--out", str(tmp_path / "run"), *TINY, "--num-images", "1",
                             "--guidance-vae", str(tmp_path))  # an existing folder without an AutoencoderTiny  # fmt: skip
    assert status == cli.EXIT_FAILURE and err.startswith("kldb generate: error: ") and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# One mapping of options, presets and the sweep config; one error policy for both command lines
# ----------------------------------------------------------------------------------------------------------------------


def test_generation_options_come_from_one_table():
    import dataclasses

    from kldb.presets import Preset

    preset_fields = {f.name for f in dataclasses.fields(Preset)}
    config_fields = {f.name for f in dataclasses.fields(sweep.SweepConfig)}
    for grid, command in ((True, "sweep"), (False, "generate")):
        options = cli.generation_options(grid)
        flags = {a.option_strings[0] for a in subparsers()[command]._actions if a.option_strings}
        assert flags == {o.flag for o in options} | {"-h", "--preset", "--out", "--no-progress"}
        assert {o.preset for o in options if o.preset} <= preset_fields
        assert {o.config for o in options if o.config} <= config_fields
        # every setting of a preset reaches the config through the table (name, description and reference do not)
        assert preset_fields - {o.preset for o in options} == {
            "name", "description", "reference", *(("alpha", "beta") if grid else ("alphas", "betas"))
        }  # fmt: skip
        assert config_fields - {o.config for o in options} == {"out_dir", "seeds"}
        for name in PRESETS:
            preset = get_preset(name)
            config = cli.sweep_config_from_args(parse(command, "--out", "x", "--preset", name, "--dtype", "float32"), grid)
            for option in options:
                if option.preset is not None and option.config is not None and option.config != "dtype":
                    expected = option.to_config(option.from_preset(getattr(preset, option.preset)))
                    assert getattr(config, option.config) == expected, (name, option.flag)
            assert config.seeds == list(range(preset.seed, preset.seed + preset.num_images))



def test_a_bug_is_not_reported_as_a_usage_error(tmp_path, capsys, monkeypatch):
    def broken(config, progress=True):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(sweep, "run_sweep", broken)
    with pytest.raises(TypeError, match="unsupported operand"):  # a traceback shows where, not "error: ..." and exit 2
        cli.main(["sweep", "--out", str(tmp_path / "run"), *TINY, "--num-images", "1"])
    monkeypatch.undo()
    # a spec that names the wrong kind of object is refused input (a KLDBInputTypeError), still a usage error
    status, _, err = run_cli(capsys, "generate", "--out", str(tmp_path / "run"), *TINY, "--num-images", "1",
                             "--pipeline", "kldb.testing:tiny_classifier")  # fmt: skip
    assert status == cli.EXIT_USAGE
    assert "Expected argument `pipeline` 'kldb.testing:tiny_classifier' to return a KLDBBoundaryPipeline" in err


def test_tiny_components_are_not_a_pipeline_spec(tmp_path, capsys):
    """`--pipeline tiny` names a model like any other name, instead of silently auditing random weights."""
    status, _, err = run_cli(capsys, "generate", "--out", str(tmp_path / "run"), "--pipeline", "tiny",
                             "--num-images", "1", "--no-progress")  # fmt: skip
    assert status == cli.EXIT_FAILURE and "kldb generate: error: " in err
    assert not (tmp_path / "run" / "manifest.jsonl").exists()


def test_both_hub_command_lines_give_the_same_exit_status(tmp_path, capsys, monkeypatch):
    from kldb import digits, hub_cli

    monkeypatch.setattr(digits, "WORLD_PATH", tmp_path / "world")  # not trained: a failure, not a usage error
    (tmp_path / "saved").mkdir()
    cases = [
        (["export", "digits", str(tmp_path / "a")], cli.EXIT_FAILURE, "The digits world is not trained yet"),
        (["export", str(tmp_path / "saved"), str(tmp_path / "b")], cli.EXIT_USAGE, "model_index.json"),
        (["publish", str(tmp_path / "saved"), "not a repo", "--dry-run"], cli.EXIT_USAGE, "error: Expected"),
        (["export", "--community", str(tmp_path / "c"), "--license", "mit"], cli.EXIT_USAGE, "only with SOURCE"),
    ]
    for argv, status, message in cases:
        assert cli.main(argv) == status, argv
        assert f"kldb {argv[0]}: error: " in (err := capsys.readouterr().err) and message in err
        assert hub_cli.main(argv) == status, argv
        assert f"python -m kldb.hub_cli {argv[0]}: error: " in (err := capsys.readouterr().err) and message in err
