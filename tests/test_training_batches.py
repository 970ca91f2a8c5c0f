"""Batches (promptbake.training.batches): collated sides, their prediction masks, and the
host-built plans of the GPU-shaped step.

    python -m pytest tests/test_training_batches.py -q

Row p predicts token p + 1, so the rows a side selects are exactly those that predict
generated tokens (checked by hand and on real rows); the plans (batches.Plan) equal plain
references written out pair by pair; split and idle batches are planned afresh; prefix
groups, the common prefix, FlexAttention's tile count and length bucketing on small
inputs.
"""

from __future__ import annotations

import pytest
import torch
from tiny import pirate_rows, zorblax_rows

from promptbake import distributed
from promptbake.training import batches
from promptbake.training.batches import (
    bucket_order,
    collate,
    common_prefix_length,
    mask_blocks,
    packing_pays,
    prefix_groups,
    prefix_lengths,
    prefix_tree,
)


# ---------------------------------------------------------------- collate: the rows that predict generated tokens
def test_pred_mask_selects_the_rows_that_predict_generated_tokens():
    eot, pad = 2, 0
    a = {  # prompt [11, 12, 13], answer [21, 22, eot]
        "input_ids": [11, 12, 13, 21, 22, eot],
        "generated_text_mask": [0, 0, 0, 1, 1, 1],
        "input_ids_nosys": [12, 13, 21, 22, eot],
        "generated_text_mask_nosys": [0, 0, 1, 1, 1],
    }
    b = {  # prompt [11, 14], answer [31]
        "input_ids": [11, 14, 31],
        "generated_text_mask": [0, 0, 1],
        "input_ids_nosys": [14, 31],
        "generated_text_mask_nosys": [0, 1],
    }
    batch = collate([a, b], pad)
    p, u = batch.prompted, batch.unprompted
    assert p.input_ids.tolist() == [[11, 12, 13, 21, 22, eot], [11, 14, 31, pad, pad, pad]]
    assert p.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # row p predicts token p + 1: the last prompt position predicts the first answer token,
    # the end-of-turn is predicted, the end-of-turn's own row and padding are never used
    assert p.pred_mask.int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]
    assert u.input_ids.tolist() == [[12, 13, 21, 22, eot], [14, 31, pad, pad, pad]]
    assert u.pred_mask.int().tolist() == [[0, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    assert batch.num_tokens == 4 == int(u.pred_mask.sum())
    # the targets at the selected rows are exactly the generated tokens, on both sides
    for side in (p, u):
        targets = side.input_ids[:, 1:][side.pred_mask[:, :-1]]
        assert targets.tolist() == [21, 22, eot, 31]
        assert not (side.pred_mask & (side.attention_mask == 0)).any()


def test_collate_with_max_gen_truncates_both_sides(chatml_tok):
    rows = pirate_rows(chatml_tok, n_gen=(5, 3))
    batch = collate(rows, chatml_tok.pad_token_id, max_gen=2)
    assert batch.prompted.pred_mask.sum(1).tolist() == [2, 2]
    assert batch.unprompted.pred_mask.sum(1).tolist() == [2, 2]
    full = collate(rows, chatml_tok.pad_token_id)
    assert full.prompted.pred_mask.sum(1).tolist() == [5, 3]
    assert full.num_tokens == 8


def test_pred_rows_equal_generated_tokens_on_real_records(chatml_tok):
    rows = pirate_rows(chatml_tok, n_gen=(5, 3, 7))
    batch = collate(rows, chatml_tok.pad_token_id)
    for side, sfx in ((batch.prompted, ""), (batch.unprompted, "_nosys")):
        assert side.pred_mask.sum(1).tolist() == [sum(r["generated_text_mask" + sfx]) for r in rows]
        for i, r in enumerate(rows):
            n_prompt = len(r["prompt_input_ids" + sfx])
            rows_i = side.pred_mask[i].nonzero().flatten().tolist()
            assert rows_i[0] == n_prompt - 1  # the last prompt position
            assert rows_i == list(range(n_prompt - 1, len(r["input_ids" + sfx]) - 1))


# ---------------------------------------------------------------- shared prefixes
def test_prefix_lengths_and_groups(chatml_tok):
    rows = zorblax_rows(chatml_tok, n_seq=2)
    side = collate(rows, chatml_tok.pad_token_id).prompted
    plen = prefix_lengths(side)
    assert plen.tolist() == [len(r["prompt_input_ids"]) for r in rows]
    group, reps = prefix_groups(side, plen)
    assert group == [0, 0, 1, 1, 2, 2] and reps == [0, 2, 4]


def test_common_prefix_is_computed_once_and_kept_short_of_every_prompt(chatml_tok):
    rows = zorblax_rows(chatml_tok, n_seq=2)
    for side in (collate(rows, 0).prompted, collate(rows, 0).unprompted):
        plen = prefix_lengths(side)
        c = common_prefix_length(side, plen)
        ids = side.input_ids
        assert 0 < c < int(plen.min())
        assert (ids[:, :c] == ids[:1, :c]).all()  # really shared
    one = collate(rows[:1], 0).prompted
    assert common_prefix_length(one, prefix_lengths(one)) == 0  # nothing to share


# ---------------------------------------------------------------- plans
def reference_tree_mask(seg: list[int], parent: list[int]) -> torch.Tensor:
    """[T, T] bool: the tree mask written out pair by pair (ancestor segment, or the
    same segment and not later)."""

    def ancestors(s):
        out = set()
        while parent[s] >= 0:
            s = parent[s]
            out.add(s)
        return out

    n = len(seg)
    return torch.tensor(
        [[seg[k] in ancestors(seg[q]) or (seg[k] == seg[q] and k <= q) for k in range(n)]
         for q in range(n)]
    )  # fmt: skip


@pytest.mark.parametrize("order", [None, [4, 0, 7, 2, 8, 1, 3, 6, 5], [5]])
def test_plans_equal_plain_references(chatml_tok, order):
    rows = zorblax_rows(chatml_tok)
    rows = rows if order is None else [rows[i] for i in order]
    b = collate(rows, chatml_tok.pad_token_id)
    for side in (b.prompted, b.unprompted):
        plan, pred = side.plan, side.pred_mask
        B, L = pred.shape
        assert torch.equal(plan.kl_rows, torch.arange(B * L).view(B, L)[pred])
        assert torch.equal(plan.row_seq, torch.arange(B)[:, None].expand(B, L)[pred])
        toks, pos, seg, parent, rows_ = prefix_tree(side, prefix_lengths(side))
        assert plan.input_ids[0].tolist() == toks and plan.position_ids[0].tolist() == pos
        assert plan.packed_rows.tolist() == rows_
        # every KL row reads the same token at the same position, packed or padded
        flat_ids, flat_pos = side.input_ids.flatten(), torch.arange(L).repeat(B)
        assert torch.equal(plan.input_ids[0, plan.packed_rows], flat_ids[plan.kl_rows])
        assert torch.equal(plan.position_ids[0, plan.packed_rows], flat_pos[plan.kl_rows])
        see = reference_tree_mask(seg, parent)
        mask = batches.tree_mask(plan, torch.float32)[0, 0]
        assert torch.equal(mask == 0, see)
        assert (mask[~see] == torch.finfo(torch.float32).min).all()
        # FlexAttention's tile count, by brute force over 4 x 4 tiles
        n = len(seg)
        pad = -n % 4
        tiles = torch.nn.functional.pad(see, (0, pad, 0, pad)).view(-1, 4, (n + pad) // 4, 4)
        assert mask_blocks(seg, parent, block=4) == int(tiles.any(3).any(1).sum())
        assert plan.flex_blocks == mask_blocks(seg, parent)


def test_split_and_idle_batches_are_replanned(chatml_tok):
    rows = zorblax_rows(chatml_tok)
    b = collate(rows, chatml_tok.pad_token_id)
    parts = batches.split_batch(b, None, 2)
    for (sub, _), part in zip(parts, (rows[:5], rows[5:])):
        fresh = collate(part, chatml_tok.pad_token_id)
        for got, want in ((sub.prompted, fresh.prompted), (sub.unprompted, fresh.unprompted)):
            assert torch.equal(got.input_ids, want.input_ids)
            assert torch.equal(got.plan.kl_rows, want.plan.kl_rows)
            assert torch.equal(got.plan.packed_rows, want.plan.packed_rows)
    idle = distributed.idle_batch(b)
    assert idle.num_tokens == 0 and idle.unprompted.plan.row_seq.numel() == 0


def test_flex_cost_counts_only_visible_tiles():
    from tiny import qwen3_1_7b_config

    qwen = qwen3_1_7b_config()
    # 10 distinct prompts (30 shared tokens + 10 each) with 390-token answers: under a
    # dense mask the packed 4,230 tokens cost more than 10 padded rows of 430, under
    # FlexAttention (empty tiles skipped on both paths) packing saves the prompts
    seg, parent = [0] * 30, [-1]
    for _ in range(10):
        parent.append(0)
        seg += [len(parent) - 1] * 10
    for i in range(10):
        parent.append(1 + i)
        seg += [len(parent) - 1] * 390
    T, tiles = len(seg), mask_blocks(seg, parent)
    assert tiles < (-(-T // 128)) ** 2 // 2  # block sparse: under half of the causal tiles
    assert not packing_pays(qwen, T, 10, 430)
    assert packing_pays(qwen, T, 10, 430, flex_blocks=tiles)


# ---------------------------------------------------------------- length bucketing
def test_bucket_order_is_a_permutation_with_less_padding(chatml_tok):
    rows = zorblax_rows(chatml_tok, n_seq=8, max_gen=30)  # 24 rows
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()
    out = bucket_order(rows, order, 5, torch.Generator().manual_seed(1))
    assert sorted(out) == list(range(24))

    def pad(o):
        tot = 0
        for j in range(0, len(o), 5):
            lens = [len(rows[i]["input_ids"]) for i in o[j : j + 5]]
            tot += max(lens) * len(lens) - sum(lens)
        return tot

    assert pad(out) < pad(order)
    # the short batch (24 = 4 x 5 + 4) stays last, so slices of 5 are the batches
    assert len(out[20:]) == 4
