"""The training loop (promptbake.training.loop) in-process on the tiny random Qwen3:
it cuts the KL, and its controls: --patience, --max_train_seconds, the plot cadence,
the teacher switches, the lagged non-finite check.

    python -m pytest tests/test_training_loop.py -q

Everything runs with hand-made trajectories (tiny.loop_rows, tiny.pirate_rows,
tiny.zorblax_rows).
"""

from __future__ import annotations

import copy
import math

import pytest
import tiny
import torch
from safetensors.torch import load_file
from tiny import (
    PIRATE,
    PIRATE_QUESTIONS,
    assert_same,
    loop_config,
    loop_rows,
    lora_files,
    pirate_rows,
    zorblax_rows,
)

from promptbake.configs import TrainConfig
from promptbake.errors import UserError
from promptbake.prompts import encode, format_prompt
from promptbake.schema import make_trajectory
from promptbake.training import checkpoint, objective
from promptbake.training import loop as train
from promptbake.training.batches import collate
from promptbake.training.objective import evaluate_kl


# ---------------------------------------------------------------- learning
def test_training_reduces_the_kl(chatml_tok, tmp_path):
    model = tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)
    rows = pirate_rows(chatml_tok, n_gen=(6, 6, 6)) * 2
    cfg = TrainConfig(
        data_path="unused.jsonl",
        out_dir=str(tmp_path / "run"),
        num_epochs=6,
        batch_size=6,
        learning_rate=2e-2,
        r=8,
        lora_alpha=16,
        save_every=0,
        plot=False,
        device="cpu",
    )
    peft_model, metrics = train.train(cfg, model, chatml_tok, rows, echo=False)
    kls = [m["train_kl"] for m in metrics]
    assert [m["epoch"] for m in metrics] == list(range(1, 7))
    assert all(math.isfinite(k) for k in kls)
    batches = [collate(rows, chatml_tok.pad_token_id)]
    before = evaluate_kl(peft_model, batches, student_adapter=False)["kl"]
    after = evaluate_kl(peft_model, batches)["kl"]
    assert kls[0] == pytest.approx(before, rel=1e-4)  # one step per epoch: epoch 1 = at init
    assert after < 0.5 * before
    assert kls[-1] < kls[0]


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
    rows = loop_rows(chatml_tok)
    cfg = loop_config(tmp_path, "p", num_epochs=6, patience=2)
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
    full = loop_config(tmp_path, "full", num_epochs=6)
    _, m_full = train.train(full, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert len(m_full) == 7

    # stopped after epoch 3 (one bad epoch counted), resumed with patience 2: only epoch 4 runs
    first = loop_config(tmp_path, "r", num_epochs=3, patience=2)
    train.train(first, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert checkpoint.load_checkpoint(tmp_path / "r")["bad_epochs"] == 1
    again = loop_config(tmp_path, "r", num_epochs=6, patience=2, resume=True)
    _, m_r = train.train(again, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert [m["epoch"] for m in m_r] == [0, 1, 2, 3, 4]
    assert_same(lora_files(tmp_path / "r"), lora_files(out))


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
    rows = loop_rows(chatml_tok)  # 8 rows, batch 4: 2 steps per epoch
    cfg = loop_config(tmp_path, "b", num_epochs=5, max_train_seconds=3.5)
    _, metrics = train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    # steps end at 1, 2 (epoch 1), 3 (epoch 2): a fourth step would end at 4, past the
    # budget, so it is not taken; epoch 2 is still validated and saved
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert [(m["steps"], m["partial"]) for m in metrics[1:]] == [(2, False), (1, True)]
    out = tmp_path / "b"
    log = (out / "train_loop.log").read_text()
    assert "stopped after epoch 2 (cut short): --max_train_seconds 3.5 spent" in log
    assert checkpoint.load_checkpoint(out)["epoch"] == 2
    # the epochs it ran are the unlimited run's
    full = loop_config(tmp_path, "full", num_epochs=2)
    train.train(full, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert_same(lora_files(out, "epoch_1"), lora_files(tmp_path / "full", "epoch_1"))

    # a budget spent before training starts still runs one step: there is an adapter
    tiny_budget = loop_config(tmp_path, "t", num_epochs=5, max_train_seconds=1e-9)
    _, m_t = train.train(tiny_budget, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert [(m["epoch"], m["steps"]) for m in m_t[1:]] == [(1, 1)]
    assert (tmp_path / "t" / "adapter_model.safetensors").exists()


def test_max_train_seconds_leaves_time_to_validate_and_save_the_last_epoch(
    tiny_model, chatml_tok, tmp_path, monkeypatch
):
    """Validation takes 0.5 s on the fake clock, a step 1 s: with a 4 s budget, epoch 1
    ends at 3.0 (validation 0.5, steps to 2.5, validation to 3.0); epoch 2 would take at
    least a step and a validation (to 4.5), so it does not start: the run ends within
    its budget instead of 0.5 s past it."""
    now = fake_clock(monkeypatch)
    real_validate = train.validate

    def slow_validate(run):
        now[0] += 0.5
        return real_validate(run)

    monkeypatch.setattr(train, "validate", slow_validate)
    rows = loop_rows(chatml_tok)
    cfg = loop_config(tmp_path, "v", num_epochs=5, max_train_seconds=4.0)
    _, metrics = train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert [m["epoch"] for m in metrics] == [0, 1] and now[0] == 3.0
    log = (tmp_path / "v" / "train_loop.log").read_text()
    assert "stopped after epoch 1: --max_train_seconds 4 spent" in log


# ---------------------------------------------------------------- the KL curve
def test_kl_curve_is_drawn_at_the_end_and_at_most_every_plot_every_s(
    chatml_tok, tmp_path, monkeypatch
):
    """Short epochs: one plot, at the end, holding every epoch; with PLOT_EVERY_S 0,
    one after every epoch (the end adds none: nothing new to draw)."""
    drawn = []
    real = train.plot_curves

    def counting(metrics, path):
        drawn.append([m["epoch"] for m in metrics])
        real(metrics, path)

    monkeypatch.setattr(train, "plot_curves", counting)
    model = tiny.tiny_qwen3(chatml_tok)
    rows = [
        make_trajectory(
            chatml_tok,
            encode(chatml_tok, format_prompt(PIRATE, q, True, chatml_tok)),
            encode(chatml_tok, format_prompt(PIRATE, q, False, chatml_tok)),
            [5, 6, 7],
        )
        for q in PIRATE_QUESTIONS[:2]
    ]
    for every, want in ((1e9, [[1, 2, 3]]), (0.0, [[1], [1, 2], [1, 2, 3]])):
        drawn.clear()
        monkeypatch.setattr(train, "PLOT_EVERY_S", every)
        cfg = TrainConfig(
            data_path="x", out_dir=str(tmp_path / str(every)), num_epochs=3, batch_size=2,
            r=2, save_every=0, device="cpu",
        )  # fmt: skip
        train.train(cfg, copy.deepcopy(model), chatml_tok, rows, echo=False)
        assert drawn == want
        assert (tmp_path / str(every) / "kl_curve.png").stat().st_size > 0


# ---------------------------------------------------------------- teacher switches
def fit(model, tok, rows, tmp_path, name, **flags):
    over = dict(num_epochs=2, save_every=0, kl_chunk_size=7)
    cfg = loop_config(tmp_path, name, **{**over, **flags})
    return train.train(cfg, copy.deepcopy(model), tok, rows, None, echo=False)[1]


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


# ---------------------------------------------------------------- lagged non-finite check
def test_non_finite_last_step_is_caught_before_anything_is_saved(
    tiny_model, chatml_tok, tmp_path, monkeypatch
):
    real = objective.batch_kl

    def nan(model, batch, *a, **kw):
        kl, per_seq = real(model, batch, *a, **kw)
        return (kl * float("nan"), per_seq) if torch.is_grad_enabled() else (kl, per_seq)

    monkeypatch.setattr(objective, "batch_kl", nan)
    rows = loop_rows(chatml_tok)
    cfg = loop_config(tmp_path, "nan", batch_size=8)  # one step: the epoch's last
    with pytest.raises(UserError, match=r"non-finite loss .* at epoch 1, batch 1/1.*before any"):
        train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert checkpoint.load_checkpoint(tmp_path / "nan") is None
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()
