"""Generate + train in one process, with one model load: the whole bake.

    promptbake bake --model_name smollm2-135m --x0_file data/zorblax_x0.md \\
        --question_dataset data/identity_train.jsonl,data/questions.jsonl \\
        --heldout data/identity_heldout.jsonl --marker Zorblax --out_dir runs/zorblax

Writes under --out_dir: trajectories_{train,val}.jsonl (+ .meta.json), the adapter
and training logs (see train.py), and, with --heldout, answers.md (base / prompted /
baked side by side), report.md and summary.json.

Why the defaults (configs.BAKE_DEFAULTS) differ from train_loop.py: the seed keeps
lora_alpha=1 with r=32, which scales the LoRA update by 1/32 and learns very slowly at
lr 1e-4; train_loop.py keeps the seed's values so old commands reproduce. Bake's were
measured on `make bench-fidelity` (README, "Why `promptbake bake` has other defaults";
each field's reason is in `promptbake bake --help`). With --on_policy the student's
own answers to the training questions are sampled during training (student_stage).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from . import distributed
from .configs import BakeConfig, GenerateConfig, field_values
from .errors import UserError
from .evaluation.conditions import Answering, answer_condition, side_by_side
from .evaluation.measures import heldout_kl
from .evaluation.report import write_report
from .evaluation.scorers import marker, score_all
from .files import atomic_write, write_json
from .flags import flag_values
from .guards import check_not_inputs, check_run_dir, prepare_out_dir, run_dir_lock
from .models import load_model, model_options, peak_gpu_memory
from .records import distinct_questions, prompt_text, read_prompt, read_questions, select_questions
from .sampling import seam as sampling
from .sampling.trajectories import Generation, generate_trajectories
from .training import onpolicy
from .training.loop import train
from .training.outputs import RUN_WRITES
from .training.setup import check_lora_fits
from .training.targets import TeacherPlan, plan_teacher, training_facts
from .training.teacher import cache_bytes, cache_from_generation


def n_validation(n_questions: int, val_fraction: float) -> int:
    """How many of `n_questions` validate: the --val_fraction share, at least one
    (when the fraction is above 0), and at least one question left to train on."""
    if val_fraction <= 0:
        return 0
    return max(1, min(round(n_questions * val_fraction), n_questions - 1))


def split_questions(questions: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Validation questions are disjoint from training ones (no answer leaks across)."""
    n_val = n_validation(len(questions), val_fraction)
    return questions[n_val:], questions[:n_val]


def bake_questions(cfg: BakeConfig) -> tuple[list[dict], list[dict]]:
    """Stage 0: the (training, validation) questions of a bake: read, repeats dropped,
    seeded shuffle, cut to --num_questions, split by --val_fraction. Pursuit uses the
    same split every round."""
    questions = distinct_questions(read_questions(cfg.question_dataset))
    questions = select_questions(questions, cfg.num_questions, cfg.seed)
    train_q, val_q = split_questions(questions, cfg.val_fraction)
    if not train_q:
        raise UserError("no training questions left after the validation split")
    return train_q, val_q


def teacher_plan(cfg: BakeConfig, model, n_questions: int) -> TeacherPlan:
    """Where the bake's teacher targets come from (training.targets), decided before
    sampling: the largest table the training questions can give is the size that counts,
    and the sampler hands back its log-probs only in one process (a torchrun rank
    samples a shard)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    tcfg = cfg.train_config()
    tokens = cfg.max_sequence_length
    if tcfg.max_traj_len is not None:
        tokens = min(tokens, tcfg.max_traj_len)
    bound = cache_bytes(n_questions * cfg.num_sequences_per_question * tokens, vocab, "exact", 0)
    alone = distributed.world_size() == 1
    sampler = sampling.returns(cfg.engine, model.device) if alone else "none"
    return plan_teacher(training_facts(tcfg, model, [], sampler=sampler, table_bytes=bound))


def sample_stage(
    model, tok, cfg: BakeConfig, x0: str, train_q: list[dict], val_q: list[dict], keep_bytes: float
) -> dict[str, Generation]:
    """Stage 1: sample the training and validation trajectories from the prompted model
    into --out_dir; the training split keeps the sampler's log-probs up to `keep_bytes`."""
    out = Path(cfg.out_dir)
    gens = {}
    for split, qs in (("train", train_q), ("val", val_q)):
        if qs:
            path = out / f"trajectories_{split}.jsonl"
            gens[split] = generate_trajectories(
                model, tok, cfg.generate_config(str(path)), x0, qs, path,
                keep_bytes=keep_bytes if split == "train" else 0,
            )  # fmt: skip
    sampling.release(model)  # training needs the memory the decoding cache held
    return gens


def student_stage(
    cfg: BakeConfig, model, tok, x0: str | list[dict], train_q: list[dict]
) -> onpolicy.StudentPrompts | None:
    """With --on_policy > 0: what the student's own answers are sampled from: the prompt
    being baked, the bake's training questions (never the validation ones) and the
    generation stage's sampling settings; None for an off-policy bake."""
    if cfg.on_policy <= 0:
        return None
    gen_args = field_values(cfg.generate_config("x"), GenerateConfig)
    source = onpolicy.StudentSource(x0, train_q, gen_args)
    return onpolicy.student_prompts(source, tok, model, cfg.train_config().max_traj_len)


