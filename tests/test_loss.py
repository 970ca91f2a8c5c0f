"""The divergences as pure tensor functions (promptbake.loss).

python -m pytest tests/test_loss.py -q
"""

import pytest
import torch
import torch.nn.functional as F

from promptbake import loss
from promptbake.errors import UserError
from promptbake.loss import DIVERGENCES, TeacherTarget, divergence, masked_kl, token_kl

V, H = 37, 8


def logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


def reference_kl(t, s):
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)


# ---------------------------------------------------------------- token_kl
def test_kl_of_a_distribution_with_itself_is_zero():
    p = logits(5, V)
    torch.testing.assert_close(token_kl(p, p), torch.zeros(5), atol=1e-6, rtol=0)
    # shifting logits does not change the distribution
    torch.testing.assert_close(token_kl(p, p + 4.0), torch.zeros(5), atol=1e-5, rtol=0)


def test_token_kl_matches_torch_kl_div():
    t, s = logits(2, 6, V, seed=1), logits(2, 6, V, seed=2)
    got = token_kl(t, s)
    assert got.shape == (2, 6)
    torch.testing.assert_close(got, reference_kl(t, s), atol=1e-6, rtol=1e-6)
    assert (got > 0).all()


def test_token_kl_is_asymmetric_and_teacher_first():
    t, s = logits(4, V, seed=3), logits(4, V, seed=4, scale=0.3)
    assert not torch.allclose(token_kl(t, s), token_kl(s, t))
    torch.testing.assert_close(token_kl(s, t), reference_kl(s, t), atol=1e-6, rtol=1e-6)


def test_token_kl_with_a_zero_probability_teacher_token_is_finite():
    t = logits(3, V, seed=5)
    t[:, 0] = float("-inf")  # p_teacher = 0 exactly: 0 * log 0 must count as 0
    s = logits(3, V, seed=6)
    got = token_kl(t, s)
    assert torch.isfinite(got).all()
    # the KL sums over the teacher's support only
    lt, ls = t.log_softmax(-1)[:, 1:], s.log_softmax(-1)[:, 1:]
    exact = (lt.exp() * (lt - ls)).sum(-1)
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-6)


def test_token_kl_computes_in_float32_for_bfloat16_inputs():
    t, s = logits(3, V, seed=7), logits(3, V, seed=8)
    got = token_kl(t.bfloat16(), s.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, reference_kl(t.bfloat16().float(), s.bfloat16().float()), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------- masked_kl
def test_masked_positions_contribute_nothing():
    t, s = logits(2, 5, V, seed=9), logits(2, 5, V, seed=10)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    mean, per_seq = masked_kl(t, s, mask)
    t2, s2 = t.clone(), s.clone()
    t2[mask == 0] = logits(int((mask == 0).sum()), V, seed=11) * 5
    s2[mask == 0] = -s2[mask == 0]
    mean2, per_seq2 = masked_kl(t2, s2, mask)
    assert float(mean2) == float(mean)
    assert torch.equal(per_seq2, per_seq)
    ref = reference_kl(t, s)
    torch.testing.assert_close(per_seq, (ref * mask).sum(-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(mean, ref[mask.bool()].mean(), atol=1e-6, rtol=1e-6)


def test_all_masked_gives_zero_not_nan():
    t, s = logits(2, 3, V, seed=12), logits(2, 3, V, seed=13)
    mean, per_seq = masked_kl(t, s, torch.zeros(2, 3))
    assert float(mean) == 0.0
    assert per_seq.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- the divergences, plain
def plain(kind, t_logits, s_logits, beta=0.5):
    """The divergence from its textbook formula on full float64 softmaxes."""
    p, q = t_logits.double().softmax(-1), s_logits.double().softmax(-1)

    def kl(a, b):  # sum a log(a / b), 0 where a == 0
        return torch.where(a > 0, a * (a / b).log(), 0.0).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.1),
    ("jsd", 0.9),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


@pytest.mark.parametrize("kind,beta", CASES)
def test_each_divergence_matches_its_plain_formula_value_and_logit_gradient(kind, beta):
    t, s = logits(6, V, seed=30), logits(6, V, seed=31)
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)  # a non-uniform upstream gradient
    s_ref = s.double().requires_grad_()
    ref = plain(kind, t, s_ref, beta)
    (ref * w).sum().backward()

    div = DIVERGENCES[kind]
    z = s.clone().requires_grad_()
    got = div.value(t.log_softmax(-1), z.log_softmax(-1), beta)
    (got * w.float()).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), s_ref.grad, atol=1e-5, rtol=1e-5)
    # the closed form the fused path uses equals autograd on the value
    closed = div.grad(t.log_softmax(-1), s.log_softmax(-1), beta) * w.float()[:, None]
    torch.testing.assert_close(closed.double(), s_ref.grad, atol=1e-5, rtol=1e-5)
    assert ref.min() > 1e-3 and s_ref.grad.abs().sum() > 0


