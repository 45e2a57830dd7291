"""The run folder's typed records: stored run folders of earlier versions load, and the format on disk is unchanged."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kldb.report import setting_metrics, write_report
from kldb.runfolder import (
    WRITTEN_WHEN_SET,
    ImageRecord,
    ManifestWriter,
    iter_settings,
    load_records,
    merge_manifests,
    read_jsonl,
    read_manifest,
    run_info,
    run_labels,
)

DATA = Path(__file__).resolve().parent / "data"
#: A run folder written by `kldb sweep` before the records were typed (tiny components, 2 settings x 2 seeds).
MINI_RUN = DATA / "mini_run"
#: The same lines as the first manifest format wrote them: no kldb_guidance_decoder, no process_index.
FIRST_FORMAT = DATA / "manifest_2026-11.jsonl"


def stored_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_stored_run_loads_as_typed_records():
    lines = stored_lines(MINI_RUN / "manifest.jsonl")
    records = read_manifest(MINI_RUN)
    assert all(isinstance(r, ImageRecord) for r in records) and len(records) == len(lines) == 4
    for record, line in zip(records, lines):
        new_fields = dict.fromkeys(WRITTEN_WHEN_SET)  # fields added after this run was written: None
        assert dataclasses.asdict(record) == {**line, **new_fields, "extra": {}}
        assert record.key == (tuple(line["class_indices"]), line["alpha"], line["beta"], line["seed"])
    assert records[0].kldb == pytest.approx(0.7031675577163696) and records[0].kldb_guidance_decoder is None
    assert [(r.alpha, r.kldb_guidance_decoder) for r in records] == [(0.0, None)] * 2 + [(0.3, "vae")] * 2
    assert list(iter_settings(records)) == ["three+two_alpha0.0_beta3.0", "three+two_alpha0.3_beta3.0"]
    assert run_labels(MINI_RUN, records) == ["zero", "one", "two", "three"] == run_info(MINI_RUN)["labels"]


def test_the_first_manifest_format_still_loads():
    records = read_manifest(FIRST_FORMAT)
    assert len(records) == 4
    assert all(r.kldb_guidance_decoder is None and r.process_index is None for r in records)
    assert [r.key for r in records] == [r.key for r in read_manifest(MINI_RUN)]
    assert [r.kldb for r in records] == [line["kldb"] for line in stored_lines(FIRST_FORMAT)]


def test_statistics_of_the_stored_run_against_numpy():
    lines = stored_lines(MINI_RUN / "manifest.jsonl")
    for row in setting_metrics(read_manifest(MINI_RUN)):
        kldb = [line["kldb"] for line in lines if line["setting"] == row["setting"]]
        assert row["n"] == len(kldb) == 2
        assert row["median_kldb"] == pytest.approx(np.median(kldb), abs=1e-12)
        assert row["kldb_iqr"] == pytest.approx(np.subtract(*np.percentile(kldb, [75, 25])), abs=1e-12)


def test_records_are_written_back_byte_for_byte(tmp_path):
    """A record's JSON line is the line it was read from: merging a stored run rewrites the same bytes."""
    run = tmp_path / "run"
    shutil.copytree(MINI_RUN, run)
    before = (run / "manifest.jsonl").read_bytes()
    merge_manifests(run)
    assert (run / "manifest.jsonl").read_bytes() == before
    line = stored_lines(MINI_RUN / "manifest.jsonl")[0]
    assert ImageRecord.from_json(line).to_json() == line
    assert list(ImageRecord.from_json(line).to_json()) == list(line)  # the key order on disk


def test_keys_a_version_does_not_know_are_kept(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(MINI_RUN, run)
    lines = stored_lines(run / "manifest.jsonl")
    (run / "manifest.jsonl").unlink()
    with ManifestWriter(run / "manifest.rank0.jsonl") as writer:
        for line in lines:
            writer.append({**line, "future_field": [1, 2]})
    records = load_records(run)
    assert [r.extra for r in records] == [{"future_field": [1, 2]}] * 4
    merge_manifests(run)
    assert read_jsonl(run / "manifest.jsonl") == [{**line, "future_field": [1, 2]} for line in lines]


def test_a_line_without_a_required_field_is_skipped(tmp_path, caplog):
    lines = stored_lines(MINI_RUN / "manifest.jsonl")
    broken = {k: v for k, v in lines[0].items() if k != "file"}
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [broken, *lines[1:]]))
    assert [r.seed for r in read_manifest(path)] == [1, 0, 1]
    assert "Skipping a manifest line without a valid record" in caplog.text


def test_report_of_a_stored_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(MINI_RUN, run)
    result = write_report(run, reference=None, per_setting=2)
    assert [row["setting"] for row in result["settings"]] == list(iter_settings(read_manifest(run)))
    assert result["table"][0]["alpha_baseline"] == 0.0 and result["table"][0]["alpha_best"] == 0.3
    assert (run / "report" / "report.md").is_file()
