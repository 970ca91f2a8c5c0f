"""Behaviour evals: answer a question set under base / prompted / baked / re-prompted, score it.

    promptbake eval --adapter runs/zorblax --questions data/identity_heldout.jsonl \\
        --scorer marker:Zorblax
    promptbake eval --adapter runs/cot --questions data/math_questions.jsonl \\
        --scorer math --adapter_scale 0,0.5,1,1.5          # a "half-baking" curve

Modes (--modes, comma-separated): the four conditions of evaluation.conditions.CONDITIONS,
base, prompted (the behaviour we baked), baked and re-prompted.

With several --adapter_scale values the two adapter modes are run at each scale
(rows "baked@0.5", ...); scale 0 is the base model exactly, 1 the baked model.
The prompt comes from --x0_file / --prompt, else from the adapter's run. Answers are
greedy unless --temperature > 0 (then --num_samples answers per question).

Scorers (--scorer, comma-separated; the kinds registered in scorers.py). A comma
starts a new scorer only when a scorer kind follows it, so ``marker:a,b`` is one regex
and ``marker:Zorblax,allcaps`` two scorers.

Writes --out_dir/eval.json (every answer and score) and eval.md, and prints the table.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..adapters import adapter_dir, load_model_and_adapter, resolve_prompt, set_adapter_scale
from ..configs import EvalConfig, require
from ..configs.choices import MODES
from ..errors import UserError
from ..files import atomic_write, write_json
from ..guards import check_not_inputs, check_run_dir, prepare_out_dir
from ..prompts import Prompt
from ..records import read_questions
from .conditions import CONDITIONS, GREEDY, Answering, answer_condition
from .report import format_table, md_cell
from .scorers import Scorer, parse_scorer, score_all, scorer_kinds


def parse_scorers(spec: str) -> list[Scorer]:
    """Split a comma-separated scorer list; a comma inside a regex stays (see docstring)."""
    kinds = "|".join(re.escape(k) for k in scorer_kinds())
    parts = re.split(rf",\s*(?=(?:{kinds})(?::|,|$))", spec.strip())
    return [parse_scorer(p) for p in parts if p.strip()]


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--adapter_scale {text!r}: expected numbers, e.g. 1 or 0,0.5,1") from None
    require(bool(scales), "--adapter_scale is empty")
    for s in scales:
        require(math.isfinite(s), f"--adapter_scale {text!r}: {s} is not a finite number")
    return scales


def parse_modes(text: str | None, has_adapter: bool) -> list[str]:
    if text is None:
        return list(MODES if has_adapter else MODES[:2])
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    require(not bad, f"--modes: unknown {', '.join(bad)}; choose from {', '.join(MODES)}")
    need = [m for m in modes if CONDITIONS[m].adapter]
    require(has_adapter or not need, f"--modes {','.join(need)} need --adapter")
    return modes


def plan_runs(modes: list[str], scales: list[float]) -> list[tuple[str, str, float]]:
    """(row label, mode, scale): adapter modes once per scale, labelled mode@scale if several."""
    runs = []
    for m in modes:
        if not CONDITIONS[m].adapter:
            runs.append((m, m, 1.0))
        else:
            runs += [(m if len(scales) == 1 else f"{m}@{s:g}", m, s) for s in scales]
    return runs


def run_eval(
    model,
    tokenizer,
    questions: list[dict],
    scorers: list[Scorer],
    runs: list[tuple[str, str, float]],
    prompt: Prompt | None,
    how: Answering = GREEDY,
    num_samples: int = 1,
) -> dict:
    """Answer and score every run; returns {label: {"mode", "scale", "scores", "answers"}}."""
    examples = [q for q in questions for _ in range(num_samples)]
    results = {}
    for label, mode, scale in runs:
        adapter_on = CONDITIONS[mode].adapter
        if CONDITIONS[mode].prompted and prompt is None:
            raise UserError(
                f"mode {mode} needs the prompt: pass --x0_file or --prompt (the run records none)"
            )
        if adapter_on:
            set_adapter_scale(model, scale)
        answers = answer_condition(model, tokenizer, examples, mode, prompt, how)
        results[label] = {
            "mode": mode,
            "scale": scale if adapter_on else None,
            "scores": {s.name: score_all(answers, examples, s) for s in scorers},
            "answers": answers,
        }
        print(
            f"  {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[label]["scores"].items())
        )
    if any(CONDITIONS[m].adapter for _, m, _ in runs):
        set_adapter_scale(model, 1.0)
    return results


def results_table(results: dict, scorers: list[Scorer], markdown: bool = False) -> str:
    head = ["model", *(s.name for s in scorers)]
    rows = [
        [label, *(f"{r['scores'][s.name]:.3f}" for s in scorers)] for label, r in results.items()
    ]
    return format_table(head, rows, markdown)


def render_markdown(cfg: EvalConfig, results: dict, scorers, questions, prompt) -> str:
    n = len(questions)
    lines = [
        f"# eval: {cfg.adapter or cfg.model_name}",
        "",
        f"{n} questions from `{cfg.questions}`, "
        + (
            f"{cfg.num_samples} sample(s) each at temperature {cfg.temperature:g}"
            if cfg.temperature
            else "greedy answers"
        )
        + f", up to {cfg.max_new_tokens} new tokens.",
        "",
        "Prompt:",
        "",
        "```",
        prompt or "(none)",
        "```",
        "",
        results_table(results, scorers, markdown=True),
        "",
        "## Answers (first sample per question)",
        "",
    ]
    labels = list(results)
    k = cfg.num_samples
    lines.append(
        format_table(
            ["question", *labels],
            [
                [
                    md_cell(q["question"]),
                    *(md_cell(results[lb]["answers"][i * k], 200) for lb in labels),
                ]
                for i, q in enumerate(questions)
            ],
            markdown=True,
        )
    )
    return "\n".join(lines) + "\n"


EVAL_WRITES = ("eval.json", "eval.md")  # what eval writes into --out_dir


def evaluate_command(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    """The `promptbake eval` command; pass `model`/`tokenizer` to skip loading."""
    cfg.validate()
    scorers = parse_scorers(cfg.scorer)
    scales = parse_scales(cfg.adapter_scale)
    adapter = adapter_dir(cfg.adapter) if cfg.adapter else None
    modes = parse_modes(cfg.modes, adapter is not None)
    questions = read_questions(cfg.questions, "--questions")
    if cfg.num_questions:
        questions = questions[: cfg.num_questions]
    prompt = resolve_prompt(cfg.x0_file, cfg.prompt, cfg.adapter)
    out = Path(cfg.out_dir) if cfg.out_dir else (adapter / "eval" if adapter else Path("eval"))
    check_run_dir(out, EVAL_WRITES)  # a folder promptbake did not write keeps its files
    check_not_inputs(
        [("--out_dir", out, EVAL_WRITES)],
        [
            ("--adapter", cfg.adapter),
            ("--questions", cfg.questions),
            ("--x0_file", cfg.x0_file),
            ("--model_name", cfg.model_name),
        ],
    )
    if model is None:
        model, tokenizer = load_model_and_adapter(adapter, cfg)
    runs = plan_runs(modes, scales)
    print(f"Answering {len(questions)} questions x {cfg.num_samples} under {len(runs)} settings")
    how = Answering(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature or None,
        batch_size=cfg.batch_size, seed=cfg.seed, enable_thinking=cfg.enable_thinking,
        engine=cfg.engine,
    )  # fmt: skip
    results = run_eval(model, tokenizer, questions, scorers, runs, prompt, how, cfg.num_samples)
    print(results_table(results, scorers))
    record = {
        "adapter": str(adapter) if adapter else None,
        "model_name": cfg.model_name,
        "questions": cfg.questions,
        "prompt": prompt,
        "scorers": [s.name for s in scorers],
        "settings": {
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "num_samples": cfg.num_samples,
            "seed": cfg.seed,
        },
        "table": {label: r["scores"] for label, r in results.items()},
        "results": results,
        "question_records": questions,
    }
    prepare_out_dir(out)
    write_json(out / "eval.json", record)
    with atomic_write(out / "eval.md") as f:
        f.write(render_markdown(cfg, results, scorers, questions, prompt))
    print(f"wrote {out / 'eval.md'} and {out / 'eval.json'}")
    return record
