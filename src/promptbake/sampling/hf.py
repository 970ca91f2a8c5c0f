"""The first sampling engine: transformers' ``generate`` (any model, any device).

    from promptbake.sampling import Sampling, sample
    out = sample(model, prompts, Sampling(max_new_tokens=64), pad_id=pad, eot_ids=eot,
                 engine="hf")

Rows are left-padded into one batch; each distinct prompt's KV cache is computed once
and shared by the rows that repeat it (:func:`shared_prefill`). With
``return_logprobs`` the model's own raw next-token log-probs at every kept token come
back too (the teacher's targets, teacher.cache_from_generation). On CUDA out-of-memory
the batch is generated in two halves, recursively, with a warning.
"""

from __future__ import annotations

import torch

from ..errors import UserError, warn
from ..models import cache_arg
from ..schema import cut_at_end_of_turn, group_identical
from .seam import Samples, Sampling

RETURNS = "full"  # every row's [n_i, V] log-probs (sampling.seam.returns)


def left_pad(
    seqs: list[list[int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a [B, L] id tensor; the mask marks real tokens by position, not by value.
    `multiple` rounds L up (a static cache then sees few distinct shapes: few recompiles)."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of every prompt but its last token, computed once per DISTINCT
    prompt and repeated for the rows that share it; None when no two rows share one.

    A batch holds --num_sequences_per_question copies of each prompt, so the prompt
    pass (most of a short answer's cost) runs once per question instead of once per
    sample. ``generate`` continues from the cache with the same positions and mask, so
    the samples are those of a plain call, up to float rounding.
    """
    if ids.shape[1] < 2:
        return None
    # each row's distinct prompt; each distinct prompt's first row
    group, reps = group_identical([tuple(row) for row in ids.tolist()])
    if len(reps) == ids.shape[0]:
        return None
    pre, pre_mask = ids[reps, :-1], mask[reps, :-1]
    # left padding: positions count real tokens, as generate() computes them
    pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    key = cache_arg(decoder)
    out = decoder(input_ids=pre, attention_mask=pre_mask, position_ids=pos, use_cache=True)
    cache = getattr(out, key)
    cache.batch_select_indices(torch.tensor(group, device=ids.device))
    return cache


@torch.no_grad()
def sample_batch(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eot_ids: list[int],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    return_logprobs: bool = False,
    **sampling,
):
    """Generate one mixed batch; return each row's new ids, cut after the first end-of-turn.

    With ``return_logprobs``, also each row's [n_i, V] float32 CPU log-probs of the
    model's own (temperature 1, unprocessed) next-token distribution at its n_i kept
    tokens: exactly the teacher's targets at those positions, a by-product of sampling
    (teacher.cache_from_generation). On CUDA out-of-memory the batch is generated in
    two halves (recursively) with a warning, instead of crashing (the guide's
    "CUDA out of memory" remedy without changing --batch_size).
    """
    static = sampling.get("cache_implementation") == "static"
    ids, mask = left_pad(prompts, pad_id, 64 if static else 1)
    ids, mask = ids.to(model.device), mask.to(model.device)
    try:
        extra = {}
        cache = None if static else shared_prefill(model, ids, mask)
        if cache is not None:
            extra[cache_arg(model.get_decoder())] = cache
        if return_logprobs:
            extra.update(output_logits=True, return_dict_in_generate=True)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=eot_ids,
            pad_token_id=pad_id,
            **sampling,
            **extra,
        )
        cache = None
        seqs = out.sequences if return_logprobs else out
        new = [cut_at_end_of_turn(row, eot_ids) for row in seqs[:, ids.shape[1] :].tolist()]
        if not return_logprobs:
            return new
        steps = torch.stack(out.logits, 1)  # [B, steps, V], raw logits
        logps = [steps[i, : len(n)].float().log_softmax(-1).cpu() for i, n in enumerate(new)]
        return new, logps
    except torch.cuda.OutOfMemoryError:
        if len(prompts) == 1:
            raise UserError(
                "CUDA out of memory generating one sequence: lower --max_sequence_length"
            ) from None
    # outside the except block, so the failed attempt's tensors are already freed
    ids = mask = cache = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = (len(prompts) + 1) // 2
    warn(f"CUDA out of memory at {len(prompts)} sequences: splitting the batch in two")
    kw = dict(pad_id=pad_id, eot_ids=eot_ids, max_new_tokens=max_new_tokens)
    kw.update(min_new_tokens=min_new_tokens, return_logprobs=return_logprobs, **sampling)
    a, b = sample_batch(model, prompts[:half], **kw), sample_batch(model, prompts[half:], **kw)
    if not return_logprobs:
        return a + b
    return a[0] + b[0], a[1] + b[1]


def generate_kwargs(s: Sampling) -> dict:
    """``generate`` keyword arguments for the sampling settings (greedy when
    temperature is None or 0)."""
    if not s.temperature:
        kw = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        kw = {"do_sample": True, "temperature": s.temperature}
        if s.top_p is not None:
            kw["top_p"] = s.top_p
        if s.top_k is not None:
            kw["top_k"] = s.top_k
    if s.cache_implementation == "static":  # transformers compiles it on CUDA
        kw["cache_implementation"] = "static"
        kw["disable_compile"] = not s.compile
    return kw


def sample(
    model,
    prompts: list[list[int]],
    settings: Sampling,
    *,
    pad_id: int,
    eot_ids: list[int],
    return_logprobs: bool = False,
) -> Samples:
    """The engine entry point (see sampling.Engine)."""
    out = sample_batch(
        model,
        prompts,
        pad_id=pad_id,
        eot_ids=eot_ids,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        return_logprobs=return_logprobs,
        **generate_kwargs(settings),
    )
    if return_logprobs:
        return Samples(*out)
    return Samples(out)
