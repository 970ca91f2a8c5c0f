"""The KL objective as pure tensor functions (promptbake.loss).

python -m pytest tests/test_loss.py -q
"""

import pytest
import torch
import torch.nn.functional as F

from promptbake import loss
from promptbake.loss import chunked_kl, masked_kl, token_kl

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


# ---------------------------------------------------------------- chunked_kl
@pytest.fixture
def head():
    torch.manual_seed(0)
    lin = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lin.weight.mul_(4)
    return lin


N = 7


@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])
def test_chunked_kl_equals_full_logits(head, chunk):
    t_h, s_h = logits(N, H, seed=14, scale=1), logits(N, H, seed=15, scale=1)
    with torch.no_grad():
        full = token_kl(head(t_h), head(s_h))
    got = chunked_kl(t_h, s_h, head, chunk)
    assert got.shape == (N,)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert full.min() > 1e-3  # a real, non-trivial KL


@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])
def test_chunked_kl_gradients_equal_the_plain_version(head, chunk):
    t_h = logits(N, H, seed=16, scale=1)
    s_plain = logits(N, H, seed=17, scale=1).requires_grad_()
    s_chunk = s_plain.detach().clone().requires_grad_()
    weights = torch.linspace(0.5, 2.0, N)  # a non-uniform upstream gradient

    (token_kl(head(t_h).detach(), head(s_plain)) * weights).sum().backward()
    g_plain_h, g_plain_w = s_plain.grad.clone(), head.weight.grad.clone()
    head.weight.grad = None

    (chunked_kl(t_h, s_chunk, head, chunk) * weights).sum().backward()
    torch.testing.assert_close(s_chunk.grad, g_plain_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, g_plain_w, atol=1e-5, rtol=1e-5)
    assert s_chunk.grad.abs().sum() > 0


def test_chunked_kl_teacher_gets_no_gradient(head):
    t_h = logits(N, H, seed=18, scale=1).requires_grad_()
    s_h = logits(N, H, seed=19, scale=1).requires_grad_()
    chunked_kl(t_h, s_h, head, 2).sum().backward()
    assert t_h.grad is None
    assert s_h.grad is not None


def test_chunked_kl_with_zero_rows(head):
    empty = torch.zeros(0, H)
    s = torch.zeros(0, H, requires_grad=True)
    got = chunked_kl(empty, s, head, 4)
    assert got.shape == (0,)
    assert got.dtype == torch.float32
    got.sum().backward()  # a training step on an empty batch must not crash
    assert s.grad is not None and s.grad.shape == (0, H)
    assert chunked_kl(empty, torch.zeros(0, H), head, 4).shape == (0,)


def test_chunked_kl_without_grad_builds_no_graph(head):
    s = logits(N, H, seed=20, scale=1).requires_grad_()
    with torch.no_grad():
        got = chunked_kl(logits(N, H, seed=21, scale=1), s, head, 3)
    assert got.grad_fn is None and not got.requires_grad


# ---------------------------------------------------------------- fused_kl
@pytest.fixture
def frozen_head(head):
    head.weight.requires_grad_(False)
    return head


@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])
def test_fused_kl_equals_kl_div_value_and_gradient(frozen_head, chunk):
    """The fused path (gradient computed in the forward pass) against F.kl_div on the
    full logits with autograd, under a non-uniform upstream gradient."""
    t_h = logits(N, H, seed=22, scale=1)
    s_ref = logits(N, H, seed=23, scale=1).requires_grad_()
    s_fused = s_ref.detach().clone().requires_grad_()
    weights = torch.linspace(0.5, 2.0, N)

    t_logp = frozen_head(t_h).log_softmax(-1)
    ref = F.kl_div(frozen_head(s_ref).log_softmax(-1), t_logp, log_target=True, reduction="none")
    (ref.sum(-1) * weights).sum().backward()

    assert loss.can_fuse(frozen_head)
    got = chunked_kl(t_h, s_fused, frozen_head, chunk)  # takes the fused path
    assert got.grad_fn is not None and "Fused" in type(got.grad_fn).__name__
    (got * weights).sum().backward()
    torch.testing.assert_close(got.detach(), ref.sum(-1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_fused.grad, s_ref.grad, atol=1e-5, rtol=1e-5)
    assert s_fused.grad.abs().sum() > 0
    assert frozen_head.weight.grad is None


def test_fused_kl_equals_the_checkpointed_path(head):
    """Same values and hidden-state gradients as the autograd path it replaces."""
    t_h = logits(N, H, seed=24, scale=1)
    s1 = logits(N, H, seed=25, scale=1).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    w = torch.linspace(2.0, 0.1, N)
    assert not loss.can_fuse(head)  # weight requires grad: checkpointed path
    (chunked_kl(t_h, s1, head, 3) * w).sum().backward()
    head.weight.requires_grad_(False)
    (chunked_kl(t_h, s2, head, 3) * w).sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-5, rtol=1e-5)


def test_fused_kl_is_not_used_for_a_head_with_bias():
    lin = torch.nn.Linear(H, V, bias=True).requires_grad_(False)
    assert not loss.can_fuse(lin)
    assert loss.can_fuse(torch.nn.Linear(H, V, bias=False).requires_grad_(False))


def test_fused_kl_without_grad_and_with_zero_rows(frozen_head):
    s = logits(N, H, seed=26, scale=1).requires_grad_()
    with torch.no_grad():
        got = chunked_kl(logits(N, H, seed=27, scale=1), s, frozen_head, 3)
    assert got.grad_fn is None
    empty = torch.zeros(0, H, requires_grad=True)
    z = chunked_kl(torch.zeros(0, H), empty, frozen_head, 3)
    z.sum().backward()
    assert empty.grad.shape == (0, H)
