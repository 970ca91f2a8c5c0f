"""The fidelity benchmark's results, without a model: reading at equal time, the table,
the targets, the plot and the bench/README.md section.

Everything here works on the plain dict that ``bench/fidelity.py`` writes to
``bench/results/fidelity-<machine>.json`` (tests/test_bench_fidelity.py feeds it fake
results). One task's record::

    {"scorer": "marker:Zorblax", "kl_base": 0.57,
     "behaviour": {"base": 0.0, "prompted": 0.9},
     "methods": {"paper": {"flags": {...}, "budget_s": 41.0, "total_s": 41.0,
                           "curve": [{"epoch": 0, "t": 9.1, "kl": 0.57, "val_kl": 0.6}, ...],
                           "read": {"epoch": 3, "t": 40.2, "kl": 0.11, "baked": 0.8}}}}

``curve`` holds one point per finished epoch (epoch 0: before training, at the end of
generation), ``t`` in seconds since the bake started, ``kl`` the held-out
KL(prompted || model) per token, ``val_kl`` the bake's own validation KL (which picks
the adapter a bake keeps).
"""

from __future__ import annotations

import os
from pathlib import Path

from promptbake.evaluation.report import format_table
from promptbake.files import atomic_write

KL_RATIO_TARGET = 0.10  # held-out KL(prompted || baked) / KL(prompted || base), at most
BEHAVIOUR_TARGET = 0.95  # baked behaviour score / prompted, at least
README_START, README_END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"


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


def method_row(task: dict, name: str) -> dict:
    """One table row's numbers for a (task, method) pair, with the two target checks."""
    m = task["methods"][name]
    r = m["read"]
    ratio = kl_ratio(r["kl"], task["kl_base"])
    share = behaviour_share(r["baked"], task["behaviour"]["prompted"])
    return {
        "kl_ratio": ratio,
        "base": task["behaviour"]["base"],
        "prompted": task["behaviour"]["prompted"],
        "baked": r["baked"],
        "share": share,
        "read_s": r["t"],
        "budget_s": m["budget_s"],
        "total_s": m["total_s"],
        "epoch": r["epoch"],
        "kl_ok": ratio <= KL_RATIO_TARGET,
        "behaviour_ok": share >= BEHAVIOUR_TARGET,
    }


def rows(results: dict) -> list[tuple[str, str, dict]]:
    return [
        (task_name, name, method_row(task, name))
        for task_name, task in results["tasks"].items()
        for name in task["methods"]
    ]


def mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def table(results: dict, markdown: bool = False) -> str:
    """bake x method: KL ratio, behaviour base / prompted / baked, baked / prompted, time."""
    head = [
        "bake",
        "method",
        f"KL ratio (<= {KL_RATIO_TARGET:.2f})",
        "behaviour base / prompted / baked",
        f"baked / prompted (>= {BEHAVIOUR_TARGET:.0%})",
        "epoch read",
        "s read / budget / ran",
    ]
    body = [
        [
            task,
            method,
            f"{r['kl_ratio']:.3f} {mark(r['kl_ok'])}",
            f"{r['base']:.2f} / {r['prompted']:.2f} / {r['baked']:.2f}",
            f"{r['share']:.0%} {mark(r['behaviour_ok'])}",
            str(r["epoch"]),
            f"{r['read_s']:.0f} / {r['budget_s']:.0f} / {r['total_s']:.0f}",
        ]
        for task, method, r in rows(results)
    ]
    return format_table(head, body, markdown)


def targets_met(results: dict, method: str) -> bool:
    """Whether `method` meets both targets on every bake."""
    picked = [r for _, m, r in rows(results) if m == method]
    return bool(picked) and all(r["kl_ok"] and r["behaviour_ok"] for r in picked)


def describe(results: dict) -> str:
    """Markdown: when, where, sizes, methods, the table and the target verdicts."""
    s = results["sizes"]
    lines = [
        f"### {results['machine']}{' (--quick)' if results.get('quick') else ''}",
        "",
        f"{results['date']}, torch {results['torch']}, {results['threads']} threads; "
        f"load average before / after: {results['loadavg_before']} / "
        f"{results['loadavg_after']}; whole run {results['seconds']:.0f} s.",
        "",
        f"Sizes: {s['n_train_q']} training questions x {s['n_seq']} samples x <= "
        f"{s['max_new_tokens']} tokens; held-out: {s['n_heldout_q']} questions, KL on "
        f"{s['heldout_samples']} sampled answers each (<= {s['max_new_tokens']} tokens), "
        "behaviour on one greedy answer each.",
        "",
        "Methods (bake flags beyond the shared sizes; the first sets the time budget):",
        "",
    ]
    lines += [f"- `{name}`: `{flags or '{}'}`" for name, flags in results["methods"].items()]
    lines += ["", table(results, markdown=True), ""]
    for name in results["methods"]:
        verdict = (
            "meets both targets on every bake"
            if targets_met(results, name)
            else ("misses a target on at least one bake")
        )
        lines.append(f"- `{name}` {verdict}.")
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, sections: list[str]) -> None:
    """Replace the text between the fidelity markers of `readme` with `sections`."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = "\n".join(sections)
    with atomic_write(readme) as f:
        f.write(f"{head}{README_START}\n{body}{README_END}{tail}")


def plot(results: dict, path: Path) -> None:
    """Held-out KL against seconds since the bake started: one panel per bake, one line
    per method, a dotted line at the first method's budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, (task_name, task) in zip(axes[0], tasks.items(), strict=True):
        for name, m in task["methods"].items():
            ax.plot([p["t"] for p in m["curve"]], [p["kl"] for p in m["curve"]], "o-", label=name)
            ax.plot([m["read"]["t"]], [m["read"]["kl"]], "k*", markersize=10)
        first = next(iter(task["methods"].values()))
        ax.axvline(first["budget_s"], color="grey", linestyle=":", label="time budget")
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
