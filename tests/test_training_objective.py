"""The training objective (promptbake.training.objective): batch_kl / backward_kl /
evaluate_kl against plain full-logit references on the tiny random Qwen3.

    python -m pytest tests/test_training_objective.py -q

The KL is computed from hidden states at the rows that predict generated tokens; these
tests pin it to a plain full-logits forward (per token and per sequence), check that the
gradient reaches only the LoRA weights, that another divergence, prefix reuse, bf16
autocast and the out-of-memory back-off keep the loss, that validation builds no graph,
that a step reads nothing back from the device, and how the KL chunk size is chosen.
"""

import pytest
import tiny
import torch
from tiny import lora_grads, noisy_lora, pirate_rows, zorblax_rows

from promptbake.configs import LoraArgs
from promptbake.errors import UserError
from promptbake.loss import masked_kl
from promptbake.training import objective
from promptbake.training.batches import collate
from promptbake.training.forward import adapter_disabled, base_of, selected_hidden
from promptbake.training.objective import (
    backward_kl,
    batch_kl,
    chunk_rows_for,
    evaluate_kl,
    kl_chunk_rows,
)
from promptbake.training.setup import add_lora
from promptbake.training.teacher import build_teacher_cache


# ---------------------------------------------------------------- batch_kl against full logits
def randomize_lora_b(model, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def reference_kl(model, batch):
    """KL(prompted base || unprompted student) from plain full-logit forwards + masked_kl."""
    with torch.no_grad(), adapter_disabled(model):
        t_logits = model(
            input_ids=batch.prompted.input_ids, attention_mask=batch.prompted.attention_mask
        ).logits
    with torch.no_grad():
        s_logits = model(
            input_ids=batch.unprompted.input_ids, attention_mask=batch.unprompted.attention_mask
        ).logits
    # line the generated positions of both sides up in a [B, G, V] layout
    counts = batch.prompted.pred_mask.sum(1).tolist()
    B, G, V = len(counts), max(counts), t_logits.shape[-1]
    t, s = torch.zeros(B, G, V), torch.zeros(B, G, V)
    mask = torch.zeros(B, G, dtype=torch.bool)
    for i, n in enumerate(counts):
        t[i, :n] = t_logits[i][batch.prompted.pred_mask[i]]
        s[i, :n] = s_logits[i][batch.unprompted.pred_mask[i]]
        mask[i, :n] = True
    return masked_kl(t, s, mask)


def test_fresh_lora_student_equals_the_base_model(chatml_tok):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    batch = collate(pirate_rows(chatml_tok), chatml_tok.pad_token_id)
    with torch.no_grad():
        kl_lora, seq_lora = batch_kl(model, batch, student_adapter=True)
        kl_base, seq_base = batch_kl(model, batch, student_adapter=False)
    assert kl_lora.shape == (15,)
    torch.testing.assert_close(kl_lora, kl_base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seq_lora, seq_base, atol=1e-5, rtol=1e-6)
    assert float(kl_base.mean()) > 1e-3  # the prompt really changes the distribution


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_batch_kl_equals_a_plain_full_logits_forward(chatml_tok, chunk):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    randomize_lora_b(model)  # the student now differs from the teacher
    batch = collate(pirate_rows(chatml_tok), chatml_tok.pad_token_id)
    with torch.no_grad():
        kl, per_seq = batch_kl(model, batch, chunk_size=chunk)
        kl_base, _ = batch_kl(model, batch, chunk_size=chunk, student_adapter=False)
    ref_mean, ref_seq = reference_kl(model, batch)
    torch.testing.assert_close(kl.mean(), ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_seq, ref_seq, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kl, kl_base, atol=1e-3)  # the adapter is really in use


def test_batch_kl_per_sequence_sums(chatml_tok, tiny_model):
    batch = collate(pirate_rows(chatml_tok, n_gen=(2, 4)), chatml_tok.pad_token_id)
    kl, per_seq = batch_kl(tiny_model, batch)  # a plain model: teacher and student share it
    torch.testing.assert_close(per_seq, torch.stack([kl[:2].sum(), kl[2:].sum()]))


def test_batch_kl_gradient_reaches_only_lora(chatml_tok):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    batch = collate(pirate_rows(chatml_tok), chatml_tok.pad_token_id)
    kl, _ = batch_kl(model, batch)
    kl.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    # at init B = 0, so only B gets a gradient (A's gradient is multiplied by B)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_batch_kl_with_prefix_reuse_matches(tiny_model, chatml_tok):
    m = noisy_lora(tiny_model)
    b = collate(zorblax_rows(chatml_tok), chatml_tok.pad_token_id)
    with torch.no_grad():
        a, sa = batch_kl(m, b, 5)
        c, sc = batch_kl(m, b, 5, prefix_reuse=True)
    assert a.min() > 0
    torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc, sa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_the_divergence_reaches_the_objective(tiny_model, chatml_tok, kind, beta):
    """batch_kl / backward_kl with another divergence: the plain full-logit formula on
    the selected rows, the same with the exact cache, the same gradient in slices;
    evaluate_kl stays forward KL."""
    rows = zorblax_rows(chatml_tok)
    pad = chatml_tok.pad_token_id
    m = noisy_lora(tiny_model)
    cache = build_teacher_cache(m, rows, pad, mode="exact", batch_size=4, log=lambda s: None)
    pick = [7, 2, 5, 0]
    b = collate([rows[i] for i in pick], pad)
    head = base_of(m).get_output_embeddings()
    with torch.no_grad(), adapter_disabled(m):
        t = head(selected_hidden(m, b.prompted)).double().softmax(-1)
    with torch.no_grad():
        q = head(selected_hidden(m, b.unprompted)).double().softmax(-1)
    if kind == "reverse_kl":
        ref = (q * (q / t).log()).sum(-1)
    else:
        mix = beta * t + (1 - beta) * q
        ref = beta * (t * (t / mix).log()).sum(-1) + (1 - beta) * (q * (q / mix).log()).sum(-1)

    kl, _ = batch_kl(m, b, 3, divergence=kind, beta=beta)
    kl.sum().backward()
    g = lora_grads(m)
    m.zero_grad()
    torch.testing.assert_close(kl.detach().double(), ref, atol=1e-5, rtol=1e-5)
    fwd, _ = batch_kl(m, b, 3)
    assert not torch.allclose(kl.detach(), fwd.detach(), rtol=1e-3, atol=0)  # small KLs: close
    kl_c, _, _ = backward_kl(
        m, b, 3, teacher=cache.target(pick), parts=2, divergence=kind, beta=beta
    )
    torch.testing.assert_close(kl_c, kl.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_grads(m), g, atol=1e-6, rtol=1e-4)
    held_out = objective.evaluate_kl(m, [b], 3)
    assert held_out["kl"] == pytest.approx(float(fwd.mean()), rel=1e-5)


# ---------------------------------------------------------------- backward_kl: autocast, out-of-memory back-off, no read-back
@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_autocast_bf16_step_is_close_to_float32_and_keeps_the_kl_float32(
    chatml_tok, prefix_reuse, monkeypatch
):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    randomize_lora_b(model)
    batch = collate(pirate_rows(chatml_tok), chatml_tok.pad_token_id)
    seen = []  # the dtypes the divergence is handed
    real = objective.loss.divergence
    monkeypatch.setattr(
        objective.loss, "divergence", lambda h, *a: seen.append(h.dtype) or real(h, *a)
    )
    out = {}
    for amp in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        kl, _, _ = objective.backward_kl(model, batch, 4, prefix_reuse=prefix_reuse, autocast=amp)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        out[amp] = kl, torch.cat([g.flatten() for g in grads])
    (kl32, g32), (kl16, g16) = out[None], out[torch.bfloat16]
    assert seen == [torch.float32] * 2 and kl16.dtype == torch.float32
    # bf16 rounding moves the loss and gradient a little, not more
    torch.testing.assert_close(kl16, kl32, atol=0.05, rtol=0.05)
    assert float(torch.cosine_similarity(g16, g32, dim=0)) > 0.99
    assert not torch.equal(kl16, kl32)  # it really ran in bf16


def test_oom_backoff_gives_the_same_gradient(tiny_model, chatml_tok, monkeypatch):
    rows = zorblax_rows(chatml_tok)
    b = collate(rows[:6], chatml_tok.pad_token_id)
    m = noisy_lora(tiny_model)
    kl, per_seq, parts = backward_kl(m, b, 4)
    assert parts == 1
    g = lora_grads(m)
    m.zero_grad()
    real = objective.batch_kl

    def flaky(model, batch, *a, **k):  # "out of memory" above two rows per pass
        if batch.prompted.input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return real(model, batch, *a, **k)

    monkeypatch.setattr(objective, "batch_kl", flaky)
    kl2, per_seq2, parts2 = backward_kl(m, b, 4)
    assert parts2 == 4  # 1 -> 2 (3 rows: still too many) -> 4
    torch.testing.assert_close(kl2, kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_seq2, per_seq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_grads(m), g, atol=1e-6, rtol=1e-4)
    monkeypatch.setattr(
        objective, "batch_kl", lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError())
    )
    with pytest.raises(UserError, match="out of memory even with one trajectory"):
        backward_kl(m, b, 4)


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


# ---------------------------------------------------------------- evaluate_kl
def test_validation_builds_no_graph(chatml_tok, monkeypatch):
    model = add_lora(tiny.tiny_qwen3(chatml_tok), LoraArgs(r=4))
    batches = [collate(pirate_rows(chatml_tok), chatml_tok.pad_token_id)]
    seen = []
    real = objective.batch_kl

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out)
        return out

    monkeypatch.setattr(objective, "batch_kl", spy)
    result = evaluate_kl(model, batches)
    assert len(seen) == 1
    kl, per_seq = seen[0]
    assert kl.grad_fn is None and not kl.requires_grad
    assert per_seq.grad_fn is None
    assert result["tokens"] == 15
    assert result["kl"] == pytest.approx(float(kl.mean()), rel=1e-6)
    assert result["kl_seq"] == pytest.approx(float(per_seq.mean()), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- the KL chunk size
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
