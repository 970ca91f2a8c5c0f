"""`make bench-fidelity`: how well a bake reproduces its prompt, per method, at equal time,
over several seeds.

    python -m bench.fidelity                       # five bakes x two methods x 3 seeds
    python -m bench.fidelity --seeds 1             # one seed: a third of the time, no spread
    python -m bench.fidelity --quick               # one tiny bake: checks the harness only
    python -m bench.fidelity --tasks rare,persona  # some of: persona, style, knowledge, cot, rare
    python -m bench.fidelity --method 'ours={"learning_rate": 2e-3, "num_epochs": 6}'
    python -m bench.fidelity --screen --axes divergence,schedule   # the screen (fidelity_screen)

A *method* is a dict of `promptbake bake` flags (BakeConfig fields) on top of the shared
sizes. The first method (``paper``: forward KL on the prompted model's own samples, a
fixed number of epochs) sets the time budget T of each bake and seed: seconds from the
start of its bake to the end of its training (model load + generation + epochs). Every
other method trains for what is left of T when its training starts
(``--max_train_seconds``, set at that moment: a method that samples more answers
trains less), and is read at T: its bake saves an adapter after every epoch, and the
harness takes the one a bake stopped at T would have kept (the best validation KL among
the epochs finished by T, bench.fidelity_report.read_at).

Each method runs once per seed (``--seeds N``: seeds 42 .. 42+N-1); the seed picks the
training questions from the bake's pool, and is the bake's --seed (question shuffle and
validation split, sampling, LoRA init). The evaluation of a bake is the same for every
seed and method: for each bake (a prompt, a pool of training questions, disjoint
held-out questions, a scorer) the harness loads the bundled SmolLM2-135M once and

1. answers the held-out questions greedily without and with the prompt (behaviour of
   base and prompted: marker rate, capital-letter share or math accuracy);
2. samples answers of the prompted model to the held-out questions: the trajectories
   on which held-out KL(prompted || model) per token and top-1 agreement (the share of
   their positions where the model's argmax token is the prompted model's) are measured;
3. per seed and method, runs ``promptbake.bake.bake`` in-process (it loads its own
   model), then measures held-out KL and top-1 agreement for every saved epoch (the
   curve against time) and answers the held-out questions with the adapter read at T.

Writes bench/results/fidelity-<machine>.json (``--quick``: ...-quick.json, not
committed; ``--screen``: fidelity-screen-<machine>.json) after every run, the plot
bench/results/fidelity-kl-vs-time.png, the table between the fidelity markers of
bench/README.md (the screen's between the fidelity-screen markers; not with --quick),
and prints the table with the targets: held-out KL ratio <= 0.10 and baked behaviour
>= 95% of prompted on every bake (means over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from bench import fidelity_report as report
from bench.common import loadavg, log, machine_name
from bench.fidelity_tasks import (
    BUDGET_FLAG,
    FULL,
    MODEL,
    QUICK,
    TASKS,
    Sizes,
    Task,
    check_methods,
    default_methods,
    n_validation,
    parse_method,
    task_questions,
)
from promptbake.configs import BakeConfig
from promptbake.errors import UserError
from promptbake.evaluation.conditions import CONDITIONS, Answering, answer
from promptbake.evaluation.measures import condition_scores
from promptbake.evaluation.scorers import parse_scorer, score_all
from promptbake.files import write_json, write_jsonl
from promptbake.models import pad_id
from promptbake.records import read_json, read_prompt
from promptbake.sampling.trajectories import generate_trajectories
from promptbake.schema import read_trajectories

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
RUNS = ROOT / "runs" / "fidelity"


def bake_config(
    task: Task, sizes: Sizes, flags: dict, train_file: Path, out: Path, seed: int | None = None
) -> BakeConfig:
    shared = {
        "model_name": MODEL,
        "device": "cpu",
        "dtype": "float32",
        "x0_file": task.x0_file,
        "question_dataset": str(train_file),
        "num_questions": sizes.n_train_q,
        "num_sequences_per_question": sizes.n_seq,
        "max_sequence_length": task.max_new_tokens or sizes.max_new_tokens,
        "gen_batch_size": sizes.gen_batch_size,
        "val_fraction": sizes.val_fraction,
        "seed": sizes.seed if seed is None else seed,
        "out_dir": str(out),
        "save_every": 1,
    }
    return BakeConfig(**{**shared, **flags})  # a method may change the generation sizes


def clock() -> float:
    return time.perf_counter()


def timed_bake(cfg: BakeConfig, total_s: float | None) -> dict:
    """``bake(cfg)``; with `total_s`, its training gets what is left of `total_s` seconds
    since the bake started when training starts (``--max_train_seconds``, at least one
    second), so a method that loads or samples longer than the paper trains less and
    every method ends at the same total time."""
    import promptbake.bake as bake_module

    if total_s is None:
        return bake_module.bake(cfg)
    t0 = clock()
    train_stage = bake_module.train_stage

    def budgeted(stage_cfg, *args, **kwargs):
        stage_cfg.max_train_seconds = max(1.0, total_s - (clock() - t0))
        return train_stage(stage_cfg, *args, **kwargs)

    bake_module.train_stage = budgeted
    try:
        return bake_module.bake(cfg)
    finally:
        bake_module.train_stage = train_stage


class Evaluator:
    """The evaluation model of one task: behaviour scores, held-out KL and top-1
    agreement, per adapter; the same for every seed and method."""

    def __init__(self, model, tok, task: Task, sizes: Sizes, heldout: list[dict], work: Path):
        self.model, self.tok, self.task, self.heldout = model, tok, task, heldout
        self.slack = 0.0  # share of the budget a method may overrun (read_at)
        self.read_only = False  # score only the epoch read, not the whole curve
        self.x0 = read_prompt(task.x0_file)
        self.scorer = parse_scorer(task.scorer)
        path = work / "heldout_trajectories.jsonl"
        gcfg = bake_config(task, sizes, {}, path, work).generate_config(str(path))
        gcfg.num_sequences_per_question = sizes.heldout_samples
        generate_trajectories(model, tok, gcfg, self.x0, heldout, path, progress=False)
        self.rows = read_trajectories(path)
        self.pad = pad_id(tok)

    def behaviour(self, model, system: str | None, adapter: bool) -> tuple[float, list[str]]:
        how = Answering(self.task.answer_tokens)
        answers = answer(model, self.tok, self.heldout, system, adapter, how)
        return score_all(answers, self.heldout, self.scorer), answers

    def scores(self, model, adapter: bool) -> dict:
        """{"kl", "top1"}: held-out KL(prompted || model) per token and top-1 agreement
        with the prompted model; `adapter` False: the base model (no prompt)."""
        student = CONDITIONS["baked" if adapter else "base"]
        s = condition_scores(
            (model, CONDITIONS["prompted"]), {"m": (model, student)}, self.rows, self.pad
        )["m"]
        return {"kl": s["kl"], "top1": s["top1"]}


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


def run_method(
    ev: Evaluator, cfg: BakeConfig, flags: dict, base_scores: dict, budget: dict | None
) -> dict:
    """Bake with `cfg` (a method's `flags` on the shared sizes), then the held-out KL /
    top-1 curve and the behaviour read at the total time `budget["total"]` (None: this
    run sets the budget; otherwise training stops when it is spent, timed_bake)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    out = Path(cfg.out_dir)
    shutil.rmtree(out, ignore_errors=True)  # no epoch_N/ of an earlier run
    t0 = time.time()
    own_budget = budget is not None and BUDGET_FLAG not in flags
    summary = timed_bake(cfg, budget["total"] if own_budget else None)
    total = time.time() - t0
    secs = summary["seconds"]
    ran_until = sum(secs[k] for k in ("load", "generate", "train"))
    curve = epoch_times(out, summary, t0)
    limit = ran_until if budget is None else budget["total"]
    # the epoch read needs only the bake's validation KL and the times; --read_only
    # scores just that one (the screen: no curve, a third of the evaluation time)
    read_epoch = report.read_at(curve, limit, ev.slack)["epoch"]
    peft = None
    for p in curve:
        if p["epoch"] == 0:
            p.update(base_scores)
            continue
        if ev.read_only and p["epoch"] != read_epoch:
            continue
        d = out / f"epoch_{p['epoch']}"
        if peft is None:
            peft = PeftModel.from_pretrained(ev.model, d).eval()
        set_peft_model_state_dict(peft, load_file(d / "adapter_model.safetensors"))
        p.update(ev.scores(peft, adapter=True))
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
        "seed": cfg.seed,
        "max_train_seconds": cfg.max_train_seconds,
        "budget_s": limit,
        "total_s": ran_until,
        "seconds": {k: secs[k] for k in ("load", "generate", "train")},
        "bake_wall_s": total,
        "curve": curve,
        "read": read,
        "answers": answers,
    }


