"""Is it baked? The one home of evaluation: the four conditions, answers, NLL and KL.

    from promptbake.evaluate import CONDITIONS, answer_condition, heldout_kl, side_by_side
    base     = answer_condition(model, tok, questions, "base")
    prompted = answer_condition(model, tok, questions, "prompted", prompt=x0)
    baked    = answer_condition(model, tok, questions, "baked")
    print(side_by_side(questions, {"base": base, "prompted": prompted, "baked": baked}))

The four conditions (:data:`CONDITIONS`), used by bake's report, ``eval``, ``compare``
and ``chat`` alike:

    base         base model, no prompt         (where we started)
    prompted     base model, with the prompt   (the target)
    baked        adapter on, no prompt         (the baked model: should track "prompted")
    re-prompted  adapter on, with the prompt   (prompt applied twice, roughly)

Answers go through the sampling seam (sampling.sample). Scores of given trajectories
go through one chunked LM-head helper (:func:`chunk_logprobs`): per-trajectory NLL
(:func:`side_nll`, compare) and per-token KL between any two (model, condition) pairs
(:func:`condition_kl`: held-out KL, and pursuit's KL across two models).

"Bake fidelity" compares held-out KL(prompted || baked) with KL(prompted || base):
the fraction of the prompt's effect that the adapter reproduces without the prompt.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..configs.choices import MODES
from ..models import end_of_turn_ids
from ..prompts import Prompt, encode, format_prompt
from ..sampling.seam import Sampling, sample
from ..training.batches import Batch, Side
from ..training.forward import adapter_disabled


@dataclass(frozen=True)
class Condition:
    """How a model is run: with the prompt in its context or not, adapter on or off."""

    prompted: bool
    adapter: bool

    def side(self, batch: Batch) -> Side:
        """The side of a trajectory batch this condition reads."""
        return batch.prompted if self.prompted else batch.unprompted

    def context(self, model):
        """The adapter switched as this condition needs (on: as the model is)."""
        return contextlib.nullcontext() if self.adapter else adapter_disabled(model)


CONDITIONS: dict[str, Condition] = {
    "base": Condition(prompted=False, adapter=False),
    "prompted": Condition(prompted=True, adapter=False),
    "baked": Condition(prompted=False, adapter=True),
    "re-prompted": Condition(prompted=True, adapter=True),
}
assert tuple(CONDITIONS) == MODES, "configs.choices.MODES names the conditions, in table order"


# ---------------------------------------------------------------- answers
@dataclass(frozen=True)
class Answering:
    """How answers are drawn: greedy unless `temperature`, `batch_size` questions at a
    time, from torch seed `seed`, with the sampling `engine` (sampling.seam)."""

    max_new_tokens: int = 64
    temperature: float | None = None
    batch_size: int = 16
    seed: int = 0
    engine: str = "auto"
    enable_thinking: bool | None = None  # Qwen3's switch, passed to the chat template
    progress: bool = False

    @property
    def sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature)


GREEDY = Answering()  # the default: greedy, 64 new tokens


@torch.no_grad()
def answer_ids(model, tokenizer, prompts: list[list[int]], how: Answering = GREEDY) -> list[str]:
    """Decoded answers to already rendered prompts (token ids), in order, through the
    sampling seam. The adapter is as the caller set it."""
    # sort by length so batches pad little; restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    eot = end_of_turn_ids(tokenizer, model)
    torch.manual_seed(how.seed)
    steps = range(0, len(order), how.batch_size)
    for i in tqdm(steps, disable=not how.progress, desc="answering"):
        idx = order[i : i + how.batch_size]
        gens = sample(
            model, [prompts[j] for j in idx], how.sampling,
            pad_id=tokenizer.pad_token_id, eot_ids=eot, engine=how.engine,
        ).new_ids  # fmt: skip
        for j, g in zip(idx, gens):
            out[j] = tokenizer.decode(g, skip_special_tokens=True).strip()
    return out


def answer(
    model,
    tokenizer,
    questions: list[dict],
    system: Prompt | None = None,
    adapter: bool = True,
    how: Answering = GREEDY,
) -> list[str]:
    """Answer each question with or without the system prompt and with or without the
    adapter. Returns the decoded answers, in order."""
    think = how.enable_thinking
    prompts = [
        encode(
            tokenizer, format_prompt(system, q["question"], system is not None, tokenizer, think)
        )
        for q in questions
    ]
    with Condition(system is not None, adapter).context(model):
        return answer_ids(model, tokenizer, prompts, how)


def answer_condition(
    model,
    tokenizer,
    questions: list[dict],
    condition: str,
    prompt: Prompt | None = None,
    how: Answering = GREEDY,
) -> list[str]:
    """:func:`answer` under one of :data:`CONDITIONS` (`prompt` is the system prompt of
    the prompted ones)."""
    c = CONDITIONS[condition]
    if c.prompted and prompt is None:
        raise ValueError(f"condition {condition} needs the prompt")
    return answer(model, tokenizer, questions, prompt if c.prompted else None, c.adapter, how)


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
