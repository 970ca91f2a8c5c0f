"""`make bench`: promptbake against the original Prompt Baking algorithm, one invocation,
same machine, same data.

    python -m bench.run                 # every job: cpu, seed, memory, gpu
    python -m bench.run --config cpu    # one of: cpu, seed, memory, engines, gpu, all (default)
    python -m bench.run --quick         # a tiny random model, seconds: checks the harness only

Jobs (see bench/README.md for the method and the latest numbers):

* cpu: the bundled SmolLM2-135M on CPU, a demo-size persona bake. Generation is timed
  for both pipelines (the original: one question per generate call); both then train on
  the SAME trajectories (ours'), so their held-out KL compares the training alone; every
  optimization is switched on and off in turn (ablation rows) (bench/cpu.py).
* seed: the seed's commands as users type them (generate_data.py, then train_loop.py)
  against the original's two scripts, each a timed process (bench/seed.py).
* memory: loss-step peak memory at Qwen3's vocabulary (151,936) (bench/memory.py).
* engines: the CPU sampling rate of each engine (hf, static, vllm where installed), a
  fact with no target (bench/engines.py).
* gpu: a Qwen3-1.7B-shaped model with random weights in bf16 at the seed's Example 1
  sizes (100 questions x 25 sequences x 300 tokens), generate + 1 epoch; skipped, with
  a message, when no CUDA device is present (bench/gpu_measure.py: run_gpu).

Each job's settings are bench/jobs.py's Job / GpuJob, made into promptbake's configs
there (job_generate_config, job_train_config).

Results: bench/results/<machine>.json, and the table in bench/README.md is rebuilt
from every results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import log, machine_name
from bench.cpu import run_cpu
from bench.engines import engines_table, run_engines
from bench.gpu_measure import run_gpu
from bench.jobs import QUICK, GpuJob, Job
from bench.memory import run_memory
from bench.seed import run_seed
from bench.tables import RESULTS, summary, update_readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="promptbake vs the original algorithm")
    p.add_argument(
        "--config", choices=["cpu", "seed", "memory", "engines", "gpu", "all"], default="all"
    )
    p.add_argument("--quick", action="store_true", help="tiny random model: a harness check")
    p.add_argument(
        "--out", default=None, help="results file (default bench/results/<machine>.json)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for every pipeline (default: torch's; 1 on a busy machine)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="seed job: runs of each pipeline, alternating ours / original (default 2)",
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF loader's bars would flood the log
    from promptbake.files import write_json

    t_start = time.perf_counter()
    results = {
        "machine": machine_name() + ("-quick" if a.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    if a.config in ("cpu", "all"):
        with tempfile.TemporaryDirectory() as d:
            results["cpu"] = run_cpu(QUICK if a.quick else Job(), Path(d))
    if a.config in ("seed", "all"):
        log("seed job: generate_data.py + train_loop.py against the original, as processes")
        with tempfile.TemporaryDirectory() as d:
            results["seed"] = run_seed(QUICK if a.quick else Job(), Path(d), a.repeats)
    if a.config in ("memory", "all"):
        log("loss-step memory microbenchmark")
        results["memory"] = run_memory(a.quick)
    if a.config in ("engines", "all"):
        log("sampling engines: CPU rate of each")
        results["engines"] = run_engines(Job(), a.quick)
    if a.config in ("gpu", "all"):
        results["gpu"] = run_gpu(GpuJob())
    results["seconds"] = time.perf_counter() - t_start
    out = Path(a.out) if a.out else RESULTS / f"{results['machine']}.json"
    if a.config != "all" and out.is_file():  # one job: keep the file's other jobs' results
        kept = json.loads(out.read_text(encoding="utf-8"))
        jobs = ("cpu", "seed", "memory", "engines", "gpu")
        results = {**kept, **{k: v for k, v in results.items() if k in jobs}}
    write_json(out, results)
    if not a.quick and a.out is None:
        update_readme()
    print("\n" + summary(results))
    if results.get("engines"):
        print("\n" + engines_table(results["engines"]))
    print(f"\nresults: {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
