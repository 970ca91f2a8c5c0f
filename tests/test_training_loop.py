"""The training loop's controls: --patience, --on_policy, --report_to, the lagged
non-finite check (promptbake.train, onpolicy.py, outputs.py).

    python -m pytest tests/test_training_loop.py -q

Everything runs in-process on the tiny random Qwen3 with hand-made trajectories.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import tiny
import torch
from safetensors.torch import load_file

from promptbake import train as train_command
from promptbake.configs import TrainConfig
from promptbake.errors import UserError
from promptbake.files import write_jsonl
from promptbake.prompts import encode, format_prompt
from promptbake.records import make_trajectory
from promptbake.training import checkpoint, objective, onpolicy
from promptbake.training import loop as train
from promptbake.training.batches import collate

X0 = "Your name is Zorblax."
QUESTIONS = ["Who are you?", "What is your name?", "Where do rivers go?", "Name a color."]


def make_rows(tok, n_seq=2, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in QUESTIONS:
        p = encode(tok, format_prompt(X0, q, True, tok))
        p0 = encode(tok, format_prompt(X0, q, False, tok))
        for _ in range(n_seq):
            n = int(torch.randint(2, 8, (1,), generator=g))
            gen = torch.randint(10, len(tok) - 30, (n,), generator=g).tolist()
            rows.append(make_trajectory(tok, p, p0, gen, question=q))
    return rows


def config(tmp_path, name, **over) -> TrainConfig:
    kw = dict(
        data_path="unused.jsonl",
        out_dir=str(tmp_path / name),
        num_epochs=3,
        batch_size=4,
        learning_rate=1e-2,
        r=4,
        lora_alpha=8.0,
        save_every=1,
        plot=False,
        device="cpu",
    )
    kw.update(over)
    return TrainConfig(**kw)


def student_for(tok, model, max_new=5) -> onpolicy.StudentPrompts:
    source = onpolicy.StudentSource(
        X0, [{"question": q} for q in QUESTIONS], {"max_sequence_length": max_new}
    )
    return onpolicy.student_prompts(source, tok, model, None)


def lora_files(out, sub="checkpoint") -> dict:
    return load_file(str(out / sub / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- patience
SCRIPT = {0: 5.0, 1: 4.0, 2: 3.0, 3: 3.5, 4: 3.6, 5: 1.0, 6: 0.5}


def scripted_validation(monkeypatch) -> None:
    """The real validation runs; its KL is replaced by SCRIPT[epoch], so that the
    curve stalls after epoch 2 and improves again at epoch 5."""
    real = train.validate

    def fake(run):
        v = real(run)
        return {**v, "kl": SCRIPT[len(run.metrics)]}

    monkeypatch.setattr(train, "validate", fake)


def test_patience_stops_keeps_the_best_and_survives_resume(
    tiny_model, chatml_tok, tmp_path, monkeypatch
):
    scripted_validation(monkeypatch)
    rows = make_rows(chatml_tok)
    cfg = config(tmp_path, "p", num_epochs=6, patience=2)
    _, metrics = train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    # epochs 3 and 4 are no better than epoch 2: stop after 4, although 5 would improve
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3, 4]
    assert [m["best"] for m in metrics[1:]] == [True, True, False, False]
    out = tmp_path / "p"
    assert_same(load_file(str(out / "adapter_model.safetensors")), lora_files(out, "epoch_2"))
    assert checkpoint.load_checkpoint(out)["bad_epochs"] == 2
    assert (
        "no better validation KL for 2 epochs (--patience 2)"
        in (out / "train_loop.log").read_text()
    )

    # without patience the same run goes on to epoch 6
    full = config(tmp_path, "full", num_epochs=6)
    _, m_full = train.train(full, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert len(m_full) == 7

    # stopped after epoch 3 (one bad epoch counted), resumed with patience 2: only epoch 4 runs
    first = config(tmp_path, "r", num_epochs=3, patience=2)
    train.train(first, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert checkpoint.load_checkpoint(tmp_path / "r")["bad_epochs"] == 1
    again = config(tmp_path, "r", num_epochs=6, patience=2, resume=True)
    _, m_r = train.train(again, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert [m["epoch"] for m in m_r] == [0, 1, 2, 3, 4]
    assert_same(lora_files(tmp_path / "r"), lora_files(out))


def test_patience_is_validated():
    with pytest.raises(UserError, match="--patience must be >= 0"):
        TrainConfig(data_path="d", out_dir="o", patience=-1).validate()
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match=r"--on_policy must be in \[0, 1\]"):
            TrainConfig(data_path="d", out_dir="o", on_policy=bad).validate()
    with pytest.raises(UserError, match=r"--jsd_beta 2.0 is outside \[0, 1\]"):
        TrainConfig(data_path="d", out_dir="o", jsd_beta=2.0).validate()


# ---------------------------------------------------------------- time budget
def fake_clock(monkeypatch) -> list:
    """train.py's clock, advanced by 1 s per optimizer step (nothing else moves it)."""
    now = [0.0]
    real_step = train.train_step

    def step(*a, **kw):
        now[0] += 1.0
        return real_step(*a, **kw)

    monkeypatch.setattr(train, "train_step", step)
    clock = {"perf_counter": lambda: now[0], "monotonic": lambda: now[0]}
    monkeypatch.setattr(train, "time", type("Clock", (), clock))
    return now


