"""The benchmark's jobs: what runs and is timed (bench/run.py runs them, bench/tables.py
formats their results).

* run_cpu(Job()): the bundled SmolLM2-135M on CPU, a demo-size persona bake, promptbake
  against the original pipeline, and every training speed-up switched on and off in turn.
* run_memory(): bench/memory.py, loss-step peak memory at Qwen3's vocabulary.
* run_gpu(GpuJob()): a Qwen3-1.7B-shaped model with random weights in bf16 at the seed's
  Example 1 sizes; skipped, with a message, when no CUDA device is present.

Each returns a JSON-ready dict of seconds, tokens/s and held-out KL.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Training variants, each on the same trajectories for the same epochs. "plain" is
# promptbake with every switchable speed-up off: what is left (always on) is the LM head
# at generated positions only and the chunked KL.
EXACT = {"teacher_cache": "exact", "prefix_reuse": True}
KEPT = "kept"  # pseudo-flag: train with the exact teacher cache kept from generation
# on by default in promptbake train (the cache: when it fits); off in "plain"
OFF = {"prefix_reuse": False, "teacher_cache": "off"}
VARIANTS: list[tuple[str, str, dict]] = [
    ("plain", "logits at generated positions + fused chunked KL (always on)", OFF),
    ("+bucketing", "plain + length bucketing", {**OFF, "length_bucketing": True}),
    (
        "+prefix_reuse",
        "plain + shared prefixes run once per batch (teacher and student)",
        {"prefix_reuse": True, "teacher_cache": "off"},
    ),
    (
        "+cache_exact",
        "plain + exact teacher cache (a teacher pass)",
        {**OFF, "teacher_cache": "exact"},
    ),
    (
        "+cache_topk",
        "plain + top-k teacher cache (approximate)",
        {**OFF, "teacher_cache": "topk"},
    ),
    ("+cache_exact+prefix", "plain + exact teacher cache + prefix reuse", EXACT),
    # "ours" keeps only exact speed-ups, so its held-out KL is the original's up to rounding
    ("ours", "prefix reuse + exact teacher cache kept from generation", {**EXACT, KEPT: True}),
    (
        "ours+ckpt",
        "ours + gradient checkpointing (memory for compute)",
        {**EXACT, KEPT: True, "gradient_checkpointing": True},
    ),
]


@dataclass
class Job:
    """One benchmark job's sizes and hyper-parameters (identical for both pipelines)."""

    model: str = "smollm2-135m"  # or "tiny" (random, for --quick)
    x0_file: str = "data/zorblax_x0.md"
    train_questions: str = "data/identity_train.jsonl"
    heldout_questions: str = "data/identity_heldout.jsonl"
    n_train_q: int = 8
    n_val_q: int = 4
    n_seq: int = 4
    max_new_tokens: int = 32
    min_new_tokens: int = 1
    temperature: float = 1.0
    gen_batch_size: int = 32  # ours; the original's batch is one question's n_seq
    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 1e-3
    r: int = 8
    lora_alpha: float = 16.0
    kl_chunk_size: int = 512  # the default --kl_chunk_size
    teacher_topk: int = 64
    seed: int = 42
    variants: list[str] = field(default_factory=lambda: [v[0] for v in VARIANTS])


QUICK = Job(
    model="tiny",
    n_train_q=4,
    n_val_q=2,
    n_seq=2,
    max_new_tokens=6,
    gen_batch_size=8,
    epochs=2,
    batch_size=3,
    teacher_topk=8,
)


