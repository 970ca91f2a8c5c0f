"""On-policy training (promptbake.training.onpolicy, through the loop): --on_policy trains
on the student's own answers, sampled without the prompt, and reads its prompt and
questions from the trajectories' sidecar.

    python -m pytest tests/test_training_onpolicy.py -q
"""

from __future__ import annotations

import copy
import json

import tiny
from tiny import LOOP_QUESTIONS, ZORBLAX, assert_same, loop_config, loop_rows, lora_files

from promptbake.training import loop as train
from promptbake.training import objective, onpolicy
from promptbake.training.batches import collate


def student_for(tok, model, max_new=5) -> onpolicy.StudentPrompts:
    source = onpolicy.StudentSource(
        ZORBLAX, [{"question": q} for q in LOOP_QUESTIONS], {"max_sequence_length": max_new}
    )
    return onpolicy.student_prompts(source, tok, model, None)


def spy_sampling(monkeypatch) -> list:
    calls = []
    real = onpolicy.sample

    def spy(model, prompts, settings, **kw):
        out = real(model, prompts, settings, **kw)
        calls.append((prompts, out.new_ids, model.training))
        return out

    monkeypatch.setattr(onpolicy, "sample", spy)
    return calls


def spy_trained_batches(monkeypatch) -> list:
    seen = []
    real = objective.backward_kl

    def spy(model, batch, *a, **kw):
        seen.append((batch.unprompted.input_ids.clone(), batch.unprompted.attention_mask.clone()))
        return real(model, batch, *a, **kw)

    monkeypatch.setattr(objective, "backward_kl", spy)
    return seen


def test_on_policy_zero_or_no_batch_drawn_changes_nothing(
    tiny_model, chatml_tok, tmp_path, monkeypatch
):
    calls = spy_sampling(monkeypatch)
    rows = loop_rows(chatml_tok)  # 8 rows: 2 batches per epoch
    student = student_for(chatml_tok, tiny_model)
    runs = {}
    for name, share in (("zero", 0.0), ("tiny-share", 0.2)):  # round(0.2 * 2) = 0 batches
        cfg = loop_config(tmp_path, name, on_policy=share, lora_dropout=0.1)
        runs[name] = train.train(
            cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False, student=student
        )[1]
    plain = loop_config(tmp_path, "plain", lora_dropout=0.1)
    runs["plain"] = train.train(plain, copy.deepcopy(tiny_model), chatml_tok, rows, rows, False)[1]
    assert calls == []
    untimed = {
        k: [{f: v for f, v in m.items() if f not in ("seconds", "tokens_per_s")} for m in ms]
        for k, ms in runs.items()
    }
    assert untimed["zero"] == untimed["plain"] == untimed["tiny-share"]
    assert_same(lora_files(tmp_path / "zero"), lora_files(tmp_path / "plain"))


def test_on_policy_one_trains_on_the_students_samples(
    tiny_model, chatml_tok, tmp_path, monkeypatch
):
    calls = spy_sampling(monkeypatch)
    seen = spy_trained_batches(monkeypatch)
    rows = loop_rows(chatml_tok)
    model = tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)  # a prompt that matters
    student = student_for(chatml_tok, model, max_new=6)
    cfg = loop_config(tmp_path, "op", on_policy=1.0, num_epochs=6, learning_rate=2e-2, save_every=0)
    peft, metrics = train.train(cfg, model, chatml_tok, rows, None, echo=False, student=student)
    assert len(calls) == 6 * 2 == len(seen)  # every batch of every epoch
    unprompted = {tuple(p[1]) for p in student.prompts}
    for (prompts, new_ids, training), (ids, mask) in zip(calls, seen):
        assert not training  # sampled in eval mode: no LoRA dropout
        assert all(tuple(p) in unprompted for p in prompts)  # no system prompt
        trained = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        assert trained == [p + g for p, g in zip(prompts, new_ids)]
    # the student moved towards the prompted teacher: held-out KL on the teacher's rows
    batches = [collate(rows, chatml_tok.pad_token_id)]
    before = objective.evaluate_kl(peft, batches, student_adapter=False)["kl"]
    after = objective.evaluate_kl(peft, batches)["kl"]
    assert after < 0.7 * before
    assert metrics[-1]["train_kl"] < metrics[0]["train_kl"]
    log = (tmp_path / "op" / "train_loop.log").read_text()
    assert "teacher cache" not in log  # every batch on-policy: nothing to cache


def test_on_policy_resume_matches_an_uninterrupted_run(tiny_model, chatml_tok, tmp_path):
    rows = loop_rows(chatml_tok)
    student = student_for(chatml_tok, tiny_model)
    kw = dict(on_policy=0.5, lora_dropout=0.1)
    whole = loop_config(tmp_path, "whole", num_epochs=3, **kw)
    _, m_whole = train.train(
        whole, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False, student=student
    )
    part = loop_config(tmp_path, "part", num_epochs=1, **kw)
    train.train(part, copy.deepcopy(tiny_model), chatml_tok, rows, rows, False, student=student)
    rest = loop_config(tmp_path, "part", num_epochs=3, resume=True, **kw)
    _, m_part = train.train(
        rest, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False, student=student
    )
    assert [m["train_kl"] for m in m_part] == [m["train_kl"] for m in m_whole]
    assert_same(lora_files(tmp_path / "part"), lora_files(tmp_path / "whole"))


def test_on_policy_reads_prompt_questions_and_settings_from_the_sidecar(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question": x}) + "\n" for x in LOOP_QUESTIONS))
    args = {"question_dataset": str(q), "num_questions": 3, "seed": 1, "shuffle": True}
    source = onpolicy.read_source(None, None, {"x0": ZORBLAX, "args": args})
    assert source.x0 == ZORBLAX and len(source.questions) == 3
    assert {x["question"] for x in source.questions} < set(LOOP_QUESTIONS)
    flags = onpolicy.read_source(None, str(q), {"x0": ZORBLAX})
    assert [x["question"] for x in flags.questions] == LOOP_QUESTIONS
