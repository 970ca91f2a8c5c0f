"""Is it baked? Per-trajectory negative log-likelihood under base/baked x prompt/no prompt.

    promptbake compare --adapter runs/zorblax
    promptbake compare --adapter runs/zorblax --data_file other.jsonl \\
        --prompt_override data/pirate_x0.md --path_prefix pirate_

For each trajectory of --data_file (default: the run's validation trajectories) the
NLL of its generated tokens (sum over tokens of -log p(token | prefix)) under the
four conditions of evaluation.conditions.CONDITIONS (base, prompted, baked, re-prompted; the
seed's compare_models.py); the samples came from "prompted".

Writes to --out_dir (default <adapter>/compare): <prefix>compare.json (every
trajectory's NLLs and the summary), <prefix>compare.md (the table) and one scatter
plot per pair, <prefix>nll_<a>_vs_<b>.png. It also reports held-out "bake fidelity":
KL(prompted || baked) against KL(prompted || base), per token.

--prompt_override FILE scores the "with prompt" conditions under another system
prompt: each prompted row is re-rendered from the record's question with the model's
own chat template, and the trajectory's generated ids are appended, so it works for
any template (no token-id surgery tied to one tokenizer).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from ..adapters import (
    adapter_dir,
    base_model_name,
    load_adapter,
    read_record,
    run_file,
    set_adapter_scale,
)
from ..configs import CompareConfig
from ..errors import UserError
from ..files import atomic_write, save_figure, write_json
from ..guards import check_not_inputs, check_run_dir, prepare_out_dir
from ..models import load_tokenizer, model_options, pad_id
from ..prompts import encode, format_prompt
from ..records import read_prompt
from ..schema import (
    check_fingerprint,
    check_token_ids,
    generated_ids,
    make_trajectory,
    read_meta,
    read_trajectories,
)
from ..training.batches import make_batches
from .conditions import CONDITIONS
from .measures import heldout_kl, side_nll
from .report import format_table


# ---------------------------------------------------------------- NLL
def trajectory_nll(
    model, tokenizer, rows: list[dict], batch_size: int = 8, chunk_size: int = 1024
) -> dict[str, dict[str, list]]:
    """{condition: {"nll": [per trajectory], "tokens": [...]}} for the four conditions."""
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    out = {c: {"nll": [], "tokens": []} for c in CONDITIONS}
    for batch in make_batches(rows, batch_size, pad, None):
        batch = batch.to(device)
        for name, cond in CONDITIONS.items():
            with cond.context(model):
                sums, counts = side_nll(model, cond.side(batch), chunk_size)
            out[name]["nll"] += sums.tolist()
            out[name]["tokens"] += counts.tolist()
    return out


# ---------------------------------------------------------------- prompt override
def _prompt_ids_nosys(rec: dict) -> list[int]:
    return [i for i, m in zip(rec["input_ids_nosys"], rec["generated_text_mask_nosys"]) if not m]


def override_prompt(
    rows: list[dict], tokenizer, system: str | list[dict], enable_thinking: bool | None = None
) -> list[dict]:
    """The trajectories with their prompted side re-rendered under another system prompt.

    The prompt is rendered from the record's question with the chat template (prompts.py),
    then the record's own generated ids are appended: the same tokens are scored, only
    the conditioning changes. The unprompted side is kept as it was.
    """
    out = []
    for n, rec in enumerate(rows, 1):
        q = rec.get("question")
        if not isinstance(q, str):
            raise UserError(
                f"--prompt_override: trajectory {n} has no 'question' field to re-render "
                "the prompt from; regenerate the data with this version of promptbake"
            )
        ids = encode(tokenizer, format_prompt(system, q, True, tokenizer, enable_thinking))
        out.append(
            make_trajectory(tokenizer, ids, _prompt_ids_nosys(rec), generated_ids(rec), question=q)
        )
    return out


# ---------------------------------------------------------------- summary
def _pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return float("nan")
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def summarize(scores: dict[str, dict[str, list]]) -> dict[str, dict]:
    """Per condition: mean NLL per trajectory and per token, and agreement with 'prompted'."""
    ref = scores["prompted"]["nll"]
    out = {}
    for cond, s in scores.items():
        n, toks = len(s["nll"]), sum(s["tokens"])
        diffs = [abs(a - b) for a, b in zip(s["nll"], ref)]
        out[cond] = {
            "nll_per_traj": sum(s["nll"]) / max(n, 1),
            "nll_per_token": sum(s["nll"]) / max(toks, 1),
            "mean_abs_diff_to_prompted": sum(diffs) / max(n, 1),
            "corr_with_prompted": _pearson(s["nll"], ref),
        }
    base_d = [abs(a - b) for a, b in zip(scores["base"]["nll"], ref)]
    baked_d = [abs(a - b) for a, b in zip(scores["baked"]["nll"], ref)]
    out["baked"]["closer_than_base_share"] = sum(b < a for a, b in zip(base_d, baked_d)) / max(
        len(ref), 1
    )
    return out


def summary_table(summary: dict[str, dict], markdown: bool = False) -> str:
    head = ["condition", "NLL/traj", "NLL/token", "|NLL - prompted|", "corr w/ prompted"]
    rows = [
        [
            c,
            f"{s['nll_per_traj']:.3f}",
            f"{s['nll_per_token']:.4f}",
            f"{s['mean_abs_diff_to_prompted']:.3f}",
            "-" if math.isnan(s["corr_with_prompted"]) else f"{s['corr_with_prompted']:.3f}",
        ]
        for c, s in summary.items()
    ]
    return format_table(head, rows, markdown)


def fidelity_line(kl: dict) -> str:
    return (
        f"bake fidelity: held-out KL(prompted || base) {kl['kl_base']:.4f} -> "
        f"KL(prompted || baked) {kl['kl_baked']:.4f} per token "
        f"({100 * kl['fidelity']:.0f}% of the gap closed)"
    )


def plot_pairs(scores: dict[str, dict[str, list]], out: Path, prefix: str) -> list[Path]:
    """One scatter plot per pair of conditions, with the y = x line; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for a, b in itertools.combinations(scores, 2):
        xa, yb = scores[a]["nll"], scores[b]["nll"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(xa, yb, s=12, alpha=0.7)
        lo, hi = min(xa + yb), max(xa + yb)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set_xlabel(f"NLL, {a}")
        ax.set_ylabel(f"NLL, {b}")
        ax.set_title(f"per-trajectory NLL: {b} vs {a}", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}nll_{a}_vs_{b}.png"
        save_figure(fig, path, dpi=110)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the command
def default_data_file(adapter: str) -> str:
    found = run_file(adapter, "trajectories_val.jsonl")
    if found is None:
        args = run_file(adapter, "args.json")
        if args is not None:
            val = read_record(args).get("val_path")
            if val and Path(val).is_file():
                return val
        raise UserError(
            f"--adapter {adapter}: no validation trajectories found in the run; pass --data_file"
        )
    return str(found)


def write_markdown(cfg: CompareConfig, out: Path, result: dict, scores: dict) -> None:
    """<prefix>compare.md: the summary table, fidelity and (--plot) the scatter plots."""
    p, summary, kl = cfg.path_prefix, result["summary"], result["heldout_kl"]
    md = [
        f"# compare: {result['adapter']}",
        "",
        f"{result['num_trajectories']} trajectories from `{result['data_file']}`, adapter "
        f"scale {cfg.adapter_scale:g}"
        + (", prompt overridden" if result["prompt_override"] else "")
        + ". NLL = sum over generated tokens of -log p(token).",
        "",
        summary_table(summary, markdown=True),
        "",
        f"Baked NLL closer to prompted than base NLL on "
        f"{100 * summary['baked']['closer_than_base_share']:.0f}% of trajectories.",
        "",
        fidelity_line(kl),
        "",
    ]
    if cfg.plot:
        md += [f"![{x.stem}]({x.name})" for x in plot_pairs(scores, out, p)] + [""]
    with atomic_write(out / f"{p}compare.md") as f:
        f.write("\n".join(md))


def compare(cfg: CompareConfig, model=None, tokenizer=None) -> dict:
    """Run the comparison; pass `model` (a PeftModel) and `tokenizer` to skip loading."""
    cfg.validate()
    adapter = adapter_dir(cfg.adapter)
    data_file = cfg.data_file or default_data_file(str(adapter))
    if tokenizer is None:  # cheap; also reads files in the original generate_data.py layout
        tokenizer = load_tokenizer(base_model_name(adapter, cfg.model_name), cfg.trust_remote_code)
    rows = read_trajectories(data_file, "--data_file", tokenizer)
    override = (
        read_prompt(cfg.prompt_override, "--prompt_override") if cfg.prompt_override else None
    )
    out = Path(cfg.out_dir) if cfg.out_dir else adapter / "compare"
    p = cfg.path_prefix
    writes = (f"{p}compare.json", f"{p}compare.md", f"{p}nll_*_vs_*.png")
    check_run_dir(out, writes)  # a folder promptbake did not write keeps its files
    check_not_inputs(
        [("--out_dir", out, writes)],
        [
            ("--adapter", str(adapter)),
            ("--data_file", data_file),
            ("--prompt_override", cfg.prompt_override),
            ("--model_name", cfg.model_name),
        ],
    )
    if model is None:
        model, tokenizer, _ = load_adapter(
            adapter, cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code,
            **model_options(cfg),
        )  # fmt: skip
    check_fingerprint(data_file, tokenizer)
    check_token_ids(rows, model)
    if override is not None:
        meta = read_meta(data_file) or {}
        thinking = (meta.get("args") or {}).get("enable_thinking")
        rows = override_prompt(rows, tokenizer, override, thinking)
    set_adapter_scale(model, cfg.adapter_scale)

    scores = trajectory_nll(model, tokenizer, rows, cfg.batch_size, cfg.kl_chunk_size)
    summary = summarize(scores)
    kl = heldout_kl(model, tokenizer, rows, cfg.batch_size, cfg.kl_chunk_size)
    table = summary_table(summary)
    print(f"NLL of {len(rows)} trajectories from {data_file} (adapter scale {cfg.adapter_scale:g})")
    print(table)
    print(fidelity_line(kl))

    prepare_out_dir(out)
    result = {
        "adapter": str(adapter),
        "data_file": data_file,
        "prompt_override": override,
        "adapter_scale": cfg.adapter_scale,
        "num_trajectories": len(rows),
        "summary": summary,
        "heldout_kl": kl,
        "trajectories": [
            {
                "question": r.get("question"),
                "generated_text": r.get("generated_text"),
                **{c: scores[c]["nll"][i] for c in CONDITIONS},
                "tokens": scores["base"]["tokens"][i],
            }
            for i, r in enumerate(rows)
        ],
    }
    write_json(out / f"{p}compare.json", result)
    write_markdown(cfg, out, result, scores)
    print(f"wrote {out / (p + 'compare.md')} and {out / (p + 'compare.json')}")
    return result
