"""The forward passes (promptbake.training.forward): hidden states at the selected rows with
prefix reuse, packed or padded, equal a plain forward, and autocast resolves per device.

    python -m pytest tests/test_training_forward.py -q

Everything runs on the tiny random Qwen3 in float32; FlexAttention runs forward only (the
CPU has no FlexAttention backward).
"""

import pytest
import torch
from tiny import noisy_lora, zorblax_rows

from promptbake.schema import make_trajectory
from promptbake.training import batches, forward
from promptbake.training.batches import collate, tree_mask
from promptbake.training.forward import base_of, prefix_reuse_hidden, selected_hidden
from promptbake.training.objective import batch_kl


# ---------------------------------------------------------------- prefix reuse
@pytest.mark.parametrize("order", [None, [4, 0, 7, 2, 8, 1, 3, 6, 5], [5]])
def test_prefix_reuse_equals_a_plain_forward(tiny_model, chatml_tok, order):
    rows = zorblax_rows(chatml_tok)
    rows = rows if order is None else [rows[i] for i in order]
    side = collate(rows, chatml_tok.pad_token_id).prompted
    with torch.no_grad():
        plain = selected_hidden(tiny_model, side)
        reused = prefix_reuse_hidden(base_of(tiny_model).get_decoder(), side, 0)
    assert reused.shape == plain.shape == (int(side.pred_mask.sum()), 64)
    torch.testing.assert_close(reused, plain, atol=1e-5, rtol=0)


def test_prefix_reuse_handles_one_token_and_empty_answers(tiny_model, chatml_tok):
    rows = zorblax_rows(chatml_tok, n_seq=2, max_gen=1)
    r = rows[0]
    empty = make_trajectory(chatml_tok, r["prompt_input_ids"], r["prompt_input_ids_nosys"], [])
    dec = base_of(tiny_model).get_decoder()
    for batch in (rows + [empty], [empty, empty]):
        side = collate(batch, chatml_tok.pad_token_id).prompted
        with torch.no_grad():
            plain = selected_hidden(tiny_model, side)
            reused = prefix_reuse_hidden(dec, side, 0)
        # one row per one-token answer (the prompt's last token predicts it), none if empty
        assert plain.shape[0] == (6 if len(batch) == 7 else 0)
        assert reused.shape == plain.shape
        torch.testing.assert_close(reused, plain, atol=1e-5, rtol=0)


def test_student_prefix_reuse_gives_the_plain_loss_and_lora_gradients(tiny_model, chatml_tok):
    """Under autograd (the student, LoRA on): the shared prefixes' cache repeats must
    carry every row's gradient back, so the LoRA gradients equal a plain forward's."""
    rows = zorblax_rows(chatml_tok)
    rows = [rows[i] for i in [4, 0, 7, 2, 8, 1, 3, 6, 5]]
    b = collate(rows, chatml_tok.pad_token_id)
    m = noisy_lora(tiny_model)
    with torch.no_grad():  # a non-zero adapter, so LoRA A gets a gradient too
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    grads = []
    for reuse in (False, True):
        m.zero_grad(set_to_none=True)
        kl, _ = batch_kl(m, b, 5, prefix_reuse=reuse)
        (kl * torch.linspace(0.5, 1.5, kl.numel())).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
        grads[-1]["kl"] = kl.detach()
    plain, reused = grads
    torch.testing.assert_close(reused.pop("kl"), plain.pop("kl"), atol=1e-5, rtol=1e-5)
    assert plain.keys() == reused.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(reused[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)
    assert sum(g.abs().sum() for g in plain.values()) > 0


# ---------------------------------------------------------------- packing
def test_packing_is_chosen_only_where_it_saves_flops(tiny_model, chatml_tok, monkeypatch):
    from tiny import qwen3_1_7b_config

    from promptbake.training import batches, forward

    qwen = qwen3_1_7b_config()
    # short answers (the CPU demo): packing wins; the seed's Example 1 (10 x 400 tokens,
    # distinct prompts): dense attention over 4,000 packed tokens would cost more
    assert batches.packing_pays(qwen, 300, 8, 78)
    assert not batches.packing_pays(qwen, 3973, 10, 400)
    # the tests above really ran the packed path (and a forced plain one agrees)
    calls = []
    monkeypatch.setattr(forward, "tree_mask", lambda *a: calls.append(1) or tree_mask(*a))
    side = collate(zorblax_rows(chatml_tok), 0).unprompted
    dec = base_of(tiny_model).get_decoder()
    with torch.no_grad():
        packed = forward.prefix_reuse_hidden(dec, side)
        assert calls == [1]
        monkeypatch.setattr(forward, "packing_pays", lambda *a: False)
        plain = forward.prefix_reuse_hidden(dec, side)
    assert calls == [1]
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)


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


# ---------------------------------------------------------------- autocast
def test_autocast_mode_resolves_per_device_and_weights(monkeypatch):
    from promptbake.training import forward

    cpu, f32 = torch.device("cpu"), torch.float32
    assert forward.autocast_dtype("off", cpu, f32) is None
    assert forward.autocast_dtype("bf16", cpu, f32) is torch.bfloat16
    assert forward.autocast_dtype("bf16", cpu, torch.bfloat16) is None  # bf16 weights already
    monkeypatch.setattr(forward, "fast_bf16", lambda d: False)
    assert forward.autocast_dtype("auto", cpu, f32) is None
    monkeypatch.setattr(forward, "fast_bf16", lambda d: True)
    assert forward.autocast_dtype("auto", cpu, f32) is torch.bfloat16