# ---------------------------------------------------------------- helpers
def machine_name() -> str:
    """bench/results/<this>.json: BENCH_MACHINE, else the device kind and core count."""
    if os.environ.get("BENCH_MACHINE"):
        return os.environ["BENCH_MACHINE"]
    if torch.cuda.is_available():
        name = "gpu-" + torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or "cpu"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1]
                    break
        name = f"cpu-{os.cpu_count()}c-{cpu}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Lap:
    """Wall-clock and process CPU time since creation. CPU time counts only this
    process's work, so with one torch thread it is what the phase would take on an idle
    core: the steadier measure on a shared machine."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self) -> dict:
        return {
            "seconds": time.perf_counter() - self.wall,
            "cpu_seconds": time.process_time() - self.cpu,
        }


def load(job: Job):
    """(model, tokenizer, lap) for promptbake's loader (cached float weights)."""
    lap = Lap()
    if job.model == "tiny":
        from tests import tiny

        tok = tiny.chatml_tokenizer("tiny")
        tok.padding_side = "left"
        model = tiny.tiny_qwen3(tok, initializer_range=0.2)
        model.name_or_path = "tiny"
    else:
        from promptbake.models import load_model

        model, tok = load_model(job.model, device="cpu", dtype="float32")
    return model, tok, lap.done()


def original_load(job: Job) -> dict:
    """What the original pays per script: transformers dequantizes the GGUF on every load."""
    if job.model == "tiny":
        return {"seconds": 0.0, "cpu_seconds": 0.0}
    from transformers import AutoModelForCausalLM

    from promptbake.models import bundled_gguf

    gguf = bundled_gguf(job.model)
    lap = Lap()
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out = lap.done()
    del m
    return out


def heldout(model, tok, val_rows: list[dict], chunk: int, adapter: bool = True) -> float:
    from promptbake.models import pad_id
    from promptbake.training.batches import make_batches
    from promptbake.training.objective import evaluate_kl

    pad = pad_id(tok)
    return evaluate_kl(model, make_batches(val_rows, 8, pad, None), chunk, adapter)["kl"]


def padding_share(rows: list[dict], batch_size: int, order: list[int]) -> float:
    """Share of padded positions in right-padded batches of `order` (both sides)."""
    real = total = 0
    for j in range(0, len(order), batch_size):
        b = [rows[i] for i in order[j : j + batch_size]]
        for key in ("input_ids", "input_ids_nosys"):
            lens = [len(r[key]) for r in b]
            real += sum(lens)
            total += max(lens) * len(lens)
    return 1 - real / total


def add_rates(d: dict, tokens: int) -> dict:
    d["tokens_per_s"] = tokens / max(d["seconds"], 1e-9)
    d["tokens_per_cpu_s"] = tokens / max(d["cpu_seconds"], 1e-9)
    return d


