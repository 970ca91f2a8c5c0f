"""`make bench-fidelity`: how well a bake reproduces its prompt, per method, at equal time.

    python -m bench.fidelity                       # four bakes x two methods, ~20 min on 2 cores
    python -m bench.fidelity --quick               # one tiny bake: checks the harness only
    python -m bench.fidelity --tasks persona,cot   # some of: persona, style, knowledge, cot
    python -m bench.fidelity --method 'ours={"learning_rate": 2e-3, "num_epochs": 6}'

A *method* is a dict of `promptbake bake` flags (BakeConfig fields) on top of the shared
sizes. The first method (``paper``: forward KL on the prompted model's own samples, a
fixed number of epochs) sets the time budget T of each bake: seconds from the start of
its bake to the end of its training (model load + generation + epochs). Every other
method is read at T: its bake saves an adapter after every epoch, and the harness takes
the one a bake stopped at T would have kept (the best validation KL among the epochs
finished by T, bench.fidelity_report.read_at). Both times are reported.

For each bake (a prompt, training questions, disjoint held-out questions, a scorer) the
harness loads the bundled SmolLM2-135M once for evaluation and

1. answers the held-out questions greedily without and with the prompt (behaviour of
   base and prompted: marker rate, capital-letter share or math accuracy);
2. samples answers of the prompted model to the held-out questions: the trajectories
   on which held-out KL(prompted || model) per token is measured;
3. per method, runs ``promptbake.bake.bake`` in-process (it loads its own model), then
   measures held-out KL for every saved epoch (the KL-against-time curve) and answers the
   held-out questions with the adapter read at T.

Writes bench/results/fidelity-<machine>.json (``--quick``: ...-quick.json, not
committed), bench/results/fidelity-kl-vs-time.png, the table between the fidelity
markers of bench/README.md (not with --quick), and prints the table with the targets:
held-out KL ratio <= 0.10 and baked behaviour >= 95% of prompted on every bake.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import fidelity_report as report
from bench.common import loadavg, log, machine_name
from promptbake.bake import bake
from promptbake.configs import BakeConfig
from promptbake.errors import UserError
from promptbake.evaluation.conditions import Answering, answer
from promptbake.evaluation.scorers import parse_scorer, score_all
from promptbake.files import write_json, write_jsonl
from promptbake.records import read_prompt, read_questions, select_questions
from promptbake.sampling.trajectories import generate_trajectories
from promptbake.schema import read_trajectories
from promptbake.training.batches import make_batches
from promptbake.training.objective import evaluate_kl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
RUNS = ROOT / "runs" / "fidelity"
MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Task:
    """One public bake: a prompt, training and held-out questions, and how to score."""

    name: str
    x0_file: str
    train: str  # question file; `train_slice` of it are the training questions
    heldout: str
    scorer: str  # a scorers.parse_scorer spec
    train_slice: tuple[int, int] | None = None
    heldout_slice: tuple[int, int] | None = None
    answer_tokens: int = 48  # greedy held-out answers
    max_new_tokens: int | None = None  # sampled answers; None: the Sizes value


TASKS = {
    "persona": Task(
        "persona",
        "data/zorblax_x0.md",
        "data/identity_train.jsonl",
        "data/identity_heldout.jsonl",
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
        "data/eldravia_heldout.jsonl",
        "marker:Quelmoor",
    ),
    "cot": Task(
        "cot",
        "data/cot_math_x0.md",
        "data/math_questions.jsonl",
        "data/math_questions.jsonl",
        "math",
        train_slice=(0, 30),
        heldout_slice=(30, 45),
        answer_tokens=128,
        max_new_tokens=64,
    ),
}


@dataclass(frozen=True)
class Sizes:
    n_train_q: int = 12  # training questions (the bake splits off val_fraction for validation)
    n_seq: int = 4  # sampled answers per training question
    max_new_tokens: int = 32
    n_heldout_q: int = 12  # held-out questions: behaviour and KL
    heldout_samples: int = 2  # sampled answers per held-out question, for the KL
    gen_batch_size: int = 32
    seed: int = 42


FULL = Sizes()
QUICK = Sizes(n_train_q=4, n_seq=2, max_new_tokens=8, n_heldout_q=3, heldout_samples=1)

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
    "divergence": "forward_kl", "on_policy": 0.0, "patience": 0, "autocast": "off"
}  # fmt: skip
# Our best settings: bake's own defaults (configs.BAKE_DEFAULTS), chosen by measurement
# on this benchmark (README: "Why `promptbake bake` has other defaults").
OURS = {
    k: {f.name: f.default for f in dataclasses.fields(BakeConfig)}[k]
    for k in (
        "learning_rate", "batch_size", "r", "lora_alpha", "target_modules", "num_epochs",
        "patience", "divergence", "on_policy", "autocast",
    )
}  # fmt: skip
# A bake flag that stops training after this many seconds, if bake grows one: a method
# then gets exactly the paper's training time instead of being read at T afterwards.
BUDGET_FLAG = "max_train_seconds"


def bake_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(BakeConfig)}


def default_methods() -> dict[str, dict]:
    fields = bake_fields()
    paper = {**PAPER, **{k: v for k, v in PAPER_IF_AVAILABLE.items() if k in fields}}
    return {"paper": paper, "ours": dict(OURS)}


def check_methods(methods: dict[str, dict]) -> None:
    """Every flag must be a bake flag: fail before any model is loaded."""
    fields = bake_fields()
    shared = {"x0_file", "question_dataset", "out_dir", "num_questions", "save_every"}
    for name, flags in methods.items():
        bad = sorted(k for k in flags if k not in fields or k in shared)
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


def task_questions(task: Task, sizes: Sizes) -> tuple[list[dict], list[dict]]:
    """(training, held-out) questions; refuses a held-out question that is also trained on."""
    train = select_questions(
        select(task, task.train, task.train_slice), sizes.n_train_q, sizes.seed
    )
    heldout = select(task, task.heldout, task.heldout_slice)[: sizes.n_heldout_q]
    seen = {q["question"].strip().lower() for q in select(task, task.train, task.train_slice)}
    overlap = [q["question"] for q in heldout if q["question"].strip().lower() in seen]
    if overlap:
        raise UserError(f"task {task.name}: held-out questions also in training: {overlap[:3]}")
    return train, heldout


def bake_config(task: Task, sizes: Sizes, flags: dict, train_file: Path, out: Path) -> BakeConfig:
    return BakeConfig(
        model_name=MODEL,
        device="cpu",
        dtype="float32",
        x0_file=task.x0_file,
        question_dataset=str(train_file),
        num_questions=sizes.n_train_q,
        num_sequences_per_question=sizes.n_seq,
        max_sequence_length=task.max_new_tokens or sizes.max_new_tokens,
        gen_batch_size=sizes.gen_batch_size,
        seed=sizes.seed,
        out_dir=str(out),
        save_every=1,
        **flags,
    )


class Evaluator:
    """The evaluation model of one task: behaviour scores and held-out KL, per adapter."""

    def __init__(self, model, tok, task: Task, sizes: Sizes, heldout: list[dict], work: Path):
        self.model, self.tok, self.task, self.heldout = model, tok, task, heldout
        self.slack = 0.0  # share of the budget a method may overrun (read_at)
        self.x0 = read_prompt(task.x0_file)
        self.scorer = parse_scorer(task.scorer)
        path = work / "heldout_trajectories.jsonl"
        gcfg = bake_config(task, sizes, {}, path, work).generate_config(str(path))
        gcfg.num_sequences_per_question = sizes.heldout_samples
        generate_trajectories(model, tok, gcfg, self.x0, heldout, path, progress=False)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.batches = make_batches(read_trajectories(path), 8, pad, None)

    def behaviour(self, model, system: str | None, adapter: bool) -> tuple[float, list[str]]:
        how = Answering(self.task.answer_tokens)
        answers = answer(model, self.tok, self.heldout, system, adapter, how)
        return score_all(answers, self.heldout, self.scorer), answers

    def kl(self, model, adapter: bool) -> float:
        return evaluate_kl(model, self.batches, student_adapter=adapter)["kl"]


def epoch_times(out: Path, summary: dict, t0: float) -> list[dict]:
    """One point per epoch: seconds since the bake started (epoch 0: end of generation,
    epoch N: when epoch_N/ was written) and the bake's validation KL."""
    secs = summary["seconds"]
    points = []
    for m in summary["epochs"]:
        n = m["epoch"]
        t = (
            secs["load"] + secs["generate"]
            if n == 0
            else (out / f"epoch_{n}" / "adapter_model.safetensors").stat().st_mtime - t0
        )
        points.append({"epoch": n, "t": t, "val_kl": m.get("val_kl")})
    if not points or points[0]["epoch"] != 0:
        points.insert(0, {"epoch": 0, "t": secs["load"] + secs["generate"], "val_kl": None})
    return points