def train_stage(
    cfg: BakeConfig,
    model,
    tok,
    gens: dict[str, Generation],
    plan: TeacherPlan,
    seed: int | None = None,
    student: onpolicy.StudentPrompts | None = None,
):
    """Stage 2: train the adapter on the rows generation returned, the teacher's targets
    where `plan` says (kept by generation, or built), and, with --on_policy, on the
    student's answers to `student`'s questions; returns (peft model, epoch metrics).
    `seed` overrides the training seed (pursuit)."""
    tcfg = cfg.train_config()
    if "val" not in gens:
        tcfg.val_path = None
    if seed is not None:
        tcfg.seed = seed
    val_rows = gens["val"].rows if "val" in gens else None
    train_gen = gens.pop("train")  # drop our reference: training may free the table
    table = None
    if plan.keep and train_gen.kept is not None:
        rows, kept = train_gen.rows, train_gen.kept
        table = cache_from_generation(rows, kept, tcfg.max_traj_len, tcfg.teacher_topk)
    train_gen.kept = None
    return train(
        tcfg, model, tok, train_gen.rows, val_rows, teacher=plan, table=table, student=student
    )


def heldout_answers(model, tok, cfg: BakeConfig, x0: str, heldout: list[dict]) -> dict:
    """Answers to the held-out questions under base, prompted and baked (evaluate.CONDITIONS)."""
    how = Answering(cfg.answer_tokens, engine=cfg.engine)
    return {
        label: answer_condition(model, tok, heldout, name, x0, how)
        for name, label in (
            ("base", "base (no prompt)"),
            ("prompted", "prompted"),
            ("baked", "baked (no prompt)"),
        )
    }


def report_answers(out: Path, cfg: BakeConfig, summary: dict, cols: dict, heldout) -> None:
    """answers.md, and the answers and marker rates in the summary."""
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


# What a bake writes into --out_dir besides a training run's files (guards.check_run_dir);
# trajectories_*.jsonl* covers each split's .meta.json, .partial, .partial.key.json, .lock
BAKE_WRITES = (
    *RUN_WRITES, "trajectories_train.jsonl*", "trajectories_val.jsonl*", "summary.json",
    "report.md", "answers.md", "fidelity.png",
)  # fmt: skip


def bake_inputs(cfg: BakeConfig) -> list[tuple[str, str | None]]:
    """Every input file of a bake, for guards.check_not_inputs."""
    return [
        ("--x0_file", cfg.x0_file),
        ("--question_dataset", cfg.question_dataset),
        ("--heldout", cfg.heldout),
        ("--model_name", cfg.model_name),  # a local model folder (a hub id is none)
    ]


def bake(cfg: BakeConfig) -> dict:
    cfg.validate()
    x0 = prompt_text(cfg.prompt) if cfg.prompt is not None else read_prompt(cfg.x0_file)
    heldout = read_questions(cfg.heldout, "--heldout") if cfg.heldout else []
    train_q, val_q = bake_questions(cfg)
    # before any work: a folder promptbake did not write keeps its files, no output is
    # an input, and one run at a time writes the folder (rank 0 holds the lock)
    check_run_dir(cfg.out_dir, BAKE_WRITES)
    check_not_inputs([("--out_dir", cfg.out_dir, BAKE_WRITES)], bake_inputs(cfg))
    with run_dir_lock(cfg.out_dir) if distributed.is_main() else contextlib.nullcontext():
        return _bake(cfg, x0, heldout, train_q, val_q)


def _bake(cfg: BakeConfig, x0, heldout: list[dict], train_q: list[dict], val_q: list[dict]):
    out = prepare_out_dir(cfg.out_dir)

    t_start = time.perf_counter()
    distributed.init(cfg.device)  # under torchrun: before loading, each process takes its GPU
    model, tok = load_model(
        cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code, **model_options(cfg)
    )
    model.name_or_path = cfg.model_name
    check_lora_fits(model, cfg)  # before sampling: the LoRA must fit once trained
    t_loaded = time.perf_counter()
    print(
        f"Sampling {cfg.num_sequences_per_question} answers for {len(train_q)} training and "
        f"{len(val_q)} validation questions from the prompted model"
    )
    plan = teacher_plan(cfg, model, len(train_q))
    gens = sample_stage(model, tok, cfg, x0, train_q, val_q, plan.keep_bytes)
    gen_stats = {split: g.stats for split, g in gens.items()}
    val_rows = gens["val"].rows if "val" in gens else None
    t_gen = time.perf_counter()
    student = student_stage(cfg, model, tok, x0, train_q)
    model, metrics = train_stage(cfg, model, tok, gens, plan, student=student)
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
    if peak_gpu_memory(model) is not None:
        summary["peak_gpu_memory"] = peak_gpu_memory(model)
    if val_rows:
        summary["heldout_kl"] = heldout_kl(model, tok, val_rows, cfg.batch_size, cfg.kl_chunk_size)
    if heldout:
        report_answers(out, cfg, summary, heldout_answers(model, tok, cfg, x0, heldout), heldout)
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
