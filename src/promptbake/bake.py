"""Generate + train in one process, with one model load: the whole bake.

    promptbake bake --model_name smollm2-135m --x0_file data/zorblax_x0.md \\
        --question_dataset data/identity_train.jsonl,data/questions.jsonl \\
        --heldout data/identity_heldout.jsonl --marker Zorblax --out_dir runs/zorblax

Writes under --out_dir: trajectories_{train,val}.jsonl (+ .meta.json), the adapter
and training logs (see train.py), and, with --heldout, answers.md (base / prompted /
baked side by side), report.md and summary.json.

Why the defaults (configs.BAKE_DEFAULTS) differ from train_loop.py: the seed keeps lora_alpha=1 with r=32,
which scales the LoRA update by 1/32, so at lr 1e-4 it learns very slowly. Here the
update scale is alpha/r = 2 (r=8, alpha=16) with lr 1e-3, which bakes a persona into
SmolLM2-135M in a few epochs on CPU; train_loop.py keeps the seed's values so old
commands reproduce.
"""

from __future__ import annotations

import time

from . import distributed
from .configs import BakeConfig
from .data import atomic_write, read_prompt, read_questions, read_trajectories, write_json
from .errors import UserError
from .evaluate import answer, heldout_kl, side_by_side
from .flags import flag_values
from .generate import generate_trajectories, select_questions
from .models import load_model
from .report import write_report
from .scorers import marker, score_all
from .teacher import cache_from_generation
from .train import prepare_out_dir, train


def split_questions(questions: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Validation questions are disjoint from training ones (no answer leaks across)."""
    n_val = round(len(questions) * val_fraction)
    if val_fraction > 0:
        n_val = max(1, min(n_val, len(questions) - 1))
    return questions[n_val:], questions[:n_val]


def keep_teacher_logprobs(cfg: BakeConfig, model, n_questions: int) -> bool:
    """Whether generation should keep the teacher's log-probs for training: with an
    exact --teacher_cache, in one process (under torchrun each rank samples a shard),
    when the largest possible table fits --teacher_cache_max_gb."""
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = n_questions * cfg.num_sequences_per_question * cfg.max_sequence_length
    return (
        cfg.teacher_cache == "exact"
        and distributed.world_size() == 1
        and tokens * vocab * 4 <= cfg.teacher_cache_max_gb * 1e9
    )


def bake(cfg: BakeConfig) -> dict:
    cfg.validate()
    x0 = cfg.prompt.strip() if cfg.prompt else read_prompt(cfg.x0_file)
    questions = read_questions(cfg.question_dataset)
    heldout = read_questions(cfg.heldout, "--heldout") if cfg.heldout else []
    out = prepare_out_dir(cfg.out_dir)
    questions = select_questions(questions, cfg.num_questions, cfg.seed)
    train_q, val_q = split_questions(questions, cfg.val_fraction)
    if not train_q:
        raise UserError("no training questions left after the validation split")

    t_start = time.perf_counter()
    distributed.init(cfg.device)  # under torchrun: before loading, each process takes its GPU
    model, tok = load_model(cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code)
    model.name_or_path = cfg.model_name
    t_loaded = time.perf_counter()
    print(
        f"Sampling {cfg.num_sequences_per_question} answers for {len(train_q)} training and "
        f"{len(val_q)} validation questions from the prompted model"
    )
    gen_stats = {}
    # the exact teacher cache comes free with sampling when it fits (keep_teacher_logprobs)
    logprobs = {} if keep_teacher_logprobs(cfg, model, len(train_q)) else None
    for split, qs in (("train", train_q), ("val", val_q)):
        if qs:
            path = out / f"trajectories_{split}.jsonl"
            gen_stats[split] = generate_trajectories(
                model,
                tok,
                cfg.generate_config(str(path)),
                x0,
                qs,
                path,
                logprobs=logprobs if split == "train" else None,
            )
    t_gen = time.perf_counter()
    tcfg = cfg.train_config()
    if not val_q:
        tcfg.val_path = None
    train_rows = read_trajectories(tcfg.data_path)
    val_rows = read_trajectories(tcfg.val_path) if tcfg.val_path else None
    cache = cache_from_generation(train_rows, logprobs, tcfg.max_traj_len) if logprobs else None
    logprobs = None
    model, metrics = train(tcfg, model, tok, train_rows, val_rows, teacher_cache=cache)
    t_train = time.perf_counter()
    if not distributed.is_main():  # generation and training were shared; reporting is rank 0's
        return {}
    # the run's args.json is the bake's (train wrote its stage's): `bake --config` repeats it
    write_json(out / "args.json", flag_values(cfg))

    summary = {
        "prompt": x0,
        "model_name": cfg.model_name,
        "seconds": {
            "load": t_loaded - t_start,
            "generate": t_gen - t_loaded,
            "train": t_train - t_gen,
        },
        "generation": gen_stats,
        "epochs": metrics,
    }
    if val_rows:
        summary["heldout_kl"] = heldout_kl(model, tok, val_rows, cfg.batch_size, cfg.kl_chunk_size)
    if heldout:
        cols = {
            "base (no prompt)": answer(
                model, tok, heldout, adapter=False, max_new_tokens=cfg.answer_tokens
            ),
            "prompted": answer(
                model, tok, heldout, system=x0, adapter=False, max_new_tokens=cfg.answer_tokens
            ),
            "baked (no prompt)": answer(
                model, tok, heldout, adapter=True, max_new_tokens=cfg.answer_tokens
            ),
        }
        table = side_by_side(heldout, cols)
        with atomic_write(out / "answers.md") as f:
            f.write("```\n" + table + "\n```\n")
        summary["answers"] = [
            {"question": q["question"], **{k: v[i] for k, v in cols.items()}}
            for i, q in enumerate(heldout)
        ]
        print(table)
        if cfg.marker:
            scorer = marker(cfg.marker)
            summary["marker"] = {
                "pattern": cfg.marker,
                **{k: score_all(v, heldout, scorer) for k, v in cols.items()},
            }
    summary["seconds"]["total"] = time.perf_counter() - t_start
    write_json(out / "summary.json", summary)
    write_report(out, cfg, summary)
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    print(
        f"\nBaked {s['prompt']!r} into {s['model_name']} in {s['seconds']['total']:.0f} s "
        f"(generate {s['seconds']['generate']:.0f} s, train {s['seconds']['train']:.0f} s)"
    )
    if "heldout_kl" in s:
        k = s["heldout_kl"]
        print(
            f"Held-out KL(prompted || model) per token: before {k['kl_base']:.4f} -> after "
            f"{k['kl_baked']:.4f} ({100 * k['fidelity']:.0f}% of the gap closed)"
        )
    if "marker" in s:
        m = s["marker"]
        n = len(s.get("answers", []))
        print(
            f"Answers matching /{m['pattern']}/ on {n} held-out questions: "
            + ", ".join(f"{k} {round(v * n)}/{n}" for k, v in m.items() if k != "pattern")
        )
