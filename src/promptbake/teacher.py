"""Teacher-side speed-ups for training: shared-prefix reuse and an opt-in teacher cache.

    promptbake train ... --prefix_reuse true --teacher_cache exact   # or topk
    python -m pytest tests/test_teacher.py -q

The teacher is the frozen base model reading (system prompt + question + answer). Two
facts make most of its work redundant:

* **Prefix reuse** (``--prefix_reuse``, exact). The sequences sampled for one question
  share their whole prompted prefix (system prompt + question, ``prompt_input_ids``).
  :func:`prefix_reuse_hidden` runs the decoder once per distinct prefix, keeps its KV
  cache, repeats the cache for the rows that share it and runs only the generated
  suffixes on top of it, with positions continuing after each row's own prefix. Its
  output equals ``train.selected_hidden`` (tests check 1e-5 in float32). It pays off
  when a batch holds several rows of a question: the teacher-cache pass sorts rows by
  question for that reason; in shuffled training batches rows rarely share a prefix.
* **Teacher cache** (``--teacher_cache``). The base model never changes, so its
  distributions at the generated positions are the same in every epoch. With
  ``exact``, :func:`build_teacher_cache` computes them once, before epoch 1, as float32
  log-probabilities [tokens x vocab] on the CPU, and every later step only runs the
  student: :func:`cached_kl` is ``loss.token_kl`` against the cached rows, equal to the
  uncached loss. When that table would exceed ``--teacher_cache_max_gb`` (or with
  ``topk``) only the teacher's top-k log-probs, their ids and the log of the remaining
  (tail) mass are kept, and the KL is computed against that coarser distribution:

      KL_k = sum_{i in top-k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

  where q_tail is the student's mass outside the teacher's top-k. This is an
  APPROXIMATION: it is the KL between the two distributions with the tail merged into
  one bin, a lower bound on the full KL (data processing), equal to it when the
  teacher puts no mass outside its top-k. The student's total mass outside the top-k
  is still trained (q_tail counts every such token), but not how it spreads that mass
  among them; in bench/ (SmolLM2, k=64) it ended with a visibly higher held-out KL
  than the exact cache. Use it only where the exact table does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .data import group_identical
from .errors import warn
from .loss import can_fuse, fused_kl, token_kl

# ---------------------------------------------------------------- prefix reuse


def prefix_lengths(side) -> torch.Tensor:
    """[B] length of each row's prompt: the first generated token's position.

    ``side.pred_mask[i, p]`` is true when row p predicts a generated token, so the
    first true row is the prompt's last token. Rows with no generated token count as
    all prompt.
    """
    pred = side.pred_mask.bool()
    lens = side.attention_mask.sum(1)
    has = pred.any(1)
    first = pred.int().argmax(1)
    return torch.where(has, first + 1, lens)


def prefix_groups(side, plen: torch.Tensor) -> tuple[list[int], list[int]]:
    """(group of each row, representative row of each group): rows whose prompts are
    token for token identical form one group."""
    ids = side.input_ids.tolist()
    return group_identical([tuple(row[:n]) for row, n in zip(ids, plen.tolist())])


def common_prefix_length(side, plen: torch.Tensor) -> int:
    """Tokens at the start of every row's prompt that all rows share (the system prompt
    and the chat template's header, typically), kept one token short of the shortest
    prompt so that each prompt's last token is still run per prompt."""
    ids = side.input_ids
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0).int()  # [T]: column equal in every row
    n = int(same.cumprod(0).sum())
    return max(0, min(n, int(plen.min()) - 1))


