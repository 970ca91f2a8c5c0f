"""bench/gpu.py off the GPU: one line and exit 0 without CUDA; the table from a result.

python -m pytest tests/test_bench_gpu.py -q
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    before = sorted(gpu.RESULTS.glob("gpu-*.json"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(
        [sys.executable, "-m", "bench.gpu"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0
    assert p.stdout.strip().splitlines() == [
        "bench-gpu: no CUDA device on this machine; nothing measured (run it on a GPU)"
    ]
    assert sorted(gpu.RESULTS.glob("gpu-*.json")) == before


def test_without_torch_it_says_so_in_one_line_and_exits_0():
    """`make bench-gpu` on a python that has no torch (torch hidden here): one line, no
    traceback, exit 0."""
    hide = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['bench.gpu']; "
    run = "runpy.run_module('bench.gpu', run_name='__main__')"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(
        [sys.executable, "-c", hide + run], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    (line,) = p.stdout.strip().splitlines()
    assert line.startswith(f"bench-gpu: no torch in {sys.executable}; nothing measured")


def test_table_marks_targets_met_and_missed():
    res = {
        "card": "NVIDIA H200",
        "vocab": "qwen",
        "example1": {"generate": {"seconds": 60.0}, "train": {"seconds": 70.0}, "total_s": 130.0},
        "generation": {
            "38": {"tokens_per_s": 12_000.0, "roofline_fraction": 0.1},
            "256": {"tokens_per_s": 40_000.0, "roofline_fraction": 0.45},
        },
        "training": {"ours_tokens_per_s": 20_000.0, "original_tokens_per_s": 8_000.0, "ratio": 2.5},
        "bandwidth_bytes_per_s": 4.0e12,
    }
    lines = {
        line.split("|")[1].strip(): line for line in gpu.table(res).splitlines() if "|" in line
    }
    assert lines["Example 1 total, s"].split("|")[4].strip() == "NO"  # 130 s > 120 s
    assert lines["generation tok/s at 38"].split("|")[4].strip() == "yes"
    assert lines["share of decode roofline at 256"].split("|")[2].strip() == "45.0%"
    assert lines["share of decode roofline at 256"].split("|")[4].strip() == "yes"
    assert lines["training ours / original"].split("|")[4].strip() == "NO"
    assert lines["training MFU, ours"].split("|")[2].strip() == "-"  # missing, not invented
    assert lines["measured copy bandwidth, GB/s"].split("|")[2].strip() == "4,000"


def test_card_slug():
    assert gpu.card_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu.card_slug("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia-geforce-rtx-4090-24gb"