def test_forward_kl_is_f_kl_div_and_the_default():
    t, s = logits(5, V, seed=32), logits(5, V, seed=33)
    got = divergence(s, torch.nn.Identity(), TeacherTarget(t.log_softmax(-1)), 2)
    torch.testing.assert_close(got, reference_kl(t, s), atol=1e-6, rtol=1e-6)


def test_reverse_kl_swaps_the_arguments():
    t, s = logits(5, V, seed=34), logits(5, V, seed=35, scale=0.5)
    tl, sl = t.log_softmax(-1), s.log_softmax(-1)
    rev = DIVERGENCES["reverse_kl"].value(tl, sl)
    torch.testing.assert_close(rev, reference_kl(s, t), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(rev, DIVERGENCES["forward_kl"].value(tl, sl), atol=1e-3)


def test_jsd_ends_are_the_two_kls_and_its_interior_is_bounded():
    t, s = logits(5, V, seed=36), logits(5, V, seed=37)
    tl, sl = t.log_softmax(-1), s.log_softmax(-1)
    jsd = DIVERGENCES["jsd"].value
    torch.testing.assert_close(jsd(tl, sl, 0.0), reference_kl(t, s), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(jsd(tl, sl, 1.0), reference_kl(s, t), atol=1e-6, rtol=1e-6)
    # the interior formula tends to 0 at the ends: that is why they are special-cased
    assert jsd(tl, sl, 1e-4).max() < 1e-2 * reference_kl(t, s).min()
    half = jsd(tl, sl, 0.5)
    assert (half > 0).all() and (half <= torch.log(torch.tensor(2.0)) + 1e-6).all()
    torch.testing.assert_close(jsd(tl, sl, 0.5), jsd(sl, tl, 0.5), atol=1e-6, rtol=1e-6)


def test_divergences_are_zero_for_equal_distributions_and_finite_at_zero_mass():
    t = logits(4, V, seed=38)
    t[:, :3] = float("-inf")  # p = 0 exactly on three tokens, for teacher and student
    tl = t.log_softmax(-1)
    for kind, beta in CASES:
        got = DIVERGENCES[kind].value(tl, tl, beta)
        torch.testing.assert_close(got, torch.zeros(4), atol=1e-6, rtol=0)
        assert torch.isfinite(DIVERGENCES[kind].grad(tl, tl, beta)).all()


def test_bad_divergence_name_or_beta_is_a_user_error():
    h, tgt = torch.zeros(2, V), TeacherTarget(torch.zeros(2, V))
    with pytest.raises(UserError, match="forward_kl, reverse_kl, jsd"):
        divergence(h, torch.nn.Identity(), tgt, kind="tvd")
    with pytest.raises(UserError, match="jsd_beta"):
        divergence(h, torch.nn.Identity(), tgt, kind="jsd", beta=1.5)
    assert loss.DIVERGENCE_NAMES == ["forward_kl", "reverse_kl", "jsd"]


# ---------------------------------------------------------------- divergence(): hidden target
@pytest.fixture
def head():
    torch.manual_seed(0)
    lin = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lin.weight.mul_(4)
    return lin


N = 7
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def run(head, s_h, target, chunk, kind, beta, w):
    """divergence() and its gradient w.r.t. the student's hidden states."""
    s = s_h.detach().clone().requires_grad_()
    got = divergence(s, head, target, chunk, kind, beta)
    (got * w).sum().backward()
    return got.detach(), s.grad


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergence_equals_the_plain_full_vocabulary_formula(head, fused, chunk, kind, beta):
    """Chunked (fused or checkpointed) == the textbook formula on the full logits,
    values and gradients w.r.t. the student's hidden states, under a non-uniform
    upstream gradient."""
    head.weight.requires_grad_(not fused)
    assert loss.can_fuse(head) == fused
    t_h, s_h = logits(N, H, seed=14, scale=1), logits(N, H, seed=15, scale=1)
    w = torch.linspace(0.5, 2.0, N)
    s_ref = s_h.double().requires_grad_()
    with torch.no_grad():
        t_logits = head(t_h)
    ref = plain(kind, t_logits, s_ref @ head.weight.detach().double().T, beta)
    (ref * w.double()).sum().backward()

    got, g = run(head, s_h, TeacherTarget(hidden=t_h), chunk, kind, beta, w)
    assert got.shape == (N,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), s_ref.grad, atol=1e-5, rtol=1e-5)
    assert ref.min() > 1e-3 and g.abs().sum() > 0


@pytest.mark.parametrize("kind,beta", KINDS)
def test_fused_path_equals_the_checkpointed_autograd_path(head, kind, beta):
    t_h, s_h = logits(N, H, seed=24, scale=1), logits(N, H, seed=25, scale=1)
    w = torch.linspace(2.0, 0.1, N)
    target = TeacherTarget(hidden=t_h)
    v1, g1 = run(head, s_h, target, 3, kind, beta, w)  # weight requires grad: checkpointed
    assert head.weight.grad is not None  # the autograd path trains a trainable head
    head.weight.requires_grad_(False)
    head.weight.grad = None
    s = s_h.clone().requires_grad_()
    got = divergence(s, head, target, 3, kind, beta)
    assert "Fused" in type(got.grad_fn).__name__
    (got * w).sum().backward()
    torch.testing.assert_close(got.detach(), v1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.grad, g1, atol=1e-5, rtol=1e-5)
    assert head.weight.grad is None  # a frozen head stays untouched


def test_the_teacher_gets_no_gradient(head):
    t_h = logits(N, H, seed=18, scale=1).requires_grad_()
    s_h = logits(N, H, seed=19, scale=1).requires_grad_()
    for fused in (False, True):
        head.weight.requires_grad_(not fused)
        divergence(s_h, head, TeacherTarget(hidden=t_h), 2, "jsd").sum().backward()
        assert t_h.grad is None
    assert s_h.grad is not None


def test_without_grad_builds_no_graph(head):
    s = logits(N, H, seed=20, scale=1).requires_grad_()
    for fused in (False, True):
        head.weight.requires_grad_(not fused)
        with torch.no_grad():
            got = divergence(s, head, TeacherTarget(hidden=logits(N, H, seed=21)), 3, "jsd")
        assert got.grad_fn is None and not got.requires_grad


def test_fused_is_not_used_for_a_head_with_bias():
    lin = torch.nn.Linear(H, V, bias=True).requires_grad_(False)
    assert not loss.can_fuse(lin)
    assert loss.can_fuse(torch.nn.Linear(H, V, bias=False).requires_grad_(False))


def test_row_count_mismatch_is_an_error(head):
    with pytest.raises(ValueError, match="3 teacher rows for 2"):
        divergence(torch.zeros(2, H), head, TeacherTarget(hidden=torch.zeros(3, H)))


# ---------------------------------------------------------------- target forms
def topk_target(t_logp, k):
    top, idx = t_logp.topk(k, -1)
    tail = t_logp.scatter(1, idx, float("-inf")).logsumexp(-1)
    return TeacherTarget(top, idx.int(), tail)


def old_topk_kl(logp, idx, log_tail, s_logits):
    """The top-k + tail forward KL as it was before the divergence family (its numbers)."""
    s = s_logits.float().log_softmax(-1)
    s_top = s.gather(1, idx.long())
    p = logp.exp()
    head = (p * (logp - s_top)).sum(-1)
    log_q_tail = torch.log((-torch.expm1(torch.logsumexp(s_top, -1))).clamp(min=1e-30))
    p_tail = log_tail.exp()
    return head + torch.where(p_tail > 0, p_tail * (log_tail - log_q_tail), 0.0)


def test_target_forms_agree_hidden_exact_and_full_topk(head):
    """Hidden states, the exact log-prob cache (kept on the CPU) and top-k with k = V
    give the same values and gradients, fused and checkpointed, for every divergence."""
    t_h, s_h = logits(N, H, seed=40, scale=1), logits(N, H, seed=41, scale=1)
    w = torch.linspace(0.5, 2.0, N)
    with torch.no_grad():
        t_logp = head(t_h).log_softmax(-1)
    forms = [TeacherTarget(hidden=t_h), TeacherTarget(t_logp), topk_target(t_logp, V)]
    assert [f.kind for f in forms] == ["hidden", "exact", "topk"]
    assert float(forms[2].log_tail.max()) == float("-inf")
    for kind, beta in KINDS:
        for fused in (True, False):
            head.weight.requires_grad_(not fused)
            (v0, g0), *rest = [run(head, s_h, f, 3, kind, beta, w) for f in forms]
            for v, g in rest:
                torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(g, g0, atol=1e-5, rtol=1e-5)


def test_topk_keeps_its_numbers_and_is_a_lower_bound_below_full_k():
    t, s = logits(6, 50, seed=42), logits(6, 50, seed=43)
    ident = torch.nn.Identity()  # the student's "hidden states" are its logits
    for k in (50, 10, 1):
        tgt = topk_target(t.log_softmax(-1), k)
        got = divergence(s, ident, tgt, 4)
        torch.testing.assert_close(got, old_topk_kl(tgt.logp, tgt.idx, tgt.log_tail, s))
    for kind, beta in KINDS:
        full = plain(kind, t, s, beta).float()
        approx = {
            k: divergence(s, ident, topk_target(t.log_softmax(-1), k), 4, kind, beta)
            for k in (50, 10, 1)
        }
        torch.testing.assert_close(approx[50], full, atol=1e-5, rtol=1e-5)  # no tail: exact
        for k in (10, 1):
            assert (approx[k] <= full + 1e-5).all() and (approx[k] > 0).all()
        # keeping more of the distribution comes closer to the full divergence
        assert (full - approx[10]).sum() < (full - approx[1]).sum()


@pytest.mark.parametrize("kind,beta", KINDS)
def test_topk_fused_equals_autograd_below_full_k(head, kind, beta):
    t_h, s_h = logits(N, H, seed=44, scale=1), logits(N, H, seed=45, scale=1)
    w = torch.linspace(0.5, 2.0, N)
    with torch.no_grad():
        target = topk_target(head(t_h).log_softmax(-1), 5)
    s_ref = s_h.clone().requires_grad_()
    ref = divergence(s_ref @ head.weight.T, torch.nn.Identity(), target, N, kind, beta)
    (ref * w).sum().backward()  # plain autograd through the coarse bins, one chunk
    head.weight.requires_grad_(False)
    v, g = run(head, s_h, target, 3, kind, beta, w)
    torch.testing.assert_close(v, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, s_ref.grad, atol=1e-5, rtol=1e-5)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("fused", [True, False])
def test_zero_rows_give_zeros_and_a_usable_graph(head, fused):
    head.weight.requires_grad_(not fused)
    empty_t = [
        TeacherTarget(hidden=torch.zeros(0, H)),
        TeacherTarget(torch.zeros(0, V)),
        TeacherTarget(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0)),
    ]
    for target in empty_t:
        for kind, beta in KINDS:
            s = torch.zeros(0, H, requires_grad=True)
            got = divergence(s, head, target, 4, kind, beta)
            assert got.shape == (0,) and got.dtype == torch.float32
            got.sum().backward()  # a training step on an empty batch must not crash
            assert s.grad is not None and s.grad.shape == (0, H)
