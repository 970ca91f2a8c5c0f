"""The benchmark's tables: Markdown and console text from the results of bench/run.py's
jobs, and the results section of bench/README.md rebuilt from bench/results/*.json.

    python -c "from bench.tables import update_readme; update_readme()"   # after editing
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(results: dict) -> str:
    """Markdown for one machine's results: each job's section, in the order of bench.run."""
    lines = [f"### {results['machine']}", ""]
    if "date" in results:
        lines.append(run_line(results))
    if results.get("cpu"):
        lines += cpu_table(results["cpu"], results.get("memory"))
        lines += ablation_table(results["cpu"])
    if results.get("seed"):
        lines += seed_table(results["seed"])
    if results.get("memory"):
        lines += memory_table(results["memory"])
    if results.get("gpu"):
        lines += gpu_lines(results["gpu"])
    return "\n".join(lines)


def run_line(results: dict) -> str:
    """When and how the results were measured (and the machine's load around the CPU job)."""
    load = ""
    if results.get("cpu"):
        load = (
            f"; load average (1, 5, 15 min) before / after the CPU job: "
            f"{results['cpu'].get('load_before')} / {results['cpu'].get('load_after')}"
        )
    return (
        f"{results['date']}, torch {results['torch']}, {results['threads']} threads, "
        f"{results['cpus']} CPUs{load}"
    )


def cpu_table(cpu: dict, mem: dict | None) -> list[str]:
    """The CPU job (bench/cpu.py): original against ours, and the memory job's ratio."""
    j = cpu["job"]
    lines = [
        "",
        f"CPU job: {j['model']}, {j['n_train_q']} questions x {j['n_seq']} samples x "
        f"<= {j['max_new_tokens']} tokens, {j['epochs']} epochs, batch {j['batch_size']}, "
        f"held-out: {j['n_val_q']} questions x {j['n_seq']}.",
        "",
        "Wall-clock seconds; the last column is the same ratio in process CPU time.",
        "",
        "| | original | ours | ratio | ratio (CPU time) |",
        "|---|---:|---:|---:|---:|",
    ]
    g, t, e, r = cpu["generation"], cpu["training"], cpu["end_to_end"], cpu["ratios"]
    rc, ew, ld = r["cpu_time"], e["seconds"], cpu["load"]
    ours = t.get("ours", t["plain"])
    lines += [
        f"| generated tokens/s | {fmt(g['original']['tokens_per_s'])} | "
        f"{fmt(g['ours']['tokens_per_s'])} | {fmt(r['generated_tokens_per_s'], 2)}x | "
        f"{fmt(rc['generated_tokens_per_s'], 2)}x |",
        f"| training tokens/s | {fmt(t['original']['tokens_per_s'])} | "
        f"{fmt(ours['tokens_per_s'])} | {fmt(r['training_tokens_per_s'], 2)}x | "
        f"{fmt(rc['training_tokens_per_s'], 2)}x |",
        f"| model loads (s) | 2 x {fmt(ld['original']['seconds'])} | "
        f"{fmt(ld['ours']['seconds'])} | | |",
        f"| end-to-end bake (s) | {fmt(ew['original'])} | {fmt(ew['ours'])} | "
        f"{fmt(r['end_to_end_speedup'], 2)}x | {fmt(rc['end_to_end_speedup'], 2)}x |",
        f"| end-to-end without loads (s) | {fmt(ew['original_no_load'])} | "
        f"{fmt(ew['ours_no_load'])} | {fmt(r['end_to_end_speedup_no_load'], 2)}x | "
        f"{fmt(rc['end_to_end_speedup_no_load'], 2)}x |",
        f"| held-out KL/token (base model: {fmt(cpu['heldout_kl_base'], 4)}) | "
        f"{fmt(t['original']['heldout_kl'], 4)} | {fmt(ours['heldout_kl'], 4)} | | |",
    ]
    if mem:
        d = mem["default_chunk"]
        lines.append(
            f"| loss-step peak memory, V=151,936 (MB) | {fmt(d['naive_bytes'] / 1e6, 0)} | "
            f"{fmt(d['chunked_bytes'] / 1e6, 0)} | {fmt(100 * d['ratio'], 1)}% | |"
        )
    return lines


def ablation_table(cpu: dict) -> list[str]:
    """The CPU job's training variants against the original, and the padding shares."""
    lines = [
        "",
        "Training ablation (same trajectories, same epochs, same initial weights):",
        "",
        "| variant | what | train s | CPU s | KL tokens/s | vs original | vs original "
        "(CPU time) | held-out KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    t = cpu["training"]
    o = t["original"]
    for name, v in t.items():
        lines.append(
            f"| {name} | {v['description']} | {fmt(v['seconds'])} | "
            f"{fmt(v['cpu_seconds'])} | {fmt(v['tokens_per_s'])} | "
            f"{fmt(v['tokens_per_s'] / o['tokens_per_s'], 2)}x | "
            f"{fmt(v['tokens_per_cpu_s'] / o['tokens_per_cpu_s'], 2)}x | "
            f"{fmt(v['heldout_kl'], 4)} |"
        )
    p = cpu.get("padding_share")
    if p:
        lines += [
            "",
            f"Padding share of training batches: shuffled {100 * p['shuffled']:.0f}%, "
            f"length-bucketed {100 * p['bucketed']:.0f}%.",
        ]
    return lines


def memory_table(mem: dict) -> list[str]:
    """The memory job (bench/memory.py): peak MB of one loss step per shape."""
    lines = ["", "Loss-step peak memory (bench/memory.py, float32, V=151,936):", ""]
    lines += ["| shape (B x T, N, chunk) | naive MB | chunked MB | ratio |"]
    lines += ["|---|---:|---:|---:|"]
    for k in ("default_chunk", "double_chunk", "half_chunk"):
        if k in mem:
            d = mem[k]
            lines.append(
                f"| {d['batch']} x {d['prompt'] + d['gen']}, {d['batch'] * d['gen']}, "
                f"{d['chunk']} | {fmt(d['naive_bytes'] / 1e6, 0)} | "
                f"{fmt(d['chunked_bytes'] / 1e6, 0)} | {fmt(100 * d['ratio'], 1)}% |"
            )
    return lines


def gpu_lines(gpu: dict) -> list[str]:
    """The GPU job (bench/gpu_measure.py: run_gpu), or why it was skipped."""
    if "skipped" in gpu:
        return ["", f"GPU job: {gpu['skipped']}."]
    r = gpu["ratios"]
    roof = gpu.get("roofline", {})
    return [
        "",
        "GPU job (random Qwen3-1.7B, bf16, 100 x 25 x 300):",
        "",
        f"- generation {fmt(gpu['generation_ours']['tokens_per_s'], 0)} tokens/s "
        f"({fmt(100 * roof.get('fraction', float('nan')), 0)}% of the HBM roofline), "
        f"{fmt(r['generated_tokens_per_s'], 2)}x the original",
        f"- training {fmt(r['training_tokens_per_s'], 2)}x the original",
        f"- generate + 1 epoch: {fmt(gpu['end_to_end_ours_s'], 0)} s "
        f"({fmt(r['end_to_end_speedup'], 2)}x the original, estimated from a subset)",
    ]


def seed_table(s: dict) -> list[str]:
    """Markdown lines for the seed job (bench/seed.py): mean seconds per process."""
    m, sp, kl = s["mean"], s["speedup"], s["heldout_kl"]
    lines = [
        "",
        f"Seed job ({s['date']}, {s['threads']} thread(s), {s['repeats']} alternating runs "
        f"each; load average before / after: {s['load_before']} / {s['load_after']}): "
        "`generate_data.py` + `train_loop.py` against the original's two scripts, each a "
        "process. Mean wall-clock seconds; the last column is the ratio in CPU time.",
        "",
        "| process | original | ours | ratio | ratio (CPU time) |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"generate": "generate", "train": "train", "end_to_end": "end to end"}
    for stage, name in names.items():
        o, u, r = m["original"][stage], m["ours"][stage], sp[stage]
        lines.append(
            f"| {name} | {fmt(o['seconds'])} | {fmt(u['seconds'])} | "
            f"{fmt(r['seconds'], 2)}x | {fmt(r['cpu_seconds'], 2)}x |"
        )
    lines += seed_breakdown(s["runs"])
    per = ", ".join(f"{x:.2f}x" for x in s["speedup_per_repeat"])
    lines += [
        f"| held-out KL/token (base model: {fmt(kl['base'], 4)}) | "
        f"{', '.join(fmt(x, 4) for x in kl['original'])} | "
        f"{', '.join(fmt(x, 4) for x in kl['ours'])} | | |",
        "",
        f"End-to-end ratio of each back-to-back pair: {per}.",
    ]
    return lines


def seed_breakdown(runs: dict) -> list[str]:
    """Where each process's wall time went, as the processes report it (mean of the runs):
    the work itself, and the rest (interpreter and library start-up, model load, writing)."""

    def avg(xs: list) -> float | None:
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    o, u = runs["original"], runs["ours"]
    rows = [
        ("generate: sampling itself", [r["inner"]["generate"]["work_seconds"] for r in o],
         [r["inner"]["generate"]["work_seconds"] for r in u]),
        ("train: training itself (ours: the epochs)", [r["inner"]["train"]["work_seconds"] for r in o],
         [r["inner"]["train"]["epoch_seconds"] for r in u]),
        ("original: model load per process (GGUF dequantized)",
         [r["inner"]["generate"]["load_seconds"] for r in o], []),
    ]  # fmt: skip
    lines = []
    for name, a, b in rows:
        lines.append(f"| {name} | {fmt(avg(a))} | {fmt(avg(b))} | | |")
    return lines


def update_readme() -> None:
    """Rebuild the results section of bench/README.md from bench/results/*.json."""
    if not README.is_file():
        return
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        return
    parts = []
    for f in sorted(RESULTS.glob("*.json")):
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            parts.append(table(json.loads(f.read_text(encoding="utf-8"))))
    body = "\n\n".join(parts) or "(no results yet: run `make bench`)"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    README.write_text(f"{head}{start}\n{body}\n{end}{tail}", encoding="utf-8")


def summary(results: dict) -> str:
    """The ratios, one line each, for the console."""
    out = []
    cpu = results.get("cpu")
    if cpu:
        r, c = cpu["ratios"], cpu["ratios"]["cpu_time"]
        out += [
            "CPU job, ours vs the original (wall clock; in CPU time):",
            f"  generated tokens/s    {r['generated_tokens_per_s']:.2f}x; "
            f"{c['generated_tokens_per_s']:.2f}x",
            f"  training tokens/s     {r['training_tokens_per_s']:.2f}x; "
            f"{c['training_tokens_per_s']:.2f}x",
            f"  end-to-end bake time  {r['end_to_end_speedup']:.2f}x faster; "
            f"{c['end_to_end_speedup']:.2f}x ({r['end_to_end_speedup_no_load']:.2f}x; "
            f"{c['end_to_end_speedup_no_load']:.2f}x without model loads)",
            f"  held-out KL/token     ours - original = {r['heldout_kl_ours_minus_original']:+.4f}",
        ]
    seed = results.get("seed")
    if seed:
        sp = seed["speedup"]
        out.append(
            "seed job (generate_data.py + train_loop.py vs the original, processes): end to end "
            f"{sp['end_to_end']['seconds']:.2f}x ({sp['end_to_end']['cpu_seconds']:.2f}x in CPU "
            f"time); held-out KL ours {seed['heldout_kl']['ours']}, original "
            f"{seed['heldout_kl']['original']}"
        )
    mem = results.get("memory")
    if mem:
        out.append(f"loss-step peak memory at V=151,936: chunked/naive = {100 * mem['ratio']:.1f}%")
    gpu = results.get("gpu")
    if gpu:
        out.append(
            "GPU job: " + (gpu["skipped"] if "skipped" in gpu else json.dumps(gpu["ratios"]))
        )
    return "\n".join(out)
