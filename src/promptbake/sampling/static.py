"""The CUDA sampling engine: a static KV cache, a compiled one-token decode step, and
sampling on the device.

    from promptbake.sampling import Sampling, sample
    out = sample(model, prompts, Sampling(max_new_tokens=64), pad_id=pad, eot_ids=eot,
                 engine="static")

Per call: each distinct prompt is prefilled once (eagerly, transformers' dynamic cache)
and its keys/values are copied into a transformers ``StaticCache`` for every row that
repeats it. Then one decode step feeds one token for all rows; on CUDA that step is
``torch.compile(mode="reduce-overhead")`` (a CUDA graph: one launch per step), on the
CPU the same function runs eagerly, so tests cover the same code. Temperature, top-k,
top-p, min new tokens (end-of-turn ids masked) and the end-of-turn stop all run on the
device; the host asks "are all rows done?" only every ``CHECK_EVERY`` steps.

Few shapes reach the compiler: prompts are left-padded to a multiple of
``PROMPT_MULTIPLE``, the cache length is prompt + new tokens rounded up likewise, the rows
to a multiple of 8 (filler rows repeat the first prompt; their output is dropped), and a
cache already built for at most twice the rows and up to ``PROMPT_MULTIPLE * 4`` more
slots is reused (it stays on the model between calls, as generate's own static cache does).

Models whose attention this engine cannot mask with a plain [B, 1, 1, slots] mask (flash
attention, sliding-window layers) are handed to the hf engine with a warning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import StaticCache

from ..errors import UserError, warn
from ..models import cache_arg
from ..schema import cut_at_end_of_turn, group_identical
from . import hf as engine_hf
from .hf import left_pad
from .seam import Samples, Sampling

RETURNS = "full"  # every row's [n_i, V] log-probs (sampling.seam.returns)

PROMPT_MULTIPLE = 64
ROW_MULTIPLE = 8
CHECK_EVERY = 16  # steps between the host's "all rows done?" reads (one sync each)


def filter_scores(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """[B, V] logits -> [B, V] float32 scores at `temperature` with the tokens outside
    top-k, then outside the top-p nucleus, set to -inf (the order and the ties of
    transformers' TopK and TopP warpers; at least one token always survives)."""
    scores = logits.float() / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def draw(logits: torch.Tensor, settings: Sampling, banned: torch.Tensor | None) -> torch.Tensor:
    """One token per row [B] from [B, V] raw logits, without leaving the device.

    `banned` ids (end-of-turn before min_new_tokens) are excluded. Sampling picks
    argmax(p / E) with E ~ Exp(1) i.i.d., which selects token i with probability p_i
    (the exponential race): no multinomial, no host round trip, graph-capturable.
    """
    logits = logits.float()
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    if not settings.temperature:
        return logits.argmax(-1)
    probs = filter_scores(logits, settings.temperature, settings.top_k, settings.top_p).softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def supported(model) -> bool:
    """Whether a [B, 1, 1, slots] mask is all this model's attention needs."""
    config = model.config.get_text_config(decoder=True)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    return getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager") and not sliding


def forward_step(model, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, cache, key: str):
    """One decode step: ids, pos [B, 1]; slots [B, M] bool (cache slots each row may
    read, its new token's slot included) -> next-token logits [B, V], model dtype.
    The token's keys/values land in slot ``cumulative_length`` of every cache layer."""
    mask = slots[:, None, None, :]
    if model.config._attn_implementation == "eager":  # an additive float mask there
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    out = model(
        input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **{key: cache}
    )
    return out.logits[:, -1]


@functools.cache
def compiled_step():
    """The decode step as one CUDA graph (compiled on first use, per shape)."""
    return torch.compile(forward_step, mode="reduce-overhead", dynamic=False)


def run_step(step, *args):
    """(logits, the step to use next): a compiled step that fails to compile (an
    unsupported model or torch version) falls back to the eager step, once, with a
    warning, instead of ending the run; out-of-memory errors still propagate."""
    try:
        return step(*args), step
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # torch._dynamo / inductor errors have no common base class
        if step is forward_step:
            raise
        warn(f"compiling the decode step failed ({type(e).__name__}); decoding eagerly")
        return forward_step(*args), forward_step


@dataclass
class HeldCache:
    cache: StaticCache
    rows: int
    length: int


def release(model) -> None:
    """Drop the static cache held on `model` (sampling.release)."""
    if getattr(model, "_promptbake_static_cache", None) is not None:
        model._promptbake_static_cache = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def static_cache(model, rows: int, length: int) -> HeldCache:
    """The model's static cache if one of close shape exists (no new graph), else a new one."""
    held = getattr(model, "_promptbake_static_cache", None)
    if held is not None and rows <= held.rows <= 2 * rows:
        if length <= held.length <= length + 4 * PROMPT_MULTIPLE:
            return held
    held = None  # free the old cache before allocating the new one
    model._promptbake_static_cache = None
    rows = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
    held = HeldCache(StaticCache(config=model.config, max_cache_len=length), rows, length)
    model._promptbake_static_cache = held
    return held


def prefill(model, prompts: list[list[int]], pad_id: int, held: HeldCache):
    """Prefill each distinct prompt once and copy its keys/values into the static cache
    for every row that repeats it; return the first logits [B, V], the rows' real
    lengths [B] and the slots mask [B, M] (True on each row's real prompt slots)."""
    group, reps = group_identical([tuple(p) for p in prompts])
    ids, mask = left_pad([prompts[r] for r in reps], pad_id, PROMPT_MULTIPLE)
    ids, mask = ids.to(model.device), mask.to(model.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
    key = cache_arg(model.get_decoder())
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    g = torch.tensor(group, device=model.device)
    width, rows = ids.shape[1], len(prompts)
    keep = mask.bool()[g][:, None, :, None]  # pad slots hold zeros, never stale NaN
    for st, dyn in zip(held.cache.layers, getattr(out, key).layers):
        if not st.is_initialized:
            shape = (rows, *dyn.keys.shape[1:])
            st.lazy_initialization(dyn.keys[:1].expand(shape), dyn.values[:1].expand(shape))
        st.keys.zero_()
        st.values.zero_()
        st.keys[:, :, :width] = torch.where(keep, dyn.keys[g], 0)
        st.values[:, :, :width] = torch.where(keep, dyn.values[g], 0)
        st.cumulative_length.fill_(width)
    slots = torch.zeros(rows, held.length, dtype=torch.bool, device=model.device)
    slots[:, :width] = mask.bool()[g]
    return out.logits[:, -1][g], mask.sum(-1)[g], slots


@torch.no_grad()
def decode(model, prompts, settings: Sampling, *, pad_id: int, eot_ids: list[int], keep_lp: bool):
    """Sample one batch: (new ids per row, [n_i, V] float32 CPU log-probs or None)."""
    n, new_max = len(prompts), settings.max_new_tokens
    width = -(-max(len(p) for p in prompts) // PROMPT_MULTIPLE) * PROMPT_MULTIPLE
    need = width + -(-max(new_max, 1) // PROMPT_MULTIPLE) * PROMPT_MULTIPLE
    held = static_cache(model, n, need)
    rows = prompts + [prompts[0]] * (held.rows - n)  # filler rows share the first prefill
    logits, lens, slots = prefill(model, rows, pad_id, held)
    device, key = model.device, cache_arg(model.get_decoder())
    step = compiled_step() if device.type == "cuda" and settings.compile else forward_step
    eot = torch.tensor(eot_ids, device=device)
    toks = torch.full((held.rows, max(new_max, 1)), pad_id, device=device)
    done = torch.zeros(held.rows, dtype=torch.bool, device=device)
    pos = lens[:, None].clone()
    kept = (
        torch.empty(n, new_max, logits.shape[-1], dtype=logits.dtype, device=device)
        if keep_lp
        else None
    )
    steps = new_max
    for t in range(new_max):
        if kept is not None:
            kept[:, t] = logits[:n]
        tok = draw(logits, settings, eot if t < settings.min_new_tokens else None)
        tok = torch.where(done, pad_id, tok)
        toks[:, t] = tok
        done |= torch.isin(tok, eot)
        if t + 1 == new_max or ((t + 1) % CHECK_EVERY == 0 and bool(done.all())):
            steps = t + 1
            break
        slots[:, width + t] = True
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits, step = run_step(step, model, tok[:, None], pos, slots, held.cache, key)
        pos += 1
    new = [cut_at_end_of_turn(r, eot_ids) for r in toks[:n, :steps].tolist()]
    if kept is None:
        return new, None
    return new, [kept[i, : len(r)].float().log_softmax(-1).cpu() for i, r in enumerate(new)]


def sample(
    model,
    prompts: list[list[int]],
    settings: Sampling,
    *,
    pad_id: int,
    eot_ids: list[int],
    return_logprobs: bool = False,
) -> Samples:
    """The engine entry point (see sampling.Engine). On CUDA out-of-memory the batch is
    sampled in two halves, recursively, with a warning."""
    if not supported(model):
        warn("the static engine needs sdpa or eager attention without sliding windows: using hf")
        return engine_hf.sample(
            model,
            prompts,
            settings,
            pad_id=pad_id,
            eot_ids=eot_ids,
            return_logprobs=return_logprobs,
        )
    kw = dict(pad_id=pad_id, eot_ids=eot_ids, return_logprobs=return_logprobs)
    try:
        new, lps = decode(
            model, prompts, settings, pad_id=pad_id, eot_ids=eot_ids, keep_lp=return_logprobs
        )
        return Samples(new, lps)
    except torch.cuda.OutOfMemoryError:
        if len(prompts) == 1:
            raise UserError(
                "CUDA out of memory generating one sequence: lower --max_sequence_length"
            ) from None
    # outside the except block, so the failed attempt's tensors are already freed
    release(model)
    warn(f"CUDA out of memory at {len(prompts)} sequences: splitting the batch in two")
    half = (len(prompts) + 1) // 2
    a = sample(model, prompts[:half], settings, **kw)
    b = sample(model, prompts[half:], settings, **kw)
    lps = None if a.logprobs is None else a.logprobs + b.logprobs
    return Samples(a.new_ids + b.new_ids, lps)
