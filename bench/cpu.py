"""The CPU job: the bundled SmolLM2-135M on CPU, a demo-size persona bake, promptbake
against the original pipeline (bench/original.py), and every training speed-up
switched on and off in turn (jobs.VARIANTS).

    python -m bench.run --config cpu --threads 1    # the job alone (bench/run.py)
    python -m bench.run --config cpu --quick        # a tiny random model: the harness only

It reads top to bottom: `setup` loads the model and the questions, `generate` times
both pipelines' sampling, `train` times the original and each variant on the same
trajectories from the same weights, `measure` turns the times into the end-to-end bake
and the ratios. `run_cpu(job, workdir)` returns a JSON-ready dict of seconds, tokens/s
and held-out KL (bench/tables.py formats it).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import Lap, add_rates, heldout, load, loadavg, log, ratio
from bench.jobs import KEPT, VARIANTS, Job, job_generate_config, job_train_config
from bench.original import OriginalSampling, OriginalTraining, generate_original, train_original
from promptbake.records import read_prompt, read_questions, select_questions
from promptbake.sampling.trajectories import generate_trajectories
from promptbake.training.batches import bucket_order
from promptbake.training.loop import train as promptbake_train
from promptbake.training.targets import TeacherPlan
from promptbake.training.teacher import cache_from_generation


@dataclass
class Setup:
    """The loaded model and the job's inputs, shared by every pipeline."""

    model: object
    tok: object
    x0: str
    train_q: list[dict]
    val_q: list[dict]
    load: dict  # {"ours", "original"}: the model load's times
    workdir: Path  # trajectories and adapters go here


@dataclass
class Generated:
    """Ours' trajectories (training and held-out), the teacher table kept while sampling
    them, and both pipelines' generation times."""

    rows: list[dict]
    val_rows: list[dict]
    kept: object  # a TeacherCache: "ours" trains with it
    times: dict  # {"ours", "original"}


def run_cpu(job: Job, workdir: Path) -> dict:
    """The CPU job; trajectories and adapters go under `workdir`."""
    res: dict = {"job": dataclasses.asdict(job), "load_before": loadavg()}
    torch.manual_seed(job.seed)
    s = setup(job, workdir)
    res["load"] = s.load
    g = generate(job, s)
    res["generation"] = g.times
    res["training"], res["heldout_kl_base"] = train(job, s, g)
    res["padding_share"] = padding(job, g.rows)
    res.update(measure(s.load, g.times, res["training"]))
    res["load_after"] = loadavg()
    return res


# ---------------------------------------------------------------- setup
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


def setup(job: Job, workdir: Path) -> Setup:
    """Load the model once (ours: cached float weights), time the original's load, and
    select the training and held-out questions."""
    model, tok, load_ours = load(job)
    model.eval()
    log(f"loaded {job.model} in {load_ours['seconds']:.1f} s (cached float weights)")
    load_orig = original_load(job)
    if job.model != "tiny":
        log(f"the original's load (GGUF dequantized): {load_orig['seconds']:.1f} s")
    return Setup(
        model,
        tok,
        read_prompt(job.x0_file),
        select_questions(read_questions(job.train_questions), job.n_train_q, job.seed),
        select_questions(read_questions(job.heldout_questions), job.n_val_q, job.seed),
        {"ours": load_ours, "original": load_orig},
        workdir,
    )


# ---------------------------------------------------------------- generate
def generate(job: Job, s: Setup) -> Generated:
    """Time ours (mixed-question batches, keeping the teacher's log-probs while sampling,
    as promptbake bake does) and the original (one question per generate call), then
    sample the held-out trajectories (not timed)."""
    train_path, val_path = s.workdir / "train.jsonl", s.workdir / "val.jsonl"
    cfg = job_generate_config(job, train_path)
    lap = Lap()
    g = generate_trajectories(
        s.model, s.tok, cfg, s.x0, s.train_q, train_path, progress=False, keep_bytes=1e12
    )
    kept = cache_from_generation(g.rows, g.kept)
    ours = add_rates(lap.done(), g.stats["new_tokens"])
    ours["new_tokens"] = g.stats["new_tokens"]
    log(f"ours generated {g.stats['new_tokens']} tokens in {ours['seconds']:.1f} s")
    lap = Lap()
    _, go = generate_original(s.model, s.tok, s.x0, s.train_q, OriginalSampling.of(cfg))
    orig = add_rates(lap.done(), go["new_tokens"])
    orig["new_tokens"] = go["new_tokens"]
    log(f"original generated {go['new_tokens']} tokens in {orig['seconds']:.1f} s")
    val_cfg = job_generate_config(job, val_path, heldout=True)
    val = generate_trajectories(s.model, s.tok, val_cfg, s.x0, s.val_q, val_path, progress=False)
    return Generated(g.rows, val.rows, kept, {"ours": ours, "original": orig})