def run_task(
    task: Task,
    sizes: Sizes,
    methods: dict[str, dict],
    seeds: list[int],
    model,
    tok,
    slack: float,
    saved=lambda record: None,
    read_only: bool = False,
) -> dict:
    """Every method on every seed of one bake; `saved(record)` after each run, so a
    stopped run keeps what it measured."""
    work = RUNS / task.name
    work.mkdir(parents=True, exist_ok=True)
    _, heldout = task_questions(task, sizes)
    ev = Evaluator(model, tok, task, sizes, heldout, work)
    ev.slack, ev.read_only = slack, read_only
    base, base_answers = ev.behaviour(model, None, adapter=False)
    prompted, prompted_answers = ev.behaviour(model, ev.x0, adapter=False)
    base_scores = ev.scores(model, adapter=False)
    log(
        f"{task.name}: {sizes.n_train_q} training questions ({n_validation(sizes)} validate), "
        f"{len(heldout)} held-out; behaviour ({task.scorer}) base {base:.3f}, prompted "
        f"{prompted:.3f}; KL(prompted || base) {base_scores['kl']:.4f}, top-1 agreement "
        f"{base_scores['top1']:.3f}"
    )
    record = {
        "scorer": task.scorer,
        "x0_file": task.x0_file,
        "kl_base": base_scores["kl"],
        "top1_base": base_scores["top1"],
        "positions": len(ev.rows),
        "behaviour": {"base": base, "prompted": prompted},
        "heldout": [q["question"] for q in heldout],
        "answers": {"base": base_answers, "prompted": prompted_answers},
        "methods": {name: {"flags": flags, "runs": []} for name, flags in methods.items()},
    }
    for seed in seeds:
        train, _ = task_questions(task, sizes, seed)
        train_file = work / f"train_questions_seed{seed}.jsonl"
        write_jsonl(train_file, train)
        budget = None
        for name, flags in methods.items():
            out = work / name.replace(":", "-")  # screen variants are axis:variant
            cfg = bake_config(task, sizes, flags, train_file, out, seed)
            log(f"{task.name} seed {seed}: baking with {name} {flags}")
            m = run_method(ev, cfg, flags, base_scores, budget)
            record["answers"].setdefault(name, []).append(m.pop("answers"))
            record["methods"][name]["runs"].append(m)
            saved(record)
            if budget is None:  # the first method sets the time budget of this seed
                budget = {"total": m["total_s"], **m["seconds"]}
            r = m["read"]
            log(
                f"{task.name} seed {seed} {name}: held-out KL {r['kl']:.4f} (ratio "
                f"{report.kl_ratio(r['kl'], record['kl_base']):.3f}), top-1 {r['top1']:.3f} "
                f"at epoch {r['epoch']}, {r['t']:.0f} s; behaviour {r['baked']:.3f}"
            )
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one tiny bake (harness check)")
    ap.add_argument("--tasks", default=None, help=f"comma-separated of {', '.join(TASKS)}")
    ap.add_argument("--seeds", type=int, default=3, help="runs per method and bake (>= 1)")
    ap.add_argument(
        "--first_seed",
        type=int,
        default=None,
        help="the first seed (default 42): --first_seed 43 --seeds 2 adds seeds 43, 44 to a "
        "seed-42 run (merge them with --report)",
    )
    ap.add_argument(
        "--method",
        action="append",
        default=[],
        help='NAME={"flag": value}: add or replace a method (repeatable); the first sets T',
    )
    ap.add_argument(
        "--screen",
        action="store_true",
        help="screen the axes of issue 23 against `ours` (bench/fidelity_screen.py)",
    )
    ap.add_argument(
        "--axes",
        default=None,
        help="with --screen: comma-separated axes or single variants, e.g. "
        "divergence,schedule:linear (default: every axis)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--read_only",
        action="store_true",
        help="score only the epoch each method is read at (no KL-vs-time curve; faster)",
    )
    ap.add_argument("--slack", type=float, default=0.05, help="share of T a method may overrun")
    ap.add_argument("--no_readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument(
        "--note", default=None, help="a sentence printed under the table's title (what was run)"
    )
    ap.add_argument(
        "--report",
        default=None,
        metavar="JSON[,JSON...]",
        help="run nothing: print the table of a results file (a stopped run's too) and "
        "put it into bench/README.md; several files (runs of other --tasks, e.g. two "
        "processes side by side) are merged bake by bake",
    )
    ap.add_argument(
        "--only", default=None, help="with --report: keep these methods (comma-separated)"
    )
    ap.add_argument(
        "--out",
        default=None,
        metavar="JSON",
        help="the results file (default: bench/results/fidelity[-screen]-<machine>.json); "
        "with --report: where the merged results (and, for the main table, their KL-vs-time "
        "plot, .png) go",
    )
    return ap.parse_args(argv)


