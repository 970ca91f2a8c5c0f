"""The hf engine (promptbake.sampling.hf): transformers' generate() behind the sampling seam,
on the tiny random Qwen3.

    python -m pytest tests/test_sampling_hf.py -q

Greedy decoding makes generation a pure function of the model, so batched, left-padded
generation must equal one-prompt-at-a-time generation exactly: that checks the attention
masks and position ids. A model whose logits are biased towards <|im_end|> checks
min_new_tokens and the cut after the first end-of-turn.
"""

import pytest
import tiny
import torch
from tiny import bias_towards, sampling_prompts

from promptbake.prompts import encode, format_prompt
from promptbake.sampling import hf as engine_hf
from promptbake.sampling.hf import left_pad, sample_batch
from promptbake.schema import make_trajectory  # noqa: E402
from promptbake.training.batches import collate  # noqa: E402
from promptbake.training.forward import selected_hidden  # noqa: E402

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


# ---------------------------------------------------------------- padding and masks
def test_left_pad_mask_comes_from_lengths_not_values(chatml_tok):
    chatml_tok.pad_token = chatml_tok.eos_token  # pad == eos == <|im_end|>
    pad = chatml_tok.pad_token_id
    seqs = [[5, pad, 6, pad], [pad, 9], [7]]
    ids, mask = left_pad(seqs, pad)
    assert ids.tolist() == [[5, pad, 6, pad], [pad, pad, pad, 9], [pad, pad, pad, 7]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_real_prompts_keep_their_end_of_turn_tokens_unmasked(chatml_tok):
    chatml_tok.pad_token = chatml_tok.eos_token
    prompts = sampling_prompts(chatml_tok)
    ids, mask = left_pad(prompts, chatml_tok.pad_token_id)
    for row, p in enumerate(prompts):
        assert chatml_tok.pad_token_id in p  # <|im_end|> closes the system and user turns
        assert int(mask[row].sum()) == len(p)
        assert ids[row, mask[row].bool()].tolist() == p


def test_batched_greedy_equals_one_at_a_time(chatml_tok, peaky_model):
    chatml_tok.pad_token = chatml_tok.eos_token  # the case where value-based masks broke
    prompts = sampling_prompts(chatml_tok)
    assert len({len(p) for p in prompts}) == 3  # really needs padding
    kw = dict(pad_id=chatml_tok.pad_token_id, eot_ids=[], max_new_tokens=8, **GREEDY)
    batched = sample_batch(peaky_model, prompts, **kw)
    # the reference: each prompt alone, no padding, every token attended
    single = []
    for p in prompts:
        ids = torch.tensor([p])
        out = peaky_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            pad_token_id=chatml_tok.pad_token_id,
            eos_token_id=[],
            **GREEDY,
        )
        single.append(out[0, len(p) :].tolist())
    assert batched == single
    assert all(len(g) == 8 for g in batched)
    assert len({tuple(g) for g in batched}) > 1  # not trivially constant output


def test_sample_batch_cuts_padding_after_end_of_turn(chatml_tok, tiny_model):
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    prompts = sampling_prompts(chatml_tok)
    handle = bias_towards(tiny_model, im_end)
    out = sample_batch(tiny_model, prompts, pad_id=0, eot_ids=[im_end], max_new_tokens=5, **GREEDY)
    handle.remove()
    assert out == [[im_end]] * 3


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_min_new_tokens_delays_the_end_of_turn(chatml_tok, tiny_model, k):
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    bias_towards(tiny_model, im_end)
    out = sample_batch(
        tiny_model,
        sampling_prompts(chatml_tok),
        pad_id=chatml_tok.pad_token_id,
        eot_ids=[im_end],
        max_new_tokens=10,
        min_new_tokens=k,
        do_sample=True,
        temperature=1.0,
    )
    for gen in out:
        # eos is suppressed for the first k new tokens, then (being the argmax) ends the turn
        # at once: k answer tokens + the end of turn
        assert len(gen) == k + 1
        assert gen[-1] == im_end
        assert im_end not in gen[:-1]


# ---------------------------------------------------------------- shared prefill and kept log-probs
def test_shared_prefill_gives_the_samples_of_a_plain_call(chatml_tok, peaky_model, monkeypatch):
    """Each distinct prompt's KV cache is computed once and repeated for its samples;
    generate() continues from it and must draw the same samples as a plain call."""
    prompts = [p for p in sampling_prompts(chatml_tok) for _ in range(3)]  # 3 samples each
    kw = dict(pad_id=0, eot_ids=[], max_new_tokens=6, do_sample=True, temperature=1.0)
    ids, mask = left_pad(prompts, 0)
    cache = engine_hf.shared_prefill(peaky_model, ids, mask)
    assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
    torch.manual_seed(3)
    shared = sample_batch(peaky_model, prompts, **kw)
    monkeypatch.setattr(engine_hf, "shared_prefill", lambda *a: None)
    torch.manual_seed(3)
    plain = sample_batch(peaky_model, prompts, **kw)
    assert shared == plain
    assert len({tuple(s) for s in shared}) > 3  # really sampled: samples of a prompt differ
    # distinct prompts: nothing to share
    ids1, mask1 = left_pad(sampling_prompts(chatml_tok), 0)
    assert engine_hf.shared_prefill(peaky_model, ids1, mask1) is None


def test_logprobs_kept_while_sampling_are_the_teachers(chatml_tok, tiny_model):
    """The raw log-probs generate() computed at each kept token equal a separate
    teacher pass over the finished trajectories, whatever temperature sampled them."""

    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [p for p in sampling_prompts(chatml_tok) for _ in range(2)]
    torch.manual_seed(0)
    new, lps = sample_batch(
        tiny_model,
        prompts,
        pad_id=0,
        eot_ids=[im_end],
        max_new_tokens=7,
        min_new_tokens=2,
        return_logprobs=True,
        do_sample=True,
        temperature=0.6,
        top_k=20,
    )
    assert [lp.shape for lp in lps] == [(len(n), len(chatml_tok)) for n in new]
    rows = [make_trajectory(chatml_tok, p, p, n) for p, n in zip(prompts, new)]
    with torch.no_grad():
        h = selected_hidden(tiny_model, collate(rows, 0).prompted)
        teacher = tiny_model.lm_head(h).float().log_softmax(-1)
    torch.testing.assert_close(torch.cat(lps), teacher, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- static cache, out of memory
def test_static_cache_and_generation_oom_backoff(chatml_tok, monkeypatch, capsys):
    """Decoding with a static cache (prompts padded to 64) gives the dynamic cache's greedy
    answers, and a CUDA out-of-memory splits the batch instead of crashing."""

    from promptbake.sampling.hf import sample_batch

    model = tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)
    prompts = [encode(chatml_tok, format_prompt(None, q, False, chatml_tok)) for q in "abc"]
    kw = dict(pad_id=chatml_tok.pad_token_id, eot_ids=[1], max_new_tokens=6, do_sample=False)
    plain = sample_batch(model, prompts, **kw)
    assert len(set(map(tuple, plain))) > 1  # not a degenerate model
    static = sample_batch(model, prompts, cache_implementation="static", **kw)
    assert static == plain
    real = model.generate

    def flaky(*a, **k):
        if k["input_ids"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("fake")
        return real(*a, **k)

    monkeypatch.setattr(model, "generate", flaky)
    assert sample_batch(model, prompts, **kw) == plain
    assert "CUDA out of memory at 3 sequences" in capsys.readouterr().err