# ---------------------------------------------------------------- train
def train(job: Job, s: Setup, g: Generated) -> tuple[dict, float]:
    """Every pipeline on the same rows, from copies of the same base weights: the
    original, then each of the job's variants; (their results, the base's held-out KL)."""
    base = copy.deepcopy(s.model)
    kl_base = heldout(base, s.tok, g.val_rows, job.kl_chunk_size)  # no adapter yet
    training = {"original": train_the_original(job, s, g, base)}
    log(f"original trained in {training['original']['seconds']:.1f} s")
    n_tok = training["original"]["kl_tokens"]  # the same rows and epochs for every variant
    for variant in VARIANTS:
        name = variant[0]
        if name in job.variants:
            training[name] = v = train_variant(job, s, g, base, variant, n_tok)
            log(f"{name} trained in {v['seconds']:.1f} s, held-out KL {v['heldout_kl']:.4f}")
    return training, kl_base


def train_the_original(job: Job, s: Setup, g: Generated, base) -> dict:
    """bench/original.py's training: full logits at every position, teacher every step."""
    cfg = job_train_config(job, s.workdir / "train.jsonl", s.workdir / "train-original")
    lap = Lap()
    m, st = train_original(copy.deepcopy(base), s.tok, g.rows, OriginalTraining.of(cfg))
    out = {
        "description": "full logits at every position, teacher every step",
        **add_rates(lap.done(), st["kl_tokens"]),
        "kl_tokens": st["kl_tokens"],
        "train_kl_last_epoch": st["train_kl"][-1],
        "heldout_kl": heldout(m, s.tok, g.val_rows, job.kl_chunk_size),
    }
    del m
    return out


def train_variant(job: Job, s: Setup, g: Generated, base, variant: tuple, n_tok: int) -> dict:
    """promptbake's train with one variant's (name, description, flags); KEPT: with the
    exact teacher table kept from generation (as promptbake bake hands it over)."""
    name, desc, flags = variant
    flags = dict(flags)
    table = g.kept if flags.pop(KEPT, False) else None
    cfg = job_train_config(job, s.workdir / "train.jsonl", s.workdir / f"train-{name}", **flags)
    model_copy = copy.deepcopy(base)
    lap = Lap()
    plan = None if table is None else TeacherPlan("kept", "teacher cache (exact, kept)")
    m, metrics = promptbake_train(
        cfg, model_copy, s.tok, g.rows, None, echo=False, teacher=plan, table=table
    )
    t = lap.done()
    out = {
        "description": desc,
        **add_rates(t, n_tok),
        "kl_tokens": n_tok,
        "train_kl_last_epoch": metrics[-1]["train_kl"],
        "heldout_kl": heldout(m, s.tok, g.val_rows, job.kl_chunk_size),
    }
    del m, model_copy
    return out


# ---------------------------------------------------------------- measure
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


def padding(job: Job, rows: list[dict]) -> dict:
    """Padding share of the training batches, shuffled and length-bucketed."""
    order = list(range(len(rows)))
    random.Random(job.seed).shuffle(order)
    gen = torch.Generator().manual_seed(job.seed)
    bucketed = bucket_order(rows, order, job.batch_size, gen)
    return {
        "shuffled": padding_share(rows, job.batch_size, order),
        "bucketed": padding_share(rows, job.batch_size, bucketed),
    }


def measure(load: dict, gen: dict, training: dict) -> dict:
    """The end-to-end bake (model load(s) + generate + train; the original runs two
    scripts, so it loads twice) and ours-vs-original ratios, in wall-clock and CPU time."""
    o, t = training["original"], training.get("ours", training["plain"])
    e2e = {}
    for unit in ("seconds", "cpu_seconds"):
        orig = gen["original"][unit] + o[unit]
        ours = gen["ours"][unit] + t[unit]
        e2e[unit] = {
            "original": 2 * load["original"][unit] + orig,  # two scripts, two loads
            "ours": load["ours"][unit] + ours,
            "original_no_load": orig,
            "ours_no_load": ours,
        }

    def ratios(unit: str, rate: str) -> dict:
        e = e2e[unit]
        return {
            "generated_tokens_per_s": ratio(gen["ours"][rate], gen["original"][rate]),
            "training_tokens_per_s": ratio(t[rate], o[rate]),
            "end_to_end_speedup": ratio(e["original"], e["ours"]),
            "end_to_end_speedup_no_load": ratio(e["original_no_load"], e["ours_no_load"]),
        }

    return {
        "end_to_end": e2e,
        "ratios": {
            **ratios("seconds", "tokens_per_s"),
            "cpu_time": ratios("cpu_seconds", "tokens_per_cpu_s"),
            "heldout_kl_ours_minus_original": round(t["heldout_kl"] - o["heldout_kl"], 5),
        },
    }
