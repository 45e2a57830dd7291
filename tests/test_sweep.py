"""The sweep runner: every image on disk with its manifest line, resumable after kill -9, a full disk, bad input."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import PIL.Image
import pytest

from kldb import runfolder, sweep
from kldb.runfolder import ImageRecord, SweepDiskFullError, load_records, read_jsonl, record_key
from kldb.sweep import SweepConfig, run_sweep

SMALL = {
    "pipeline": "kldb.testing:tiny_pipeline",
    "class_subsets": [["three", "two"]],
    "alphas": [0.0, 0.3],
    "betas": [3.0],
    "num_inference_steps": 4,
    "kldb_guidance_interval": 2,
}


def config(out: Path, seeds: int | list = 3, **overrides) -> SweepConfig:
    seeds = list(range(seeds)) if isinstance(seeds, int) else seeds
    kwargs = {**SMALL, "seeds": seeds, "batch_size": 2, **overrides}
    return SweepConfig(out, **kwargs)


def expected_keys(cfg: SweepConfig) -> set[tuple]:
    indices = (3, 2)
    return {(indices, float(a), float(b), s) for a in cfg.alphas for b in cfg.betas for s in cfg.seeds}


def complete_lines(out: Path) -> list[dict]:
    """All complete manifest lines of a run folder (merged manifest and parts), duplicates included."""
    records = read_jsonl(out / runfolder.MANIFEST_NAME)
    for part in runfolder.manifest_parts(out):
        records += read_jsonl(part)
    return records


def assert_consistent(out: Path) -> list[dict]:
    """Every complete line names a PNG that exists, has the recorded size and decodes; no key twice."""
    records = complete_lines(out)
    counts = Counter(record_key(r) for r in records)
    assert not [k for k, n in counts.items() if n > 1], "a (setting, seed) is recorded twice"
    for record in records:
        path = out / record["file"]
        assert path.stat().st_size == record["bytes"]
        with PIL.Image.open(path) as image:
            image.load()  # decodes every chunk: a truncated PNG raises here
            assert image.text["seed"] == str(record["seed"])
    for png in (out / runfolder.IMAGES_DIR).rglob("*.png"):  # also the PNGs whose line was not written yet
        with PIL.Image.open(png) as image:
            image.load()
    merged = out / runfolder.MANIFEST_NAME
    if merged.exists() and merged.stat().st_size:
        assert merged.read_bytes().endswith(b"\n"), "manifest.jsonl is only ever replaced whole"
    return records


def assert_complete(out: Path, cfg: SweepConfig) -> list[dict]:
    records = assert_consistent(out)
    assert {record_key(r) for r in records} == expected_keys(cfg)
    assert len(records) == len(expected_keys(cfg))
    assert not runfolder.manifest_parts(out), "parts are merged into manifest.jsonl at the end"
    assert not list(out.rglob(".*.tmp")), "no temporary file is left behind"
    return records


def test_two_setting_sweep(tmp_path):
    cfg = config(tmp_path / "run")
    result = run_sweep(cfg, progress=False)
    records = assert_complete(tmp_path / "run", cfg)
    assert (result.generated, result.already_done, result.total) == (6, 0, 6)
    assert result.settings == ["three+two_alpha0.0_beta3.0", "three+two_alpha0.3_beta3.0"]
    # manifest order: setting by setting, seeds ascending
    assert [(r["alpha"], r["seed"]) for r in records] == [(a, s) for a in (0.0, 0.3) for s in range(3)]
    record = records[-1]
    with PIL.Image.open(tmp_path / "run" / record["file"]) as image:
        assert image.size == (32, 32)
        meta = image.text
    assert meta["prompt"] == "three and two" == record["prompt"]
    assert json.loads(meta["classes"]) == ["three", "two"]
    assert float(meta["alpha"]) == 0.3 and float(meta["beta"]) == 3.0
    assert float(meta["kldb"]) == pytest.approx(record["kldb"])
    assert len(json.loads(meta["top_probabilities"])) == 4  # the tiny classifier has 4 labels
    stored = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert stored["labels"] == ["zero", "one", "two", "three"]
    assert stored["fixed"]["num_inference_steps"] == 4


def test_rerun_does_nothing_and_grid_can_grow(tmp_path):
    cfg = config(tmp_path / "run", seeds=2)
    run_sweep(cfg, progress=False)
    before = (tmp_path / "run" / "manifest.jsonl").read_bytes()
    again = run_sweep(cfg, progress=False)
    assert (again.generated, again.already_done) == (0, 4)
    assert (tmp_path / "run" / "manifest.jsonl").read_bytes() == before
    bigger = config(tmp_path / "run", seeds=3, alphas=[0.0, 0.3, 0.6])
    grown = run_sweep(bigger, progress=False)
    assert (grown.generated, grown.already_done) == (5, 4)
    assert_complete(tmp_path / "run", bigger)


def test_missing_or_truncated_image_is_made_again(tmp_path):
    cfg = config(tmp_path / "run", seeds=2)
    run_sweep(cfg, progress=False)
    records = {r["seed"]: r for r in read_jsonl(tmp_path / "run" / "manifest.jsonl") if r["alpha"] == 0.0}
    (tmp_path / "run" / records[0]["file"]).unlink()
    truncated = tmp_path / "run" / records[1]["file"]
    truncated.write_bytes(truncated.read_bytes()[:100])
    result = run_sweep(cfg, progress=False)
    assert result.generated == 2
    assert_complete(tmp_path / "run", cfg)


def test_recovery_drops_partial_line_and_temporary_files(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, seeds=2)
    run_sweep(cfg, progress=False)
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    # a killed run: the last record's line only half written, the last PNG's temporary file left behind
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:2]))
    (out / "manifest.rank0.jsonl").write_bytes(lines[2] + lines[3][: len(lines[3]) // 2])
    orphan = out / "images" / "three+two_alpha0.3_beta3.0" / ".seed000001.png.abc123.tmp"
    orphan.write_bytes(b"\x89PNG half")
    assert runfolder.recover(out) == {"partial_lines_dropped": 1, "temporary_files_deleted": 1}
    assert (out / "manifest.rank0.jsonl").read_bytes() == lines[2]
    assert not orphan.exists()
    result = run_sweep(cfg, progress=False)
    assert (result.generated, result.already_done) == (1, 3)
    assert_complete(out, cfg)


def sweep_command(out: Path, seeds: int) -> list[str]:
    """The `kldb sweep` command line of :func:`config` (tiny components), as a real user would type it."""
    return [
        sys.executable, "-m", "kldb.cli", "sweep", "--out", str(out), "--pipeline", "kldb.testing:tiny_pipeline", "--classes", "three", "two",
        "--alphas", "0", "0.3", "--betas", "3", "--num-images", str(seeds), "--steps", "4", "--interval", "2",
        "--batch-size", "2", "--no-progress",
    ]  # fmt: skip


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _lines_written(out: Path) -> int:
    parts = [out / "manifest.jsonl", *runfolder.manifest_parts(out)]
    return sum(p.read_bytes().count(b"\n") for p in parts if p.exists())


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(tmp_path):
    """Three `kldb sweep` runs killed with SIGKILL at random points (after a random number of images, plus a random delay within
    the next image), each followed by a consistency check; then a resume completes the run: nothing lost, nothing
    duplicated, no truncated PNG or manifest line."""
    out = tmp_path / "run"
    seeds = 24
    rng = random.Random(20260)
    kills = 0
    for trial in range(3):
        target = _lines_written(out) + rng.randint(1, 10)
        process = subprocess.Popen(
            sweep_command(out, seeds),
            env=_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 240
        while process.poll() is None and _lines_written(out) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
        records = assert_consistent(out)
        assert len(records) < 2 * seeds or trial > 0, f"trial {trial}: the run ended before it could be killed"
    assert kills >= 2
    cfg = config(out, seeds=seeds)
    result = run_sweep(cfg, progress=False)
    assert result.already_done >= 3
    records = assert_complete(out, cfg)
    # the resumed images are the images an uninterrupted run makes (same seeds, same noise)
    reference = run_sweep(config(tmp_path / "reference", seeds=seeds), progress=False)
    by_key = {record_key(r): r for r in read_jsonl(reference.manifest)}
    for record in records:
        assert record["kldb"] == pytest.approx(by_key[record_key(record)]["kldb"], abs=1e-4)


def full_disk_after(allowed: int, original):
    """A ``ManifestWriter._write`` that lets ``allowed`` writes through, then writes half a line and raises ENOSPC."""
    calls = []

    def write(writer, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) > allowed:
            writer._file.write(data[: len(data) // 2])
            writer._file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        original(writer, data)

    return write


def test_full_disk_while_appending_a_manifest_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config(out, seeds=3)
    monkeypatch.setattr(runfolder.ManifestWriter, "_write", full_disk_after(2, runfolder.ManifestWriter._write))
    with pytest.raises(
        SweepDiskFullError, match=r"No space left on the device while writing .*manifest\.rank0\.jsonl"
    ):
        run_sweep(cfg, progress=False)
    # the half-written line was cut off again: two complete lines, both naming complete PNGs
    part = out / "manifest.rank0.jsonl"
    assert part.read_bytes().count(b"\n") == 2 and part.read_bytes().endswith(b"\n")
    assert len(assert_consistent(out)) == 2
    monkeypatch.undo()
    result = run_sweep(cfg, progress=False)
    assert (result.generated, result.already_done) == (4, 2)
    assert_complete(out, cfg)


def test_full_disk_while_writing_a_png(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config(out, seeds=3)
    calls = []
    original = sweep.save_png

    def save_png(path, image, metadata):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, image, metadata)

    monkeypatch.setattr(sweep, "save_png", save_png)
    with pytest.raises(SweepDiskFullError, match=r"the 3 images written in this run before it are complete"):
        run_sweep(cfg, progress=False)
    assert len(assert_consistent(out)) == 3
    monkeypatch.undo()
    run_sweep(cfg, progress=False)
    assert_complete(out, cfg)


def test_resume_with_other_image_settings_is_refused(tmp_path):
    run_sweep(config(tmp_path / "run", seeds=1), progress=False)
    with pytest.raises(
        ValueError, match=r"Expected argument `num_inference_steps` to be 4, as in the run being resumed"
    ):
        run_sweep(config(tmp_path / "run", seeds=1, num_inference_steps=5), progress=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"alphas": []},
            r"Expected argument `alphas` to be a non-empty list of distinct finite numbers >= 0 \(or \"auto\"\) but got \[\]",
        ),
        ({"alphas": [0.1, -0.1]}, r"`alphas` .* but got \[0.1, -0.1\]"),
        ({"alphas": [float("nan")]}, r"`alphas` .* but got \[nan\]"),
        ({"alphas": [0.1, 0.1]}, r"`alphas` .* but got \[0.1, 0.1\]"),
        ({"alphas": ["0.1"]}, r"`alphas` .* but got \['0.1'\]"),
        ({"betas": [float("inf")]}, r"Expected argument `betas` to be .* but got \[inf\]"),
        ({"seeds": ()}, r"Expected argument `seeds` to be a non-empty list of distinct integers .* but got \(\)"),
        ({"seeds": [1, 1]}, r"`seeds` .* but got \[1, 1\]"),
        ({"seeds": [-1]}, r"`seeds` .* but got \[-1\]"),
        ({"seeds": [1.5]}, r"`seeds` .* but got \[1.5\]"),
        ({"class_subsets": []}, r"Expected argument `class_subsets` to be a non-empty list of non-empty lists"),
        ({"class_subsets": [[]]}, r"`class_subsets` .* but got \[\[\]\]"),
        ({"class_subsets": ["three"]}, r"`class_subsets` .* but got \['three'\]"),
        ({"num_inference_steps": 0}, r"Expected argument `num_inference_steps` to be a positive integer but got 0"),
        ({"kldb_guidance_interval": 0}, r"`kldb_guidance_interval` to be a positive integer but got 0"),
        ({"kldb_guidance_interval": 5}, r"`kldb_guidance_interval` to be at most num_inference_steps=4 but got 5"),
        ({"batch_size": 0}, r"Expected argument `batch_size` to be a positive integer but got 0"),
        ({"kldb_gradient": "exact"}, r"Expected argument `kldb_gradient` to be one of \['unet', 'detached'\]"),
        ({"kldb_guidance_decoder": "taesd"}, r"Expected argument `kldb_guidance_decoder` to be one of \['auto', 'vae', 'guidance_vae'\] but got 'taesd'"),
        ({"guidance_vae": " "}, r"Expected argument `guidance_vae` to be None or a non-empty string .* but got ' '"),
        ({"guidance_rescale": 1.5}, r"Expected argument `guidance_rescale` to be a number in \[0, 1\] but got 1.5"),
        ({"timestep_spacing": "fast"}, r"Expected argument `timestep_spacing` to be None or one of"),
        ({"height": 30}, r"`height` and `width` have to be divisible by 8 but are 30 and 32\."),
        ({"prompt": ""}, r"Expected argument `prompt` to be None or a non-empty string but got ''"),
        ({"pipeline": ""}, r"Expected argument `pipeline` to be a non-empty string but got ''"),
        ({"dtype": "float8"}, r"Expected argument `dtype` to be one of .* but got 'float8'"),
    ],
)
def test_bad_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_sweep(config(tmp_path / "run", **overrides), progress=False)
    assert not (tmp_path / "run").exists(), "nothing is written for a bad config"


def test_repeated_class_subset(tmp_path):
    with pytest.raises(ValueError, match=r"Expected argument `class_subsets` to hold distinct class subsets .* but got"):
        run_sweep(config(tmp_path / "run", class_subsets=[["three", "two"], [3, 2]]), progress=False)


def test_unknown_class_name(tmp_path):
    with pytest.raises(ValueError, match=r"`classes` contains 'eleven', which is not among the classifier's labels"):
        run_sweep(config(tmp_path / "run", class_subsets=[["three", "eleven"]]), progress=False)


def test_load_records_keeps_the_first_line_of_a_key(tmp_path):
    out = tmp_path / "run"
    run_sweep(config(out, seeds=1), progress=False)
    line = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)[0]
    (out / "manifest.rank1.jsonl").write_bytes(line)
    assert len(load_records(out)) == 2
    runfolder.merge_manifests(out)
    assert len(read_jsonl(out / "manifest.jsonl")) == 2 and not runfolder.manifest_parts(out)


def test_manifest_writer_keeps_a_complete_line_and_cuts_a_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "manifest.rank0.jsonl"
    original = runfolder.ManifestWriter._write

    def interrupted_after_write(writer, data):  # Ctrl-C arrives after the line is written, during fsync
        original(writer, data)
        raise KeyboardInterrupt

    def interrupted_mid_write(writer, data):  # Ctrl-C arrives with half the line written
        writer._file.write(data[:5])
        raise KeyboardInterrupt

    with runfolder.ManifestWriter(path) as writer:
        writer.append({"n": 1})
        monkeypatch.setattr(runfolder.ManifestWriter, "_write", interrupted_after_write)
        with pytest.raises(KeyboardInterrupt):
            writer.append({"n": 2})
        monkeypatch.setattr(runfolder.ManifestWriter, "_write", interrupted_mid_write)
        with pytest.raises(KeyboardInterrupt):
            writer.append({"n": 3})
    assert read_jsonl(path) == [{"n": 1}, {"n": 2}]
    assert path.read_bytes().endswith(b"\n")


def test_a_classifier_with_nan_logits_gives_null_scores_not_a_crash(tmp_path, caplog):
    from kldb.report import setting_metrics

    out = tmp_path / "run"
    result = run_sweep(config(out, seeds=2, classifier="sweep_fixtures:nan_classifier"), progress=False)
    assert result.generated == 4 and result.skipped_updates > 0
    records = assert_complete(out, config(out, seeds=2))
    assert all(r["kldb"] is None and r["entropy"] is None for r in records)
    assert "Non-finite KLDB (nan)" in caplog.text
    with pytest.raises(ValueError, match="to have at least one image with finite scores but it has none"):
        setting_metrics([ImageRecord.from_json(r) for r in records])


def test_guidance_vae_is_given_to_the_pipeline_and_recorded(tmp_path):
    cfg = config(tmp_path / "run", seeds=2, guidance_vae="kldb.testing:tiny_guidance_vae")
    run_sweep(cfg, progress=False)
    records = assert_complete(tmp_path / "run", cfg)
    decoders = {(r["alpha"], r["kldb_guidance_decoder"]) for r in records}
    assert decoders == {(0.0, None), (0.3, "guidance_vae")}  # "auto" took the given guidance_vae
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["fixed"]["guidance_vae"] == cfg.guidance_vae
    # the same sweep through the VAE's decoder gives other guided images (the tiny decoder has random weights)
    full = config(tmp_path / "full", seeds=2, guidance_vae="kldb.testing:tiny_guidance_vae", kldb_guidance_decoder="vae")
    run_sweep(full, progress=False)
    full_records = {(r["alpha"], r["seed"]): r for r in assert_complete(tmp_path / "full", full)}
    assert {r["kldb_guidance_decoder"] for r in full_records.values()} == {None, "vae"}
    for r in records:
        other = full_records[(r["alpha"], r["seed"])]
        assert (r["kldb"] == other["kldb"]) == (r["alpha"] == 0.0)


def test_a_guidance_vae_spec_must_give_an_autoencoder():
    from kldb.loading import load_guidance_vae

    with pytest.raises(TypeError, match=r"`guidance_vae` 'kldb.testing:tiny_tokenizer' to return an autoencoder with a `decode` method but it returned CLIPTokenizer"):
        load_guidance_vae("kldb.testing:tiny_tokenizer")
    with pytest.raises(ValueError, match=r"Expected argument `guidance_vae` to name an importable `module:function`"):
        load_guidance_vae("kldb.nothing:here")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"kldb_guidance_decoder": "guidance_vae"}, r"`kldb_guidance_decoder='guidance_vae'` needs the pipeline's `guidance_vae`"),
        ({"width": 34}, r"`height` and `width` have to be divisible by 8 but are 32 and 34\."),
        ({"class_subsets": [["three", "eleven"]]}, r"`classes` contains 'eleven', which is not among the classifier's labels"),
    ],
    ids=["no-guidance-vae", "width", "class-name"],
)  # fmt: skip
def test_the_grid_is_checked_against_the_pipeline_before_anything_is_written(tmp_path, overrides, match):
    """What only the loaded pipeline can check is checked by its own input checks, before the run folder exists."""
    with pytest.raises(ValueError, match=match):
        run_sweep(config(tmp_path / "run", **overrides), progress=False)
    assert not (tmp_path / "run").exists()
