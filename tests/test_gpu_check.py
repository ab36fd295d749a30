"""benchmarks/gpu_check.sh, the one-call GPU check: its dry run on the CPU goes through every step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def run_check(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, **({"MUDD_CACHE": str(cache)} if cache else {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=400)


def test_dry_run_runs_every_step_and_writes_the_report(tmp_path, bundled_cache):
    done = run_check(str(tmp_path), "--dry-run", cache=bundled_cache)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert {name: step["status"] for name, step in report["steps"].items()} == dict.fromkeys(
        ("kernels", "bench", "recompute", "train"), "ok"
    )
    bench, recompute = report["figures"]["bench"], report["figures"]["recompute"]
    assert bench["device"] == "cpu" and bench["models"]["mudd"]["train_step_ratio"] > 0
    assert set(bench["mix_impls_s"]) == {"matmul"} and bench["mix_impls_s"]["matmul"] > 0
    assert recompute["overrides"] == {"recompute_mix": True} and recompute["memory_ratio"] > 1
    train = report["figures"]["train"]
    assert train["steps"] == 3 and math.isfinite(train["last_loss"]) and math.isfinite(train["val_loss"])
    assert [row["figure"] for row in report["targets"]] == ["train_step_ratio", "decode_ratio", "memory_ratio"]
    assert all(row["value"] is not None for row in report["targets"])
    # Time ratios come with the bench's quartiles; the memory ratio is exact and has none.
    assert [row["quartiles"] is not None for row in report["targets"]] == [True, True, False]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run on the CPU" in md and "| train | ok |" in md
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.count("===== ") == 8  # each step's command and its end
    assert (tmp_path / "train_metrics.jsonl").exists() and not (tmp_path / "train").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_full_check_refuses_in_one_line(tmp_path):
    done = run_check(str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_check: no CUDA device; run it on a GPU machine, or with --dry-run on the CPU"
