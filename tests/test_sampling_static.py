"""The static-cache engine (promptbake.sampling.static) against the hf engine and plain
references, on the tiny random Qwen3 (eager decode step: the CPU runs the code CUDA compiles).

    python -m pytest tests/test_sampling_static.py -q
"""

import json

import pytest
import torch
from tiny import PIRATE, SAMPLING_QUESTIONS, bias_towards, im_end, sample_with, sampling_prompts

from promptbake.configs import GenerateConfig
from promptbake.models import end_of_turn_ids
from promptbake.sampling import static as engine_static
from promptbake.sampling import trajectories
from promptbake.sampling.seam import Sampling
from promptbake.sampling.static import draw, filter_scores
from promptbake.sampling.trajectories import generate_trajectories
from promptbake.schema import TRAJECTORY_KEYS, generated_ids, make_trajectory
from promptbake.training.batches import collate
from promptbake.training.forward import selected_hidden

GREEDY = Sampling(max_new_tokens=9, temperature=None)


# ------------------------------------------------------------------ equal to the hf engine
def test_greedy_equals_the_hf_engine(chatml_tok, peaky_model):
    base = sampling_prompts(chatml_tok)
    assert len({len(p) for p in base}) == 3  # left padding is exercised
    prompts = [base[0], base[1], base[0], base[2], base[1], base[0]]  # shared prompts
    hf = sample_with(peaky_model, chatml_tok, prompts, GREEDY, "hf", eot_ids=[])
    st = sample_with(peaky_model, chatml_tok, prompts, GREEDY, "static", eot_ids=[])
    assert st.new_ids == hf.new_ids
    assert all(len(g) == 9 for g in st.new_ids)
    assert len({tuple(g) for g in st.new_ids}) == 3
    # a second call reuses the model's static cache (same shape, filler rows differ)
    again = sample_with(peaky_model, chatml_tok, prompts[:5], GREEDY, "static", eot_ids=[])
    assert again.new_ids == hf.new_ids[:5]


def test_top_k_1_is_greedy(chatml_tok, peaky_model):
    prompts = sampling_prompts(chatml_tok)
    greedy = sample_with(peaky_model, chatml_tok, prompts, GREEDY, "static", eot_ids=[])
    top1 = Sampling(max_new_tokens=9, temperature=1.7, top_k=1)
    assert (
        sample_with(peaky_model, chatml_tok, prompts, top1, "static", eot_ids=[]).new_ids
        == greedy.new_ids
    )


def test_end_of_turn_cut_and_no_padding(chatml_tok, tiny_model):
    eot = im_end(chatml_tok)
    bias_towards(tiny_model, eot)
    out = sample_with(
        tiny_model, chatml_tok, sampling_prompts(chatml_tok), Sampling(max_new_tokens=40), "static"
    )
    assert out.new_ids == [[eot]] * 3  # one step, then every row is done


@pytest.mark.parametrize("k", [0, 1, 5])
def test_min_new_tokens_delays_the_end_of_turn(chatml_tok, tiny_model, k):
    eot = im_end(chatml_tok)
    bias_towards(tiny_model, eot)
    settings = Sampling(max_new_tokens=10, min_new_tokens=k, temperature=1.0)
    for gen in sample_with(
        tiny_model, chatml_tok, sampling_prompts(chatml_tok), settings, "static"
    ).new_ids:
        assert len(gen) == k + 1 and gen[-1] == eot and eot not in gen[:-1]


def test_sampling_is_reproducible_under_the_seed(chatml_tok, tiny_model):
    prompts = sampling_prompts(chatml_tok) * 2
    settings = Sampling(max_new_tokens=12, temperature=1.3, top_p=0.95)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(sample_with(tiny_model, chatml_tok, prompts, settings, "static").new_ids)
    assert outs[0] == outs[1] != outs[2]
    assert len({tuple(g) for g in outs[0]}) > 1  # rows of one prompt differ: really sampled


def test_kept_logprobs_are_the_teachers(chatml_tok, tiny_model):
    prompts = [p for p in sampling_prompts(chatml_tok) for _ in range(2)]
    torch.manual_seed(0)
    settings = Sampling(max_new_tokens=7, min_new_tokens=2, temperature=0.6, top_k=20)
    out = sample_with(tiny_model, chatml_tok, prompts, settings, "static", return_logprobs=True)
    assert [lp.shape for lp in out.logprobs] == [(len(n), len(chatml_tok)) for n in out.new_ids]
    assert all(lp.dtype == torch.float32 and lp.device.type == "cpu" for lp in out.logprobs)
    rows = [make_trajectory(chatml_tok, p, p, n) for p, n in zip(prompts, out.new_ids)]
    with torch.no_grad():
        h = selected_hidden(tiny_model, collate(rows, 0).prompted)
        teacher = tiny_model.lm_head(h).float().log_softmax(-1)
    torch.testing.assert_close(torch.cat(out.logprobs), teacher, atol=1e-4, rtol=0)


