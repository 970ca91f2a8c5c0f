"""The seed job: the commands users type, timed as processes, against the original's.

    python -m bench.run --config seed --threads 1

Ours is the seed's two scripts as a user runs them, at their defaults except the sizes
shared with the original (the teacher cache, prefix reuse etc. are whatever
`train_loop.py` does by itself):

    python generate_data.py --model_name smollm2-135m --x0_file ... --traj_out_file T
    python train_loop.py --model_name smollm2-135m --data_path T --out_dir D \\
        --num_epochs 3 --batch_size 8 -r 8 --lora_alpha 16 --learning_rate 1e-3

The original is bench/original.py's two stages, also as processes (`python -m
bench.original generate|train`): one question per generate call, full logits, the
teacher every step, the GGUF dequantized on each load. Both pipelines get the same
flags and data files (the cpu job's persona job); each trains on the trajectories it
generated itself, so the job is end to end. The runs alternate (ours, original, ours,
original, ...) so that a drifting machine load hits both alike; each process's wall
time and CPU time (its own and its children's) are recorded. One evaluator (this
process) then measures the held-out KL of every adapter on the same held-out
trajectories.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import heldout, load, loadavg, log, ratio
from bench.jobs import Job, job_generate_config, job_train_config

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("ours", "original")


# the settings both pipelines' processes get, as flags; everything else is each
# script's default (ours: train_loop.py's teacher cache, prefix reuse, ...)
GENERATE_FLAGS = (
    "model_name", "x0_file", "question_dataset", "num_questions",
    "num_sequences_per_question", "max_sequence_length", "min_sequence_length",
    "temperature", "batch_size", "traj_out_file",
)  # fmt: skip
TRAIN_FLAGS = (
    "model_name", "data_path", "out_dir", "num_epochs", "batch_size", "r", "lora_alpha",
    "learning_rate",
)  # fmt: skip


def as_flags(cfg, names: tuple[str, ...]) -> list[str]:
    """The config's fields `names` as the seed's scripts spell them (`-r`, `--name`)."""
    out = []
    for name in names:
        out += ["-r" if name == "r" else f"--{name}", str(getattr(cfg, name))]
    return out


def commands(pipeline: str, job: Job, model: str, d: Path) -> list[tuple[str, list[str]]]:
    """[(stage, argv)] of one pipeline's processes, writing into directory `d`."""
    traj, adapter = d / "traj.jsonl", d / "adapter"
    gen = as_flags(job_generate_config(job, traj, model_name=model), GENERATE_FLAGS)
    train = as_flags(job_train_config(job, traj, adapter, model_name=model), TRAIN_FLAGS)
    if pipeline == "ours":
        return [
            ("generate", [sys.executable, "generate_data.py", *gen]),
            ("train", [sys.executable, "train_loop.py", *train]),
        ]
    orig = [sys.executable, "-m", "bench.original"]
    return [
        ("generate", [*orig, "generate", *gen, "--stats", str(d / "generate.json")]),
        ("train", [*orig, "train", *train, "--stats", str(d / "train.json")]),
    ]


