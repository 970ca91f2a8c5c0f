"""A batch's loss: run teacher and student, take the divergence (loss.py) at every
generated token, backpropagate it; and the held-out KL of a set of batches.

    kl, per_seq, parts = backward_kl(model, batch, chunk_size, teacher=target,
                                     divergence="jsd", beta=0.5)

``chunk_size`` 0 picks the LM-head chunk for the device (:func:`kl_chunk_rows`). Rows,
per-sequence sums and packing plans come from the batch's host-built plans
(training.batches.Plan): nothing in a step reads a value back from the device.

:func:`batch_kl` runs the teacher (adapter off, no grad; or reads its cached target)
and the student (adapter on) and hands their hidden states to ``loss.divergence``
(forward KL by default; any name in ``loss.DIVERGENCE_NAMES``).
:func:`backward_kl` runs the SUMMED loss's backward, in row slices whose gradients add
up, and on CUDA out-of-memory retries with more slices instead of crashing.
:func:`evaluate_kl` is the held-out metric, always forward KL, with no graph.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import distributed, loss
from ..errors import UserError, warn
from ..loss import TeacherTarget
from .batches import Batch, split_batch
from .forward import adapter_disabled, base_of, hidden_states, mixed_precision

# ---------------------------------------------------------------- KL chunk size
CPU_CHUNK_ROWS = 512
CHUNK_ROWS_RANGE = (512, 8192)


def chunk_rows_for(free_bytes: int, vocab: int) -> int:
    """KL rows per LM-head chunk on a GPU with `free_bytes` free: about three float32
    [rows x vocab] copies live at once in a chunk (logits, log-probs, gradient), and
    they get at most an eighth of the free memory, within CHUNK_ROWS_RANGE."""
    rows = free_bytes // 8 // (3 * 4 * max(vocab, 1))
    lo, hi = CHUNK_ROWS_RANGE
    return int(min(hi, max(lo, rows)))


@functools.lru_cache(maxsize=8)
def _device_chunk_rows(device: torch.device, vocab: int) -> int:
    # measured once per process and device: the free memory at the first step
    free, _ = torch.cuda.mem_get_info(device)
    return chunk_rows_for(free, vocab)


def kl_chunk_rows(chunk_size: int, device, vocab: int) -> int:
    """`chunk_size` when positive (--kl_chunk_size given); 0 means auto: 512 rows off
    CUDA, on CUDA :func:`chunk_rows_for` the device's free memory."""
    if chunk_size > 0:
        return chunk_size
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_CHUNK_ROWS
    return _device_chunk_rows(device, vocab)


