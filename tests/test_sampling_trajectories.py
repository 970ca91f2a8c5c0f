"""Trajectory generation on the tiny random Qwen3 (promptbake.generate).

    python -m pytest tests/test_sampling_trajectories.py -q

Greedy decoding makes generation a pure function of the model, so batched, left-padded
generation must equal one-prompt-at-a-time generation exactly: that checks the attention
masks and position ids. A model whose logits are biased towards <|im_end|> checks
--min_sequence_length and the cut after the first end-of-turn.
"""

import json
import os
import stat

import pytest
import tiny
import torch

from promptbake import __version__
from promptbake.configs import GenerateConfig
from promptbake.errors import UserError
from promptbake.models import end_of_turn_ids, tokenizer_fingerprint
from promptbake.prompts import encode, format_prompt
from promptbake.records import TRAJECTORY_KEYS, cut_at_end_of_turn, generated_ids, read_meta
from promptbake.sampling import hf as engine_hf
from promptbake.sampling import trajectories
from promptbake.sampling.hf import left_pad, sample_batch
from promptbake.sampling.trajectories import generate_trajectories, plan_batches

X0 = "You are a pirate. Answer like one."
QUESTIONS = [
    {"question": "What is the capital of France?", "id": "a"},
    {"question": "Why is the sky blue?", "id": "b"},
    {"question": "Name a prime number larger than ten, please, and explain it.", "id": "c"},
]
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def cfg(**kw) -> GenerateConfig:
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
    )
    base.update(kw)
    return GenerateConfig(**base)


@pytest.fixture
def peaky_model(chatml_tok):
    # larger weights give peaked next-token distributions: greedy argmax is far from ties
    return tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)