def child_env(threads: int) -> dict:
    """The environment of every timed process: this checkout's code, the bench's thread
    count (torch reads OMP_NUM_THREADS at start-up), no Hub."""
    env = dict(os.environ)
    path = [str(ROOT / "src"), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def timed(argv: list[str], env: dict, log_path: Path) -> dict:
    """Run one process to completion; its wall-clock and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as f:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": wall, "cpu_seconds": cpu}


def inner_times(pipeline: str, d: Path) -> dict:
    """What each process says it spent on the work itself (not start-up and load)."""
    if pipeline == "original":
        out = {}
        for stage in ("generate", "train"):
            s = json.loads((d / f"{stage}.json").read_text(encoding="utf-8"))
            out[stage] = {"load_seconds": s["load_seconds"], "work_seconds": s["seconds"]}
        return out
    gen_log = (d / "generate.log").read_text(encoding="utf-8", errors="replace")
    m = re.search(r"new tokens in ([0-9.]+) s", gen_log)
    epochs = [
        json.loads(line)
        for line in (d / "adapter" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return {
        "generate": {"work_seconds": float(m.group(1)) if m else None},
        "train": {"epoch_seconds": sum(e["seconds"] for e in epochs)},
    }


def run_pipeline(pipeline: str, job: Job, model: str, d: Path, env: dict) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    for stage, argv in commands(pipeline, job, model, d):
        out[stage] = timed(argv, env, d / f"{stage}.log")
    out["end_to_end"] = {
        u: out["generate"][u] + out["train"][u] for u in ("seconds", "cpu_seconds")
    }
    out["inner"] = inner_times(pipeline, d)
    return out


def quick_model_dir(workdir: Path) -> str:
    """--quick: the tiny random model saved as a local model directory (both pipelines
    load it from there; the harness check needs no bundled model)."""
    from tests import tiny

    tok = tiny.chatml_tokenizer("tiny")
    model = tiny.tiny_qwen3(tok, initializer_range=0.2)
    d = workdir / "tiny-model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def evaluate(job: Job, model_name: str, dirs: dict, workdir: Path) -> dict:
    """Held-out KL(prompted || baked) per token of every adapter, one evaluator, the same
    held-out trajectories (sampled here from the prompted base model)."""
    from peft import PeftModel

    from promptbake.models import load_model
    from promptbake.records import read_prompt, read_questions, select_questions
    from promptbake.sampling.trajectories import generate_trajectories

    if job.model == "tiny":
        base, tok = load_model(model_name, device="cpu", dtype="float32")
    else:
        base, tok, _ = load(job)
    val_q = select_questions(read_questions(job.heldout_questions), job.n_val_q, job.seed)
    path = workdir / "heldout.jsonl"
    cfg = job_generate_config(job, path, heldout=True, model_name=model_name)
    x0 = read_prompt(job.x0_file)
    rows = generate_trajectories(base, tok, cfg, x0, val_q, path, progress=False).rows
    out = {"base": heldout(base, tok, rows, job.kl_chunk_size)}
    for name, adapter_dirs in dirs.items():
        out[name] = []
        for a in adapter_dirs:
            m = PeftModel.from_pretrained(copy.deepcopy(base), str(a)).eval()
            out[name].append(heldout(m, tok, rows, job.kl_chunk_size))
            del m
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarize(runs: dict) -> dict:
    """Mean seconds per process and end to end over the repeats, and the ratios."""
    avg: dict = {}
    for p in PIPELINES:
        avg[p] = {
            stage: {u: mean([r[stage][u] for r in runs[p]]) for u in ("seconds", "cpu_seconds")}
            for stage in ("generate", "train", "end_to_end")
        }
    o, s = avg["original"], avg["ours"]
    return {
        "mean": avg,
        "speedup": {
            stage: {u: ratio(o[stage][u], s[stage][u]) for u in ("seconds", "cpu_seconds")}
            for stage in ("generate", "train", "end_to_end")
        },
        # each repeat's pair (run back to back): how much the ratio drifts
        "speedup_per_repeat": [
            ratio(a["end_to_end"]["seconds"], b["end_to_end"]["seconds"])
            for a, b in zip(runs["original"], runs["ours"])
        ],
    }


def run_seed(job: Job, workdir: Path, repeats: int = 2) -> dict:
    """The seed job: `repeats` x (ours, original) as processes, then one evaluator."""
    threads = torch.get_num_threads()
    env = child_env(threads)
    model = quick_model_dir(workdir) if job.model == "tiny" else job.model
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": threads,
        "repeats": repeats,
        "load_before": loadavg(),
        "commands": {p: [" ".join(a[1:]) for _, a in commands(p, job, model, Path("D"))]
                     for p in PIPELINES},
    }  # fmt: skip
    runs: dict = {p: [] for p in PIPELINES}
    dirs: dict = {p: [] for p in PIPELINES}
    for rep in range(repeats):
        for p in PIPELINES:  # alternate: ours, original, ours, original, ...
            d = workdir / f"{p}-{rep}"
            runs[p].append(run_pipeline(p, job, model, d, env))
            dirs[p].append(d / "adapter")
            e = runs[p][-1]
            log(
                f"seed job, {p} #{rep + 1}: generate {e['generate']['seconds']:.1f} s, "
                f"train {e['train']['seconds']:.1f} s, end to end "
                f"{e['end_to_end']['seconds']:.1f} s (load average {loadavg()})"
            )
    res["load_after"] = loadavg()
    res["runs"] = runs
    res.update(summarize(runs))
    res["heldout_kl"] = evaluate(job, model, dirs, workdir)
    return res
