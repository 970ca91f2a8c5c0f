"""The GPU-shaped training step: host-built plans (batches.Plan) equal plain references,
nothing in a step reads a value back from the device, FlexAttention's packed tree
equals a plain forward, and the KL chunk size is chosen for the device."""

from __future__ import annotations

import pytest
import torch
from tiny import noisy_lora, zorblax_rows

from promptbake import distributed
from promptbake.training import batches, forward, objective
from promptbake.training.batches import (
    collate,
    mask_blocks,
    packing_pays,
    prefix_lengths,
    prefix_tree,
)
from promptbake.training.forward import base_of, prefix_reuse_hidden, selected_hidden
from promptbake.training.objective import backward_kl, chunk_rows_for, kl_chunk_rows


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


class HostSync(AssertionError):
    pass


def _raise(*args, **kwargs):
    raise HostSync("a value read back from the device inside a step")


@pytest.mark.parametrize("reuse", [True, False])
def test_a_step_reads_nothing_back(tiny_model, chatml_tok, monkeypatch, reuse):
    """Forward, loss and backward of a collated batch with every read-back method of
    torch.Tensor (and boolean-mask indexing) raising; the values are still right."""
    m = noisy_lora(tiny_model)
    b = collate(zorblax_rows(chatml_tok), chatml_tok.pad_token_id)
    ref, ref_seq, _ = backward_kl(m, b, 7, prefix_reuse=reuse)
    getitem = torch.Tensor.__getitem__

    def no_bool_index(self, idx):
        for i in idx if isinstance(idx, tuple) else (idx,):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                _raise()
        return getitem(self, idx)

    with monkeypatch.context() as mp:
        for name in ("tolist", "item", "nonzero", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, name, _raise)
        mp.setattr(torch.Tensor, "__getitem__", no_bool_index)
        kl, per_seq, _ = backward_kl(m, b, 7, prefix_reuse=reuse)
    torch.testing.assert_close(kl, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(per_seq, ref_seq, atol=1e-5, rtol=0)


def test_flex_packed_tree_equals_a_plain_forward(tiny_model, chatml_tok, monkeypatch):
    """The packed prefix tree under a FlexAttention block mask (forward only: the CPU
    has no FlexAttention backward) equals the plain padded forward."""
    rows = zorblax_rows(chatml_tok)
    rows = [rows[i] for i in [4, 0, 7, 2, 8, 1, 3, 6, 5]]
    side = collate(rows, chatml_tok.pad_token_id).unprompted
    dec = base_of(tiny_model).get_decoder()
    calls = []
    monkeypatch.setattr(forward, "packing_pays", lambda *a: True)
    monkeypatch.setattr(
        forward, "tree_block_mask", lambda p: calls.append(1) or batches.tree_block_mask(p)
    )
    with torch.no_grad():
        plain = selected_hidden(tiny_model, side)
        tiny_model.set_attn_implementation("flex_attention")
        assert dec.config._attn_implementation == "flex_attention"
        packed = prefix_reuse_hidden(dec, side)
    assert calls == [1]
    assert packed.shape == plain.shape
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=0)


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


def test_kl_chunk_size_is_chosen_for_the_device():
    V = 151_936
    assert kl_chunk_rows(300, "cpu", V) == 300  # an explicit value wins
    assert kl_chunk_rows(0, "cpu", V) == 512
    # three float32 [rows x V] copies within an eighth of the free memory
    assert chunk_rows_for(16 * 2**30, V) == 16 * 2**30 // 8 // (12 * V) == 1177
    assert chunk_rows_for(130 * 2**30, V) == 8192  # an H200: clamped
    assert chunk_rows_for(2**30, V) == 512  # nearly full: the floor
    assert chunk_rows_for(2**30, 1000) == 8192  # a small vocabulary


def test_batch_kl_auto_chunk_equals_explicit(tiny_model, chatml_tok):
    m = noisy_lora(tiny_model)
    b = collate(zorblax_rows(chatml_tok), chatml_tok.pad_token_id)
    with torch.no_grad():
        auto, _ = objective.batch_kl(m, b, 0)
        explicit, _ = objective.batch_kl(m, b, 5)
    torch.testing.assert_close(auto, explicit, atol=1e-6, rtol=0)
