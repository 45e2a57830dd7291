"""The demo and the examples write one prompt-only vs guided comparison (kldb.demo), with the digits preset's settings."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from conftest import gen

from kldb import cli, demo, digits
from kldb.presets import PRESETS


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, demo.run_demo(out, num_images=2, alpha=0.3, steps=2, interval=1, seed=4, tiny=True)


def test_the_demo_audits_the_digits_preset_classes(tiny_demo):
    out, report = tiny_demo
    preset = PRESETS["digits"]
    assert report["classes"] == list(preset.classes) == ["three", "eight"]
    assert report["prompt"] == "three and eight" and report["beta"] == preset.beta
    assert report["seeds"] == [4, 5] and report["world"].startswith("tiny random components")
    assert set(report["settings"]) == {"prompt_only", "guided"}
    assert (report["settings"]["prompt_only"]["alpha"], report["settings"]["guided"]["alpha"]) == (0.0, 0.3)
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "grid.png").is_file() and not (out / "results.json").exists()


def test_each_demo_image_records_how_it_was_made(tiny_demo):
    out, report = tiny_demo
    for row, alpha in (("prompt_only", 0.0), ("guided", 0.3)):
        for i, seed in enumerate(report["seeds"]):
            with PIL.Image.open(out / "images" / f"{row}_{i:03d}.png") as image:
                meta = image.text
            assert meta["row"] == row and json.loads(meta["seed"]) == seed and json.loads(meta["alpha"]) == alpha
            assert meta["prompt"] == "three and eight" and json.loads(meta["beta"]) == report["beta"]
            assert json.loads(meta["classes"]) == [3, 8] and len(json.loads(meta["probabilities"])) == 10


def test_save_comparison_summary_against_numpy(tiny_pipe, tmp_path):
    runs = {
        "prompt_only": [tiny_pipe(classes=[3, 2], num_inference_steps=2, kldb_guidance_scale=0.0, generator=gen(s))
                        for s in range(3)],
        "guided": [tiny_pipe(classes=[3, 2], num_inference_steps=2, kldb_guidance_interval=1, generator=gen(s))
                   for s in range(3)],
    }  # fmt: skip
    summary = demo.save_comparison(tmp_path / "out", runs, ["zero", "one", "two", "three"], {"alpha": 0.1})
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == summary
    assert summary["settings"] == {"alpha": 0.1}
    for row, outputs in runs.items():
        kldb = [float(o.kldb[0]) for o in outputs]
        entropy = [float(o.entropy[0]) for o in outputs]
        r = summary["rows"][row]
        assert r["kldb"] == kldb and r["median_kldb"] == pytest.approx(float(np.median(kldb)), abs=1e-12)
        assert r["median_entropy"] == pytest.approx(float(np.median(entropy)), abs=1e-12)
        labels = [["zero", "one", "two", "three"][int(o.probabilities[0].argmax())] for o in outputs]
        assert r["predicted"] == labels and sum(r["predicted_class_mix"].values()) == 3
    assert "median KLDB" in demo.format_summary(summary)


def test_without_the_world_the_demo_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(digits, "WORLD_PATH", tmp_path / "world")
    with pytest.raises(FileNotFoundError, match=r"The digits world is not trained yet .* pass --tiny \(kldb demo\)"):
        demo.run_demo(tmp_path / "out", num_images=1, steps=2, interval=1)
    assert cli.main(["demo", "--out", str(tmp_path / "out"), "--num-images", "1"]) == cli.EXIT_FAILURE
    assert "kldb demo: error: The digits world is not trained yet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no images from stand-in components the user did not ask for
