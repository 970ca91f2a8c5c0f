"""`python -m bench.fidelity --screen`: one axis at a time against `ours`, at the paper's
wall-clock time, on every bake (issue 23, item 2).

    python -m bench.fidelity --screen                               # every axis, 3 seeds
    python -m bench.fidelity --screen --axes schedule --seeds 1 --tasks rare,persona
    python -m bench.fidelity --screen --quick                       # the harness only

Each variant is `ours` (bake's defaults, bench.fidelity_tasks.OURS) with the flags of one
axis changed; `paper` runs first and sets the time budget T of every bake and seed, and
`ours` is the control every variant is compared with (its value on each axis is the
first one listed in the issue: forward KL, 4 answers per question, temperature 1.0, a
constant learning rate, off-policy). A variant that samples more answers gets less
training time, so that all finish at T (bench.fidelity.training_budget).

The table (bench/README.md, between the fidelity-screen markers): per bake the mean
over seeds of the KL ratio (± sd), top-1 agreement and behaviour share, then the mean
over bakes and its change against `ours`. The shares in the mean over bakes are capped
at 100%, so that overshooting one bake does not hide a miss on another.
"""

from __future__ import annotations

import math
import statistics

from bench import fidelity_report as report
from bench import fidelity_tasks
from promptbake.errors import UserError
from promptbake.evaluation.report import format_table

# warm-up of the decaying schedules: a third of an epoch of the full sizes (12 training
# questions x 4 answers / batch 4 = 12 steps per epoch)
WARMUP_STEPS = 4

# axis -> variant -> the flags it changes on top of `ours`
AXES: dict[str, dict[str, dict]] = {
    "divergence": {
        "reverse_kl": {"divergence": "reverse_kl"},
        "jsd0.5": {"divergence": "jsd", "jsd_beta": 0.5},
    },
    "answers": {  # answers per question at equal time: fewer epochs fit
        "n8": {"num_sequences_per_question": 8},
        "n16": {"num_sequences_per_question": 16},
    },
    "temperature": {
        "t1.5": {"temperature": 1.5},
        "t2.0": {"temperature": 2.0},
    },
    "schedule": {  # decay to the time budget (or the epoch ceiling, if it comes first)
        "linear": {"lr_schedule": "linear", "warmup_steps": WARMUP_STEPS},
        "cosine": {"lr_schedule": "cosine", "warmup_steps": WARMUP_STEPS},
    },
    "on_policy": {  # student-sampled batches, with the fastest engine (--engine auto)
        "op0.25": {"on_policy": 0.25},
    },
}


def variants(axes: str | None = None) -> dict[str, dict]:
    """The screen's methods beyond `paper` and `ours`: ``axis:variant`` -> full flags.
    `axes`: comma-separated axes, or single variants as ``axis:variant``."""
    known = [f"{axis}:{name}" for axis in AXES for name in AXES[axis]]
    picked = []
    for item in axes.split(",") if axes else list(AXES):
        some = [k for k in known if k == item or k.split(":")[0] == item]
        if not some:
            raise UserError(
                f"--axes: unknown {item!r}; choose from {', '.join(AXES)} or one of "
                f"{', '.join(known)}"
            )
        picked += [k for k in some if k not in picked]
    return {k: {**fidelity_tasks.OURS, **AXES[k.split(":")[0]][k.split(":")[1]]} for k in picked}


def changed(flags: dict) -> str:
    """The flags a method changes against `ours`, as `k=v` (the control: '-')."""
    diff = {k: v for k, v in flags.items() if fidelity_tasks.OURS.get(k, object()) != v}
    return ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "-"


def over_bakes(rows: dict[str, dict]) -> dict:
    """Means over bakes of the per-bake means: KL ratio, top-1, share capped at 100%."""

    def mean(values):
        vals = [v for v in values if not math.isnan(v)]
        return statistics.fmean(vals) if vals else float("nan")

    return {
        "kl_ratio": mean(r["kl_ratio"]["mean"] for r in rows.values()),
        "top1": mean(r["top1"]["mean"] for r in rows.values()),
        "share": mean(min(1.0, r["share"]["mean"]) for r in rows.values()),
    }


def table(results: dict, markdown: bool = True) -> str:
    tasks = list(results["tasks"])
    by_method: dict[str, dict[str, dict]] = {}
    for task, method, r in report.rows(results):
        by_method.setdefault(method, {})[task] = r
    ours = by_method.get("ours", {})
    head = ["method", "changes vs ours"]
    head += [f"{t}: KL ratio / top-1 / share" for t in tasks]
    head += ["mean over bakes: KL ratio / top-1 / share", "vs ours: KL ratio / top-1 / share"]
    body = []
    for method, per_task in by_method.items():
        row = [method, changed(results["methods"][method])]
        for t in tasks:
            r = per_task.get(t)
            if r is None:
                row.append("-")
                continue
            kl = r["kl_ratio"]
            sd = f"±{kl['sd']:.3f}" if kl["n"] > 1 else ""
            row.append(f"{kl['mean']:.3f}{sd} / {r['top1']['mean']:.3f} / {r['share']['mean']:.0%}")
        m = over_bakes(per_task)
        some = "" if len(per_task) == len(tasks) else f" ({len(per_task)} bakes)"
        row.append(f"{m['kl_ratio']:.3f} / {m['top1']:.3f} / {m['share']:.0%}{some}")
        if not set(per_task) <= set(ours):
            row.append("-")
        else:  # against ours on the same bakes (a variant screened on some bakes only)
            c = over_bakes({t: ours[t] for t in per_task})
            row.append(
                f"{m['kl_ratio'] - c['kl_ratio']:+.3f} / {m['top1'] - c['top1']:+.3f}"
                f" / {100 * (m['share'] - c['share']):+.0f} pts{some}"
            )
        body.append(row)
    return format_table(head, body, markdown)


def describe(results: dict) -> str:
    """Markdown: when, where, load, command, sizes, and the screening table."""
    lines = report.header(results)
    lines[0] = lines[0].replace("### ", "### screen: ", 1)
    lines += [
        "Variants: `ours` with one axis changed (column 2); `paper` set the time budget. "
        "Cells: means over seeds (KL ratio ± sd over seeds); lower KL ratio, higher top-1 "
        "and share are better.",
        "",
        table(results),
        "",
    ]
    v = report.validation_picks(results)
    if v["runs"]:
        lines += [
            f"Validation KL picked the held-out-best epoch in {v['best_picked']} of "
            f"{v['runs']} runs (cost: {v['ratio_lost']:.3f} KL ratio, {v['top1_lost']:.3f} "
            "top-1 on average).",
            "",
        ]
    return "\n".join(lines) + "\n"
