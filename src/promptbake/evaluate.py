"""Is it baked? Held-out KL and side-by-side answers of base, prompted and baked models.

    from promptbake.evaluate import answer, heldout_kl, side_by_side
    base     = answer(model, tok, questions, adapter=False)
    prompted = answer(model, tok, questions, system=x0, adapter=False)
    baked    = answer(model, tok, questions, adapter=True)
    print(side_by_side(questions, {"base": base, "prompted": prompted, "baked": baked}))

"Bake fidelity" compares held-out KL(prompted || baked) with KL(prompted || base):
the fraction of the prompt's effect that the adapter reproduces without the prompt.
"""

from __future__ import annotations

import contextlib
import textwrap

import torch
from tqdm.auto import tqdm

from .batches import make_batches
from .chat import encode, format_prompt
from .forward import adapter_disabled
from .models import end_of_turn_ids, pad_id
from .objective import evaluate_kl
from .sampling import Sampling, sample

MODES = ("base", "prompted", "baked", "re-prompted")
# mode -> (use the system prompt?, adapter on?)
MODE_SETTINGS = {
    "base": (False, False),
    "prompted": (True, False),
    "baked": (False, True),
    "re-prompted": (True, True),
}


@torch.no_grad()
def answer(
    model,
    tokenizer,
    questions: list[dict],
    system: str | None = None,
    adapter: bool = True,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    enable_thinking: bool | None = None,
    temperature: float | None = None,
    seed: int = 0,
    progress: bool = False,
    engine: str = "auto",
) -> list[str]:
    """Answer each question (greedy unless `temperature` is set), with or without the system
    prompt and with or without the adapter. Returns the decoded answers, in order."""
    prompts = [
        encode(
            tokenizer,
            format_prompt(system, q["question"], system is not None, tokenizer, enable_thinking),
        )
        for q in questions
    ]
    # sort by length so batches pad little; restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    eot = end_of_turn_ids(tokenizer, model)
    settings = Sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    ctx = contextlib.nullcontext() if adapter else adapter_disabled(model)
    torch.manual_seed(seed)
    with ctx:
        for i in tqdm(range(0, len(order), batch_size), disable=not progress, desc="answering"):
            idx = order[i : i + batch_size]
            gens = sample(
                model,
                [prompts[j] for j in idx],
                settings,
                pad_id=tokenizer.pad_token_id,
                eot_ids=eot,
                engine=engine,
            ).new_ids
            for j, g in zip(idx, gens):
                out[j] = tokenizer.decode(g, skip_special_tokens=True).strip()
    return out


def heldout_kl(
    model, tokenizer, rows: list[dict], batch_size: int = 8, chunk_size: int = 1024
) -> dict:
    """KL(prompted || base) and KL(prompted || baked) per token on trajectories, and fidelity."""
    pad = pad_id(tokenizer)
    batches = make_batches(rows, batch_size, pad, None)
    base = evaluate_kl(model, batches, chunk_size, student_adapter=False)["kl"]
    baked = evaluate_kl(model, batches, chunk_size, student_adapter=True)["kl"]
    return {
        "kl_base": base,
        "kl_baked": baked,
        "fidelity": 1.0 - baked / base if base > 0 else float("nan"),
    }


def side_by_side(questions: list[dict], columns: dict[str, list[str]], width: int = 38) -> str:
    """A plain-text table: one block per question, one wrapped column per model."""
    names = list(columns)
    sep = "+" + "+".join("-" * (width + 2) for _ in names) + "+"
    lines = []
    for i, q in enumerate(questions):
        lines += [
            f"Q{i + 1}: {q['question']}",
            sep,
            "|" + "|".join(f" {n:<{width}} " for n in names) + "|",
            sep,
        ]
        cells = [textwrap.wrap(" ".join(columns[n][i].split()), width)[:6] or [""] for n in names]
        for r in range(max(len(c) for c in cells)):
            lines.append(
                "|" + "|".join(f" {(c[r] if r < len(c) else ''):<{width}} " for c in cells) + "|"
            )
        lines += [sep, ""]
    return "\n".join(lines)
