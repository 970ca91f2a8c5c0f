"""Scores of given trajectories: per-trajectory NLL and per-token KL between conditions.

    from promptbake.evaluation.measures import heldout_kl, side_nll
    kl = heldout_kl(model, tok, val_rows)   # {"kl_base", "kl_baked", "fidelity"}
    top1_agreement((model, CONDITIONS["prompted"]), {"baked": (model, CONDITIONS["baked"])},
                   rows, pad_id)             # {"baked": share of argmax tokens that agree}

Only the rows that predict generated tokens go through the LM head, a chunk at a time
(:func:`chunk_logprobs`), as in training. :func:`condition_kl` compares any two
(model, condition) pairs (evaluation.conditions): one model for held-out KL (prompted
vs base and baked), two for pursuit's stacked rounds against the original model.
:func:`top1_agreement` reads the same positions for the share where the two argmax
tokens agree; :func:`condition_scores` gives both in one pass.

"Bake fidelity" compares held-out KL(prompted || baked) with KL(prompted || base):
the fraction of the prompt's effect that the adapter reproduces without the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..loss import kl_from_logprobs
from ..models import pad_id
from ..training.batches import Side, make_batches
from ..training.forward import base_of, selected_hidden
from ..training.objective import kl_chunk_rows
from .conditions import CONDITIONS, Condition


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


def paired_logprobs(
    teacher: tuple[object, Condition],
    students: dict[str, tuple[object, Condition]],
    rows: list[dict],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(student name, teacher log-probs [n, V], student log-probs [n, V]) chunks over
    every row that predicts a generated token of `rows`, the teacher and each student
    reading the side of each trajectory their condition reads: the batching of
    :func:`condition_kl` and :func:`top1_agreement`. The teacher runs once per batch."""
    t_model, t_cond = teacher
    device = next(t_model.parameters()).device
    vocab = base_of(t_model).get_output_embeddings().weight.shape[0]
    chunk_size = kl_chunk_rows(chunk_size, device, vocab)  # 0: auto
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
                yield name, t_lp, s_lp


@torch.no_grad()
def condition_scores(
    teacher: tuple[object, Condition],
    students: dict[str, tuple[object, Condition]],
    rows: list[dict],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """Per student, in one pass: ``kl``, the per-token KL(teacher || student), and
    ``top1``, the share of positions where the student's most likely token is the
    teacher's (the measure closest to greedy answers), and ``positions``.

    A teacher or student is a (model, condition) pair: the model runs the condition's
    side of each trajectory with the condition's adapter setting, so the pairs may be
    one model (held-out KL: prompted vs base and baked) or two (pursuit's stacked
    rounds against the original model).
    """
    kl, agree = dict.fromkeys(students, 0.0), dict.fromkeys(students, 0)
    n = dict.fromkeys(students, 0)
    for name, t_lp, s_lp in paired_logprobs(
        teacher, students, rows, pad_id, batch_size, chunk_size
    ):
        kl[name] += float(kl_from_logprobs(t_lp, s_lp).sum())
        agree[name] += int((t_lp.argmax(-1) == s_lp.argmax(-1)).sum())
        n[name] += t_lp.shape[0]
    return {
        name: {
            "kl": kl[name] / max(n[name], 1),
            "top1": agree[name] / n[name] if n[name] else float("nan"),
            "positions": n[name],
        }
        for name in students
    }


def condition_kl(
    teacher: tuple[object, Condition],
    students: dict[str, tuple[object, Condition]],
    rows: list[dict],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Per-token KL(teacher || student) on trajectories, for each named student
    (:func:`condition_scores`)."""
    scores = condition_scores(teacher, students, rows, pad_id, batch_size, chunk_size)
    return {name: s["kl"] for name, s in scores.items()}


def top1_agreement(
    teacher: tuple[object, Condition],
    students: dict[str, tuple[object, Condition]],
    rows: list[dict],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Per named student, the share of the trajectories' generated positions where its
    argmax token is the teacher's (same rows and conditions as :func:`condition_kl`)."""
    scores = condition_scores(teacher, students, rows, pad_id, batch_size, chunk_size)
    return {name: s["top1"] for name, s in scores.items()}


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