def batch_kl(
    model,
    batch: Batch,
    chunk_size: int = 1024,
    student_adapter: bool = True,
    *,
    teacher: TeacherTarget | None = None,
    prefix_reuse: bool = False,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence [N] between the prompted base (teacher) and the unprompted
    student, and per-sequence sums [B]; by default KL(teacher || student).

    The teacher is always the model with the adapter disabled, under no_grad. With
    ``student_adapter=False`` the student is the base model too: KL(prompted || base).
    ``teacher``: the batch's cached teacher log-probs (loss.TeacherTarget), so the teacher does
    not run; ``prefix_reuse``: teacher and student run each shared prompt prefix once
    (the prefix all rows share, then each distinct prompt; forward.prefix_reuse_hidden).
    ``divergence``, ``beta``: which divergence (loss.DIVERGENCES) and the JSD's beta.
    ``autocast``: the decoder's forwards run in this dtype (forward.mixed_precision,
    --autocast); the LM head and the divergence stay in the head's dtype.
    """

    head = base_of(model).get_output_embeddings()
    chunk_size = kl_chunk_rows(chunk_size, head.weight.device, head.weight.shape[0])
    dtype = head.weight.dtype
    amp = functools.partial(mixed_precision, head.weight.device, autocast)
    if teacher is None:
        with torch.no_grad(), adapter_disabled(model), amp():
            h = hidden_states(model, batch.prompted, prefix_reuse)
        teacher = TeacherTarget(hidden=h.to(dtype))
    ctx = contextlib.nullcontext() if student_adapter else adapter_disabled(model)
    with ctx, amp():
        s_hidden = hidden_states(model, batch.unprompted, prefix_reuse)
    kl = loss.divergence(s_hidden.to(dtype), head, teacher, chunk_size, divergence, beta)
    # the row -> sequence index was built at collation: no nonzero() read-back here
    per_seq = torch.zeros(batch.unprompted.pred_mask.shape[0], device=kl.device)
    per_seq = per_seq.index_add(0, batch.unprompted.plan.row_seq, kl.detach())
    return kl, per_seq


def backward_kl(
    model,
    batch: Batch,
    chunk_size: int = 1024,
    *,
    teacher: TeacherTarget | None = None,
    prefix_reuse: bool = False,
    parts: int = 1,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward of the batch's SUMMED divergence (``divergence``, ``beta``,
    ``autocast`` as in :func:`batch_kl`); returns (per-row values [N] detached, per-sequence sums
    [B], parts).

    The rows run in `parts` slices whose gradients add up (the same gradient as one
    pass). On CUDA out-of-memory the step is redone with twice as many slices, instead
    of crashing (the guide's \"CUDA out of memory\" remedy, without changing --batch_size); the caller
    keeps the returned `parts` for the following steps.
    """
    n = batch.prompted.input_ids.shape[0]
    head = base_of(model).get_output_embeddings()
    chunk_size = kl_chunk_rows(chunk_size, head.weight.device, head.weight.shape[0])
    while True:
        try:
            kls, seqs = [], []
            for sub, t in split_batch(batch, teacher, parts):
                kl, per_seq = batch_kl(
                    model,
                    sub,
                    chunk_size,
                    teacher=t,
                    prefix_reuse=prefix_reuse,
                    divergence=divergence,
                    beta=beta,
                    autocast=autocast,
                )
                if kl.requires_grad:
                    kl.sum().backward()
                kls.append(kl.detach())
                seqs.append(per_seq)
            return torch.cat(kls), torch.cat(seqs), parts
        except torch.cuda.OutOfMemoryError:
            kl = per_seq = kls = None  # drop the failed attempt's tensors
            for p in model.parameters():
                p.grad = None
            if batch.prompted.input_ids.device.type == "cuda":
                torch.cuda.empty_cache()
            if distributed.is_sharded(model):  # the other processes cannot follow a retry
                raise UserError(
                    "CUDA out of memory under --fsdp: use more GPUs, --gradient_checkpointing "
                    "true, a smaller --batch_size, --kl_chunk_size or --max_traj_len"
                ) from None
            if parts >= n:
                raise UserError(
                    "CUDA out of memory even with one trajectory at a time: use "
                    "--gradient_checkpointing true, a smaller --kl_chunk_size or --max_traj_len"
                ) from None
            parts = min(2 * parts, n)
            warn(f"CUDA out of memory: retrying each step in {parts} slices of the batch")


@torch.no_grad()
def evaluate_kl(
    model, batches: list[Batch], chunk_size: int = 1024, student_adapter: bool = True
) -> dict:
    """Token-mean KL(teacher || student) and mean per-sequence KL sum over batches
    (forward KL whatever the training divergence: one held-out metric for all runs);
    builds no graph."""
    n_tok, n_seq = 0, 0
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # read back once, at the end
    for b in batches:
        kl, per_seq = batch_kl(model, b.to(device), chunk_size, student_adapter)
        sums += torch.stack([kl.sum(), per_seq.sum()]).double()
        n_tok += kl.numel()
        n_seq += per_seq.numel()
    total, seq_sum = sums.tolist()
    return {"kl": total / max(n_tok, 1), "kl_seq": seq_sum / max(n_seq, 1), "tokens": n_tok}
