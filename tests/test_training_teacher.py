"""The teacher's table (promptbake.training.teacher): the exact and top-k caches, and the
table kept from generation, on the tiny random Qwen3 in float32.

    python -m pytest tests/test_training_teacher.py -q

The exact cache must give the uncached loss and gradients, the top-k cache a lower bound
with a gradient, and the log-probs kept while sampling the same table as a teacher pass.
"""

import pytest
import torch
from tiny import ZORBLAX_QUESTIONS, lora_grads, noisy_lora, zorblax_rows

from promptbake.loss import divergence, token_kl
from promptbake.training.batches import collate
from promptbake.training.forward import base_of, selected_hidden
from promptbake.training.objective import batch_kl
from promptbake.training.teacher import build_teacher_cache, cache_from_generation, cache_order


# ---------------------------------------------------------------- teacher cache
@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_exact_cache_gives_the_uncached_loss_and_gradients(tiny_model, chatml_tok, prefix_reuse):
    rows = zorblax_rows(chatml_tok)
    pad = chatml_tok.pad_token_id
    m = noisy_lora(tiny_model)
    cache = build_teacher_cache(
        m, rows, pad, mode="exact", batch_size=4, prefix_reuse=prefix_reuse, log=lambda s: None
    )
    assert cache.mode == "exact" and cache.logp.shape[1] == len(chatml_tok)
    pick = [7, 2, 5, 0]
    b = collate([rows[i] for i in pick], pad)
    kl, per_seq = batch_kl(m, b, 3)
    kl.sum().backward()
    g_plain = lora_grads(m)
    m.zero_grad()
    kl_c, per_seq_c = batch_kl(m, b, 3, teacher=cache.target(pick))
    kl_c.sum().backward()
    torch.testing.assert_close(kl_c, kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_seq_c, per_seq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_grads(m), g_plain, atol=1e-6, rtol=1e-4)


def test_topk_cache_gradient_flows(tiny_model, chatml_tok):
    rows = zorblax_rows(chatml_tok)
    m = noisy_lora(tiny_model)
    cache = build_teacher_cache(m, rows, chatml_tok.pad_token_id, mode="topk", topk=16, log=print)
    assert cache.mode == "topk" and cache.logp.shape[1] == 16 and cache.idx.dtype == torch.int32
    assert (cache.log_tail < 0).all()
    head = base_of(m).get_output_embeddings()
    b = collate(rows[:4], chatml_tok.pad_token_id)
    s_hidden = selected_hidden(m, b.unprompted)
    kl = divergence(s_hidden, head, cache.target(range(4)), 4)
    with torch.no_grad():
        t_hidden = selected_hidden(m, b.prompted)
        full = token_kl(head(t_hidden), head(s_hidden))
    assert (kl <= full + 1e-5).all()
    kl.sum().backward()
    assert lora_grads(m).abs().sum() > 0


def test_cache_order_groups_rows_by_prompt(chatml_tok):
    rows = zorblax_rows(chatml_tok)
    shuffled = [rows[i] for i in [4, 0, 7, 2, 8, 1, 3, 6, 5]]
    order = cache_order(shuffled)
    prompts = [tuple(shuffled[i]["prompt_input_ids"]) for i in order]
    changes = sum(a != b for a, b in zip(prompts, prompts[1:]))
    assert sorted(order) == list(range(9)) and changes == 2


# ---------------------------------------------------------------- kept from generation
def test_teacher_cache_kept_from_generation_equals_a_teacher_pass(tiny_model, chatml_tok, tmp_path):
    from promptbake.configs import GenerateConfig
    from promptbake.sampling.trajectories import generate_trajectories
    from promptbake.schema import read_trajectories

    qs = [{"question": q} for q in ZORBLAX_QUESTIONS]
    cfg = GenerateConfig(
        model_name="tiny",
        device="cpu",
        num_sequences_per_question=3,
        max_sequence_length=6,
        batch_size=4,
        traj_out_file=str(tmp_path / "t.jsonl"),
    )
    m = noisy_lora(tiny_model)
    caches = {}
    for max_gen in (None, 2):
        out = tmp_path / f"t{max_gen}.jsonl"
        gen = generate_trajectories(
            tiny_model, chatml_tok, cfg, "Your name is Zorblax.", qs, out, keep_bytes=1e12
        )
        rows = read_trajectories(out)
        assert gen.rows == rows and len(rows) == 9  # what was written, in file order
        got = caches[max_gen] = cache_from_generation(rows, gen.kept, max_gen)
        ref = build_teacher_cache(
            m, rows, chatml_tok.pad_token_id, batch_size=4, max_gen=max_gen, log=lambda s: None
        )
        assert torch.equal(got.offsets, ref.offsets)
        torch.testing.assert_close(got.logp, ref.logp, atol=1e-4, rtol=0)
    # a row without kept log-probs (e.g. written by an earlier, resumed run): no cache
    full, o = caches[None], caches[None].offsets
    kept = {(r["question_index"], r["sample_index"]): full.logp[o[i] : o[i + 1]] for i, r in enumerate(rows)}  # fmt: skip
    assert cache_from_generation(rows, kept, 2) is not None
    del kept[(rows[4]["question_index"], rows[4]["sample_index"])]
    assert cache_from_generation(rows, kept) is None


def test_a_top_k_table_kept_from_generation_is_the_teacher_passs_top_k(tiny_model, chatml_tok):
    """The vllm engine hands back top-k (ids, log-probs) per row: cache_from_generation
    makes the same top-k + tail table a top-k teacher pass builds (--teacher_cache topk)."""
    rows = [
        dict(r, question_index=i, sample_index=0)
        for i, r in enumerate(zorblax_rows(chatml_tok)[:4])
    ]
    full = build_teacher_cache(tiny_model, rows, chatml_tok.pad_token_id, log=lambda s: None)
    ref = build_teacher_cache(
        tiny_model, rows, chatml_tok.pad_token_id, mode="topk", topk=8, log=lambda s: None
    )
    o = full.offsets
    kept = {}
    for i, r in enumerate(rows):
        vals, ids = full.logp[o[i] : o[i + 1]].topk(10, dim=-1)  # the engine's k = 10
        kept[(r["question_index"], r["sample_index"])] = (ids, vals)
    got = cache_from_generation(rows, kept, topk=8)
    assert got.mode == "topk" and torch.equal(got.offsets, ref.offsets)
    assert torch.equal(got.idx.long(), ref.idx.long())
    torch.testing.assert_close(got.logp, ref.logp)
    torch.testing.assert_close(got.log_tail, ref.log_tail, atol=1e-5, rtol=1e-5)
    # a row the engine kept nothing for: no table (training then builds its own)
    del kept[next(iter(kept))]
    assert cache_from_generation(rows, kept, topk=8) is None