def run_method(ev: Evaluator, task: Task, sizes: Sizes, flags: dict, train_file, out, budget):
    """Bake with `flags`, then the held-out KL curve and the behaviour read at `budget`."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if budget is not None and BUDGET_FLAG in bake_fields() and BUDGET_FLAG not in flags:
        flags = {**flags, BUDGET_FLAG: budget["train"]}
    cfg = bake_config(task, sizes, flags, train_file, out)
    shutil.rmtree(out, ignore_errors=True)  # no epoch_N/ of an earlier run
    t0 = time.time()
    summary = bake(cfg)
    total = time.time() - t0
    ran_until = sum(summary["seconds"][k] for k in ("load", "generate", "train"))
    curve = epoch_times(out, summary, t0)
    peft = None
    for p in curve:
        if p["epoch"] == 0:
            p["kl"] = ev.kl(ev.model, adapter=False)
            continue
        d = out / f"epoch_{p['epoch']}"
        if peft is None:
            peft = PeftModel.from_pretrained(ev.model, d).eval()
        set_peft_model_state_dict(peft, load_file(d / "adapter_model.safetensors"))
        p["kl"] = ev.kl(peft, adapter=True)
    limit = ran_until if budget is None else budget["total"]
    read = dict(report.read_at(curve, limit, ev.slack))
    if read["epoch"] > 0:
        d = out / f"epoch_{read['epoch']}"
        set_peft_model_state_dict(peft, load_file(d / "adapter_model.safetensors"))
    # from_pretrained put LoRA layers into ev.model: epoch 0 runs with the adapter off
    read["baked"], answers = ev.behaviour(
        ev.model if peft is None else peft, None, adapter=read["epoch"] > 0
    )
    if peft is not None:
        ev.model = peft.unload()  # the plain model again, for the next method
    return {
        "flags": flags,
        "budget_s": limit,
        "total_s": ran_until,
        "bake_wall_s": total,
        "curve": curve,
        "read": read,
        "answers": answers,
    }


def run_task(task: Task, sizes: Sizes, methods: dict[str, dict], model, tok, slack: float):
    work = RUNS / task.name
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = task_questions(task, sizes)
    train_file = work / "train_questions.jsonl"
    write_jsonl(train_file, train)
    log(f"{task.name}: {len(train)} training, {len(heldout)} held-out questions")
    ev = Evaluator(model, tok, task, sizes, heldout, work)
    ev.slack = slack
    base, base_answers = ev.behaviour(model, None, adapter=False)
    prompted, prompted_answers = ev.behaviour(model, ev.x0, adapter=False)
    log(f"{task.name}: behaviour ({task.scorer}) base {base:.3f}, prompted {prompted:.3f}")
    record = {
        "scorer": task.scorer,
        "x0_file": task.x0_file,
        "kl_base": ev.kl(model, adapter=False),
        "behaviour": {"base": base, "prompted": prompted},
        "heldout": [q["question"] for q in heldout],
        "answers": {"base": base_answers, "prompted": prompted_answers},
        "methods": {},
    }
    budget = None
    for name, flags in methods.items():
        log(f"{task.name}: baking with {name} {flags}")
        m = run_method(ev, task, sizes, flags, train_file, work / name, budget)
        record["answers"][name] = m.pop("answers")
        record["methods"][name] = m
        if budget is None:  # the first method sets the time budget
            budget = {"total": m["total_s"], "train": m["total_s"] - m["curve"][0]["t"]}
        r = m["read"]
        log(
            f"{task.name}/{name}: held-out KL {r['kl']:.4f} (ratio "
            f"{report.kl_ratio(r['kl'], record['kl_base']):.3f}) at epoch {r['epoch']}, "
            f"{r['t']:.0f} s; behaviour {r['baked']:.3f}"
        )
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one tiny bake (harness check)")
    ap.add_argument("--tasks", default=None, help=f"comma-separated of {', '.join(TASKS)}")
    ap.add_argument(
        "--method",
        action="append",
        default=[],
        help='NAME={"flag": value}: add or replace a method (repeatable); the first sets T',
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--slack", type=float, default=0.05, help="share of T a method may overrun")
    ap.add_argument("--no_readme", action="store_true", help="do not update bench/README.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.tasks.split(",") if args.tasks else (["persona"] if args.quick else list(TASKS))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    methods = default_methods()
    for text in args.method:
        name, flags = parse_method(text)
        methods[name] = flags
    if args.quick:  # one epoch each: the harness, not the numbers
        methods = {
            k: {**v, "num_epochs": min(v.get("num_epochs", 1), 2)} for k, v in methods.items()
        }
    check_methods(methods)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    from promptbake.models import load_model

    start, load_before = time.perf_counter(), loadavg()
    model, tok = load_model(MODEL, device="cpu", dtype="float32")
    tasks = {n: run_task(TASKS[n], sizes, methods, model, tok, args.slack) for n in names}
    results = {
        "machine": machine_name(),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seconds": time.perf_counter() - start,
        "sizes": dataclasses.asdict(sizes),
        "methods": methods,
        "tasks": tasks,
    }
    suffix = "-quick" if args.quick else ""
    path = RESULTS / f"fidelity-{results['machine']}{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    # the quick run's plot stays out of bench/results (only its JSON is git-ignored there)
    report.plot(results, (RUNS if args.quick else RESULTS) / f"fidelity-kl-vs-time{suffix}.png")
    print(report.describe(results))
    if not args.quick and not args.no_readme:
        report.write_readme(README, [report.describe(results)])
    log(f"wrote {path} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
