"""Training batches: collation, length bucketing, row slicing and packing plans.

    from promptbake.batches import collate, make_batches
    batch = collate(rows, pad_id)          # Batch(prompted=Side, unprompted=Side)

A trajectory is read twice: by the teacher (system prompt + question + answer, the
``prompted`` side) and by the student (question + answer, the ``unprompted`` side).
Each side is right-padded; ``pred_mask`` marks the rows whose logits predict a
generated token (row p predicts token p + 1), the only rows the loss looks at.

The packing plan (:func:`prefix_tree`, :class:`Plan`) lays a batch out as one
sequence with every shared prompt prefix once; forward.py runs it under
:func:`tree_mask` (sdpa, eager) or :func:`tree_block_mask` (FlexAttention). Plans and
row indices are built on the host, once per batch, when a side is made (collate), and
travel to the device with it: a training step reads nothing back from the device.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..schema import group_identical

if TYPE_CHECKING:  # a type only: loss.py does not depend on batches
    from ..loss import TeacherTarget


# ---------------------------------------------------------------- padded batches
@dataclass
class Plan:
    """The index tensors of one side, built on the host when the side is made, so that
    a training step indexes with them and never reads anything back from the device.

    ``kl_rows`` [N]: flat index ``b * L + p`` of each KL row (row-major over
    ``pred_mask``); ``row_seq`` [N]: its sequence. The packed prefix tree
    (:func:`prefix_tree`): ``input_ids``, ``position_ids`` [1, T], ``segments`` [T],
    ``visible`` [S, S] (segment s sees segment a: a is s or an ancestor of s),
    ``packed_rows`` [N] (the packed index of each KL row); ``flex_blocks``: the
    128 x 128 blocks of the tree mask that hold a visible pair (what FlexAttention
    computes), a host int; ``unpadded``: no row has padding (a host bool).
    """

    kl_rows: torch.Tensor
    row_seq: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    visible: torch.Tensor
    packed_rows: torch.Tensor
    flex_blocks: int
    unpadded: bool

    @property
    def packed_len(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> Plan:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


@dataclass
class Side:
    """One side (prompted or unprompted) of a batch, right-padded.

    ``plan`` is built from the tensors when the side is made (they are on the host
    then: collate); ``to`` moves tensors and plan together, and ``host`` keeps the
    host side (split_batch re-plans its row slices from it)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    pred_mask: torch.Tensor  # [B, L] True on rows whose logits predict a generated token
    plan: Plan = field(init=False, repr=False, compare=False)
    host: Side = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.plan = make_plan(self)
        self.host = self

    def to(self, device) -> Side:
        out = copy.copy(self)  # not __init__: the plan is moved, not rebuilt
        out.input_ids, out.attention_mask, out.pred_mask = (
            t.to(device, non_blocking=True)
            for t in (self.input_ids, self.attention_mask, self.pred_mask)
        )
        out.plan = self.plan.to(device)
        return out


@dataclass
class Batch:
    prompted: Side
    unprompted: Side

    @property
    def num_tokens(self) -> int:
        return self.prompted.plan.kl_rows.shape[0]

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
    matching slices of its cached teacher rows. The slices are cut and planned from the
    host sides (nothing is read back from the device), then moved where `batch` is."""
    n = batch.prompted.input_ids.shape[0]
    if parts <= 1:
        return [(batch, teacher)]
    size = -(-n // parts)
    device = batch.prompted.input_ids.device
    hosts = (batch.prompted.host, batch.unprompted.host)
    counts = hosts[1].pred_mask.sum(1).tolist()
    out, tok = [], 0
    for a in range(0, n, size):
        sides = []
        for side in hosts:
            w = int(side.attention_mask[a : a + size].sum(1).max())
            cut = (
                t[a : a + size, :w] for t in (side.input_ids, side.attention_mask, side.pred_mask)
            )
            sides.append(Side(*cut).to(device))
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


def prefix_tree(side, plen: torch.Tensor) -> tuple[list[int], ...]:
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


def make_plan(side: Side) -> Plan:
    """The side's :class:`Plan`, from its host tensors."""
    pred = side.pred_mask.bool()
    seq, pos = pred.nonzero(as_tuple=True)
    toks, positions, seg, parent, rows = prefix_tree(side, prefix_lengths(side))
    long = torch.long
    return Plan(
        kl_rows=seq * pred.shape[1] + pos,
        row_seq=seq,
        input_ids=torch.tensor([toks], dtype=long),
        position_ids=torch.tensor([positions], dtype=long),
        segments=torch.tensor(seg, dtype=long),
        visible=visibility(parent),
        packed_rows=torch.tensor(rows, dtype=long),
        flex_blocks=mask_blocks(seg, parent),
        unpadded=bool(side.attention_mask.all()),
    )


