"""The guidance benchmark runs end to end in its tiny setting and writes the JSON it promises (numbers not asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))
TOP_LEVEL = ("guided_over_prompt_only", "measured_over_ideal", "peak_memory_ratio", "peak_memory_increase_ratio")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = [
        sys.executable, "-m", "benchmarks.bench_guidance", "--model", "tiny", "--steps", "2", "--interval", "2",
        "--batch", "2", "--batches", "1,2", "--repeats", "1", "--warmup", "1", "--options", "unet+gvae,detached+ckpt",
        "--threads", "1", "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


def test_top_level_figures_are_finite_and_positive(tiny_result):
    result, _ = tiny_result
    assert result["complete"] is True and result["sections_not_run"] == []
    for key in TOP_LEVEL:
        assert _positive(result[key]), (key, result[key])
    # batch 16 was not run in this setting: the key is there, null, and the largest batch stands in
    assert "batch16_over_batch1_throughput" in result and result["batch16_over_batch1_throughput"] is None
    largest = result["largest_over_batch1_throughput"]
    assert largest["batch"] == 2 and _positive(largest["guided"]) and _positive(largest["prompt_only"])


def test_every_option_and_batch_is_reported(tiny_result):
    result, stdout = tiny_result
    assert [row["option"] for row in result["options"]] == ["unet+gvae", "detached+ckpt"]
    assert result["default_option"] == "unet+gvae"  # the tiny setting has a guidance_vae: "auto" uses it
    assert [row["guidance_vae"] for row in result["options"]] == [True, False]
    for row in result["options"]:
        for key in ("seconds_per_image", "guided_over_prompt_only", "measured_over_ideal", "ideal_seconds",
                    "peak_memory_bytes", "peak_memory_ratio"):  # fmt: skip
            assert _positive(row[key]), (row["option"], key, row[key])
        # a shared-forward step is a difference of two timings: finite, and on toy models it may come out <= 0
        assert math.isfinite(row["step_alone_seconds"])
        assert row["guided_steps"] == 1 and row["guided_updates"] + row["skipped_updates"] == 2
        split = row["extra_seconds_split"]
        assert _positive(split["vae_decoder"]) and _positive(split["classifier"])
        assert result["guidance_step"][row["option"]]["shares_unet_forward"] == (row["kldb_gradient"] == "unet")
        assert ("unet" in split) == (row["kldb_gradient"] == "unet")
        assert row["kldb_median"] is not None and row["kldb_median"] >= 0
    assert [row["batch"] for row in result["throughput"]] == [1, 2]
    for row in result["throughput"]:
        assert _positive(row["guided_images_per_second"]) and _positive(row["prompt_only_images_per_second"])
    assert "### Options at batch 2" in stdout and "| detached+ckpt |" in stdout


def test_settings_and_environment_are_recorded(tiny_result):
    result, _ = tiny_result
    settings, env = result["settings"], result["environment"]
    assert settings["model"] == "tiny" and settings["steps"] == 2 and settings["batches"] == [1, 2]
    assert settings["timed_seed"] == 0 and settings["threads"] == 1
    for key in ("torch", "diffusers", "transformers", "device", "torch_threads"):
        assert env[key]
    assert result["kldb_meaningful"] is False


def test_help_explains_every_option():
    from benchmarks.bench_guidance import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ddim", r"Expected an option to start with one of \('unet', 'detached'\) but got 'ddim'"),
        ("unet+fast", r"Expected option modifiers among .* but got 'unet\+fast'"),
        ("unet+fp16+bf16", r"Expected at most one of 'fp16' and 'bf16' in an option but got 'unet\+fp16\+bf16'"),
    ],
)
def test_bad_option_names(name, message):
    from benchmarks.bench_guidance import GuidanceOption

    with pytest.raises(ValueError, match=message):
        GuidanceOption.parse(name)


def test_option_names_parse():
    from benchmarks.bench_guidance import GuidanceOption

    option = GuidanceOption.parse("detached+ckpt+bf16")
    assert option.kldb_gradient == "detached" and option.checkpointing and option.autocast == "bf16"
    assert not option.vae_slicing and not option.frozen_weights
