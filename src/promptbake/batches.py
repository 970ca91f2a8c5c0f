"""Training batches: collation, length bucketing, row slicing and packing plans.

    from promptbake.batches import collate, make_batches
    batch = collate(rows, pad_id)          # Batch(prompted=Side, unprompted=Side)

A trajectory is read twice: by the teacher (system prompt + question + answer, the
``prompted`` side) and by the student (question + answer, the ``unprompted`` side).
Each side is right-padded; ``pred_mask`` marks the rows whose logits predict a
generated token (row p predicts token p + 1), the only rows the loss looks at.

The packing plan (:func:`prefix_tree`, :func:`tree_mask`) lays a batch out as one
sequence with every shared prompt prefix once; forward.py runs it. Everything here is
built on the host, once per batch, from plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import distributed
from .data import group_identical

if TYPE_CHECKING:  # a type only: loss.py does not depend on batches
    from .loss import TeacherTarget


# ---------------------------------------------------------------- padded batches
@dataclass
class Side:
    """One side (prompted or unprompted) of a batch, right-padded."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    pred_mask: torch.Tensor  # [B, L] True on rows whose logits predict a generated token

    def to(self, device) -> Side:
        return Side(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.pred_mask)))


@dataclass
class Batch:
    prompted: Side
    unprompted: Side

    @property
    def num_tokens(self) -> int:
        return int(self.prompted.pred_mask.sum())

    def to(self, device) -> Batch:
        return Batch(self.prompted.to(device), self.unprompted.to(device))


def truncate(rec: dict, max_gen: int | None) -> dict:
    """Keep only the first `max_gen` generated tokens of a trajectory (both sides)."""
    if max_gen is None:
        return rec
    out = dict(rec)
    for sfx in ("", "_nosys"):
        n_prompt = len(rec["generated_text_mask" + sfx]) - sum(rec["generated_text_mask" + sfx])
        out["input_ids" + sfx] = rec["input_ids" + sfx][: n_prompt + max_gen]
        out["generated_text_mask" + sfx] = rec["generated_text_mask" + sfx][: n_prompt + max_gen]
    return out


def make_side(seqs: list[list[int]], gen_masks: list[list[int]], pad_id: int) -> Side:
    width = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    pred = torch.zeros((B, width), dtype=torch.bool)
    for i, (s, g) in enumerate(zip(seqs, gen_masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        g = torch.tensor(g, dtype=torch.bool)
        pred[i, : len(s) - 1] = g[1:]  # row p predicts token p + 1
    return Side(ids, attn, pred)


def collate(records: list[dict], pad_id: int, max_gen: int | None = None) -> Batch:
    recs = [truncate(r, max_gen) for r in records]
    return Batch(
        make_side([r["input_ids"] for r in recs], [r["generated_text_mask"] for r in recs], pad_id),
        make_side(
            [r["input_ids_nosys"] for r in recs],
            [r["generated_text_mask_nosys"] for r in recs],
            pad_id,
        ),
    )


def make_batches(
    rows: list[dict],
    batch_size: int,
    pad_id: int,
    max_gen: int | None,
    order: list[int] | None = None,
    shard: bool = False,
) -> list[Batch | None]:
    """Batches of `batch_size` rows in `order`. With `shard`, each batch is cut down to
    this process's share of it (distributed.shard), so the processes together see the
    same global batches as one process; a share of a short last batch may be empty (None).
    """
    order = list(range(len(rows))) if order is None else order
    chunks = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    if shard:
        chunks = [distributed.shard(c) for c in chunks]
    return [collate([rows[i] for i in c], pad_id, max_gen) if c else None for c in chunks]


def bucket_order(
    rows: list[dict],
    order: list[int],
    batch_size: int,
    generator: torch.Generator,
    max_gen: int | None = None,
    window: int = 16,
) -> list[int]:
    """`order` regrouped so that each batch holds trajectories of similar length.

    Windows of `window` batches of the shuffled order are sorted by length and cut into
    batches; the full batches are then shuffled (a short last batch stays last, so
    consecutive `batch_size` slices of the result are the batches). Less padding, and
    still a random epoch: which rows meet in a batch and the batch order vary by epoch.
    """

    def size(i: int) -> int:
        r = rows[i]
        n_gen = sum(r["generated_text_mask"])
        kept = n_gen if max_gen is None else min(n_gen, max_gen)
        return len(r["input_ids"]) + len(r["input_ids_nosys"]) - 2 * (n_gen - kept)

    w = batch_size * window
    chunks = []
    for j in range(0, len(order), w):
        win = sorted(order[j : j + w], key=size)
        chunks += [win[k : k + batch_size] for k in range(0, len(win), batch_size)]
    short = [c for c in chunks if len(c) < batch_size]
    full = [c for c in chunks if len(c) == batch_size]
    perm = torch.randperm(len(full), generator=generator).tolist()
    return [i for c in [full[p] for p in perm] + short for i in c]


def split_batch(batch: Batch, teacher: TeacherTarget | None, parts: int) -> list[tuple]:
    """`batch` cut into `parts` row slices (each trimmed to its own width), with the
    matching slices of its cached teacher rows."""
    n = batch.prompted.input_ids.shape[0]
    if parts <= 1:
        return [(batch, teacher)]
    size = -(-n // parts)
    counts = batch.unprompted.pred_mask.sum(1).tolist()
    out, tok = [], 0
    for a in range(0, n, size):
        sides = []
        for side in (batch.prompted, batch.unprompted):
            w = int(side.attention_mask[a : a + size].sum(1).max())
            sides.append(Side(*(t[a : a + size, :w] for t in vars(side).values())))
        n_tok = int(sum(counts[a : a + size]))
        t = None if teacher is None else teacher.slice(tok, tok + n_tok)
        out.append((Batch(*sides), t))
        tok += n_tok
    return out


# ---------------------------------------------------------------- packing plans (prefix reuse)
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