def prefix_tree(side, plen: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    """A batch as one packed "prefix tree" of tokens: (token ids, positions, segment of
    each token, parent of each segment) and the packed index of every KL row.

    Segments: the prefix every row shares (if any), then each distinct prompt's
    remainder (child of the shared prefix), then each row's answer (child of its
    prompt). A token's position is its position in its own row, so every token sees
    exactly its row's earlier tokens once :func:`tree_mask` is applied.
    """
    ids, lens, pred = side.input_ids.tolist(), side.attention_mask.sum(1).tolist(), side.pred_mask
    plen_l = plen.tolist()
    group, reps = prefix_groups(side, plen)
    C = common_prefix_length(side, plen)
    toks: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    parent: list[int] = []
    start: list[int] = []

    def add(span: list[int], first: int, up: int) -> int:
        parent.append(up)
        start.append(len(toks))
        toks.extend(span)
        pos.extend(range(first, first + len(span)))
        seg.extend([len(parent) - 1] * len(span))
        return len(parent) - 1

    root = add(ids[0][:C], 0, -1) if C > 0 else -1
    prompt_seg = [add(ids[r][C : plen_l[r]], C, root) for r in reps]
    rows: list[int] = []  # the packed index of each KL row, row-major like pred_mask
    for i in range(len(ids)):
        p = plen_l[i]
        answer = add(ids[i][p : lens[i]], p, prompt_seg[group[i]])
        for q in pred[i].nonzero()[:, 0].tolist():  # rows predicting generated tokens
            if q < p:  # the prompt's last token, in its prompt's segment
                rows.append(start[prompt_seg[group[i]]] + q - C)
            else:
                rows.append(start[answer] + q - p)
    return toks, pos, seg, parent, rows


def tree_mask(seg: list[int], parent: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, T, T] additive attention mask: token t sees token u when u's segment is an
    ancestor of t's, or the same segment and u <= t (causal within a segment)."""
    n = len(parent)
    anc = torch.zeros(n, n, dtype=torch.bool)  # anc[s, a]: a is a proper ancestor of s
    for s_ in range(n):
        a = parent[s_]
        while a >= 0:
            anc[s_, a] = True
            a = parent[a]
    sg = torch.tensor(seg)
    ar = torch.arange(len(seg))
    see = anc[sg][:, sg] | ((sg[:, None] == sg[None, :]) & (ar[None, :] <= ar[:, None]))
    mask = torch.zeros(len(seg), len(seg), dtype=dtype).masked_fill_(~see, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def packing_pays(config, packed: int, rows: int, width: int) -> bool:
    """Whether one packed sequence of `packed` tokens costs fewer FLOPs than `rows`
    right-padded rows of `width` tokens: the linear layers scale with the token count,
    attention with the squared length (the packed sequence attends densely under its
    mask). Short answers and long shared prompts favour packing; long answers (hundreds
    of tokens, the seed's Example 1) do not."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    linear = 2 * (2 * h * heads * head_dim + 2 * h * kv + 3 * h * config.intermediate_size)
    attention = 4 * heads * head_dim  # per (query, key) pair
    cost_packed = packed * linear + packed**2 * attention
    cost_padded = rows * width * linear + rows * width**2 * attention
    return cost_packed < cost_padded


def prefix_reuse_hidden(decoder, side, pad_id: int = 0) -> torch.Tensor:
    """Final hidden states [N, H] at the rows that predict generated tokens, running
    every shared prompt prefix once; the same rows, in the same order, as
    ``train.selected_hidden`` (row-major over ``side.pred_mask``).

    The batch becomes ONE packed sequence (:func:`prefix_tree`): the prefix all rows
    share (system prompt, chat header), each distinct prompt's remainder once, then
    every answer, with no padding, run in a single decoder call under a tree attention
    mask (:func:`tree_mask`) and each token's own position. Every token sees exactly
    what it sees in a plain forward of its row, so the result equals it up to float
    rounding (tests: 1e-5); under autograd (the student) a shared prefix receives the
    summed gradient of every row that reads it. It falls back to the plain padded
    forward (still one call) where that is cheaper (:func:`packing_pays`) or where the
    attention implementation takes no 4D mask (flash-attention).
    """
    ids, attn, pred = side.input_ids, side.attention_mask, side.pred_mask.bool()

    def plain() -> torch.Tensor:
        return decoder(input_ids=ids, attention_mask=attn).last_hidden_state[pred]

    if decoder.config._attn_implementation not in ("sdpa", "eager") or ids.shape[0] == 0:
        return plain()
    toks, pos, seg, parent, rows = prefix_tree(side, prefix_lengths(side))
    if not packing_pays(decoder.config, len(toks), *ids.shape):
        return plain()
    dev = ids.device
    dtype = decoder.get_input_embeddings().weight.dtype
    h = decoder(
        input_ids=torch.tensor([toks], device=dev),
        attention_mask=tree_mask(seg, parent, dtype, dev),
        position_ids=torch.tensor([pos], device=dev),
        use_cache=False,
    ).last_hidden_state[0]
    return h[torch.tensor(rows, dtype=torch.long, device=dev)]


# ---------------------------------------------------------------- the KL against a cache


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


# ---------------------------------------------------------------- building the cache


@dataclass
class TeacherCache:
    """Teacher log-probs at every training row's KL positions, on the CPU.

    Row r's positions are ``offsets[r]:offsets[r + 1]`` of the tensors below.
    """

    mode: str  # "exact" or "topk"
    offsets: torch.Tensor  # [R + 1]
    logp: torch.Tensor  # [N, V] (exact) or [N, k] (top-k)
    idx: torch.Tensor | None = None  # [N, k] int32 (top-k)
    log_tail: torch.Tensor | None = None  # [N] (top-k)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.logp, self.idx, self.log_tail)
            if t is not None
        )

    def target(self, rows: Sequence[int], device=None) -> TeacherTarget:
        """The cached rows of trajectories `rows`, concatenated in that order."""
        if len(rows) == 0:
            sel = torch.zeros(0, dtype=torch.long)
        else:
            sel = torch.cat(
                [torch.arange(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]
            )
        t = TeacherTarget(
            self.logp.index_select(0, sel),
            None if self.idx is None else self.idx.index_select(0, sel),
            None if self.log_tail is None else self.log_tail.index_select(0, sel),
        )
        return t if device is None else t.to(device)


def cache_bytes(n_rows: int, vocab: int, mode: str, k: int) -> int:
    """Bytes of a cache of `n_rows` KL rows: float32 [N, V], or top-k (float32 values,
    int32 ids, one float32 tail per row)."""
    return n_rows * vocab * 4 if mode == "exact" else n_rows * (k * 8 + 4)


def kl_rows(rec: dict, max_gen: int | None = None) -> int:
    """KL rows of one trajectory: its generated tokens (after --max_traj_len)."""
    n = sum(rec["generated_text_mask"])
    return n if max_gen is None else min(n, max_gen)


def cache_order(rows: list[dict]) -> list[int]:
    """Row indices sorted so that rows sharing a prompt are adjacent (prefix reuse
    finds them in one batch) and lengths within a prompt ascend (little padding)."""

    def key(i: int):
        r = rows[i]
        prompt = r.get("prompt_input_ids")
        if prompt is None:
            g = r["generated_text_mask"]
            prompt = r["input_ids"][: len(g) - sum(g)]
        return (len(prompt), prompt, len(r["input_ids"]))

    return sorted(range(len(rows)), key=key)


def cache_from_generation(
    rows: list[dict], logprobs: dict, max_gen: int | None = None
) -> TeacherCache | None:
    """The exact teacher cache of `rows`, from the log-probs saved while sampling them
    (generate.generate_trajectories(logprobs=...)); None if any row has none.

    The teacher is the prompted base model, the model that sampled the answers: at
    each sampled token, generation already computed the teacher's full distribution
    (raw logits, before temperature or top-p). Keeping them saves the whole teacher
    pass; they equal that pass's log-probs up to float rounding (batch shapes and the
    incremental KV cache differ; tests check 1e-4).
    """
    parts = []
    for r in rows:
        lp = logprobs.get((r.get("question_index"), r.get("sample_index")))
        n = kl_rows(r, max_gen)
        if lp is None or lp.shape[0] < n or sum(r["generated_text_mask"]) != lp.shape[0]:
            return None
        parts.append(lp[:n])
    counts = torch.tensor([p.shape[0] for p in parts], dtype=torch.long)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    return TeacherCache("exact", offsets, torch.cat(parts))


@torch.no_grad()
def build_teacher_cache(
    model,
    rows: list[dict],
    pad_id: int,
    *,
    mode: str = "exact",
    topk: int = 64,
    max_gb: float = 4.0,
    batch_size: int = 16,
    max_gen: int | None = None,
    chunk_size: int = 1024,
    prefix_reuse: bool = True,
    log: Callable[[str], None] = print,
) -> TeacherCache:
    """One teacher pass (adapter disabled) over `rows`; their log-probs at the KL rows.

    ``mode="exact"`` falls back to top-k, with a warning, when the float32 table would
    exceed `max_gb`. Rows are visited grouped by prompt (see :func:`cache_order`).
    """
    from .train import adapter_disabled, base_of, collate, selected_hidden

    if mode not in ("exact", "topk"):
        raise ValueError(f"teacher cache mode must be exact or topk, not {mode!r}")
    base = base_of(model)
    head = base.get_output_embeddings()
    decoder = base.get_decoder()
    vocab = head.weight.shape[0]
    topk = min(topk, vocab)
    counts = [kl_rows(r, max_gen) for r in rows]
    n = sum(counts)
    if mode == "exact" and cache_bytes(n, vocab, "exact", topk) > max_gb * 1e9:
        warn(
            f"an exact teacher cache of {n} x {vocab} float32 needs "
            f"{cache_bytes(n, vocab, 'exact', topk) / 1e9:.1f} GB > --teacher_cache_max_gb "
            f"{max_gb:g}; keeping the top {topk} log-probs + tail mass instead (approximate KL)"
        )
        mode = "topk"
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    if mode == "exact":
        logp = torch.empty(n, vocab, dtype=torch.float32)
        idx = log_tail = None
    else:
        logp = torch.empty(n, topk, dtype=torch.float32)
        idx = torch.empty(n, topk, dtype=torch.int32)
        log_tail = torch.empty(n, dtype=torch.float32)
    device = next(model.parameters()).device
    order = cache_order(rows)
    was_training = model.training
    model.eval()
    try:
        with adapter_disabled(model):
            for j in range(0, len(order), batch_size):
                chunk_rows = order[j : j + batch_size]
                side = collate([rows[i] for i in chunk_rows], pad_id, max_gen).prompted.to(device)
                if prefix_reuse:
                    h = prefix_reuse_hidden(decoder, side, pad_id)
                else:
                    h = selected_hidden(model, side)
                # where each batch row's KL rows go in the cache
                dest = torch.cat(
                    [torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in chunk_rows]
                )
                assert h.shape[0] == dest.shape[0], (h.shape, dest.shape)
                for c in range(0, h.shape[0], chunk_size):
                    lp = head(h[c : c + chunk_size]).float().log_softmax(-1)
                    d = dest[c : c + chunk_size]
                    if mode == "exact":
                        logp[d] = lp.cpu()
                    else:
                        top, ti = lp.topk(topk, dim=-1)
                        rest = lp.scatter(1, ti, float("-inf")).logsumexp(-1)
                        logp[d], idx[d], log_tail[d] = top.cpu(), ti.int().cpu(), rest.cpu()
    finally:
        model.train(was_training)
    cache = TeacherCache(mode, offsets, logp, idx, log_tail)
    log(
        f"teacher cache ({mode}{'' if mode == 'exact' else f', k={topk}'}): {n} rows, "
        f"{cache.nbytes / 1e9:.2f} GB"
    )
    return cache


__all__ = [
    "TeacherCache",
    "TeacherTarget",
    "build_teacher_cache",
    "cache_bytes",
    "cache_from_generation",
    "cache_order",
    "cached_kl",
    "common_prefix_length",
    "kl_rows",
    "prefix_groups",
    "prefix_lengths",
    "packing_pays",
    "prefix_reuse_hidden",
    "prefix_tree",
    "topk_kl",
    "tree_mask",
]