def test_out_of_memory_splits_the_batch_into_the_same_rows(
    chatml_tok, peaky_model, monkeypatch, capsys
):
    prompts = sampling_prompts(chatml_tok) * 2
    ref = sample_with(
        peaky_model, chatml_tok, prompts, GREEDY, "static", eot_ids=[], return_logprobs=True
    )
    real, sizes = engine_static.decode, []

    def oom_once(model, prompts, *a, **kw):
        sizes.append(len(prompts))
        if len(sizes) == 1:
            raise torch.cuda.OutOfMemoryError("fake")
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(engine_static, "decode", oom_once)
    out = sample_with(
        peaky_model, chatml_tok, prompts, GREEDY, "static", eot_ids=[], return_logprobs=True
    )
    assert "out of memory at 6 sequences" in capsys.readouterr().err
    assert sizes == [6, 3, 3]
    assert out.new_ids == ref.new_ids
    torch.testing.assert_close(torch.cat(out.logprobs), torch.cat(ref.logprobs), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the device sampler
def reference_probs(logits: list[float], t: float, top_k: int | None, top_p: float | None):
    """softmax(logits / t) restricted to top-k, then to the smallest top-p nucleus."""
    x = torch.tensor(logits, dtype=torch.float64) / t
    keep = torch.ones(len(logits), dtype=torch.bool)
    if top_k is not None:
        keep &= x >= x.sort(descending=True).values[top_k - 1]
    p = torch.where(keep, x, -torch.inf).softmax(-1)
    if top_p is not None:
        order = p.argsort()  # ascending: drop the tail whose mass stays <= 1 - top_p
        drop = (p[order].cumsum(0) <= 1 - top_p) & (torch.arange(len(p)) < len(p) - 1)
        keep[order[drop]] = False
        p = torch.where(keep, x, -torch.inf).softmax(-1)
    return p


@pytest.mark.parametrize("t,top_k,top_p", [(0.7, None, None), (1.5, 5, None), (1.0, 6, 0.8)])
def test_sampler_frequencies_match_the_filtered_softmax(t, top_k, top_p):
    logits = [2.0, 1.5, 1.2, 0.4, 0.0, -0.3, -1.0, -2.5]
    want = reference_probs(logits, t, top_k, top_p)
    assert (want - reference_probs(logits, 1.0, None, None)).abs().max() > 0.03  # T matters
    torch.manual_seed(0)
    n = 200_000
    tok = draw(
        torch.tensor([logits]).expand(n, -1),
        Sampling(1, temperature=t, top_k=top_k, top_p=top_p),
        None,
    )
    freq = torch.bincount(tok, minlength=len(logits)).double() / n
    assert (freq - want).abs().max() < 0.006  # > 4 standard errors of the largest p
    assert torch.all(freq[want == 0] == 0)


def test_filter_scores_keeps_at_least_one_token():
    scores = filter_scores(torch.tensor([[5.0, 1.0, 0.0]]), 1.0, None, 0.01)
    assert torch.isfinite(scores).tolist() == [[True, False, False]]


# ------------------------------------------------------------------ the generation stage on this engine


def gen_cfg(**kw) -> GenerateConfig:
    base = dict(
        model_name="tiny",
        device="cpu",
        x0_file="x0.md",
        question_dataset="q.jsonl",
        traj_out_file="out.jsonl",
        num_questions=3,
        num_sequences_per_question=2,
        max_sequence_length=6,
        min_sequence_length=1,
        batch_size=4,
        seed=7,
        engine="static",
    )
    base.update(kw)
    return GenerateConfig(**base)


def test_generate_trajectories_with_the_static_engine_resumes_exactly(
    chatml_tok, tiny_model, tmp_path, monkeypatch
):

    ref = tmp_path / "ref.jsonl"
    generate_trajectories(
        tiny_model,
        chatml_tok,
        gen_cfg(batch_size=2),
        PIRATE,
        SAMPLING_QUESTIONS,
        ref,
        progress=False,
    )
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    eot = set(end_of_turn_ids(chatml_tok, tiny_model))
    assert len(rows) == 6
    for r in rows:
        assert set(TRAJECTORY_KEYS) <= set(r)
        gen = generated_ids(r)
        assert 1 <= len(gen) <= 6 and not eot & set(gen[:-1])
        assert r["input_ids"] == r["prompt_input_ids"] + gen
        assert r["text"] == chatml_tok.decode(r["input_ids"], skip_special_tokens=False)

    real, calls = trajectories.sample, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(trajectories, "sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_trajectories(
            tiny_model,
            chatml_tok,
            gen_cfg(batch_size=2),
            PIRATE,
            SAMPLING_QUESTIONS,
            out,
            progress=False,
        )
    monkeypatch.undo()
    generate_trajectories(
        tiny_model,
        chatml_tok,
        gen_cfg(batch_size=2),
        PIRATE,
        SAMPLING_QUESTIONS,
        out,
        progress=False,
    )
    assert out.read_bytes() == ref.read_bytes()


def test_a_step_that_fails_to_compile_falls_back_to_the_eager_step(monkeypatch, capsys):
    """A compile error in the CUDA-graph step must not end a generation run: the same
    arguments go to the eager step, which is then used for the following steps; an
    out-of-memory error still propagates (the caller splits the batch)."""
    seen = []
    monkeypatch.setattr(engine_static, "forward_step", lambda *a: seen.append(a) or "logits")

    def broken(*args):
        raise RuntimeError("inductor: unsupported")

    out, step = engine_static.run_step(broken, 1, 2)
    assert out == "logits" and seen == [(1, 2)] and step is engine_static.forward_step
    assert "decoding eagerly" in capsys.readouterr().err

    def oom(*args):
        raise torch.cuda.OutOfMemoryError()

    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine_static.run_step(oom, 1)
