"""--lr_schedule: the learning-rate multiplier after warm-up (training/setup.py), pure,
through LambdaLR, across a checkpoint, and in a tiny training run.

    python -m pytest tests/test_lr_schedule.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from promptbake.configs import TrainConfig
from promptbake.errors import UserError
from promptbake.prompts import encode, format_prompt
from promptbake.schema import make_trajectory
from promptbake.training import loop as train
from promptbake.training import setup as setup_mod
from promptbake.training.setup import (
    LRSchedule,
    decay_factor,
    lr_factor,
    run_progress,
    warmup_factor,
)


def make_rows(tok) -> list[dict]:
    """8 hand-made trajectories (4 questions x 2 random answers)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for q in ["Who are you?", "What is your name?", "Where do rivers go?", "Name a color."]:
        p = encode(tok, format_prompt("Your name is Zorblax.", q, True, tok))
        p0 = encode(tok, format_prompt("Your name is Zorblax.", q, False, tok))
        for _ in range(2):
            n = int(torch.randint(2, 8, (1,), generator=g))
            gen = torch.randint(10, len(tok) - 30, (n,), generator=g).tolist()
            rows.append(make_trajectory(tok, p, p0, gen, question=q))
    return rows


def config(tmp_path, name, **over) -> TrainConfig:
    kw = dict(
        data_path="unused.jsonl", out_dir=str(tmp_path / name), batch_size=4,
        learning_rate=1e-2, r=4, lora_alpha=8.0, save_every=1, plot=False, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**kw, **over})


def test_decay_factor_values():
    for p in (0.0, 0.3, 1.0):
        assert decay_factor(p, "constant") == 1.0
    assert [decay_factor(p, "linear") for p in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]
    assert decay_factor(0.0, "cosine") == 1.0
    assert decay_factor(0.5, "cosine") == pytest.approx(0.5)
    assert decay_factor(0.25, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert decay_factor(1.0, "cosine") == pytest.approx(0.0)
    assert decay_factor(1.7, "linear") == 0.0 and decay_factor(-1, "linear") == 1.0  # clipped
    with pytest.raises(ValueError, match="step"):
        decay_factor(0.5, "step")


def test_run_progress_by_steps_time_and_the_earlier_end():
    # 10 steps, 2 of warm-up: progress counts the 8 after it
    assert run_progress(0, 2, 10) == 0.0
    assert run_progress(2, 2, 10) == 0.0
    assert run_progress(6, 2, 10) == pytest.approx(0.5)
    assert run_progress(10, 2, 10) == 1.0 and run_progress(15, 2, 10) == 1.0
    # a time budget: elapsed / budget, or the step ceiling when that comes first
    assert run_progress(3, 0, 100, elapsed_s=30.0, budget_s=40.0) == pytest.approx(0.75)
    assert run_progress(90, 0, 100, elapsed_s=10.0, budget_s=40.0) == pytest.approx(0.9)
    assert run_progress(3, 0, 100, elapsed_s=50.0, budget_s=40.0) == 1.0
    assert run_progress(3, 0, 100, elapsed_s=50.0, budget_s=0.0) == pytest.approx(0.03)


def test_lr_factor_warms_up_then_decays():
    assert warmup_factor(0, 4) == 0.25 and warmup_factor(9, 0) == 1.0  # unchanged
    # constant: exactly the old warm-up multiplier
    assert [lr_factor(s, 4, "constant", 0.9) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    total, w = 12, 4
    f = [lr_factor(s, w, "linear", run_progress(s, w, total)) for s in range(total + 1)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # warm-up
    assert f[4:] == pytest.approx([1 - k / 8 for k in range(9)])  # 1 -> 0 over the 8 after it
    assert lr_factor(0, 4, "cosine", 0.9) == pytest.approx(min(0.25, decay_factor(0.9, "cosine")))


def lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_in_lambdalr_by_steps():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("linear", 0, total_steps=10))
    got = lrs(sched, opt, 10)
    assert got == pytest.approx([1 - k / 10 for k in range(10)])  # the last step is > 0
    assert opt.param_groups[0]["lr"] == 0.0  # the end of the run


class Clock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def test_time_budget_schedule_continues_after_a_resume(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(setup_mod, "time", clock)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("linear", 0, 1000, budget_s=100.0))
    for _ in range(3):  # three steps, 10 s each
        clock.now += 10.0
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7)
    state = {"sched": sched.state_dict(), "opt": opt.state_dict()}
    assert state["sched"]["lr_lambdas"][0]["elapsed_s"] == pytest.approx(30.0)

    clock.now = 5.0  # another process: its clock has nothing to do with the first one's
    p2 = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.SGD([p2], lr=1.0)
    fresh = LRSchedule("linear", 0, 1000, budget_s=100.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, fresh)
    settings = dict(fresh.__dict__)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert fresh.resumed(settings) == pytest.approx(30.0)
    clock.now += 10.0
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.6)  # 40 s of 100, not 10 s
    # this run's own settings win over the checkpoint's (e.g. a larger budget)
    bigger = LRSchedule("cosine", 2, 50, budget_s=200.0)
    settings = dict(bigger.__dict__)
    bigger.__dict__.update(state["sched"]["lr_lambdas"][0])
    bigger.resumed(settings)
    assert (bigger.schedule, bigger.warmup_steps, bigger.total_steps, bigger.budget_s) == (
        "cosine", 2, 50, 200.0
    )  # fmt: skip
    assert bigger.elapsed_s == pytest.approx(30.0)


def test_lr_schedule_is_validated():
    TrainConfig(data_path="d", out_dir="o", lr_schedule="cosine").validate()
    with pytest.raises(UserError, match="--lr_schedule"):
        TrainConfig(data_path="d", out_dir="o", lr_schedule="step").validate()


def test_training_run_decays_to_zero_and_resume_keeps_the_schedule(
    tiny_model, chatml_tok, tmp_path
):
    rows = make_rows(chatml_tok)  # 8 rows, batch 4: 2 steps per epoch
    cfg = config(tmp_path, "a", num_epochs=3, lr_schedule="linear", warmup_steps=1)
    _, metrics = train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    # 6 steps, 1 of warm-up: after epoch e the next step's multiplier is 1 - (2e - 1) / 5
    assert [m["lr"] for m in metrics[1:]] == pytest.approx([1e-2 * 0.8, 1e-2 * 0.4, 0.0])
    # 2 epochs, then resumed to the same 3-epoch ceiling: the same schedule
    part = config(tmp_path, "b", num_epochs=2, lr_schedule="linear", warmup_steps=1)
    train.train(part, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    rest = config(tmp_path, "b", num_epochs=3, lr_schedule="linear", warmup_steps=1, resume=True)
    _, m2 = train.train(rest, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    assert m2[-1]["lr"] == 0.0 and m2[-1]["epoch"] == 3
