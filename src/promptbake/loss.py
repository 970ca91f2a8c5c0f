"""The divergences: P_teacher against P_student at each generated token, pure functions.

The teacher is the model WITH the prompt (adapter off), the student the model
WITHOUT the prompt (adapter on). Everything here is a pure function of tensors.

    divergence(s_hidden [N, H], head, target, chunk, kind, beta) -> [N]   the one entry
    DIVERGENCES / DIVERGENCE_NAMES   forward_kl (default), reverse_kl, jsd
    forward_kl / reverse_kl / jsd(t_logp [N, V], s_logp [N, V], beta) -> [N]  (+ *_grad)
    check_divergence(kind, beta)     UserError on a bad name or beta
    TeacherTarget                    the teacher: hidden [N, H] | log-probs [N, V] | top-k
    coarse_logprobs(target, s_logp)  the (k + 1)-bin view of a top-k target
    can_fuse(head)                   whether the fused gradient applies
    token_kl(t_logits [N, V], s_logits [N, V])                 -> [N]   reference
    kl_from_logprobs(a_logp [N, V], b_logp [N, V])             -> [N]   KL(A || B)
    masked_kl(t_logits [B, T, V], s_logits [B, T, V], m [B, T]) -> mean over m, per-seq

``divergence`` never materializes [N x V] float32 logits at once: it projects
``chunk`` rows at a time through the LM head (the teacher's hidden states too, under
no_grad; a cached target moves to the device one chunk at a time). With Qwen3's
151,936 entries, 32 x 400 rows are 7.8 GB per float32 copy; a 1024-row chunk is 0.6 GB.

When the LM head is a frozen bias-free linear layer (the usual case: LoRA never
touches it) the loss is *fused*: while a chunk's logits exist in the forward pass it
also computes the gradient w.r.t. the student's logits (closed form per divergence,
e.g. ``q - p`` for forward KL; autograd on the chunk for the top-k bins) and from it
the gradient w.r.t. the hidden states, ``grad_logits @ W``, keeping only that [N, H]
tensor. Backward then just scales it by the upstream gradient: two LM head matmuls
per chunk instead of three (the same trick as fused linear + cross-entropy kernels).
Any other head checkpoints each chunk (backward recomputes it).

Top-k targets keep only the teacher's k most likely tokens and the log of the mass
outside them (the tail). The divergence is then taken between the two coarse
(k + 1)-bin distributions, the top-k bins plus one tail bin (the student's tail is its
mass outside the teacher's top-k): exact when the teacher has no tail, otherwise a
lower bound on the full divergence (data processing; every divergence here is an
f-divergence).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .errors import UserError

Head = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- reference forms
def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) for each row, computed in float32.

    Shapes: [..., V], [..., V] -> [...]. Gradients flow to the student only if it
    requires grad; the teacher is treated as a constant target.
    """
    t = teacher_logits.float().log_softmax(-1)
    return kl_from_logprobs(t, student_logits.float().log_softmax(-1))


