"""The baking objective: full-vocabulary KL(P_teacher || P_student) per generated token.

The teacher is the model WITH the prompt (adapter off), the student the model
WITHOUT the prompt (adapter on). Everything here is a pure function of tensors.

    token_kl(t_logits [N, V], s_logits [N, V])              -> [N]   reference, full logits
    masked_kl(t_logits [B, T, V], s_logits [B, T, V], m [B, T]) -> mean over m, per-seq sums
    chunked_kl(t_hidden [N, H], s_hidden [N, H], head, chunk) -> [N]   memory-bounded
    fused_kl(s_hidden [N, H], weight [V, H], teacher_logp, chunk) -> [N]   the fast path

``chunked_kl`` never materializes the [N x V] float32 logits for teacher and student
at once: it projects ``chunk`` rows at a time through the LM head and checkpoints each
chunk, so backward recomputes the chunk instead of keeping it. With Qwen3's 151,936
entries, 32 x 400 rows are 7.8 GB per float32 copy; a 1024-row chunk is 0.6 GB.

``fused_kl`` is the same loss when the LM head is a frozen bias-free linear layer (the
usual case: LoRA never touches it). The gradient of KL(p || softmax(s)) w.r.t. the
student's logits s is simply ``q - p``, so while a chunk's logits exist in the forward
pass it also computes the gradient w.r.t. the hidden states, ``(q - p) @ W``, and keeps
only that [N, H] tensor. Backward then just scales it by the upstream gradient: two LM
head matmuls per chunk instead of the checkpointed path's three, and one softmax instead
of two (the same trick as fused linear + cross-entropy kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) for each row, computed in float32.

    Shapes: [..., V], [..., V] -> [...]. Gradients flow to the student only if it
    requires grad; the teacher is treated as a constant target.
    """
    t = teacher_logits.float().log_softmax(-1)
    return kl_from_logprobs(t, student_logits.float().log_softmax(-1))


def kl_from_logprobs(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) from normalized log-probs: [..., V], [..., V] -> [...]."""
    p = teacher_logp.exp()
    # p * (t - s), written with xlogy so that entries where p_teacher == 0 give exactly 0
    return (torch.special.xlogy(p, p) - p * student_logp).sum(-1)


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

    Shapes: [N, H], [N, H] -> [N]. `head` maps [n, H] -> [n, V] (the LM head). Peak
    memory is O(chunk_size x V) instead of O(N x V): a frozen linear head goes through
    `fused_kl`, any other head checkpoints each chunk (backward recomputes it).
    """
    if teacher_hidden.shape[0] == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32) + 0 * student_hidden.sum()
    if can_fuse(head):

        def teacher_logp(i: int, j: int) -> torch.Tensor:
            with torch.no_grad():
                return head(teacher_hidden[i:j]).float().log_softmax(-1)

        return fused_kl(student_hidden, head.weight, teacher_logp, chunk_size)
    out = []
    grad = torch.is_grad_enabled() and student_hidden.requires_grad
    for i in range(0, teacher_hidden.shape[0], chunk_size):
        t, s = teacher_hidden[i : i + chunk_size], student_hidden[i : i + chunk_size]
        if grad:
            out.append(checkpoint(_chunk_kl, head, t, s, use_reentrant=False))
        else:
            out.append(_chunk_kl(head, t, s))
    return torch.cat(out)


def can_fuse(head) -> bool:
    """Whether `head` is a frozen, bias-free linear layer, the case `fused_kl` handles
    (a trained or wrapped head takes the checkpointed autograd path)."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and type(head.weight) in (torch.Tensor, torch.nn.Parameter)
    )


class _FusedKL(torch.autograd.Function):
    """Per-row KL [N] whose gradient w.r.t. the student's hidden states is computed in
    the forward pass, chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, s_hidden, weight, teacher_logp, chunk_size):
        n = s_hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=s_hidden.device)
        grad = torch.empty_like(s_hidden) if ctx.needs_input_grad[0] else None
        for i in range(0, n, chunk_size):
            j = min(i + chunk_size, n)
            s_logp = (s_hidden[i:j] @ weight.T).float().log_softmax(-1)
            t_logp = teacher_logp(i, j)
            out[i:j] = kl_from_logprobs(t_logp, s_logp)
            if grad is not None:
                # d KL / d logits = q - p (the rows of p sum to 1)
                grad[i:j] = (s_logp.exp_().sub_(t_logp.exp())).to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype)[:, None], None, None, None