def pick_methods(args) -> dict[str, dict]:
    from bench import fidelity_screen

    methods = default_methods()
    if args.screen:
        methods.update(fidelity_screen.variants(args.axes))
    elif args.axes:
        raise UserError("--axes goes with --screen")
    for text in args.method:
        name, flags = parse_method(text)
        methods[name] = flags
    if args.quick:  # at most 2 epochs each: the harness, not the numbers
        methods = {
            k: {**v, "num_epochs": min(v.get("num_epochs", 2), 2)} for k, v in methods.items()
        }
    check_methods(methods)
    return methods


def publish(results: dict, no_readme: bool = False) -> str:
    """The table of `results` (the screen's or the main one), printed and, unless it is a
    --quick run or `no_readme`, written between its markers of bench/README.md."""
    if results.get("screen"):
        from bench import fidelity_screen

        text = fidelity_screen.describe(results)
        markers = (report.SCREEN_START, report.SCREEN_END)
    else:
        text = report.describe(results)
        markers = (report.README_START, report.README_END)
    print(text)
    if not results.get("quick") and not no_readme:
        report.write_readme(README, [text], markers)
    return text


def answers_of(task: dict, method: str) -> list:
    """A method's held-out answers, one list per run (None where a file has none)."""
    runs = task["methods"].get(method, {"runs": []})["runs"]
    return task.get("answers", {}).get(method) or [None] * len(runs)


