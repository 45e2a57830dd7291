"""A sweep sharded over 2 CPU processes by `accelerate launch`: every (setting, seed) exactly once, one manifest.

On a CPU, `accelerate launch --cpu` starts more than one process only through MPI; `--multi_gpu` starts them with
torch.distributed.run, and the sweep's `PartialState(cpu=True)` then shards over two gloo processes.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_sweep import _environment, assert_complete, config

from kldb.runfolder import read_jsonl, record_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, seeds: int) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "accelerate is part of the `audit` extra"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "kldb.cli", "sweep", "--out", str(out), "--pipeline", "kldb.testing:tiny_pipeline", "--classes", "three", "two",
        "--alphas", "0", "0.3", "--betas", "3", "--num-images", str(seeds), "--steps", "4", "--interval", "2",
        "--batch-size", "2", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    return subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_two_processes_share_the_sweep_and_merge_one_manifest(tmp_path):
    out = tmp_path / "run"
    first = launch(out, seeds=3)
    assert first.returncode == 0, first.stderr[-3000:]
    records = assert_complete(out, config(out, seeds=3))
    assert Counter(r["process_index"] for r in records) == {0: 3, 1: 3}, "each process made half of the 6 images"
    assert first.stdout.count("6 images in") == 1, "only the main process prints the summary"

    # resumed with a bigger grid, still on 2 processes: only the 6 new images are made, split between them
    second = launch(out, seeds=6)
    assert second.returncode == 0, second.stderr[-3000:]
    records = assert_complete(out, config(out, seeds=6))
    before = {record_key(r) for r in read_jsonl(out / "manifest.jsonl")}
    assert len(before) == 12
    assert Counter(r["process_index"] for r in records) == {0: 6, 1: 6}
    assert "(6 were already there)" in second.stdout
