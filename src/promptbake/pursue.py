"""Prompt pursuit: bake the prompt again and again, each time on top of the last bake.

    promptbake pursue --rounds 3 --model_name smollm2-135m --x0_file data/zorblax_x0.md \\
        --question_dataset data/identity_train.jsonl --heldout data/identity_heldout.jsonl \\
        --marker Zorblax --out_dir runs/zorblax_pursuit

Round 1 is a normal bake (bake.py) with the prompt. Round k > 1 merges the adapters of
rounds 1..k-1 into the weights, samples trajectories from that merged model WITH the
prompt (the round-k teacher), and trains a fresh adapter on it: teacher = merged model
with the prompt, student = merged model + new adapter without it. If baking captures
the prompt, the round-k model without the prompt behaves like the round-(k-1) model
with it, so the prompt's effect compounds from round to round (Bhargava et al. 2024).

Writes <out_dir>/round_k/ (a bake run directory: trajectories, adapter, metrics) and,
after every round, pursuit.json and pursuit.md with one row per round:

* KL(round-k teacher || round-k model) per token on the round's validation trajectories,
  before (the round-(k-1) model without prompt) and after training;
* KL(original prompted model || round-k model) on round 1's validation trajectories,
  i.e. the drift away from the plain prompted model;
* with --heldout and --marker, the marker rate of the round-k model without the prompt
  and with it (re-prompted). Round 0 is the base model (without / with the prompt).

round_k/ for k > 1 holds promptbake_chain.json listing rounds 1..k-1, so
``promptbake eval --adapter <out_dir>/round_k`` loads the whole stack.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

from . import distributed
from .adapters import CHAIN_FILE, attach_adapter, merged_copy
from .bake import (
    BAKE_WRITES,
    bake,
    bake_inputs,
    bake_questions,
    sample_stage,
    student_stage,
    teacher_plan,
    train_stage,
)
from .configs import PursueConfig
from .evaluation.conditions import CONDITIONS, Answering, answer
from .evaluation.measures import condition_kl, heldout_kl
from .evaluation.report import format_table, pct
from .evaluation.scorers import marker, score_all
from .files import atomic_write, write_json
from .guards import check_not_inputs, check_run_dir, prepare_out_dir, run_dir_lock
from .models import load_model, model_options, pad_id
from .records import prompt_text, read_prompt, read_questions
from .schema import read_trajectories


def cross_model_kl(
    teacher, student, tokenizer, rows: list[dict], batch_size: int = 8, chunk_size: int = 1024
) -> float:
    """Per-token KL(teacher WITH prompt, adapter off || student WITHOUT prompt, as it is)
    for two different models (the original base model and a stack of merged rounds)."""
    pad = pad_id(tokenizer)
    return condition_kl(
        (teacher, CONDITIONS["prompted"]),
        {"kl": (student, CONDITIONS["baked"])},
        rows,
        pad,
        batch_size,
        chunk_size,
    )["kl"]


def marker_rates(
    model, tok, cfg: PursueConfig, x0: str | list[dict], heldout: list[dict]
) -> dict | None:
    """Marker rate without and with the prompt (adapter on, if the model has one)."""
    if not (heldout and cfg.marker):
        return None
    scorer = marker(cfg.marker)
    return {
        name: score_all(
            answer(
                model, tok, heldout, system, how=Answering(cfg.answer_tokens, engine=cfg.engine)
            ),
            heldout,
            scorer,
        )
        for name, system in (("no_prompt", None), ("with_prompt", x0))
    }


def later_round(
    k: int,
    prev,
    tok,
    cfg: PursueConfig,
    x0: str | list[dict],
    train_q,
    val_q,
    rdir: Path,
    base_dirs,
):
    """Round k > 1: merge, sample from the merged model with the prompt, train a new adapter."""
    teacher = merged_copy(prev)  # rounds 1..k-1 in the weights
    teacher.name_or_path = cfg.model_name
    bcfg = cfg.bake_config(rdir)
    # fresh samples each round: the round-k teacher is a different model, and a new seed
    # keeps round k from replaying round 1's random draws
    bcfg.seed = cfg.seed + k - 1
    print(f"\n== round {k}: sampling from the round-{k - 1} model WITH the prompt")
    plan = teacher_plan(bcfg, teacher, len(train_q))
    gens = sample_stage(teacher, tok, bcfg, x0, train_q, val_q, plan.keep_bytes)
    val_rows = gens["val"].rows
    student = student_stage(bcfg, teacher, tok, x0, train_q)  # with --on_policy
    model, metrics = train_stage(bcfg, teacher, tok, gens, plan, seed=cfg.seed, student=student)
    write_json(
        rdir / CHAIN_FILE,
        {"base_model": cfg.model_name, "merge_first": [f"../{d.name}" for d in base_dirs]},
    )
    # evaluate the adapter that was saved (the best validation epoch), as a user would load
    # it; unload() takes the just-trained LoRA layers out again, leaving the merged teacher
    from peft import PeftModel

    model = PeftModel.from_pretrained(model.unload(), rdir).eval()
    return model, metrics, val_rows


def render_markdown(result: dict) -> str:
    rows = []
    for r in result["rounds"]:
        t = r.get("kl_to_teacher")
        m = r.get("marker") or {}
        rows.append(
            [
                r["round"],
                r["model"],
                "-" if t is None else f"{t['kl_base']:.4f} → {t['kl_baked']:.4f}",
                f"{r['kl_to_original']:.4f}",
                pct(m.get("no_prompt")),
                pct(m.get("with_prompt")),
            ]
        )
    head = [
        "round",
        "model",
        "KL(round teacher ‖ model) before → after",
        "KL(original prompted ‖ model)",
        "marker, no prompt",
        "marker, with prompt",
    ]
    lines = [
        f"# Prompt pursuit: {len(result['rounds']) - 1} round(s) on {result['model_name']}",
        "",
        "```",
        result["prompt"],
        "```",
        "",
        f"KL in nats per generated token. Marker /{result.get('marker') or '-'}/ on "
        f"{result.get('num_heldout', 0)} held-out questions (greedy answers).",
        "",
        format_table(head, rows, markdown=True),
        "",
    ]
    return "\n".join(lines)


def write_result(out: Path, result: dict) -> None:
    write_json(out / "pursuit.json", result)
    with atomic_write(out / "pursuit.md") as f:
        f.write(render_markdown(result))


# What a pursuit writes into --out_dir, and into each round_k/ (guards.check_run_dir)
PURSUE_WRITES = ("pursuit.json", "pursuit.md", "round_*")
ROUND_WRITES = (*BAKE_WRITES, CHAIN_FILE, "pursuit_round.json")


def pursue(cfg: PursueConfig) -> dict:
    cfg.validate()
    x0 = prompt_text(cfg.prompt) if cfg.prompt is not None else read_prompt(cfg.x0_file)
    heldout = read_questions(cfg.heldout, "--heldout") if cfg.heldout else []
    # before any work: folders promptbake did not write keep their files, no output is an
    # input, and one pursuit at a time writes the folder
    check_run_dir(cfg.out_dir, PURSUE_WRITES)
    for k in range(1, cfg.rounds + 1):
        check_run_dir(Path(cfg.out_dir) / f"round_{k}", ROUND_WRITES)
    check_not_inputs([("--out_dir", cfg.out_dir, PURSUE_WRITES)], bake_inputs(cfg))
    with run_dir_lock(cfg.out_dir) if distributed.is_main() else contextlib.nullcontext():
        return _pursue(cfg, x0, heldout)


def _pursue(cfg: PursueConfig, x0, heldout: list[dict]) -> dict:
    out = prepare_out_dir(cfg.out_dir)
    t0 = time.perf_counter()

    # round 1: a normal bake
    print("== round 1: a normal bake")
    first = bake(cfg.bake_config(out / "round_1"))

    # the same question split bake() used, for every later round
    train_q, val_q = bake_questions(cfg)

    base, tok = load_model(
        cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code, **model_options(cfg)
    )
    base.name_or_path = cfg.model_name
    orig_val = read_trajectories(out / "round_1" / "trajectories_val.jsonl")
    bs, chunk = cfg.batch_size, cfg.kl_chunk_size
    result = {
        "prompt": x0,
        "model_name": cfg.model_name,
        "marker": cfg.marker,
        "num_heldout": len(heldout),
        "rounds": [
            {
                "round": 0,
                "model": "base",
                "kl_to_teacher": None,
                "kl_to_original": cross_model_kl(base, base, tok, orig_val, bs, chunk),
                "marker": marker_rates(base, tok, cfg, x0, heldout),
            }
        ],
    }
    write_result(out, result)

    dirs = [out / "round_1"]
    model = attach_adapter(copy.deepcopy(base), dirs[0]).eval()
    val_rows, metrics = orig_val, first.get("epochs")
    for k in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        if k > 1:
            rdir = prepare_out_dir(str(out / f"round_{k}"))
            model, metrics, val_rows = later_round(
                k, model, tok, cfg, x0, train_q, val_q, rdir, dirs
            )
            dirs.append(rdir)
        entry = {
            "round": k,
            "model": f"round {k}",
            "adapter": str(dirs[-1]),
            "kl_to_teacher": heldout_kl(model, tok, val_rows, bs, chunk),
            "kl_to_original": cross_model_kl(base, model, tok, orig_val, bs, chunk),
            "marker": marker_rates(model, tok, cfg, x0, heldout),
            "train_epochs": metrics,
            "seconds": time.perf_counter() - t_round,
        }
        write_json(dirs[-1] / "pursuit_round.json", entry)
        result["rounds"].append(entry)
        write_result(out, result)
        print(
            f"round {k}: KL(teacher || model) {entry['kl_to_teacher']['kl_base']:.4f} -> "
            f"{entry['kl_to_teacher']['kl_baked']:.4f}, KL(original prompted || model) "
            f"{entry['kl_to_original']:.4f}"
            + (
                f", marker {pct(entry['marker']['no_prompt'])} without / "
                f"{pct(entry['marker']['with_prompt'])} with the prompt"
                if entry["marker"]
                else ""
            )
        )
    result["seconds"] = time.perf_counter() - t0
    write_result(out, result)
    print(render_markdown(result))
    return result