def visibility(parent: list[int]) -> torch.Tensor:
    """[S, S] bool: ``v[s, a]`` when segment a is s or an ancestor of s."""
    n = len(parent)
    v = torch.eye(n, dtype=torch.bool)
    for s_ in range(n):
        a = parent[s_]
        while a >= 0:
            v[s_, a] = True
            a = parent[a]
    return v


def mask_blocks(seg: list[int], parent: list[int], block: int = 128) -> int:
    """How many `block` x `block` tiles of the packed tree mask hold at least one
    visible (query, key) pair: what FlexAttention computes (it skips empty tiles)."""
    spans: dict[int, list[int]] = {}  # segment -> [first, last] token (segments are contiguous)
    for t, s_ in enumerate(seg):
        spans.setdefault(s_, [t, t])[1] = t
    tiles = set()
    for s_, (q0, q1) in spans.items():
        a = s_
        while a >= 0:
            if a in spans:
                k0, k1 = spans[a]
                for qb in range(q0 // block, q1 // block + 1):
                    # within its own segment a query sees keys up to itself only
                    last = qb if a == s_ else k1 // block
                    tiles.update((qb, kb) for kb in range(k0 // block, last + 1))
            a = parent[a]
    return len(tiles)


# ---------------------------------------------------------------- tree attention masks
# Built from a plan where the plan is (on the device in training), by indexing only.
def tree_mask(plan: Plan, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, T] additive attention mask: token q sees token k when k's segment is
    q's or an ancestor of it, and k <= q (an ancestor's tokens all come before its
    descendants', so this is also causal within a segment)."""
    seg = plan.segments
    n = seg.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril_()
    see = plan.visible[seg[:, None], seg[None, :]] & causal
    mask = torch.zeros(n, n, dtype=dtype, device=seg.device)
    return mask.masked_fill_(~see, torch.finfo(dtype).min)[None, None]


def padded_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive causal mask of right-padded rows (keys past a row's end
    hidden), the mask transformers would build, built here without asking the device
    whether the batch has padding at all (the plan knows: Plan.unpadded)."""
    n = attention_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril_()
    see = causal[None] & attention_mask.bool()[:, None, :]
    mask = torch.zeros(see.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill_(~see, torch.finfo(dtype).min)[:, None]


def tree_visible(seg, visible, b, h, q, k):
    """FlexAttention mask_mod of the tree mask (see :func:`tree_mask`)."""
    return visible[seg[q], seg[k]] & (k <= q)


def tree_block_mask(plan: Plan):
    """The tree mask as a FlexAttention BlockMask (tiles with no visible pair skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = plan.packed_len
    mod = functools.partial(tree_visible, plan.segments, plan.visible)
    return create_block_mask(mod, None, None, n, n, device=plan.segments.device)


def packing_pays(
    config, packed: int, rows: int, width: int, flex_blocks: int | None = None, block: int = 128
) -> bool:
    """Whether one packed sequence of `packed` tokens costs fewer FLOPs than `rows`
    right-padded rows of `width` tokens: the linear layers scale with the token count,
    attention with the (query, key) pairs computed. A dense 4D mask (sdpa, eager)
    computes every pair: the squared lengths. FlexAttention (`flex_blocks` given: the
    packed mask's non-empty `block`-sized tiles, Plan.flex_blocks) computes only the
    tiles that hold a visible pair, on both paths: the packed tree's tiles against
    each padded row's causal triangle of tiles. Short answers and long shared prompts
    favour packing; long answers (hundreds of tokens, the seed's Example 1) do not
    under a dense mask."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    linear = 2 * (2 * h * heads * head_dim + 2 * h * kv + 3 * h * config.intermediate_size)
    attention = 4 * heads * head_dim  # per (query, key) pair
    if flex_blocks is None:
        pairs_packed, pairs_padded = packed**2, rows * width**2
    else:
        nb = -(-width // block)
        pairs_packed = flex_blocks * block**2
        pairs_padded = rows * nb * (nb + 1) // 2 * block**2
    cost_packed = packed * linear + pairs_packed * attention
    cost_padded = rows * width * linear + pairs_padded * attention
    return cost_packed < cost_padded
