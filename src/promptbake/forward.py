"""Forward passes of the one model that is both teacher and student.

    with adapter_disabled(model):           # the teacher: base weights, prompted side
        h = hidden_states(model, batch.prompted, prefix_reuse=True)

The teacher is the PeftModel with its adapter switched off, so no second copy of the
weights exists. Only the hidden states at the rows that predict generated tokens are
returned ([N, H], row-major over ``pred_mask``): the LM head and the loss run on those
rows alone (loss.py). With prefix reuse the batch runs as one packed sequence under a
tree attention mask (batches.prefix_tree), every shared prompt prefix once.
"""

from __future__ import annotations

import contextlib

import torch

from .batches import Side, packing_pays, prefix_lengths, prefix_tree, tree_mask


def base_of(model):
    """The transformers model under a PeftModel (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_disabled(model):
    """Context in which a PeftModel runs as the base model; a no-op for plain models."""
    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


def selected_hidden(model, side: Side) -> torch.Tensor:
    """Final hidden states [N, H] at the rows that predict generated tokens."""
    decoder = base_of(model).get_decoder()
    h = decoder(input_ids=side.input_ids, attention_mask=side.attention_mask).last_hidden_state
    return h[side.pred_mask]


def prefix_reuse_hidden(decoder, side, pad_id: int = 0) -> torch.Tensor:
    """Final hidden states [N, H] at the rows that predict generated tokens, running
    every shared prompt prefix once; the same rows, in the same order, as
    :func:`selected_hidden` (row-major over ``side.pred_mask``).

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


def hidden_states(model, side: Side, prefix_reuse: bool = False) -> torch.Tensor:
    """[N, H] final hidden states at `side`'s KL rows: packed (prefix reuse) or padded."""
    if prefix_reuse:
        return prefix_reuse_hidden(base_of(model).get_decoder(), side)
    return selected_hidden(model, side)
