"""The baking objective: full-vocabulary KL(P_teacher || P_student) per generated token.

The teacher is the model WITH the prompt (adapter off), the student the model
WITHOUT the prompt (adapter on). Everything here is a pure function of tensors.

    token_kl(t_logits [N, V], s_logits [N, V])              -> [N]   reference, full logits
    masked_kl(t_logits [B, T, V], s_logits [B, T, V], m [B, T]) -> mean over m, per-seq sums
    chunked_kl(t_hidden [N, H], s_hidden [N, H], head, chunk) -> [N]   memory-bounded

``chunked_kl`` never materializes the [N x V] float32 logits for teacher and student
at once: it projects ``chunk`` rows at a time through the LM head and checkpoints each
chunk, so backward recomputes the chunk instead of keeping it. With Qwen3's 151,936
entries, 32 x 400 rows are 7.8 GB per float32 copy; a 1024-row chunk is 0.6 GB.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) for each row, computed in float32.

    Shapes: [..., V], [..., V] -> [...]. Gradients flow to the student only if it
    requires grad; the teacher is treated as a constant target.
    """
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    p = t.exp()
    # p * (t - s), written with xlogy so that entries where p_teacher == 0 give exactly 0
    return (torch.special.xlogy(p, p) - p * s).sum(-1)


def masked_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KL over positions where `mask` is true, and the per-sequence KL sums.

    Shapes: [B, T, V], [B, T, V], [B, T] -> scalar, [B]. An all-false mask gives 0
    (not NaN). This is the plain full-logit form; training uses `chunked_kl` on the
    selected rows, and tests check the two agree.
    """
    m = mask.bool()
    kl = token_kl(teacher_logits, student_logits) * m
    per_seq = kl.sum(-1)
    return per_seq.sum() / m.sum().clamp(min=1), per_seq


def _chunk_kl(head: Callable, t_hidden: torch.Tensor, s_hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t_logits = head(t_hidden)
    return token_kl(t_logits, head(s_hidden))


def chunked_kl(
    teacher_hidden: torch.Tensor,
    student_hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-row KL from final hidden states, projecting through `head` chunk by chunk.

    Shapes: [N, H], [N, H] -> [N]. `head` maps [n, H] -> [n, V] (the LM head). Each
    chunk is checkpointed, so peak memory is O(chunk_size x V) instead of O(N x V).
    """
    if teacher_hidden.shape[0] == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32) + 0 * student_hidden.sum()
    out = []
    grad = torch.is_grad_enabled() and student_hidden.requires_grad
    for i in range(0, teacher_hidden.shape[0], chunk_size):
        t, s = teacher_hidden[i : i + chunk_size], student_hidden[i : i + chunk_size]
        if grad:
            out.append(checkpoint(_chunk_kl, head, t, s, use_reentrant=False))
        else:
            out.append(_chunk_kl(head, t, s))
    return torch.cat(out)
