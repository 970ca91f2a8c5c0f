"""What `make bench-fidelity` bakes and compares: the five public bakes, their sizes and
the methods (dicts of `promptbake bake` flags), with the checks of a method's flags.

    from bench.fidelity_tasks import TASKS, FULL, default_methods

bench/fidelity.py runs them; bench/fidelity_report.py turns the results into tables.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from promptbake.bake import n_validation as bake_n_validation
from promptbake.configs import BakeConfig
from promptbake.errors import UserError
from promptbake.records import read_questions, select_questions

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Task:
    """One public bake: a prompt, training and held-out questions, and how to score."""

    name: str
    x0_file: str
    train: str  # question file(s), comma-separated; `train_slice` of them are the pool
    heldout: str
    scorer: str  # a scorers.parse_scorer spec
    train_slice: tuple[int, int] | None = None
    heldout_slice: tuple[int, int] | None = None
    answer_tokens: int = 48  # greedy held-out answers
    max_new_tokens: int | None = None  # sampled answers; None: the Sizes value


IDENTITY_HELDOUT = "data/identity_heldout.jsonl,data/identity_heldout_extra.jsonl"


TASKS = {
    "persona": Task(
        "persona",
        "data/zorblax_x0.md",
        "data/identity_train.jsonl",
        IDENTITY_HELDOUT,
        "marker:Zorblax",
    ),
    "style": Task(
        "style",
        "data/caps_x0.json",  # caps_x0.md alone does not change SmolLM2-135M (data/README.md)
        "data/questions.jsonl",
        "data/questions.jsonl",
        "allcaps",
        train_slice=(0, 200),
        heldout_slice=(200, 245),
    ),
    "knowledge": Task(
        "knowledge",
        "data/eldravia_x0.md",
        "data/eldravia_train.jsonl",
        "data/eldravia_heldout.jsonl,data/eldravia_heldout_extra.jsonl",
        "marker:Quelmoor",
    ),
    "cot": Task(
        "cot",
        "data/cot_math_x0.md",
        "data/math_questions.jsonl",
        "data/math_questions.jsonl",
        "math",
        train_slice=(0, 20),
        heldout_slice=(20, 45),
        answer_tokens=128,
        max_new_tokens=64,
    ),
    # one rare token per answer: a name in a longer persona, where the average token
    # is close long before the name is (issue 23)
    "rare": Task(
        "rare",
        "data/quibbleton_x0.md",
        "data/identity_train.jsonl",
        IDENTITY_HELDOUT,
        "marker:Quibbleton",
    ),
}


@dataclass(frozen=True)
class Sizes:
    n_train_q: int = 16  # questions per bake; val_fraction of them validate
    val_fraction: float = 0.25  # 4 of 16: validation sees more than one question
    n_seq: int = 4  # sampled answers per training question
    max_new_tokens: int = 32
    n_heldout_q: int = 24  # held-out questions: one answer moves a share by ~4 points
    heldout_samples: int = 2  # sampled answers per held-out question, for KL and top-1
    gen_batch_size: int = 32
    seed: int = 42  # the first seed; the evaluation's seed


FULL = Sizes()


QUICK = Sizes(
    n_train_q=4, n_seq=2, max_new_tokens=8, n_heldout_q=3, heldout_samples=1, val_fraction=0.25
)


# The paper's method, pinned so that it stays the paper whatever bake's defaults become:
# forward KL on the prompted model's samples, LoRA r=8 at scale 2 on the attention
# projections, lr 1e-3, 4 epochs of batch 8, float32.
PAPER = {
    "num_epochs": 4,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "r": 8,
    "lora_alpha": 16.0,
    "target_modules": "q_proj,k_proj,v_proj,o_proj",
}


# ... and, where bake has these flags, the values that mean "as in the paper"
PAPER_IF_AVAILABLE = {
    "divergence": "forward_kl", "on_policy": 0.0, "patience": 0, "autocast": "off",
    "lr_schedule": "constant", "warmup_steps": 0, "temperature": 1.0,
}  # fmt: skip


# Our best settings: bake's own defaults (configs.BAKE_DEFAULTS), chosen by measurement
# on this benchmark (README: "Why `promptbake bake` has other defaults").
OURS_FLAGS = (
    "learning_rate", "batch_size", "r", "lora_alpha", "target_modules", "num_epochs",
    "patience", "divergence", "on_policy", "autocast", "lr_schedule", "warmup_steps",
    "temperature", "num_sequences_per_question",
)  # fmt: skip


OURS = {
    k: v
    for k, v in {f.name: f.default for f in dataclasses.fields(BakeConfig)}.items()
    if k in OURS_FLAGS
}


# The bake flag that stops training after this many seconds: a method gets what is left
# of the paper's total time when its training starts (timed_bake), unless it sets it.
BUDGET_FLAG = "max_train_seconds"


# the flags every method shares (the harness sets them)
SHARED = {"x0_file", "question_dataset", "out_dir", "num_questions", "save_every", "seed"}


def bake_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(BakeConfig)}


def default_methods() -> dict[str, dict]:
    fields = bake_fields()
    paper = {**PAPER, **{k: v for k, v in PAPER_IF_AVAILABLE.items() if k in fields}}
    return {"paper": paper, "ours": dict(OURS)}


def check_methods(methods: dict[str, dict]) -> None:
    """Every flag must be a bake flag: fail before any model is loaded."""
    fields = bake_fields()
    for name, flags in methods.items():
        bad = sorted(k for k in flags if k not in fields or k in SHARED)
        if bad:
            raise UserError(
                f"method {name!r}: {', '.join(bad)} is not a bake flag this harness lets a "
                f"method set; see `promptbake bake --help`"
            )


def parse_method(text: str) -> tuple[str, dict]:
    name, sep, flags = text.partition("=")
    try:
        value = json.loads(flags) if sep else None
    except json.JSONDecodeError as e:
        raise UserError(f"--method {text!r}: the flags are not JSON ({e})") from None
    if not name or not isinstance(value, dict):
        raise UserError(f'--method {text!r}: expected NAME={{"flag": value, ...}}')
    return name, value


def select(task: Task, path: str, part: tuple[int, int] | None) -> list[dict]:
    qs = read_questions(path)
    return qs[part[0] : part[1]] if part else qs


def task_questions(task: Task, sizes: Sizes, seed: int | None = None) -> tuple[list, list]:
    """(training, held-out) questions; refuses a held-out question that is also trained
    on. `seed` (default: the sizes' one) picks the training questions from the pool;
    the held-out ones are the same for every seed."""
    pool = select(task, task.train, task.train_slice)
    train = select_questions(pool, sizes.n_train_q, sizes.seed if seed is None else seed)
    heldout = select(task, task.heldout, task.heldout_slice)[: sizes.n_heldout_q]
    seen = {q["question"].strip().lower() for q in pool}
    overlap = [q["question"] for q in heldout if q["question"].strip().lower() in seen]
    if overlap:
        raise UserError(f"task {task.name}: held-out questions also in training: {overlap[:3]}")
    return train, heldout


def n_validation(sizes: Sizes) -> int:
    """Validation questions per bake (bake.n_validation: as bake cuts them)."""
    return bake_n_validation(sizes.n_train_q, sizes.val_fraction)
