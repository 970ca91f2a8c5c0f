"""report.md for a bake run, and the small table helpers the evaluation commands share.

    from promptbake.report import write_report
    write_report(out_dir, cfg, summary)      # bake.py calls this at the end of bake()

The report holds the run's settings, the KL curves (kl_curve.png, written by training),
the bake-fidelity figure (fidelity.png: held-out KL(prompted || base) against
KL(prompted || baked)), marker rates and a side-by-side table of held-out answers
(base / prompted / baked). Everything it shows comes from summary.json, so a report
can be rebuilt from a finished run:

    python -m promptbake.evaluation.report runs/zorblax
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_write, save_figure
from ..records import read_json


# ---------------------------------------------------------------- tables
def md_cell(text: Any, limit: int | None = None) -> str:
    """One Markdown table cell: newlines folded, pipes escaped, optionally shortened."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


def format_table(head: list[str], rows: list[list[Any]], markdown: bool = False) -> str:
    """A plain-text (aligned columns) or Markdown table of already formatted cells."""
    cells = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in cells])
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *cells]
    )


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


# ---------------------------------------------------------------- the fidelity figure
def plot_fidelity(kl: dict, path: Path) -> None:
    """Bar chart: held-out KL of the unprompted base and the baked model to the prompted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    bars = ax.bar(
        ["base (no prompt)", "baked (no prompt)"],
        [kl["kl_base"], kl["kl_baked"]],
        color=["#999999", "#d95f02"],
    )
    ax.bar_label(bars, fmt="%.4f")
    ax.margins(y=0.15)  # room for the labels under the title
    ax.set_ylabel("held-out KL(prompted || model)\nper token (nats)")
    ax.set_title(f"bake fidelity: {100 * kl['fidelity']:.0f}% of the gap closed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------- report.md
def _settings(cfg: Any) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg or {})


def render_report(out: Path, settings: dict, summary: dict) -> str:
    lines = [f"# Bake report: {out.name}", ""]
    prompt = summary.get("prompt", "")
    if not isinstance(prompt, str):  # a .json prompt: a list of chat messages
        prompt = json.dumps(prompt, indent=1, ensure_ascii=False)
    lines += ["Prompt baked into the weights:", "", "```", prompt, "```", ""]
    sec = summary.get("seconds", {})
    if sec:
        lines += [
            f"Model `{summary.get('model_name')}`; total {sec.get('total', 0):.0f} s "
            f"(load {sec.get('load', 0):.0f} s, generate {sec.get('generate', 0):.0f} s, "
            f"train {sec.get('train', 0):.0f} s).",
            "",
        ]

    lines += ["## Settings", ""]
    lines.append(
        format_table(
            ["setting", "value"],
            [[k, "" if v is None else v] for k, v in settings.items() if k != "prompt"],
            markdown=True,
        )
    )

    epochs = summary.get("epochs") or []
    lines += ["", "## Training: KL(prompted || baked) per token", ""]
    if (out / "kl_curve.png").is_file():
        lines += ["![KL curves](kl_curve.png)", ""]
    if epochs:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(
            format_table(
                ["epoch", "train KL", "validation KL", "best"],
                [
                    [m["epoch"], fmt(m.get("train_kl")), fmt(m.get("val_kl")), m.get("best", "")]
                    for m in epochs
                ],
                markdown=True,
            )
        )

    kl = summary.get("heldout_kl")
    if kl:
        lines += ["", "## Bake fidelity (validation trajectories)", ""]
        if (out / "fidelity.png").is_file():
            lines += ["![bake fidelity](fidelity.png)", ""]
        lines.append(
            f"KL(prompted || base) = {kl['kl_base']:.4f}, KL(prompted || baked) = "
            f"{kl['kl_baked']:.4f} nats/token: the adapter closes "
            f"**{100 * kl['fidelity']:.0f}%** of the gap the prompt makes."
        )

    marker = summary.get("marker")
    answers = summary.get("answers") or []
    if marker:
        n = len(answers)
        lines += ["", f"## Marker /{marker['pattern']}/ on {n} held-out answers", ""]
        lines.append(
            format_table(
                ["model", "rate"],
                [
                    [k, f"{pct(v)} ({round(v * n)}/{n})"]
                    for k, v in marker.items()
                    if k != "pattern"
                ],
                markdown=True,
            )
        )
    if answers:
        cols = [k for k in answers[0] if k != "question"]
        lines += ["", "## Held-out answers, side by side", ""]
        lines.append(
            format_table(
                ["question", *cols],
                [[md_cell(a["question"]), *(md_cell(a[c], 300) for c in cols)] for a in answers],
                markdown=True,
            )
        )
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, cfg: Any, summary: dict) -> Path:
    """Write <out_dir>/report.md (and fidelity.png when there is a held-out KL)."""
    out = Path(out_dir)
    if summary.get("heldout_kl"):
        plot_fidelity(summary["heldout_kl"], out / "fidelity.png")
    path = out / "report.md"
    with atomic_write(path) as f:
        f.write(render_report(out, _settings(cfg), summary))
    return path


def main(argv: list[str] | None = None) -> int:
    """Rebuild report.md from a finished run directory (summary.json + args.json)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m promptbake.evaluation.report RUN_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not (out / "summary.json").is_file():
        print(f"error: {out}/summary.json not found (not a finished bake run)", file=sys.stderr)
        return 2
    hint = "restore it, or bake the run again"
    try:
        summary = read_json(out / "summary.json", hint=hint)
        args = out / "args.json"
        settings = read_json(args, hint=hint) if args.is_file() else {}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {write_report(out, settings, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
