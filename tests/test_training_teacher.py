"""Teacher speed-ups (promptbake.teacher) and the training switches built on them.

    python -m pytest tests/test_training_teacher.py -q

Everything runs on the tiny random Qwen3 in float32: prefix reuse must equal a plain
forward, the exact teacher cache must give the uncached loss and gradients, the top-k
cache must be exact at k = V and a lower bound below it, length bucketing must be a
permutation with less padding, and the CUDA out-of-memory back-off must give the
same gradient as one pass.
"""

import copy

import pytest
import torch
from tiny import ZORBLAX_QUESTIONS, lora_grads, noisy_lora, zorblax_rows

from promptbake.configs import TrainConfig
from promptbake.errors import UserError
from promptbake.loss import divergence, token_kl
from promptbake.records import make_trajectory
from promptbake.training import loop as train_mod
from promptbake.training import objective
from promptbake.training.batches import (
    bucket_order,
    collate,
    common_prefix_length,
    prefix_groups,
    prefix_lengths,
    tree_mask,
)
from promptbake.training.forward import (
    adapter_disabled,
    base_of,
    prefix_reuse_hidden,
    selected_hidden,
)
from promptbake.training.objective import backward_kl, batch_kl
from promptbake.training.teacher import build_teacher_cache, cache_from_generation, cache_order


# ---------------------------------------------------------------- prefix reuse
def test_prefix_lengths_and_groups(chatml_tok):
    rows = zorblax_rows(chatml_tok, n_seq=2)
    side = collate(rows, chatml_tok.pad_token_id).prompted
    plen = prefix_lengths(side)
    assert plen.tolist() == [len(r["prompt_input_ids"]) for r in rows]
    group, reps = prefix_groups(side, plen)
    assert group == [0, 0, 1, 1, 2, 2] and reps == [0, 2, 4]


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


def test_batch_kl_with_prefix_reuse_matches(tiny_model, chatml_tok):
    m = noisy_lora(tiny_model)
    b = collate(zorblax_rows(chatml_tok), chatml_tok.pad_token_id)
    with torch.no_grad():
        a, sa = batch_kl(m, b, 5)
        c, sc = batch_kl(m, b, 5, prefix_reuse=True)
    assert a.min() > 0
    torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc, sa, atol=1e-5, rtol=1e-5)


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


def test_cache_order_groups_rows_by_prompt(chatml_tok):
    rows = zorblax_rows(chatml_tok)
    shuffled = [rows[i] for i in [4, 0, 7, 2, 8, 1, 3, 6, 5]]
    order = cache_order(shuffled)
    prompts = [tuple(shuffled[i]["prompt_input_ids"]) for i in order]
    changes = sum(a != b for a, b in zip(prompts, prompts[1:]))
    assert sorted(order) == list(range(9)) and changes == 2


# ---------------------------------------------------------------- batching, back-off, fit
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


def fit(model, tok, rows, tmp_path, name, **flags):
    cfg = TrainConfig(
        data_path="unused.jsonl",
        out_dir=str(tmp_path / name),
        num_epochs=2,
        batch_size=4,
        learning_rate=1e-2,
        r=4,
        lora_alpha=8.0,
        save_every=0,
        kl_chunk_size=7,
        plot=False,
        **flags,
    )
    return train_mod.train(cfg, copy.deepcopy(model), tok, rows, None, echo=False)[1]


def test_training_switches_keep_the_loss(tiny_model, chatml_tok, tmp_path):
    """Exact speed-ups change nothing but speed; bucketing changes the batches only."""
    rows = zorblax_rows(chatml_tok)
    plain = fit(tiny_model, chatml_tok, rows, tmp_path, "plain", teacher_cache="off")
    exact = fit(
        tiny_model,
        chatml_tok,
        rows,
        tmp_path,
        "exact",
        teacher_cache="exact",
        prefix_reuse=True,
        gradient_checkpointing=True,
    )
    for a, b in zip(plain, exact):
        assert a["train_kl"] == pytest.approx(b["train_kl"], rel=1e-4)
    assert plain[-1]["train_kl"] < plain[0]["train_kl"]  # it trains
    bucketed = fit(
        tiny_model, chatml_tok, rows, tmp_path, "bucket", teacher_cache="off", length_bucketing=True
    )
    assert bucketed[0]["train_kl"] != pytest.approx(plain[0]["train_kl"], rel=1e-6)
    assert bucketed[-1]["train_kl"] < bucketed[0]["train_kl"]


def test_teacher_cache_auto_is_exact_and_never_topk_unless_asked(tiny_model, chatml_tok, tmp_path):
    """auto builds the exact table when it fits; auto or exact over --teacher_cache_max_gb
    runs the teacher every step (the same curve as off, bit for bit), never top-k."""
    rows = zorblax_rows(chatml_tok)
    off = fit(tiny_model, chatml_tok, rows, tmp_path, "off", teacher_cache="off")
    auto = fit(tiny_model, chatml_tok, rows, tmp_path, "auto")  # the default
    log = (tmp_path / "auto" / "train_loop.log").read_text()
    assert "teacher cache (exact)" in log
    for a, b in zip(off, auto):
        assert a["train_kl"] == pytest.approx(b["train_kl"], rel=1e-4)
    for mode in ("auto", "exact"):
        small = fit(
            tiny_model, chatml_tok, rows, tmp_path, f"small-{mode}",
            teacher_cache=mode, teacher_cache_max_gb=1e-9,
        )  # fmt: skip
        assert [m["train_kl"] for m in small] == [m["train_kl"] for m in off]
        log = (tmp_path / f"small-{mode}" / "train_loop.log").read_text()
        assert "the teacher runs every step instead" in log
        assert "topk" not in log.replace("--teacher_cache topk trades", "")
        assert "teacher cache (" not in log
    assert TrainConfig().teacher_cache == "auto"


def test_new_flags_are_validated():
    with pytest.raises(UserError, match="teacher_topk"):
        TrainConfig(data_path="d", out_dir="o", teacher_topk=0).validate()
    with pytest.raises(UserError, match="teacher_cache_max_gb"):
        TrainConfig(data_path="d", out_dir="o", teacher_cache_max_gb=0).validate()


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


def test_teacher_cache_kept_from_generation_equals_a_teacher_pass(tiny_model, chatml_tok, tmp_path):
    from promptbake.configs import GenerateConfig
    from promptbake.records import read_trajectories
    from promptbake.sampling.trajectories import generate_trajectories

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