def fused_kl(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logp: Callable[[int, int], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-row KL(teacher || softmax(student_hidden @ weight.T)), its gradient
    precomputed chunk by chunk.

    Shapes: [N, H], [V, H] -> [N]. ``teacher_logp(i, j)`` returns the teacher's
    normalized float32 log-probs of rows i..j-1, [j - i, V] (computed from the teacher's
    hidden states, or read from a cache). ``weight`` is a frozen LM head's weight; it
    gets no gradient. Equals ``token_kl`` on the full logits, value and gradient.
    """
    if student_hidden.shape[0] == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32) + 0 * student_hidden.sum()
    return _FusedKL.apply(student_hidden, weight.detach(), teacher_logp, chunk_size)


# ---------------------------------------------------------------- cached teacher targets
@dataclass
class TeacherTarget:
    """The teacher's distributions at a batch's KL rows, in the batch's row order.

    exact: ``logp`` [n, V] log-probabilities. top-k: ``logp`` [n, k] top-k
    log-probabilities, ``idx`` [n, k] their token ids, ``log_tail`` [n] log of the
    teacher's mass outside them (-inf when there is none).
    """

    logp: torch.Tensor
    idx: torch.Tensor | None = None
    log_tail: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.logp.shape[0]

    def to(self, device) -> TeacherTarget:
        return TeacherTarget(*(None if t is None else t.to(device) for t in self._parts()))

    def slice(self, start: int, stop: int) -> TeacherTarget:
        return TeacherTarget(*(None if t is None else t[start:stop] for t in self._parts()))

    def _parts(self) -> tuple:
        return (self.logp, self.idx, self.log_tail)


def topk_kl(
    logp: torch.Tensor, idx: torch.Tensor, log_tail: torch.Tensor, student_logits: torch.Tensor
) -> torch.Tensor:
    """KL between teacher and student with everything outside the teacher's top-k
    merged into one "tail" bin (an approximation and a lower bound of the full KL).

    Shapes: [n, k], [n, k], [n], [n, V] -> [n]. Exact when ``log_tail`` is -inf.
    """
    s = student_logits.float().log_softmax(-1)
    s_top = s.gather(1, idx.long())
    p = logp.exp()
    head = (p * (logp - s_top)).sum(-1)
    # student mass outside the teacher's top-k, in log space; clamped so an (almost)
    # empty tail gives a finite value and a zero gradient instead of log(0)
    log_q_tail = torch.log((-torch.expm1(torch.logsumexp(s_top, -1))).clamp(min=1e-30))
    p_tail = log_tail.exp()
    tail = torch.where(p_tail > 0, p_tail * (log_tail - log_q_tail), torch.zeros_like(p_tail))
    return head + tail


def _cached_chunk_kl(head: Callable, s_hidden, logp, idx, log_tail) -> torch.Tensor:
    # The target may live on the CPU: it moves to the device here, one chunk at a time,
    # so checkpointing keeps only the CPU views, not every chunk's copy on the device.
    dev = s_hidden.device
    logp, idx, log_tail = (None if t is None else t.to(dev) for t in (logp, idx, log_tail))
    s_logits = head(s_hidden)
    if idx is None:
        return token_kl(logp, s_logits)  # log-probs are valid logits: the same maths
    return topk_kl(logp, idx, log_tail, s_logits)


def cached_kl(
    target: TeacherTarget,
    student_hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-row KL [N] of the student (hidden states [N, H] through `head`) against a
    cached teacher; chunked like ``loss.chunked_kl`` (fused for an exact cache and a
    frozen linear head, checkpointed otherwise)."""
    if len(target) != student_hidden.shape[0]:
        raise ValueError(f"{len(target)} cached teacher rows for {student_hidden.shape[0]} rows")
    if student_hidden.shape[0] == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32) + 0 * student_hidden.sum()
    if target.idx is None and can_fuse(head):
        dev = student_hidden.device

        def teacher_logp(i: int, j: int) -> torch.Tensor:
            return target.logp[i:j].to(dev, torch.float32)

        return fused_kl(student_hidden, head.weight, teacher_logp, chunk_size)
    grad = torch.is_grad_enabled() and student_hidden.requires_grad
    out = []
    for i in range(0, student_hidden.shape[0], chunk_size):
        t = target.slice(i, i + chunk_size)
        args = (head, student_hidden[i : i + chunk_size], t.logp, t.idx, t.log_tail)
        if grad:
            out.append(checkpoint(_cached_chunk_kl, *args, use_reentrant=False))
        else:
            out.append(_cached_chunk_kl(*args))
    return torch.cat(out)