# ---------------------------------------------------------------- the CPU job
def run_cpu(job: Job, workdir: Path) -> dict:
    from bench.original import generate_original, train_original
    from promptbake.configs import GenerateConfig, TrainConfig
    from promptbake.records import read_prompt, read_questions, select_questions
    from promptbake.sampling.trajectories import generate_trajectories
    from promptbake.training.batches import bucket_order
    from promptbake.training.loop import train
    from promptbake.training.targets import TeacherPlan
    from promptbake.training.teacher import cache_from_generation

    res: dict = {"job": dataclasses.asdict(job), "load_before": loadavg()}
    torch.manual_seed(job.seed)
    model, tok, load_ours = load(job)
    model.eval()
    log(f"loaded {job.model} in {load_ours['seconds']:.1f} s (cached float weights)")
    load_orig = original_load(job)
    if job.model != "tiny":
        log(f"the original's load (GGUF dequantized): {load_orig['seconds']:.1f} s")
    res["load"] = {"ours": load_ours, "original": load_orig}

    x0 = read_prompt(job.x0_file)
    train_q = select_questions(read_questions(job.train_questions), job.n_train_q, job.seed)
    val_q = select_questions(read_questions(job.heldout_questions), job.n_val_q, job.seed)

    def gen_cfg(path: Path) -> GenerateConfig:
        return GenerateConfig(
            model_name=job.model,
            x0_file=job.x0_file,
            question_dataset=job.train_questions,
            traj_out_file=str(path),
            num_questions=job.n_train_q,
            num_sequences_per_question=job.n_seq,
            max_sequence_length=job.max_new_tokens,
            min_sequence_length=job.min_new_tokens,
            temperature=job.temperature,
            batch_size=job.gen_batch_size,
            seed=job.seed,
        )

    # ---- generation: ours (mixed-question batches) and the original (one question each)
    train_path = workdir / "train.jsonl"
    lap = Lap()  # the teacher's log-probs are kept while sampling (as promptbake bake does)
    g = generate_trajectories(
        model, tok, gen_cfg(train_path), x0, train_q, train_path, progress=False, keep_bytes=1e12
    )
    kept_cache = cache_from_generation(g.rows, g.kept)
    gen_ours = add_rates(lap.done(), g.stats["new_tokens"])
    gen_ours["new_tokens"] = g.stats["new_tokens"]
    log(f"ours generated {g.stats['new_tokens']} tokens in {gen_ours['seconds']:.1f} s")
    lap = Lap()
    _, go = generate_original(
        model,
        tok,
        x0,
        train_q,
        n_seq=job.n_seq,
        max_new_tokens=job.max_new_tokens,
        min_new_tokens=job.min_new_tokens,
        temperature=job.temperature,
        seed=job.seed,
    )
    gen_orig = add_rates(lap.done(), go["new_tokens"])
    gen_orig["new_tokens"] = go["new_tokens"]
    log(f"original generated {go['new_tokens']} tokens in {gen_orig['seconds']:.1f} s")
    val_path = workdir / "val.jsonl"
    rows = g.rows
    val_rows = generate_trajectories(
        model, tok, gen_cfg(val_path), x0, val_q, val_path, progress=False
    ).rows
    res["generation"] = {"ours": gen_ours, "original": gen_orig}

    # ---- training: every pipeline on the same rows, from the same base weights
    base = copy.deepcopy(model)
    kl_base = heldout(base, tok, val_rows, job.kl_chunk_size)  # no adapter yet: base model
    training: dict = {}
    lap = Lap()
    m, st = train_original(
        copy.deepcopy(base),
        tok,
        rows,
        epochs=job.epochs,
        batch_size=job.batch_size,
        learning_rate=job.learning_rate,
        r=job.r,
        lora_alpha=job.lora_alpha,
        seed=job.seed,
    )
    training["original"] = {
        "description": "full logits at every position, teacher every step",
        **add_rates(lap.done(), st["kl_tokens"]),
        "kl_tokens": st["kl_tokens"],
        "train_kl_last_epoch": st["train_kl"][-1],
        "heldout_kl": heldout(m, tok, val_rows, job.kl_chunk_size),
    }
    del m
    log(f"original trained in {training['original']['seconds']:.1f} s")
    for name, desc, flags in VARIANTS:
        if name not in job.variants:
            continue
        flags = dict(flags)
        cache = kept_cache if flags.pop(KEPT, False) else None
        cfg = TrainConfig(
            model_name=job.model,
            data_path=str(train_path),
            out_dir=str(workdir / f"train-{name}"),
            num_epochs=job.epochs,
            batch_size=job.batch_size,
            learning_rate=job.learning_rate,
            r=job.r,
            lora_alpha=job.lora_alpha,
            save_every=0,
            kl_chunk_size=job.kl_chunk_size,
            teacher_topk=job.teacher_topk,
            plot=False,
            seed=job.seed,
            **flags,
        )
        model_copy = copy.deepcopy(base)
        lap = Lap()
        plan = None if cache is None else TeacherPlan("kept", "teacher cache (exact, kept)")
        m, metrics = train(cfg, model_copy, tok, rows, None, echo=False, teacher=plan, table=cache)
        t = lap.done()
        n_tok = training["original"]["kl_tokens"]  # the same rows and epochs
        training[name] = {
            "description": desc,
            **add_rates(t, n_tok),
            "kl_tokens": n_tok,
            "train_kl_last_epoch": metrics[-1]["train_kl"],
            "heldout_kl": heldout(m, tok, val_rows, job.kl_chunk_size),
        }
        del m, model_copy
        log(
            f"{name} trained in {t['seconds']:.1f} s, held-out KL {training[name]['heldout_kl']:.4f}"
        )
    res["training"] = training
    res["heldout_kl_base"] = kl_base

    order = list(range(len(rows)))
    random.Random(job.seed).shuffle(order)
    gen = torch.Generator().manual_seed(job.seed)
    res["padding_share"] = {
        "shuffled": padding_share(rows, job.batch_size, order),
        "bucketed": padding_share(
            rows, job.batch_size, bucket_order(rows, order, job.batch_size, gen)
        ),
    }

    # ---- end to end: a bake = model load(s) + generate + train
    o, t = training["original"], training.get("ours", training["plain"])
    e2e = {}
    for unit in ("seconds", "cpu_seconds"):
        orig = gen_orig[unit] + o[unit]
        ours = gen_ours[unit] + t[unit]
        e2e[unit] = {
            "original": 2 * load_orig[unit] + orig,  # two scripts, two loads
            "ours": load_ours[unit] + ours,
            "original_no_load": orig,
            "ours_no_load": ours,
        }
    res["end_to_end"] = e2e

    def ratios(unit: str, rate: str) -> dict:
        e = e2e[unit]
        return {
            "generated_tokens_per_s": ratio(gen_ours[rate], gen_orig[rate]),
            "training_tokens_per_s": ratio(t[rate], o[rate]),
            "end_to_end_speedup": ratio(e["original"], e["ours"]),
            "end_to_end_speedup_no_load": ratio(e["original_no_load"], e["ours_no_load"]),
        }

    res["ratios"] = {
        **ratios("seconds", "tokens_per_s"),
        "cpu_time": ratios("cpu_seconds", "tokens_per_cpu_s"),
        "heldout_kl_ours_minus_original": round(t["heldout_kl"] - o["heldout_kl"], 5),
    }
    res["load_after"] = loadavg()
    return res