def merge_results(parts: list[dict], only: list[str] | None = None) -> dict:
    """One results dict from several runs: other bakes, or other seeds of the same bake
    (then its evaluation must be the same: the same held-out KL of the base model). A
    method in two runs must have the same flags; `only` keeps those methods. The
    first run's header, the longest run's seconds, every command."""
    merged = dict(parts[0], tasks={}, methods={}, seeds=[])
    for part in parts:
        methods = {k: v for k, v in part["methods"].items() if only is None or k in only}
        clash = [k for k, v in methods.items() if merged["methods"].get(k, v) != v]
        if clash:
            raise UserError(
                f"--report: {part['command']!r} ran method {clash[0]!r} with other flags "
                f"than an earlier file; merge only runs of the same methods"
            )
        merged["methods"].update(methods)
        merged["seeds"] = sorted(set(merged["seeds"]) | set(part["seeds"]))
        for name, task in part["tasks"].items():
            task = dict(task, methods={k: v for k, v in task["methods"].items() if k in methods})
            have = merged["tasks"].get(name)
            if have is None:
                merged["tasks"][name] = task
                continue
            if abs(have["kl_base"] - task["kl_base"]) > 1e-6 * have["kl_base"]:
                raise UserError(f"--report: bake {name!r} was evaluated differently in two files")
            for k, m in task["methods"].items():
                mine = have["methods"].setdefault(k, {"flags": m["flags"], "runs": []})
                if {r["seed"] for r in mine["runs"]} & {r["seed"] for r in m["runs"]}:
                    raise UserError(f"--report: bake {name!r}, {k}: a seed is in two files")
                # runs and their held-out answers, in seed order
                pairs = [*zip(mine["runs"], answers_of(have, k), strict=True)]
                pairs += zip(m["runs"], answers_of(task, k), strict=True)
                pairs.sort(key=lambda ra: ra[0]["seed"])
                mine["runs"] = [r for r, _ in pairs]
                have.setdefault("answers", {})[k] = [a for _, a in pairs]
    if len(parts) > 1:
        merged["command"] = " & ".join(p["command"] for p in parts) + " (merged)"
        merged["seconds"] = max(p.get("seconds", 0) for p in parts)
        merged["loadavg_after"] = parts[-1].get("loadavg_after")
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        only = args.only.split(",") if args.only else None
        results = merge_results([read_json(p) for p in args.report.split(",")], only)
        if args.note:
            results["note"] = args.note
        if args.out:  # the merged results, as one run's file (and its plot)
            write_json(Path(args.out), results)
            if not results.get("screen") and not results.get("quick"):
                report.plot(results, Path(args.out).with_suffix(".png"))
        publish(results, args.no_readme)
        return 0
    names = args.tasks.split(",") if args.tasks else (["persona"] if args.quick else list(TASKS))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    methods = pick_methods(args)
    sizes = QUICK if args.quick else FULL
    first = sizes.seed if args.first_seed is None else args.first_seed
    seeds = [first + i for i in range(args.seeds)]
    torch.set_num_threads(args.threads)
    from promptbake.models import load_model

    start, load_before = time.perf_counter(), loadavg()
    model, tok = load_model(MODEL, device="cpu", dtype="float32")
    results = {
        "machine": machine_name(),
        "quick": args.quick,
        "screen": args.screen,
        "command": "python -m bench.fidelity " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": args.note,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "loadavg_before": load_before,
        "seeds": seeds,
        "slack": args.slack,
        "sizes": dataclasses.asdict(sizes),
        "methods": methods,
        "tasks": {},
    }
    kind = "fidelity-screen" if args.screen else "fidelity"
    suffix = "-quick" if args.quick else ""
    path = Path(args.out) if args.out else RESULTS / f"{kind}-{results['machine']}{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for n in names:

        def saved(record: dict, n: str = n) -> None:  # after every run: nothing is lost
            results["tasks"][n] = record
            results["loadavg_after"] = loadavg()
            results["seconds"] = time.perf_counter() - start
            write_json(path, results)

        saved(
            run_task(TASKS[n], sizes, methods, seeds, model, tok, args.slack, saved, args.read_only)
        )
    if not args.screen:  # the quick run's plot stays out of bench/results (git-ignored JSON only)
        where = RUNS if args.quick else RESULTS
        report.plot(results, where / f"fidelity-kl-vs-time{suffix}.png")
    publish(results, args.no_readme)
    log(f"wrote {path} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
