"""Teacher-side speed-ups for training: shared-prefix reuse and an opt-in teacher cache.

    promptbake train ... --prefix_reuse true --teacher_cache exact   # or topk
    python -m pytest tests/test_training_teacher.py -q

The teacher is the frozen base model reading (system prompt + question + answer). Two
facts make most of its work redundant:

* **Prefix reuse** (``--prefix_reuse``, exact). The sequences sampled for one question
  share their whole prompted prefix (system prompt + question, ``prompt_input_ids``).
  :func:`prefix_reuse_hidden` runs the decoder once per distinct prefix, keeps its KV
  cache, repeats the cache for the rows that share it and runs only the generated
  suffixes on top of it, with positions continuing after each row's own prefix. Its
  output equals ``forward.selected_hidden`` (tests check 1e-5 in float32). It pays off
  when a batch holds several rows of a question: the teacher-cache pass sorts rows by
  question for that reason; in shuffled training batches rows rarely share a prefix.
* **Teacher cache** (``--teacher_cache``). The base model never changes, so its
  distributions at the generated positions are the same in every epoch. With
  ``exact`` (or ``auto``, the default), :func:`build_teacher_cache` computes them once,
  before epoch 1, as float32 log-probabilities [tokens x vocab] on the CPU, and every
  later step only runs the student: ``loss.divergence`` against the
  cached rows, equal to the uncached loss. When that table would exceed
  ``--teacher_cache_max_gb`` (:func:`exact_cache_fits`), the training loop runs the
  teacher every step instead: exact too, only slower. Only ``topk``, asked for by
  name, keeps the teacher's top-k log-probs, their ids and the log of the remaining
  (tail) mass, and computes the KL against that coarser distribution:

      KL_k = sum_{i in top-k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

  where q_tail is the student's mass outside the teacher's top-k. This is an
  APPROXIMATION: it is the KL between the two distributions with the tail merged into
  one bin, a lower bound on the full KL (data processing), equal to it when the
  teacher puts no mass outside its top-k. The student's total mass outside the top-k
  is still trained (q_tail counts every such token), but not how it spreads that mass
  among them; in bench/ (SmolLM2, k=64) it ended with a visibly higher held-out KL
  than the exact cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..loss import TeacherTarget
from .batches import collate
from .forward import adapter_disabled, base_of, prefix_reuse_hidden, selected_hidden
from .objective import kl_chunk_rows


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


def exact_cache_fits(rows: list[dict], vocab: int, max_gen: int | None, max_gb: float) -> bool:
    """Whether the exact table of `rows` (float32 [tokens x vocab]) fits `max_gb` GB."""
    n = sum(kl_rows(r, max_gen) for r in rows)
    return cache_bytes(n, vocab, "exact", 0) <= max_gb * 1e9


@torch.no_grad()
def build_teacher_cache(
    model,
    rows: list[dict],
    pad_id: int,
    *,
    mode: str = "exact",
    topk: int = 64,
    batch_size: int = 16,
    max_gen: int | None = None,
    chunk_size: int = 1024,
    prefix_reuse: bool = True,
    log: Callable[[str], None] = print,
) -> TeacherCache:
    """One teacher pass (adapter disabled) over `rows`; their log-probs at the KL rows.

    ``mode`` is built as asked, never swapped for another: the caller checks the size
    of an exact table first (:func:`exact_cache_fits`). Rows are visited grouped by
    prompt (see :func:`cache_order`).
    """
    if mode not in ("exact", "topk"):
        raise ValueError(f"teacher cache mode must be exact or topk, not {mode!r}")
    base = base_of(model)
    head = base.get_output_embeddings()
    decoder = base.get_decoder()
    vocab = head.weight.shape[0]
    topk = min(topk, vocab)
    counts = [kl_rows(r, max_gen) for r in rows]
    n = sum(counts)
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
    chunk_size = kl_chunk_rows(chunk_size, device, vocab)  # 0: auto
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