def test_max_train_seconds_cuts_the_epoch_and_keeps_the_best(
    tiny_model, chatml_tok, tmp_path, monkeypatch
):
    fake_clock(monkeypatch)
    rows = make_rows(chatml_tok)  # 8 rows, batch 4: 2 steps per epoch
    cfg = config(tmp_path, "b", num_epochs=5, max_train_seconds=3.0)
    _, metrics = train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    # steps end at 1, 2 (epoch 1), 3 (epoch 2): the budget is spent before epoch 2's
    # second step, which is not taken; epoch 2 is still validated and saved
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert [(m["steps"], m["partial"]) for m in metrics[1:]] == [(2, False), (1, True)]
    out = tmp_path / "b"
    log = (out / "train_loop.log").read_text()
    assert "stopped after epoch 2 (cut short): --max_train_seconds 3 spent" in log
    assert checkpoint.load_checkpoint(out)["epoch"] == 2
    # the epochs it ran are the unlimited run's
    full = config(tmp_path, "full", num_epochs=2)
    train.train(full, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert_same(lora_files(out, "epoch_1"), lora_files(tmp_path / "full", "epoch_1"))

    # a budget spent before training starts still runs one step: there is an adapter
    tiny_budget = config(tmp_path, "t", num_epochs=5, max_train_seconds=1e-9)
    _, m_t = train.train(tiny_budget, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert [(m["epoch"], m["steps"]) for m in m_t[1:]] == [(1, 1)]
    assert (tmp_path / "t" / "adapter_model.safetensors").exists()


def test_max_train_seconds_is_validated():
    for bad in (-1.0, float("inf")):
        with pytest.raises(UserError, match="--max_train_seconds"):
            TrainConfig(data_path="d", out_dir="o", max_train_seconds=bad).validate()


# ---------------------------------------------------------------- on-policy
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
    rows = make_rows(chatml_tok)  # 8 rows: 2 batches per epoch
    student = student_for(chatml_tok, tiny_model)
    runs = {}
    for name, share in (("zero", 0.0), ("tiny-share", 0.2)):  # round(0.2 * 2) = 0 batches
        cfg = config(tmp_path, name, on_policy=share, lora_dropout=0.1)
        runs[name] = train.train(
            cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False, student=student
        )[1]
    plain = config(tmp_path, "plain", lora_dropout=0.1)
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
    rows = make_rows(chatml_tok)
    model = tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)  # a prompt that matters
    student = student_for(chatml_tok, model, max_new=6)
    cfg = config(tmp_path, "op", on_policy=1.0, num_epochs=6, learning_rate=2e-2, save_every=0)
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
    rows = make_rows(chatml_tok)
    student = student_for(chatml_tok, tiny_model)
    kw = dict(on_policy=0.5, lora_dropout=0.1)
    whole = config(tmp_path, "whole", num_epochs=3, **kw)
    _, m_whole = train.train(
        whole, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False, student=student
    )
    part = config(tmp_path, "part", num_epochs=1, **kw)
    train.train(part, copy.deepcopy(tiny_model), chatml_tok, rows, rows, False, student=student)
    rest = config(tmp_path, "part", num_epochs=3, resume=True, **kw)
    _, m_part = train.train(
        rest, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False, student=student
    )
    assert [m["train_kl"] for m in m_part] == [m["train_kl"] for m in m_whole]
    assert_same(lora_files(tmp_path / "part"), lora_files(tmp_path / "whole"))


def test_on_policy_without_prompt_or_questions_is_refused_before_loading(
    tiny_model_dir, chatml_tok, tmp_path, monkeypatch
):
    data = tmp_path / "t.jsonl"
    write_jsonl(data, make_rows(chatml_tok))  # no .meta.json sidecar
    monkeypatch.setattr(train_command, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = config(tmp_path, "run", model_name=str(tiny_model_dir), data_path=str(data))
    with pytest.raises(UserError, match="--on_policy needs the baked prompt: pass --x0_file"):
        train_command.run_train(TrainConfig(**{**vars(cfg), "on_policy": 0.5}), echo=False)
    (tmp_path / "x0.md").write_text(X0)
    cfg = TrainConfig(**{**vars(cfg), "on_policy": 0.5, "x0_file": str(tmp_path / "x0.md")})
    with pytest.raises(UserError, match="--on_policy needs the training questions"):
        train_command.run_train(cfg, echo=False)
    assert not (tmp_path / "run").exists()


def test_on_policy_reads_prompt_questions_and_settings_from_the_sidecar(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question": x}) + "\n" for x in QUESTIONS))
    args = {"question_dataset": str(q), "num_questions": 3, "seed": 1, "shuffle": True}
    source = onpolicy.read_source(None, None, {"x0": X0, "args": args})
    assert source.x0 == X0 and len(source.questions) == 3
    assert {x["question"] for x in source.questions} < set(QUESTIONS)
    flags = onpolicy.read_source(None, str(q), {"x0": X0})
    assert [x["question"] for x in flags.questions] == QUESTIONS


# ---------------------------------------------------------------- tracking
def test_tensorboard_logs_step_loss_lr_and_epoch_kl(tiny_model, chatml_tok, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = make_rows(chatml_tok)
    cfg = config(tmp_path, "tb", batch_size=8, report_to="tensorboard")  # one step per epoch
    _, metrics = train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()

    def series(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    loss = series("train/loss")
    assert sorted(loss) == [1, 2, 3]
    for m in metrics[1:]:
        assert loss[m["epoch"]] == pytest.approx(m["train_kl"], rel=1e-5)
    assert series("train/learning_rate") == {s: pytest.approx(1e-2) for s in (1, 2, 3)}
    assert all(v > 0 for v in series("train/tokens_per_s").values())
    val = series("epoch/val_kl")
    assert val == {m["epoch"]: pytest.approx(m["val_kl"], rel=1e-5) for m in metrics}


def test_tensorboard_missing_is_one_clear_error(monkeypatch):
    from promptbake.training.outputs import check_report_to

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"--report_to tensorboard needs the tensorboard package"):
        check_report_to("tensorboard")
    check_report_to("none")


# ---------------------------------------------------------------- lagged non-finite check
def test_non_finite_last_step_is_caught_before_anything_is_saved(
    tiny_model, chatml_tok, tmp_path, monkeypatch
):
    real = objective.batch_kl

    def nan(model, batch, *a, **kw):
        kl, per_seq = real(model, batch, *a, **kw)
        return (kl * float("nan"), per_seq) if torch.is_grad_enabled() else (kl, per_seq)

    monkeypatch.setattr(objective, "batch_kl", nan)
    rows = make_rows(chatml_tok)
    cfg = config(tmp_path, "nan", batch_size=8)  # one step: the epoch's last
    with pytest.raises(UserError, match=r"non-finite loss .* at epoch 1, batch 1/1.*before any"):
        train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert checkpoint.load_checkpoint(tmp_path / "nan") is None
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()