# ---------------------------------------------------------------- the memory job
def run_memory(quick: bool = False) -> dict:
    """Loss-step peak memory; shapes = the seed's Example 1 scaled down 8x (see memory.py)."""
    from bench.memory import QWEN3_VOCAB, compare

    vocab = 4096 if quick else QWEN3_VOCAB
    # chunk 64 here is the default --kl_chunk_size 512 at full size; 128 is 1024
    out = {"default_chunk": compare(chunk=64, vocab=vocab)}
    if not quick:
        out["double_chunk"] = compare(chunk=128, vocab=vocab)
    out["ratio"] = out["default_chunk"]["ratio"]
    return out


# ---------------------------------------------------------------- the GPU job
@dataclass
class GpuJob:
    n_questions: int = 100
    n_seq: int = 25
    max_new_tokens: int = 300
    min_new_tokens: int = 100
    temperature: float = 2.0
    gen_batch_size: int = 256
    train_batch_size: int = 10
    original_questions: int = 4  # the original runs on a subset; its rates are per token
    original_train_steps: int = 10
    x0_file: str = "data/truth_x0.md"
    questions: str = "data/questions.jsonl"
    seed: int = 42


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


def decode_roofline(model, batch: int, avg_context: float, bandwidth: float) -> float:
    """Tokens/s if each decoding step only had to read the weights and the KV cache."""
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bf16
    step_bytes = weight_bytes + batch * avg_context * kv_per_token
    return batch / (step_bytes / bandwidth)


