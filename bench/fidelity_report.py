"""The fidelity benchmark's results, without a model: reading at equal time, the spread
over seeds, the table, the targets, the plot and the bench/README.md sections.

Everything here works on the plain dict that ``bench/fidelity.py`` writes to
``bench/results/fidelity-<machine>.json`` (tests/test_bench_fidelity.py feeds it fake
results). One task's record::

    {"scorer": "marker:Zorblax", "kl_base": 0.57, "top1_base": 0.62,
     "behaviour": {"base": 0.0, "prompted": 0.9},
     "methods": {"paper": {"flags": {...}, "runs": [
         {"seed": 42, "budget_s": 41.0, "total_s": 41.0,
          "curve": [{"epoch": 0, "t": 9.1, "kl": 0.57, "top1": 0.62, "val_kl": 0.6}, ...],
          "read": {"epoch": 3, "t": 40.2, "kl": 0.11, "top1": 0.9, "baked": 0.8}},
         ...]}}}

``runs`` holds one run per seed; ``curve`` one point per finished epoch (epoch 0:
before training, at the end of generation), ``t`` in seconds since the bake started,
``kl`` the held-out KL(prompted || model) per token, ``top1`` the share of held-out
positions where the model's argmax token is the prompted model's, ``val_kl`` the bake's
own validation KL (which picks the adapter a bake keeps).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from promptbake.bake import n_validation
from promptbake.evaluation.report import format_table
from promptbake.files import atomic_write

KL_RATIO_TARGET = 0.10  # held-out KL(prompted || baked) / KL(prompted || base), at most
BEHAVIOUR_TARGET = 0.95  # baked behaviour score / prompted, at least
README_START, README_END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
SCREEN_START, SCREEN_END = "<!-- fidelity-screen:start -->", "<!-- fidelity-screen:end -->"


def read_at(curve: list[dict], budget_s: float, slack: float = 0.0) -> dict:
    """The point a bake given `budget_s` seconds would keep: among the epochs finished by
    then (within `slack`, a share of the budget), the one with the best validation KL,
    as a bake keeps its best-validation adapter; without validation KL, the last one.
    Epoch 0 (no training) counts, so a method too slow for the budget reads as unbaked."""
    done = [p for p in curve if p["t"] <= budget_s * (1 + slack)] or curve[:1]
    if all(p.get("val_kl") is not None for p in done):
        return min(done, key=lambda p: (p["val_kl"], -p["epoch"]))
    return done[-1]


def kl_ratio(kl: float, kl_base: float) -> float:
    return kl / kl_base if kl_base > 0 else float("nan")


def behaviour_share(baked: float, prompted: float) -> float:
    """Baked score as a share of the prompted one (1.0 when neither shows the behaviour)."""
    if prompted > 0:
        return baked / prompted
    return 1.0 if baked <= 0 else float("inf")


def stats(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max, and n."""
    vals = list(values)
    finite = all(math.isfinite(v) for v in vals)
    sd = statistics.stdev(vals) if len(vals) > 1 and finite else 0.0
    mean = statistics.fmean(vals) if finite else max(vals, key=abs)
    return {"mean": mean, "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


def spread(st: dict, fmt: str = ".3f", pct: bool = False) -> str:
    """`mean ± sd (min-max)` over seeds; the mean alone for one seed."""

    def f(v: float) -> str:
        return "inf" if math.isinf(v) else (f"{v:.0%}" if pct else format(v, fmt))

    if st["n"] == 1:
        return f(st["mean"])
    return f"{f(st['mean'])} ± {f(st['sd'])} ({f(st['min'])}-{f(st['max'])})"


def method_row(task: dict, name: str) -> dict:
    """One table row's numbers for a (task, method) pair over its seeds, with the two
    target checks on the means."""
    m = task["methods"][name]
    runs = m["runs"]
    reads = [r["read"] for r in runs]
    prompted = task["behaviour"]["prompted"]
    ratio = stats([kl_ratio(r["kl"], task["kl_base"]) for r in reads])
    share = stats([behaviour_share(r["baked"], prompted) for r in reads])
    return {
        "kl_ratio": ratio,
        "top1": stats([r.get("top1", float("nan")) for r in reads]),
        "top1_base": task.get("top1_base", float("nan")),
        "base": task["behaviour"]["base"],
        "prompted": prompted,
        "baked": stats([r["baked"] for r in reads]),
        "share": share,
        "read_s": statistics.fmean(r["t"] for r in reads),
        "budget_s": statistics.fmean(r["budget_s"] for r in runs),
        "total_s": statistics.fmean(r["total_s"] for r in runs),
        "epochs": [r["epoch"] for r in reads],
        "seeds": [r.get("seed") for r in runs],
        "kl_ok": ratio["mean"] <= KL_RATIO_TARGET,
        "behaviour_ok": share["mean"] >= BEHAVIOUR_TARGET,
    }


def rows(results: dict) -> list[tuple[str, str, dict]]:
    return [
        (task_name, name, method_row(task, name))
        for task_name, task in results["tasks"].items()
        for name, m in task["methods"].items()
        if m["runs"]
    ]


def mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def table(results: dict, markdown: bool = False) -> str:
    """bake x method: KL ratio, top-1 agreement, behaviour, baked / prompted, time;
    mean ± sd (min-max) over seeds where there are several."""
    head = [
        "bake",
        "method",
        f"KL ratio (<= {KL_RATIO_TARGET:.2f})",
        "top-1 agreement: base -> baked",
        "behaviour base / prompted / baked",
        f"baked / prompted (>= {BEHAVIOUR_TARGET:.0%})",
        "epoch read",
        "s read / budget / ran",
    ]
    body = [
        [
            task,
            method,
            f"{spread(r['kl_ratio'])} {mark(r['kl_ok'])}",
            f"{r['top1_base']:.3f} -> {spread(r['top1'])}",
            f"{r['base']:.2f} / {r['prompted']:.2f} / {r['baked']['mean']:.2f}",
            f"{spread(r['share'], pct=True)} {mark(r['behaviour_ok'])}",
            ",".join(map(str, r["epochs"])),
            f"{r['read_s']:.0f} / {r['budget_s']:.0f} / {r['total_s']:.0f}",
        ]
        for task, method, r in rows(results)
    ]
    return format_table(head, body, markdown)


def targets_met(results: dict, method: str) -> bool:
    """Whether `method` meets both targets (means over seeds) on every bake."""
    picked = [r for _, m, r in rows(results) if m == method]
    return bool(picked) and all(r["kl_ok"] and r["behaviour_ok"] for r in picked)


def misses(results: dict, method: str) -> list[str]:
    """Each target `method` misses, on which bake and by how much (means over seeds)."""
    out = []
    for task, m, r in rows(results):
        if m != method:
            continue
        if not r["kl_ok"]:
            out.append(
                f"{task}: KL ratio {r['kl_ratio']['mean']:.3f}, "
                f"{r['kl_ratio']['mean'] - KL_RATIO_TARGET:+.3f} over {KL_RATIO_TARGET:.2f}"
            )
        if not r["behaviour_ok"]:
            out.append(
                f"{task}: behaviour {r['share']['mean']:.0%} of prompted, "
                f"{100 * (BEHAVIOUR_TARGET - r['share']['mean']):.0f} points under "
                f"{BEHAVIOUR_TARGET:.0%}"
            )
    return out


def validation_picks(results: dict) -> dict:
    """How well the bakes' own validation KL picked the epoch: over every run, how often
    the epoch read (best validation KL by T) is also the best on held-out KL among the
    epochs finished by then, and the held-out KL ratio and top-1 agreement lost by the
    picks (mean over runs; 0 when validation always picked the held-out best)."""
    n = same = 0
    lost_ratio, lost_top1 = [], []
    slack = results.get("slack", 0.05)  # the harness default (--slack)
    for task in results["tasks"].values():
        for m in task["methods"].values():
            for run in m["runs"]:
                done = [p for p in run["curve"] if p["t"] <= run["budget_s"] * (1 + slack)]
                if not done or any("kl" not in p for p in done):  # --read_only: no curve
                    continue
                best = min(done, key=lambda p: p["kl"])
                read = run["read"]
                n += 1
                same += best["epoch"] == read["epoch"]
                lost_ratio.append(kl_ratio(read["kl"] - best["kl"], task["kl_base"]))
                top = max(p.get("top1", float("nan")) for p in done)
                lost_top1.append(top - read.get("top1", float("nan")))
    mean = statistics.fmean
    return {
        "runs": n,
        "best_picked": same,
        "ratio_lost": mean(lost_ratio) if lost_ratio else float("nan"),
        "top1_lost": mean(lost_top1) if lost_top1 else float("nan"),
    }


def header(results: dict) -> list[str]:
    """When, where, the load, the command, seeds and sizes."""
    s = results["sizes"]
    n_val = n_validation(s["n_train_q"], s.get("val_fraction", 0.1))
    after = results.get("loadavg_after", "?")
    lines = [
        f"### {results['machine']}{' (--quick)' if results.get('quick') else ''}",
        "",
        f"{results['date']}, torch {results['torch']}, {results['threads']} threads; "
        f"load average before / after: {results['loadavg_before']} / {after} (the 2 cores "
        f"were shared: times are disturbed where the load exceeds 2); whole run "
        f"{results.get('seconds', 0):.0f} s.",
        "",
    ]
    if results.get("note"):
        lines += [f"**{results['note']}**", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    seeds = results.get("seeds", [s.get("seed")])
    runs = {
        (t, k): len(m["runs"])
        for t, task in results.get("tasks", {}).items()
        for k, m in task["methods"].items()
    }
    most = max(runs.values(), default=len(seeds))
    fewer = sorted({t for (t, _), n in runs.items() if n < most})
    count = f"{most} run(s) per method and bake" + (
        f"; fewer on {', '.join(fewer)}: {min(runs.values())}" if fewer else ""
    )
    lines += [
        f"Seeds: {', '.join(map(str, seeds))} ({count}; "
        "mean ± sd (min-max) where there are several). "
        f"Sizes: {s['n_train_q']} questions per bake ({n_val} of them validate) x "
        f"{s['n_seq']} samples x <= {s['max_new_tokens']} tokens; held-out: "
        f"{s['n_heldout_q']} questions, KL and top-1 agreement on {s['heldout_samples']} "
        "sampled answers each of the prompted model, behaviour on one greedy answer each.",
        "",
    ]
    return lines


def describe(results: dict) -> str:
    """Markdown: when, where, sizes, methods, the table and the target verdicts."""
    lines = header(results)
    lines += ["Methods (bake flags beyond the shared sizes; the first sets the time budget):", ""]
    lines += [f"- `{name}`: `{flags or '{}'}`" for name, flags in results["methods"].items()]
    lines += ["", table(results, markdown=True), ""]
    v = validation_picks(results)
    s = results["sizes"]
    n_val = n_validation(s["n_train_q"], s.get("val_fraction", 0.1))
    if v["runs"]:
        lines += [
            f"Validation KL (validation questions per bake: {n_val}) picked the epoch "
            f"with the best held-out KL in "
            f"{v['best_picked']} of {v['runs']} runs; its picks cost {v['ratio_lost']:.3f} "
            f"of KL ratio and {v['top1_lost']:.3f} of top-1 agreement on average.",
            "",
        ]
    for name in results["methods"]:
        if targets_met(results, name):
            lines.append(f"- `{name}` meets both targets on every bake.")
        else:
            missed = misses(results, name)
            lines.append(
                f"- `{name}` misses a target on at least one bake"
                + (f": {'; '.join(missed)}." if missed else ".")
            )
    return "\n".join(lines) + "\n"


def write_readme(
    readme: Path, sections: list[str], markers: tuple[str, str] = (README_START, README_END)
) -> None:
    """Replace the text between `markers` (the fidelity ones by default) of `readme`
    with `sections`."""
    start, end = markers
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = "\n".join(sections)
    with atomic_write(readme) as f:
        f.write(f"{head}{start}\n{body}{end}{tail}")


def plot(results: dict, path: Path) -> None:
    """Held-out KL against seconds since the bake started: one panel per bake, one
    colour per method (a line per seed), a dotted line at the first method's budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, (task_name, task) in zip(axes[0], tasks.items(), strict=True):
        for i, (name, m) in enumerate(task["methods"].items()):
            color = f"C{i % 10}"
            for j, run in enumerate(m["runs"]):
                c = [p for p in run["curve"] if "kl" in p]  # --read_only scores one epoch
                label = name if j == 0 else None
                ax.plot([p["t"] for p in c], [p["kl"] for p in c], "o-", color=color,
                        label=label, lw=1, ms=3)  # fmt: skip
                ax.plot([run["read"]["t"]], [run["read"]["kl"]], "k*", markersize=8)
        first = next(iter(task["methods"].values()))
        for run in first["runs"]:
            ax.axvline(run["budget_s"], color="grey", linestyle=":", lw=0.8)
        ax.axhline(KL_RATIO_TARGET * task["kl_base"], color="green", linestyle="--", lw=0.8)
        ax.set_title(task_name)
        ax.set_xlabel("seconds since the bake started")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out KL(prompted || model) / token")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