def kl_from_logprobs(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """KL(A || B) = sum_v a_v (log a_v - log b_v) from normalized log-probs.

    Shapes: [..., V], [..., V] -> [...]. Entries where a_v == 0 give exactly 0 (as
    xlogy does), also where b_v == 0 too, in value and gradient; a_v > 0 with
    b_v == 0 gives inf, as it should. Differentiable in both arguments.
    """
    a = a_logp.exp()
    # a - b is nan where both are -inf; `where` drops it, and its gradient, there.
    # einsum sums the products without a third [..., V] tensor: one copy less per chunk
    return torch.einsum("...v,...v->...", a, torch.where(a > 0, a_logp - b_logp, 0.0))


def _terms(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """a (log a - log b) elementwise, exactly 0 where a == 0."""
    a = a_logp.exp()
    # a - b is nan where both are -inf; `where` drops it, and its gradient, there
    return a * torch.where(a > 0, a_logp - b_logp, 0.0)


def masked_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KL over positions where `mask` is true, and the per-sequence KL sums.

    Shapes: [B, T, V], [B, T, V], [B, T] -> scalar, [B]. An all-false mask gives 0
    (not NaN). This is the plain full-logit form; training uses `divergence` on the
    selected rows, and tests check the two agree.
    """
    m = mask.bool()
    kl = token_kl(teacher_logits, student_logits) * m
    per_seq = kl.sum(-1)
    return per_seq.sum() / m.sum().clamp(min=1), per_seq


# ---------------------------------------------------------------- the divergences
# Each takes the teacher's and the student's normalized float32 log-probs t, s
# [n, V] and beta, and returns [n]; each `*_grad` is d value / d student LOGITS [n, V]
# (s = log_softmax(logits)), used by the fused path on full distributions.
def forward_kl(t: torch.Tensor, s: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(P_teacher || P_student), the paper's objective (mode-covering)."""
    return kl_from_logprobs(t, s)


def forward_kl_grad(t: torch.Tensor, s: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    return s.exp().sub_(t.exp())  # q - p (the rows of p sum to 1); in place: one less copy


def reverse_kl(t: torch.Tensor, s: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(P_student || P_teacher) (mode-seeking)."""
    return kl_from_logprobs(s, t)


def reverse_kl_grad(t: torch.Tensor, s: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    terms = _terms(s, t)  # q (log q - log p)
    return terms - s.exp() * terms.sum(-1, keepdim=True)  # q (log q - log p - KL)


def _mixture_logp(t: torch.Tensor, s: torch.Tensor, beta: float) -> torch.Tensor:
    """log M, M = beta P_teacher + (1 - beta) P_student, for 0 < beta < 1."""
    return torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))


def jsd(t: torch.Tensor, s: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (TRL's convention):

        M = beta P_teacher + (1 - beta) P_student
        JSD_beta = beta KL(P_teacher || M) + (1 - beta) KL(P_student || M)

    beta = 0 is defined as forward KL(P_teacher || P_student) and beta = 1 as reverse
    KL(P_student || P_teacher). The formula above tends to 0 at both ends (M becomes
    the other distribution and its weight vanishes), which is why the ends are
    special-cased; beta = 0.5 is the symmetric JSD (at most log 2).
    """
    if beta <= 0.0:
        return forward_kl(t, s)
    if beta >= 1.0:
        return reverse_kl(t, s)
    m = _mixture_logp(t, s, beta)
    return beta * kl_from_logprobs(t, m) + (1 - beta) * kl_from_logprobs(s, m)


def jsd_grad(t: torch.Tensor, s: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    if beta <= 0.0:
        return forward_kl_grad(t, s)
    if beta >= 1.0:
        return reverse_kl_grad(t, s)
    # d JSD / d log q_v = (1 - beta) q_v (log q_v - log m_v); through the softmax:
    # (1 - beta) (q r - q sum(q r)) with r = log q - log m
    qr = _terms(s, _mixture_logp(t, s, beta))
    return (1 - beta) * (qr - s.exp() * qr.sum(-1, keepdim=True))


@dataclass(frozen=True)
class Divergence:
    """A per-row divergence ``value(t, s, beta) -> [n]`` from normalized log-probs
    [n, V], and its gradient w.r.t. the student's logits ``grad(t, s, beta) -> [n, V]``."""

    value: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    grad: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


# Adding a divergence: a value, its logit gradient, an entry here (the config's
# --divergence choices are DIVERGENCE_NAMES).
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl, forward_kl_grad),
    "reverse_kl": Divergence(reverse_kl, reverse_kl_grad),
    "jsd": Divergence(jsd, jsd_grad),
}
DIVERGENCE_NAMES: list[str] = list(DIVERGENCES)


def check_divergence(kind: str, beta: float = 0.5) -> None:
    """Raise UserError for an unknown divergence name or a beta outside [0, 1]."""
    if kind not in DIVERGENCES:
        raise UserError(f"--divergence {kind!r} is not one of: {', '.join(DIVERGENCE_NAMES)}")
    if not 0.0 <= float(beta) <= 1.0:
        raise UserError(f"--jsd_beta {beta} is outside [0, 1]: 0 is forward KL, 1 reverse KL")


# ---------------------------------------------------------------- the teacher target
@dataclass
class TeacherTarget:
    """The teacher's distributions at a batch's KL rows, in the batch's row order.

    One of three forms (``kind``):
    hidden: ``hidden`` [n, H] final hidden states, projected through the student's
    (frozen) head chunk by chunk under no_grad. exact: ``logp`` [n, V]
    log-probabilities (a cache; may live on the CPU). topk: ``logp`` [n, k] top-k
    log-probabilities, ``idx`` [n, k] their token ids, ``log_tail`` [n] log of the
    teacher's mass outside them (-inf when there is none).
    """

    logp: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    log_tail: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def __post_init__(self):
        if (self.hidden is None) == (self.logp is None):
            raise ValueError("a TeacherTarget holds either hidden states or log-probs")
        if (self.idx is None) != (self.log_tail is None):
            raise ValueError("a top-k TeacherTarget needs both idx and log_tail")

    @property
    def kind(self) -> str:
        """ "hidden", "exact" or "topk"."""
        if self.hidden is not None:
            return "hidden"
        return "exact" if self.idx is None else "topk"

    def __len__(self) -> int:
        return (self.logp if self.hidden is None else self.hidden).shape[0]

    def to(self, device) -> TeacherTarget:
        return TeacherTarget(*(None if t is None else t.to(device) for t in self._parts()))

    def slice(self, start: int, stop: int) -> TeacherTarget:
        return TeacherTarget(*(None if t is None else t[start:stop] for t in self._parts()))

    def _parts(self) -> tuple:
        return (self.logp, self.idx, self.log_tail, self.hidden)


def coarse_logprobs(
    target: TeacherTarget, student_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (k + 1)-bin log-probs of teacher and student for a top-k target: the
    teacher's top-k tokens, then one tail bin for everything else.

    Shapes: top-k target of n rows, [n, V] -> [n, k + 1], [n, k + 1]. Where the
    teacher has no tail (log_tail = -inf) the bin is empty on both sides (exact when
    k = V; with k < V it ignores student mass where the teacher has none).
    """
    s_top = student_logp.gather(1, target.idx.long())
    # the student's mass outside the teacher's top-k, in log space; clamped so an
    # (almost) empty tail gives a finite value and a zero gradient instead of log(0)
    log_q_tail = torch.log((-torch.expm1(torch.logsumexp(s_top, -1))).clamp(min=1e-30))
    log_tail = target.log_tail.float()
    log_q_tail = torch.where(log_tail.exp() > 0, log_q_tail, float("-inf"))
    t = torch.cat([target.logp.float(), log_tail[:, None]], 1)
    return t, torch.cat([s_top, log_q_tail[:, None]], 1)


def _teacher_logp(target: TeacherTarget, head: Head, device) -> torch.Tensor:
    """Normalized float32 teacher log-probs [n, V] of a hidden or exact target chunk."""
    if target.kind == "hidden":
        with torch.no_grad():
            return head(target.hidden.to(device)).float().log_softmax(-1)
    return target.logp.to(device, torch.float32)


def _chunk_value(
    s_logits: torch.Tensor, target: TeacherTarget, head: Head, div: Divergence, beta: float
) -> torch.Tensor:
    """The divergence [n] of one chunk: student logits [n, V] against its target rows
    (still where the caller keeps them: moved to the logits' device here)."""
    s = s_logits.float().log_softmax(-1)
    if target.kind == "topk":
        t, s = coarse_logprobs(target.to(s.device), s)
    else:
        t = _teacher_logp(target, head, s.device)
    return div.value(t, s, beta)


def _fused_chunk(
    s_hidden: torch.Tensor, head: Head, target: TeacherTarget, div: Divergence, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the fused path: the divergence [n] and its gradient w.r.t. the
    student's hidden states [n, H], from the gradient w.r.t. its logits (the closed
    form on full distributions, autograd through the top-k bins). The logits are made
    here and dropped as soon as their log-softmax exists: one [n, V] copy less."""
    weight = head.weight.detach()
    if target.kind == "topk":
        with torch.enable_grad():
            z = (s_hidden @ weight.T).float().requires_grad_()
            value = _chunk_value(z, target, head, div, beta)
            (grad,) = torch.autograd.grad(value.sum(), z)
        return value.detach(), grad.to(weight.dtype) @ weight
    s = (s_hidden @ weight.T).float().log_softmax(-1)
    t = _teacher_logp(target, head, s.device)
    value = div.value(t, s, beta)
    return value, div.grad(t, s, beta).to(weight.dtype) @ weight


# ---------------------------------------------------------------- the one entry
def can_fuse(head) -> bool:
    """Whether `head` is a frozen, bias-free linear layer, the case the fused path
    handles (a trained or wrapped head takes the checkpointed autograd path)."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and type(head.weight) in (torch.Tensor, torch.nn.Parameter)
    )


class _Fused(torch.autograd.Function):
    """Per-row divergence [N] whose gradient w.r.t. the student's hidden states is
    computed in the forward pass, chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, s_hidden, head, target, chunk_size, div, beta):
        n = s_hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=s_hidden.device)
        grad = torch.empty_like(s_hidden)
        for i in range(0, n, chunk_size):
            j = min(i + chunk_size, n)
            out[i:j], grad[i:j] = _fused_chunk(s_hidden[i:j], head, target.slice(i, j), div, beta)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype)[:, None], None, None, None, None, None


def _checkpointed(
    s_hidden: torch.Tensor,
    head: Head,
    target: TeacherTarget,
    chunk_size: int,
    div: Divergence,
    beta: float,
    grad: bool,
) -> torch.Tensor:
    """Chunk by chunk through autograd, each chunk checkpointed when `grad`."""
    out = []
    for i in range(0, s_hidden.shape[0], chunk_size):
        # the target chunk stays where it is (a CPU cache stays on the CPU): checkpoint
        # keeps only that view, and _chunk_value moves it to the device
        s, t = s_hidden[i : i + chunk_size], target.slice(i, i + chunk_size)
        if grad:
            out.append(checkpoint(_head_value, head, s, t, div, beta, use_reentrant=False))
        else:
            out.append(_head_value(head, s, t, div, beta))
    return torch.cat(out)


def _head_value(head: Head, s_hidden, target: TeacherTarget, div: Divergence, beta: float):
    return _chunk_value(head(s_hidden), target, head, div, beta)


def divergence(
    student_hidden: torch.Tensor,
    head: Head,
    target: TeacherTarget,
    chunk_size: int = 1024,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence between the teacher and softmax(head(student_hidden)).

    Shapes: student_hidden [N, H], ``head`` maps [n, H] -> [n, V] (the LM head),
    ``target`` N rows in any of its forms (TeacherTarget) -> [N] float32. ``kind``
    names an entry of DIVERGENCES (forward_kl = KL(teacher || student), the default;
    reverse_kl; jsd with ``beta``, see :func:`jsd`). Peak memory is O(chunk_size x V).
    A frozen bias-free linear head takes the fused path, any other the checkpointed
    one (same values and gradients); the teacher never gets a gradient. N = 0 gives
    an empty result still attached to the graph.
    """
    check_divergence(kind, beta)
    if len(target) != student_hidden.shape[0]:
        raise ValueError(f"{len(target)} teacher rows for {student_hidden.shape[0]} student rows")
    if student_hidden.shape[0] == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32) + 0 * student_hidden.sum()
    div, beta = DIVERGENCES[kind], float(beta)
    grad = torch.is_grad_enabled() and student_hidden.requires_grad
    # the logits and the divergence in the head's own dtype, even inside a caller's
    # mixed-precision forward: a bf16 log-softmax over the vocabulary would be the loss
    with torch.autocast(student_hidden.device.type, enabled=False):
        if grad and can_fuse(head):
            return _Fused.apply(student_hidden, head, target, chunk_size, div, beta)
        return _checkpointed(student_hidden, head, target, chunk_size, div, beta, grad)