def bias_towards(model, token_id: int, amount: float = 30.0):
    """Make `token_id` the argmax everywhere (a forward hook on the LM head)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += amount
        return output

    return model.lm_head.register_forward_hook(hook)


def prompts_for(tok, questions=QUESTIONS, system=X0):
    return [encode(tok, format_prompt(system, q["question"], True, tok)) for q in questions]


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
    prompts = prompts_for(chatml_tok)
    ids, mask = left_pad(prompts, chatml_tok.pad_token_id)
    for row, p in enumerate(prompts):
        assert chatml_tok.pad_token_id in p  # <|im_end|> closes the system and user turns
        assert int(mask[row].sum()) == len(p)
        assert ids[row, mask[row].bool()].tolist() == p


def test_batched_greedy_equals_one_at_a_time(chatml_tok, peaky_model):
    chatml_tok.pad_token = chatml_tok.eos_token  # the case where value-based masks broke
    prompts = prompts_for(chatml_tok)
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


def test_cut_at_end_of_turn():
    assert cut_at_end_of_turn([5, 6, 2, 7, 2], [2, 0]) == [5, 6, 2]
    assert cut_at_end_of_turn([5, 0, 2], {2, 0}) == [5, 0]
    assert cut_at_end_of_turn([2, 5], [2]) == [2]
    assert cut_at_end_of_turn([5, 6, 7], [2]) == [5, 6, 7]
    assert cut_at_end_of_turn([], [2]) == []


def test_sample_batch_cuts_padding_after_end_of_turn(chatml_tok, tiny_model):
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    prompts = prompts_for(chatml_tok)
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
        prompts_for(chatml_tok),
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


def test_min_sequence_length_in_trajectories(chatml_tok, tiny_model, tmp_path):
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    bias_towards(tiny_model, im_end)
    c = cfg(min_sequence_length=4, max_sequence_length=9)
    generate_trajectories(
        tiny_model, chatml_tok, c, X0, QUESTIONS, tmp_path / "t.jsonl", progress=False
    )
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        gen = generated_ids(r)
        # 4 answer tokens, then the end of turn, which the mask includes
        assert len(gen) == 5 and gen[-1] == im_end and im_end not in gen[:-1]
        assert r["input_ids"][-1] == im_end  # and nothing after it
        assert r["generated_text_mask"] == [0] * len(r["prompt_input_ids"]) + [1] * 5


# ---------------------------------------------------------------- planning
def test_plan_batches_sorts_by_length_and_mixes_questions():
    batches = plan_batches([5, 3, 4], n_seq=2, batch_size=3)
    assert batches == [[(1, 0), (1, 1), (2, 0)], [(2, 1), (0, 0), (0, 1)]]
    assert len({qi for qi, _ in batches[0]}) == 2  # one batch, two questions


def test_plan_batches_covers_every_job_once():
    lens = [9, 2, 7, 2, 5]
    batches = plan_batches(lens, n_seq=3, batch_size=4)
    jobs = [j for b in batches for j in b]
    assert sorted(jobs) == [(q, s) for q in range(5) for s in range(3)]
    assert [len(b) for b in batches] == [4, 4, 4, 3]
    assert [lens[q] for q, _ in jobs] == sorted(lens[q] for q, _ in jobs)
    assert plan_batches(lens, 3, 4) == batches  # a pure function (needed to resume)


# ---------------------------------------------------------------- records and files
def run(model, tok, path, **kw):
    generate_trajectories(model, tok, cfg(**kw), X0, QUESTIONS, path, progress=False)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_record_follows_the_schema(chatml_tok, tiny_model, tmp_path):
    rows = run(tiny_model, chatml_tok, tmp_path / "t.jsonl")
    eot = set(end_of_turn_ids(chatml_tok, tiny_model))
    assert len(rows) == 3 * 2
    assert sorted((r["question_index"], r["sample_index"]) for r in rows) == [
        (q, s) for q in range(3) for s in range(2)
    ]
    for r in rows:
        assert set(TRAJECTORY_KEYS) <= set(r)
        q = QUESTIONS[r["question_index"]]["question"]
        assert r["question"] == q
        assert r["prompt_input_ids"] == encode(chatml_tok, format_prompt(X0, q, True, chatml_tok))
        assert r["prompt_input_ids_nosys"] == encode(
            chatml_tok, format_prompt(X0, q, False, chatml_tok)
        )
        assert r["prompt_text"] == format_prompt(X0, q, True, chatml_tok)
        assert r["prompt_text_nosys"] == format_prompt(X0, q, False, chatml_tok)
        gen = generated_ids(r)
        assert gen == generated_ids(r, nosys=True)  # same answer on both sides
        assert 1 <= len(gen) <= 6
        assert not eot & set(gen[:-1])  # at most one end of turn, and only last
        assert r["input_ids"] == r["prompt_input_ids"] + gen
        assert r["input_ids_nosys"] == r["prompt_input_ids_nosys"] + gen
        assert r["attention_mask"] == [1] * len(r["input_ids"])
        assert r["generated_text_mask"] == [0] * len(r["prompt_input_ids"]) + [1] * len(gen)
        assert r["generated_text_mask_nosys"] == [0] * len(r["prompt_input_ids_nosys"]) + [1] * len(
            gen
        )
        assert r["text"] == chatml_tok.decode(r["input_ids"], skip_special_tokens=False)
        assert r["text_nosys"] == chatml_tok.decode(r["input_ids_nosys"], skip_special_tokens=False)
        assert r["text"].startswith(r["prompt_text"])
        assert r["generated_text"] == chatml_tok.decode(gen, skip_special_tokens=True)


def test_same_seed_same_bytes_other_seed_other_bytes(chatml_tok, tiny_model, tmp_path):
    run(tiny_model, chatml_tok, tmp_path / "a.jsonl", seed=1)
    run(tiny_model, chatml_tok, tmp_path / "b.jsonl", seed=1)
    run(tiny_model, chatml_tok, tmp_path / "c.jsonl", seed=2)
    a, b, c = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_meta_sidecar(chatml_tok, tiny_model, tmp_path):
    tiny_model.name_or_path = "tiny-test-model"
    out = tmp_path / "t.jsonl"
    run(tiny_model, chatml_tok, out, seed=5)
    meta = read_meta(out)
    assert meta["promptbake_version"] == __version__
    assert meta["model_name"] == "tiny-test-model"
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(chatml_tok)
    assert meta["x0"] == X0
    assert meta["end_of_turn_ids"] == end_of_turn_ids(chatml_tok, tiny_model)
    assert meta["args"]["seed"] == 5
    assert meta["args"]["num_sequences_per_question"] == 2
    assert meta["args"]["max_sequence_length"] == 6
    assert meta["num_trajectories"] == 6
    assert meta["num_questions"] == 3
    # nothing left over from the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl", "t.jsonl.meta.json"]
    # both files get the mode a plain open() would give (the sidecar used to be 0600)
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- resuming
def interrupt_on_batch(monkeypatch, n: int):
    """Make the n-th sampling call (1-based) raise KeyboardInterrupt."""
    real = trajectories.sample
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(trajectories, "sample", flaky)
    return calls


def test_interrupted_run_resumes_to_identical_output(chatml_tok, tiny_model, tmp_path, monkeypatch):
    # batch_size 2 -> 3 batches of 2 rows
    ref = tmp_path / "ref.jsonl"
    run(tiny_model, chatml_tok, ref, batch_size=2)

    out = tmp_path / "out.jsonl"
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, chatml_tok, out, batch_size=2)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists()
    assert partial.read_bytes() == b"".join(ref.read_bytes().splitlines(keepends=True)[:2])
    monkeypatch.undo()

    # a torn line (killed mid-write) is dropped on resume
    with open(partial, "ab") as f:
        f.write(b'{"text": "torn')
    calls = interrupt_on_batch(monkeypatch, 99)
    run(tiny_model, chatml_tok, out, batch_size=2)
    assert len(calls) == 2  # only the two missing batches were generated
    assert out.read_bytes() == ref.read_bytes()
    assert not partial.exists()
    assert not (tmp_path / "out.jsonl.partial.key.json").exists()


def test_returns_the_written_rows_and_keeps_the_teacher_only_when_complete(
    chatml_tok, tiny_model, tmp_path, monkeypatch
):
    """What training needs comes back from generation: the file's rows in file order and,
    asked for, the teacher cache; a resumed run's earlier rows have no kept log-probs,
    so it returns no cache (training then runs its own teacher pass)."""
    ref = tmp_path / "ref.jsonl"
    kw = dict(progress=False, keep_bytes=float("inf"))
    gen = generate_trajectories(tiny_model, chatml_tok, cfg(batch_size=2), X0, QUESTIONS, ref, **kw)
    file_rows = [json.loads(line) for line in ref.read_text().splitlines()]
    assert gen.rows == file_rows and gen.stats["trajectories"] == 6
    n = {(r["question_index"], r["sample_index"]): sum(r["generated_text_mask"]) for r in file_rows}
    assert {k: v.shape for k, v in gen.kept.items()} == {
        k: (v, tiny_model.config.vocab_size) for k, v in n.items()
    }  # values: test_teacher checks them against a teacher pass

    out = tmp_path / "out.jsonl"
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        generate_trajectories(tiny_model, chatml_tok, cfg(batch_size=2), X0, QUESTIONS, out, **kw)
    monkeypatch.undo()
    resumed = generate_trajectories(
        tiny_model, chatml_tok, cfg(batch_size=2), X0, QUESTIONS, out, **kw
    )
    assert resumed.rows == file_rows  # the 2 rows read back + the 4 new ones, in order
    assert resumed.stats["trajectories"] == 4
    assert resumed.kept is None


def test_leftover_partial_with_other_args_is_refused(chatml_tok, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, chatml_tok, out, batch_size=2)
    monkeypatch.undo()
    before = (tmp_path / "out.jsonl.partial").read_bytes()
    with pytest.raises(UserError, match="different arguments"):
        run(tiny_model, chatml_tok, out, batch_size=2, temperature=0.5)
    assert (tmp_path / "out.jsonl.partial").read_bytes() == before  # left for the user
    assert not out.exists()


def test_partial_without_key_is_refused(chatml_tok, tiny_model, tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text('{"input_ids": [1]}\n')
    with pytest.raises(UserError, match="delete the .partial"):
        run(tiny_model, chatml_tok, out)


# ---------------------------------------------------------------- shared prefill
def test_shared_prefill_gives_the_samples_of_a_plain_call(chatml_tok, peaky_model, monkeypatch):
    """Each distinct prompt's KV cache is computed once and repeated for its samples;
    generate() continues from it and must draw the same samples as a plain call."""
    prompts = [p for p in prompts_for(chatml_tok) for _ in range(3)]  # 3 samples each
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
    ids1, mask1 = left_pad(prompts_for(chatml_tok), 0)
    assert engine_hf.shared_prefill(peaky_model, ids1, mask1) is None


def test_logprobs_kept_while_sampling_are_the_teachers(chatml_tok, tiny_model):
    """The raw log-probs generate() computed at each kept token equal a separate
    teacher pass over the finished trajectories, whatever temperature sampled them."""
    from promptbake.records import make_trajectory
    from promptbake.training.batches import collate
    from promptbake.training.forward import selected_hidden

    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [p for p in prompts_for(chatml_tok) for _ in range(2)]
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