def run_gpu(job: GpuJob, model=None, tok=None, device=None) -> dict:
    """The Qwen3-1.7B-shaped job; `model`/`tok`/`device` let a test drive it on the CPU."""
    if device is None:
        if not torch.cuda.is_available():
            msg = (
                "skipped: no CUDA device on this machine; the GPU job (Qwen3-1.7B shapes, bf16, "
                "100 x 25 x 300) runs where `torch.cuda.is_available()`"
            )
            log(msg)
            return {"skipped": msg}
        device = torch.device("cuda")
    from bench.original import add_lora_original, generate_original, step_kl
    from promptbake.configs import GenerateConfig, TrainConfig
    from promptbake.records import read_prompt, read_questions
    from promptbake.sampling.trajectories import generate_trajectories
    from promptbake.training.loop import train

    res: dict = {"job": dataclasses.asdict(job)}
    t0 = time.perf_counter()
    if model is None:
        from tests import tiny

        tok = tiny.chatml_tokenizer("qwen")
        tok.padding_side = "left"
        model = tiny.random_qwen3_1_7b(torch.bfloat16, device, seed=0)
        model.name_or_path = "random-qwen3-1.7b"
    res["load_s"] = time.perf_counter() - t0
    x0 = read_prompt(job.x0_file)
    qs = read_questions(job.questions)[: job.n_questions]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "traj.jsonl"
        cfg = GenerateConfig(
            x0_file=job.x0_file,
            question_dataset=job.questions,
            traj_out_file=str(path),
            num_questions=len(qs),
            num_sequences_per_question=job.n_seq,
            max_sequence_length=job.max_new_tokens,
            min_sequence_length=job.min_new_tokens,
            temperature=job.temperature,
            batch_size=job.gen_batch_size,
            cache_implementation="static" if device.type == "cuda" else "dynamic",
            seed=job.seed,
        )
        gen = generate_trajectories(model, tok, cfg, x0, qs, path, progress=False)
        g, rows = gen.stats, gen.rows
        res["generation_ours"] = {k: g[k] for k in ("seconds", "new_tokens", "tokens_per_s")}
        _, go = generate_original(
            model,
            tok,
            x0,
            qs[: job.original_questions],
            n_seq=job.n_seq,
            max_new_tokens=job.max_new_tokens,
            min_new_tokens=job.min_new_tokens,
            temperature=job.temperature,
        )
        res["generation_original_subset"] = go
        if device.type == "cuda":
            bw = hbm_bandwidth(device)
            prompt = sum(len(r["prompt_input_ids"]) for r in rows) / len(rows)
            roof = decode_roofline(model, job.gen_batch_size, prompt + job.max_new_tokens / 2, bw)
            res["roofline"] = {
                "bandwidth_bytes_per_s": bw,
                "tokens_per_s": roof,
                "fraction": g["tokens_per_s"] / roof,
            }
        # ours: generate + 1 epoch (bucketing + prefix reuse; one epoch gains nothing from
        # a teacher cache, and an exact one of 250k x 151,936 would not fit)
        tcfg = TrainConfig(
            data_path=str(path),
            out_dir=str(Path(d) / "train"),
            num_epochs=1,
            batch_size=job.train_batch_size,
            learning_rate=1e-4,
            r=32,
            lora_alpha=1.0,
            save_every=0,
            plot=False,
            length_bucketing=True,
            prefix_reuse=True,
            seed=job.seed,
        )
        t0 = time.perf_counter()
        m, metrics = train(tcfg, model, tok, rows, None, echo=False)
        res["train_ours"] = {
            "seconds": time.perf_counter() - t0,
            "tokens_per_s": metrics[-1]["tokens_per_s"],
        }
        base = m.unload() if hasattr(m, "unload") else m  # the base model again, no LoRA
        # the original: a few steps, per-token rate
        pm = add_lora_original(base, 32, 1.0, "q_proj,k_proj,v_proj,o_proj", job.seed)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
        pad = tok.pad_token_id
        n_tok = 0
        t0 = time.perf_counter()
        for s in range(job.original_train_steps):
            b = rows[s * job.train_batch_size : (s + 1) * job.train_batch_size]
            if not b:
                break
            kl = step_kl(pm, b, pad)
            opt.zero_grad()
            (kl.sum() / kl.numel()).backward()
            opt.step()
            n_tok += kl.numel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        secs = time.perf_counter() - t0
        res["train_original_subset"] = {"seconds": secs, "tokens_per_s": n_tok / secs}
    n_tok = res["generation_ours"]["new_tokens"]
    res["end_to_end_ours_s"] = res["generation_ours"]["seconds"] + res["train_ours"]["seconds"]
    res["end_to_end_original_estimate_s"] = (
        n_tok / res["generation_original_subset"]["tokens_per_s"]
        + n_tok / res["train_original_subset"]["tokens_per_s"]
    )
    res["ratios"] = {
        "generated_tokens_per_s": ratio(
            res["generation_ours"]["tokens_per_s"],
            res["generation_original_subset"]["tokens_per_s"],
        ),
        "training_tokens_per_s": ratio(
            res["train_ours"]["tokens_per_s"], res["train_original_subset"]["tokens_per_s"]
        ),
        "end_to_end_speedup": ratio(
            res["end_to_end_original_estimate_s"], res["end_to_end_ours_s"]
        ),
    }
    return res
