"""Sweeps, reports and the map from a folder of real images (`init_images`, `strengths`): issue 15, part 3.

References: the pipeline called directly with `image=<the file>` (PIL, as a user opens it), `strength` and the seed;
SHA-256 computed here with hashlib; the folder's files listed here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from kldb.runfolder import ImageRecord, read_jsonl, record_key, source_folder
from kldb.sweep import SweepConfig, run_sweep
from kldb.testing import tiny_pipeline

SMALL = {
    "pipeline": "kldb.testing:tiny_pipeline",
    "class_subsets": [["three", "two"]],
    "alphas": [0.0, 0.3],
    "betas": [3.0],
    "num_inference_steps": 4,
    "kldb_guidance_interval": 2,
}
SOURCES = ["a.png", "b c.png", "sub/d.png"]  # sorted by relative POSIX path; a space and a subfolder


def write_sources(folder: Path, size: tuple[int, int] = (32, 32), names: list[str] = SOURCES) -> Path:
    """Small smooth RGB PNGs (8-bit), one per name."""
    for i, name in enumerate(names):
        rng = np.random.default_rng(100 + i)
        coarse = rng.random((size[0] // 8, size[1] // 8, 3))
        image = PIL.Image.fromarray((coarse * 255).astype(np.uint8)).resize(size[::-1], PIL.Image.BILINEAR)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
    (folder / "notes.txt").write_text("not an image")  # left out
    (folder / ".hidden.png").write_bytes(b"left out too")
    return folder


def config(out: Path, sources: Path, **overrides) -> SweepConfig:
    kwargs = {**SMALL, "seeds": [0, 1], "batch_size": 1, "init_images": str(sources), "strengths": [0.5, 1.0]}
    return SweepConfig(out, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    sources = write_sources(root / "sources")
    cfg = config(root / "run", sources)
    result = run_sweep(cfg, progress=False)
    return cfg, result, [ImageRecord.from_json(line) for line in read_jsonl(root / "run" / "manifest.jsonl")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_source_strength_alpha_and_seed_is_made_once_with_its_source_and_hash(run):
    cfg, result, records = run
    assert (result.generated, result.total) == (2 * 2 * 3 * 2, 24)  # alphas x strengths x sources x seeds
    root = Path(cfg.init_images)
    expected = {(a, s, f, seed) for a in (0.0, 0.3) for s in (0.5, 1.0) for f in SOURCES for seed in (0, 1)}
    assert {(r.alpha, r.strength, r.source_file, r.seed) for r in records} == expected
    for r in records:
        assert r.source_sha256 == sha256(root / r.source_file)
        assert r.setting == f"three+two_alpha{r.alpha!r}_beta3.0_strength{r.strength!r}"
        assert r.file == f"images/{r.setting}/{source_folder(r.source_file)}/seed{r.seed:06d}.png"
        assert record_key(r.to_json()) == ((3, 2), r.alpha, 3.0, r.seed, r.strength, r.source_file)
    assert len({source_folder(f) for f in SOURCES}) == 3
    assert source_folder("b c.png") == "b-c-" + hashlib.sha256(b"b c.png").hexdigest()[:8]
    stored = json.loads((root.parent / "run" / "sweep.json").read_text())
    assert stored["sources"] == {name: sha256(root / name) for name in SOURCES}
    # manifest order: setting by setting (alpha, then strength), then source, then seed
    assert [(r.alpha, r.strength, r.source_file, r.seed) for r in records] == sorted(
        expected, key=lambda k: (k[0], k[1], SOURCES.index(k[2]), k[3])
    )


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_each_image_is_the_pipeline_called_on_its_file_bit_for_bit(run, pipe, alpha):
    cfg, _, records = run
    out = Path(cfg.out_dir)
    for r in [r for r in records if r.alpha == alpha and r.seed == 1]:
        with PIL.Image.open(Path(cfg.init_images) / r.source_file) as photo:
            direct = pipe(
                image=photo, strength=r.strength, classes=["three", "two"], kldb_guidance_scale=alpha,
                guidance_scale=3.0, num_inference_steps=4, kldb_guidance_interval=2, guidance_rescale=cfg.guidance_rescale,
                negative_prompt=cfg.negative_prompt, generator=torch.Generator().manual_seed(1),
                kldb_step_control=cfg.kldb_step_control, output_type="pil",
            )  # fmt: skip
        with PIL.Image.open(out / r.file) as made:
            assert np.array_equal(np.asarray(made), np.asarray(direct.images[0])), r.file
        assert r.kldb == float(direct.kldb[0]) and r.kldb_start == float(direct.kldb_start[0])
        assert r.pixel_l2 == float(direct.pixel_l2[0]) and r.ssim == float(direct.ssim[0])
        assert r.predicted_class_start == int(direct.predicted_class_start[0])
        assert r.predicted_label_start == ["zero", "one", "two", "three"][r.predicted_class_start]
        start = direct.probabilities_start[0].double()
        assert r.class_probabilities_start == [round(float(start[c]), 8) for c in (3, 2)]
        assert r.prompt == "three and two"


def test_a_batch_of_seeds_is_one_call_with_a_generator_per_seed(tmp_path, pipe):
    """With ``batch_size`` 2 the two seeds of a source are one call (one image, two rows): bit for bit that call."""
    sources = write_sources(tmp_path / "sources", names=["a.png"])
    cfg = config(tmp_path / "run", sources, alphas=[0.3], strengths=[0.5], batch_size=2)
    run_sweep(cfg, progress=False)
    records = [ImageRecord.from_json(line) for line in read_jsonl(tmp_path / "run" / "manifest.jsonl")]
    assert [r.batch_size for r in records] == [2, 2]
    with PIL.Image.open(sources / "a.png") as photo:
        direct = pipe(
            image=photo, strength=0.5, classes=["three", "two"], kldb_guidance_scale=0.3, guidance_scale=3.0,
            num_inference_steps=4, kldb_guidance_interval=2, guidance_rescale=cfg.guidance_rescale,
            negative_prompt=cfg.negative_prompt, num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(s) for s in (0, 1)], kldb_step_control=cfg.kldb_step_control,
            output_type="pil",
        )  # fmt: skip
    for i, r in enumerate(records):
        with PIL.Image.open(tmp_path / "run" / r.file) as made:
            assert np.array_equal(np.asarray(made), np.asarray(direct.images[i]))
        assert r.kldb == float(direct.kldb[i]) and r.pixel_l2 == float(direct.pixel_l2[i])


def test_the_source_s_own_scores_are_the_same_for_every_result_of_that_source(run):
    _, _, records = run
    for name in SOURCES:
        starts = {(r.kldb_start, tuple(r.class_probabilities_start)) for r in records if r.source_file == name}
        assert len(starts) == 1, name


def test_a_rerun_makes_nothing_new_and_a_changed_source_is_refused(tmp_path):
    sources = write_sources(tmp_path / "sources")
    cfg = config(tmp_path / "run", sources, alphas=[0.3], strengths=[0.5], seeds=[0])
    run_sweep(cfg, progress=False)
    before = (tmp_path / "run" / "manifest.jsonl").read_bytes()
    again = run_sweep(cfg, progress=False)
    assert (again.generated, again.already_done) == (0, 3)
    assert (tmp_path / "run" / "manifest.jsonl").read_bytes() == before
    # a text-to-image line and an image-to-image line round-trip byte for byte
    for line in before.splitlines():
        assert json.dumps(ImageRecord.from_json(json.loads(line)).to_json()).encode() == line
    # a new source is added to the run; a changed one is refused, naming it
    write_sources(sources, names=["e.png"])
    grown = run_sweep(cfg, progress=False)
    assert (grown.generated, grown.already_done) == (1, 3)
    with PIL.Image.open(sources / "b c.png") as image:
        image.rotate(90).save(sources / "b c.png")
    with pytest.raises(ValueError, match=r"Expected source image 'b c.png' in `init_images` .* but it changed"):
        run_sweep(cfg, progress=False)


def test_a_run_folder_is_text_to_image_or_image_to_image_not_both(tmp_path):
    sources = write_sources(tmp_path / "sources")
    run_sweep(config(tmp_path / "run", sources, alphas=[0.0], strengths=[0.5], seeds=[0]), progress=False)
    with pytest.raises(ValueError, match=r"Expected argument `init_images` to be a folder, as the run being resumed"):
        run_sweep(SweepConfig(tmp_path / "run", **SMALL, seeds=[0]), progress=False)
    run_sweep(SweepConfig(tmp_path / "t2i", **SMALL, seeds=[0]), progress=False)
    # a text-to-image run: names, keys, paths and lines as before image-to-image existed
    lines = read_jsonl(tmp_path / "t2i" / "manifest.jsonl")
    assert [r["file"] for r in lines] == [f"images/three+two_alpha{a}_beta3.0/seed000000.png" for a in ("0.0", "0.3")]
    assert all(len(record_key(r)) == 4 for r in lines)
    assert not {"source_file", "source_sha256", "strength", "kldb_start", "pixel_l2", "ssim"} & {
        k for r in lines for k in r
    }
    assert "sources" not in json.loads((tmp_path / "t2i" / "sweep.json").read_text())
    with pytest.raises(ValueError, match=r"Expected argument `init_images` to be None, as the run being resumed"):
        run_sweep(config(tmp_path / "t2i", sources, alphas=[0.0], seeds=[0]), progress=False)


def test_mixed_sizes_are_refused_naming_the_files(tmp_path):
    sources = write_sources(tmp_path / "sources")
    write_sources(sources, size=(40, 32), names=["z.png"])
    with pytest.raises(ValueError, match=r"`init_images` to hold images of one size .* 32x32: 'a.png', 'b c.png', "
                                         r"'sub/d.png'; 40x32: 'z.png'"):  # fmt: skip
        run_sweep(config(tmp_path / "run", sources), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("size", "match"),
    [
        ((34, 33), r"`init_images` .*'a.png'.*divisible by the VAE factor 2 but it is 34x33"),
        ((36, 36), r"`init_images` .* \(images of 36x36\): `height` and `width` have to be divisible by 8"),
    ],
)
def test_a_size_the_pipeline_cannot_take_is_refused_by_its_own_checks(tmp_path, size, match):
    sources = write_sources(tmp_path / "sources", size=size)
    with pytest.raises(ValueError, match=match):
        run_sweep(config(tmp_path / "run", sources), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"strengths": [0.0]}, r"Expected argument `strengths` to be a non-empty list of distinct numbers in \(0, 1\] but got \[0.0\]"),
        ({"strengths": [0.5, 0.5]}, r"`strengths` .* but got \[0.5, 0.5\]"),
        ({"strengths": [0.4]}, r"Expected argument `strengths` to be numbers whose int\(num_inference_steps \* strength\) steps .* reach kldb_guidance_interval=2, the first guided step but got \[0.4\]"),
        ({"alphas": ["auto"]}, r"Expected argument `alphas` to be numbers with `init_images`"),
        ({"init_images": "nowhere"}, r"Expected argument `init_images` to be a folder of images but got 'nowhere'"),
        ({"init_images": None}, r"Expected argument `strengths` to be None without `init_images`"),
        ({"height": 64}, r"`init_images` .*`height` and `width` have to be the size of `image`"),
    ],
    ids=["zero", "repeated", "too-few-steps", "auto", "no-folder", "strengths-alone", "height"],
)  # fmt: skip
def test_bad_image_to_image_config(tmp_path, overrides, match):
    sources = write_sources(tmp_path / "sources")
    with pytest.raises(ValueError, match=match):
        run_sweep(config(tmp_path / "run", sources, **overrides), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"`init_images` to be a folder holding at least one image file"):
        run_sweep(config(tmp_path / "run", tmp_path / "empty"), progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# The report: medians before and after, paired by (source, seed), and the before/after pairs
# ----------------------------------------------------------------------------------------------------------------------


def test_the_report_shows_before_after_pairs_and_medians_per_setting(run, tmp_path):
    import shutil

    from kldb.report import write_report

    cfg, _, records = run
    result = write_report(cfg.out_dir, out_dir=tmp_path / "report", bootstrap_resamples=200)
    files = result["files"]
    assert {"before_after.png", "before_after.json"} <= set(files)
    pairs = json.loads(Path(files["before_after.json"]).read_text())
    by_file = {r.file: r for r in records}
    settings = sorted({r.setting for r in records})
    # per setting, every source in source order, each with its result at the lowest seed
    assert [(p["setting"], p["source_file"], p["seed"]) for p in pairs] == [
        (s, name, 0) for s in sorted(settings, key=[r.setting for r in records].index) for name in SOURCES
    ]
    for p in pairs:
        record = by_file[p["file"]]
        assert (record.setting, record.source_file, record.seed) == (p["setting"], p["source_file"], p["seed"])
        assert p["source_sha256"] == sha256(Path(cfg.init_images) / p["source_file"])
    with PIL.Image.open(files["before_after.png"]) as grid:
        assert grid.height > 4 * 96 and grid.width > 6 * 96  # 4 settings, 3 pairs (6 images) each
    rows = {r["setting"]: r for r in result["settings"]}
    for name, row in rows.items():
        group = [r for r in records if r.setting == name]
        assert row["strength"] == group[0].strength and row["n_sources"] == 3
        assert row["median_kldb_start"] == pytest.approx(float(np.median([r.kldb_start for r in group])))
        assert row["median_pixel_l2"] == pytest.approx(float(np.median([r.pixel_l2 for r in group])))
        assert row["median_ssim"] == pytest.approx(float(np.median([r.ssim for r in group])))
        # the guided setting is paired with alpha 0 at the same strength, by (source, seed): 3 x 2 pairs
        assert row["n_paired"] == (6 if row["alpha"] > 0 else None)
    table = result["table"]
    assert [(t["strength"], t["alpha_baseline"], t["alpha_best"]) for t in table] == [(0.5, 0.0, 0.3), (1.0, 0.0, 0.3)]
    page = Path(files["report.md"]).read_text()
    assert "## Before and after: from real images" in page and "![Before and after" in page
    assert "three / two (strength 0.5)" in page
    header = Path(files["settings.csv"]).read_text().splitlines()[0].split(",")
    assert {"strength", "median_kldb_start", "median_pixel_l2", "median_ssim"} <= set(header)

    # a source that changed since the run is left out, and said so
    copy = tmp_path / "copy"
    shutil.copytree(cfg.out_dir, copy, ignore=shutil.ignore_patterns("report"))
    moved = shutil.copytree(cfg.init_images, tmp_path / "moved")
    PIL.Image.new("RGB", (32, 32), "red").save(moved / "a.png")
    info = json.loads((copy / "sweep.json").read_text())
    info["last_config"]["init_images"] = str(moved)
    (copy / "sweep.json").write_text(json.dumps(info))
    again = write_report(copy, bootstrap_resamples=200)
    shown = json.loads(Path(again["files"]["before_after.json"]).read_text())
    assert {p["source_file"] for p in shown} == {"b c.png", "sub/d.png"}
    assert "Left out of the grid (missing from" in Path(again["files"]["report.md"]).read_text()


# ----------------------------------------------------------------------------------------------------------------------
# The command line and the map
# ----------------------------------------------------------------------------------------------------------------------


def test_kldb_sweep_with_init_images_and_strengths(tmp_path, capsys):
    from kldb import cli

    sources = write_sources(tmp_path / "sources", names=["a.png"])
    status = cli.main([
        "sweep", "--out", str(tmp_path / "run"), "--pipeline", "kldb.testing:tiny_pipeline", "--classes", "three",
        "two", "--steps", "4", "--interval", "2", "--alphas", "0", "0.3", "--betas", "3", "--num-images", "1", "--no-progress",
        "--init-images", str(sources), "--strengths", "0.5", "--dtype", "float32",
    ])  # fmt: skip
    assert status == 0
    lines = read_jsonl(tmp_path / "run" / "manifest.jsonl")
    assert [(r["alpha"], r["strength"], r["source_file"]) for r in lines] == [(0.0, 0.5, "a.png"), (0.3, 0.5, "a.png")]
    last = json.loads((tmp_path / "run" / "sweep.json").read_text())["last_config"]
    assert (last["init_images"], last["strengths"]) == (str(sources), [0.5])
    assert "three+two_alpha0.3_beta" in capsys.readouterr().out
    # --strengths without --init-images is refused (a usage error, exit 2)
    status = cli.main(["sweep", "--out", str(tmp_path / "t2i"), "--pipeline", "kldb.testing:tiny_pipeline",
                       "--strengths", "0.5", "--num-images", "1"])  # fmt: skip
    assert status == 2
    assert "Expected argument `strengths` to be None without `init_images`" in capsys.readouterr().err


def test_kldb_map_passes_init_images_to_its_sweep(tmp_path, monkeypatch):
    from kldb import boundary_map, cli

    sources = write_sources(tmp_path / "sources", names=["a.png"])
    seen = {}

    def capture(config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(boundary_map, "run_map", capture)
    with pytest.raises(SystemExit):
        cli.main(["map", "--out", str(tmp_path / "map"), "--pipeline", "kldb.testing:tiny_pipeline", "--classes",
                  "one", "two", "three", "--steps", "4", "--interval", "2", "--seeds", "1", "--init-images",
                  str(sources), "--strengths", "0.5"])  # fmt: skip
    config = seen["config"]
    assert (config.init_images, config.strengths) == (str(sources), [0.5])
    assert config.class_subsets == [["one", "two"], ["one", "three"], ["two", "three"]]
    with pytest.raises(ValueError, match=r"Expected argument `strengths` to hold one strength for a map"):
        boundary_map.map_config(tmp_path / "m", ["one", "two"], pipeline="kldb.testing:tiny_pipeline",
                                num_inference_steps=4, kldb_guidance_interval=2, init_images=str(sources),
                                strengths=[0.5, 1.0])  # fmt: skip


def test_a_map_from_real_images_runs_and_pools_the_sources(tmp_path):
    from kldb.boundary_map import map_config, run_map

    sources = write_sources(tmp_path / "sources", names=["a.png", "b.png"])
    config = map_config(
        tmp_path / "map", ["one", "two", "three"], seeds=1, alphas=[0.0, 0.3], step_control="fixed",
        pipeline="kldb.testing:tiny_pipeline", num_inference_steps=4, kldb_guidance_interval=2,
        init_images=str(sources), strengths=[0.5], batch_size=1,
    )  # fmt: skip
    result = run_map(config, progress=False)
    records = read_jsonl(tmp_path / "map" / "manifest.jsonl")
    assert len(records) == 3 * 2 * 2  # pairs x alphas x sources
    assert all(row["n"] == 2 for row in result.rows)  # each map cell pools both sources
