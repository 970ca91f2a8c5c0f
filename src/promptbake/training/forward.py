"""Forward passes of the one model that is both teacher and student.

    with adapter_disabled(model):           # the teacher: base weights, prompted side
        h = hidden_states(model, batch.prompted, prefix_reuse=True)

The teacher is the PeftModel with its adapter switched off, so no second copy of the
weights exists. Only the hidden states at the rows that predict generated tokens are
returned ([N, H], row-major over ``pred_mask``): the LM head and the loss run on those
rows alone (loss.py). With prefix reuse the batch runs as one packed sequence under a
tree attention mask (batches.prefix_tree), every shared prompt prefix once. Rows are
picked with the plans' integer indices (batches.Plan): no host-device sync.
"""

from __future__ import annotations

import contextlib

import torch

from .batches import Side, packing_pays, padded_mask, tree_block_mask, tree_mask


def base_of(model):
    """The transformers model under a PeftModel (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_disabled(model):
    """Context in which a PeftModel runs as the base model; a no-op for plain models."""
    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


AUTOCAST_MODES = ("off", "bf16", "auto")


def fast_bf16(device: torch.device) -> bool:
    """The device multiplies bfloat16 natively: a CUDA GPU that supports it, or a CPU
    with AMX or AVX-512 BF16 (there bf16 matmuls ran 1.8x the float32 ones, bench/README)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(
            getattr(cpu, name, lambda: False)()
            for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
    return False


def autocast_dtype(mode: str, device: torch.device, param_dtype: torch.dtype) -> torch.dtype | None:
    """--autocast resolved: bfloat16 when the student's forward should run under
    mixed precision, else None. Only float32 weights gain from it (bf16 weights are
    bf16 already); ``auto`` asks :func:`fast_bf16`."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast mode {mode!r} not in {AUTOCAST_MODES}")
    if mode == "off" or param_dtype != torch.float32:
        return None
    if mode == "auto" and not fast_bf16(device):
        return None
    return torch.bfloat16


def mixed_precision(device: torch.device, dtype: torch.dtype | None):
    """Context of a forward whose matmuls run in `dtype` (weights, optimizer and the
    LoRA gradients stay float32); a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def selected_hidden(model, side: Side) -> torch.Tensor:
    """Final hidden states [N, H] at the rows that predict generated tokens, picked by
    the plan's integer row index (a boolean mask would read its count back)."""
    return selected_hidden_of(base_of(model).get_decoder(), side)


PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")  # the kernels that take a tree mask


def prefix_reuse_hidden(decoder, side, pad_id: int = 0) -> torch.Tensor:
    """Final hidden states [N, H] at the rows that predict generated tokens, running
    every shared prompt prefix once; the same rows, in the same order, as
    :func:`selected_hidden` (row-major over ``side.pred_mask``).

    The batch becomes ONE packed sequence (its plan, batches.prefix_tree, built on the
    host at collation): the prefix all rows share (system prompt, chat header), each
    distinct prompt's remainder once, then every answer, with no padding, run in a
    single decoder call under a tree attention mask (a dense 4D mask, or a
    FlexAttention block mask under ``flex_attention``) and each token's own position.
    Every token sees exactly what it sees in a plain forward of its row, so the result
    equals it up to float rounding (tests: 1e-5); under autograd (the student) a shared
    prefix receives the summed gradient of every row that reads it. It falls back to
    the plain padded forward (still one call) where that is cheaper
    (batches.packing_pays, from host ints) or where the attention implementation takes
    no tree mask (flash-attention). Nothing is read back from the device.
    """
    impl = decoder.config._attn_implementation
    ids, plan = side.input_ids, side.plan
    flex = impl == "flex_attention"
    if (
        impl not in PACKED_ATTENTION
        or ids.shape[0] == 0
        or not packing_pays(
            decoder.config, plan.packed_len, *ids.shape, plan.flex_blocks if flex else None
        )
    ):
        return selected_hidden_of(decoder, side)
    if flex:
        mask = tree_block_mask(plan)
    else:
        mask = tree_mask(plan, decoder.get_input_embeddings().weight.dtype)
    h = decoder(
        input_ids=plan.input_ids,
        attention_mask=mask,
        position_ids=plan.position_ids,
        use_cache=False,
    ).last_hidden_state[0]
    return h.index_select(0, plan.packed_rows)


def selected_hidden_of(decoder, side: Side) -> torch.Tensor:
    """:func:`selected_hidden` for a bare decoder: the plain padded forward.

    Under sdpa and eager the mask is made here (none when the plan says no row is
    padded: the fused causal kernel), because transformers would otherwise ask the
    device whether the 2D mask has any padding; other kernels get the 2D mask."""
    mask = side.attention_mask
    if decoder.config._attn_implementation in ("sdpa", "eager"):
        dtype = decoder.get_input_embeddings().weight.dtype
        mask = None if side.plan.unpadded else padded_mask(mask, dtype)
    h = decoder(input_ids=side.input_ids, attention_mask=mask).last_hidden_state
    return h.flatten(0, 1).index_select(0, side.plan.kl_rows)


def hidden_states(model, side: Side, prefix_reuse: bool = False) -> torch.Tensor:
    """[N, H] final hidden states at `side`'s KL rows: packed (prefix reuse) or padded."""
    if prefix_reuse:
        return prefix_reuse_hidden(base_of(model).get_decoder(), side)
    return selected_hidden(model, side)
