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
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batches import Batch, Side, make_batches
from .chat import encode, format_prompt
from .forward import adapter_disabled, base_of, selected_hidden
from .loss import kl_from_logprobs
from .models import end_of_turn_ids, pad_id
from .objective import kl_chunk_rows
from .sampling import Sampling, sample


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
MODES = tuple(CONDITIONS)  # the --modes / chat mode names, in table order


# ---------------------------------------------------------------- answers
@torch.no_grad()
def answer_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float | None = None,
    seed: int = 0,
    progress: bool = False,
    engine: str = "auto",
) -> list[str]:
    """Decoded answers to already rendered prompts (token ids), in order, through the
    sampling seam; greedy unless `temperature` is set. The adapter is as the caller set it."""
    # sort by length so batches pad little; restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    eot = end_of_turn_ids(tokenizer, model)
    settings = Sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    torch.manual_seed(seed)
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
    with Condition(system is not None, adapter).context(model):
        return answer_ids(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            batch_size,
            temperature,
            seed,
            progress,
            engine,
        )


def answer_condition(
    model, tokenizer, questions: list[dict], condition: str, prompt: str | None = None, **kw
) -> list[str]:
    """:func:`answer` under one of :data:`CONDITIONS` (`prompt` is the system prompt of
    the prompted ones); keyword arguments as :func:`answer`'s."""
    c = CONDITIONS[condition]
    if c.prompted and prompt is None:
        raise ValueError(f"condition {condition} needs the prompt")
    return answer(
        model, tokenizer, questions, system=prompt if c.prompted else None, adapter=c.adapter, **kw
    )


# ---------------------------------------------------------------- NLL and KL of trajectories
def chunk_logprobs(model, hidden: torch.Tensor, chunk_size: int = 1024) -> Iterator[torch.Tensor]:
    """The model's float32 log-probs [n, V] at hidden-state rows [N, H], `chunk_size`
    rows at a time through its LM head (never [N, V] at once)."""
    head = base_of(model).get_output_embeddings()
    for i in range(0, hidden.shape[0], chunk_size):
        yield head(hidden[i : i + chunk_size]).float().log_softmax(-1)


def per_sequence(side: Side, values: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums [B] of per-row values [N] (row-major over ``pred_mask``)."""
    seq = side.pred_mask.nonzero()[:, 0]
    return torch.zeros(side.pred_mask.shape[0], device=values.device).index_add(0, seq, values)


@torch.no_grad()
def side_nll(model, side: Side, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence NLL sums [B] and generated-token counts [B] of one padded side.

    Only the rows that predict generated tokens go through the LM head (as in training):
    row p predicts token p + 1, so the targets are the ids shifted left by one.
    """
    h = selected_hidden(model, side)
    targets = side.input_ids[:, 1:][side.pred_mask[:, :-1]]
    nll = [
        F.nll_loss(lp, targets[i : i + lp.shape[0]], reduction="none")
        for i, lp in zip(range(0, h.shape[0], chunk_size), chunk_logprobs(model, h, chunk_size))
    ]
    nll = torch.cat(nll) if nll else h.new_zeros(0, dtype=torch.float32)
    return per_sequence(side, nll).cpu(), side.pred_mask.sum(1).cpu()


@torch.no_grad()
def condition_kl(
    teacher: tuple[object, Condition],
    students: dict[str, tuple[object, Condition]],
    rows: list[dict],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Per-token KL(teacher || student) on trajectories, for each named student.

    A teacher or student is a (model, condition) pair: the model runs the condition's
    side of each trajectory with the condition's adapter setting, so the pairs may be
    one model (held-out KL: prompted vs base and baked) or two (pursuit's stacked
    rounds against the original model). The teacher runs once per batch.
    """
    t_model, t_cond = teacher
    device = next(t_model.parameters()).device
    vocab = base_of(t_model).get_output_embeddings().weight.shape[0]
    chunk_size = kl_chunk_rows(chunk_size, device, vocab)  # 0: auto
    totals, n = dict.fromkeys(students, 0.0), 0
    for b in make_batches(rows, batch_size, pad_id, None):
        b = b.to(device)
        with t_cond.context(t_model):
            t_h = selected_hidden(t_model, t_cond.side(b))
        for name, (s_model, s_cond) in students.items():
            with s_cond.context(s_model):
                s_h = selected_hidden(s_model, s_cond.side(b))
            for i in range(0, t_h.shape[0], chunk_size):
                # each head under its own condition (a LoRA may reach the LM head too)
                with t_cond.context(t_model):
                    t_lp = next(chunk_logprobs(t_model, t_h[i : i + chunk_size], chunk_size))
                with s_cond.context(s_model):
                    s_lp = next(chunk_logprobs(s_model, s_h[i : i + chunk_size], chunk_size))
                totals[name] += float(kl_from_logprobs(t_lp, s_lp).sum())
        n += t_h.shape[0]
    return {name: total / max(n, 1) for name, total in totals.items()}


def heldout_kl(
    model, tokenizer, rows: list[dict], batch_size: int = 8, chunk_size: int = 1024
) -> dict:
    """KL(prompted || base) and KL(prompted || baked) per token on trajectories, and fidelity."""
    pad = pad_id(tokenizer)
    kl = condition_kl(
        (model, CONDITIONS["prompted"]),
        {"kl_base": (model, CONDITIONS["base"]), "kl_baked": (model, CONDITIONS["baked"])},
        rows,
        pad,
        batch_size,
        chunk_size,
    )
    base, baked = kl["kl_base"], kl["kl_baked"]
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
