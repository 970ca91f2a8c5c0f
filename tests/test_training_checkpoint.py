"""Never lose work in training (promptbake.training.checkpoint): resumable runs, atomic
checkpoints, the NaN guard.

    pytest tests/test_training_checkpoint.py -q

Everything runs on the tiny random Qwen3 (``tiny_model_dir``). One test kills a real
``promptbake train`` process with SIGKILL and finishes the run in-process; the rest
interrupt training in-process (a KeyboardInterrupt or a NaN injected into
``objective.batch_kl``). Comparisons run single-threaded so that float sums do not depend
on thread splits. (Generation's resume: test_sampling_trajectories.py.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import checkpoint_run, gen_config, subprocess_env

from promptbake import train as train_command
from promptbake.configs import TrainConfig
from promptbake.errors import UserError
from promptbake.generate import run_generate
from promptbake.training import checkpoint, objective


@pytest.fixture(scope="module")
def trajectories(tiny_model_dir, resume_inputs, tmp_path_factory):
    """(train, val) trajectory files from the tiny model: 26 and 4 rows."""
    d = tmp_path_factory.mktemp("traj")
    run_generate(
        gen_config(tiny_model_dir, resume_inputs, d / "all.jsonl", num_sequences_per_question=3)
    )
    lines = (d / "all.jsonl").read_text().splitlines(keepends=True)
    meta = (d / "all.jsonl.meta.json").read_text()
    for name, part in (("train", lines[:26]), ("val", lines[26:])):
        (d / f"{name}.jsonl").write_text("".join(part))
        (d / f"{name}.jsonl.meta.json").write_text(meta)
    return d / "train.jsonl", d / "val.jsonl"


def train_config(model_dir, trajectories, out_dir: Path, **over) -> TrainConfig:
    tr, va = trajectories
    kw = dict(
        model_name=str(model_dir),
        data_path=str(tr),
        val_path=str(va),
        out_dir=str(out_dir),
        num_epochs=3,
        batch_size=8,  # 26 rows: batches of 8, 8, 8, 2
        learning_rate=3e-3,
        r=4,
        lora_alpha=8.0,
        lora_dropout=0.1,  # dropout draws from the RNG: resuming must restore it
        save_every=1,
        plot=False,
    )
    kw.update(over)
    return TrainConfig(**kw)


def lora_of(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "checkpoint" / "adapter_model.safetensors"))


def assert_same_lora(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-5), k


def kl_curve(metrics: list[dict]) -> list[float]:
    """Epoch, train KL, val KL and best flag of every epoch, flat (for pytest.approx)."""
    out = []
    for m in metrics:
        out += [m["epoch"], m.get("train_kl") or -1.0, m["val_kl"], float(m.get("best", 0))]
    return out


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, trajectories, tmp_path_factory):
    """An uninterrupted 3-epoch run: (out_dir, metrics)."""
    out = tmp_path_factory.mktemp("baseline")
    _, metrics = train_command.run_train(
        train_config(tiny_model_dir, trajectories, out), echo=False
    )
    assert (
        metrics[-1]["val_kl"] < metrics[0]["val_kl"]
    )  # it learns, so the comparison means something
    return out, metrics


def patch_batch_kl(monkeypatch, at_call: int, action: str) -> None:
    """Make the `at_call`-th training call of objective.batch_kl raise KeyboardInterrupt or return NaN."""
    real = objective.batch_kl
    calls = [0]

    def fake(model, batch, *a, **kw):
        kl, per_seq = real(model, batch, *a, **kw)
        if torch.is_grad_enabled():  # a training step, not evaluation
            calls[0] += 1
            if calls[0] == at_call:
                if action == "interrupt":
                    raise KeyboardInterrupt
                kl = kl * float("nan")
        return kl, per_seq

    monkeypatch.setattr(objective, "batch_kl", fake)


# ---------------------------------------------------------------- training
def test_training_interrupted_and_resumed_matches_uninterrupted(
    tiny_model_dir, trajectories, baseline, tmp_path, monkeypatch
):
    base_out, base_metrics = baseline
    out = tmp_path / "run"
    patch_batch_kl(monkeypatch, at_call=4 + 2, action="interrupt")  # epoch 2, second batch
    with pytest.raises(KeyboardInterrupt):
        train_command.run_train(train_config(tiny_model_dir, trajectories, out), echo=False)
    state = checkpoint.load_checkpoint(out)
    assert state["epoch"] == 1
    monkeypatch.undo()

    _, metrics = train_command.run_train(
        train_config(tiny_model_dir, trajectories, out, resume=True), echo=False
    )
    assert kl_curve(metrics) == pytest.approx(kl_curve(base_metrics), rel=1e-6)
    assert_same_lora(lora_of(out), lora_of(base_out))
    # the best adapter and the metrics file are those of the uninterrupted run too
    assert_same_lora(
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(base_out / "adapter_model.safetensors")),
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2, 3]
    assert "resumed from" in (out / "train_loop.log").read_text()


def test_resume_without_restoring_the_optimizer_would_differ(
    tiny_model_dir, trajectories, baseline, tmp_path, monkeypatch
):
    """The comparison above can fail: dropping the optimizer state changes the adapter."""
    base_out, _ = baseline
    out = tmp_path / "run"
    patch_batch_kl(monkeypatch, at_call=4 + 1, action="interrupt")
    with pytest.raises(KeyboardInterrupt):
        train_command.run_train(train_config(tiny_model_dir, trajectories, out), echo=False)
    monkeypatch.undo()
    real_restore = checkpoint.restore

    def forgetful(state, model, optimizer, scheduler, lr):
        state = dict(state, optimizer=optimizer.state_dict())  # a fresh AdamW
        real_restore(state, model, optimizer, scheduler, lr)

    monkeypatch.setattr(checkpoint, "restore", forgetful)
    train_command.run_train(
        train_config(tiny_model_dir, trajectories, out, resume=True), echo=False
    )
    a, b = lora_of(out), lora_of(base_out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes(tiny_model_dir, trajectories, baseline, tmp_path):
    base_out, base_metrics = baseline
    out = tmp_path / "run"
    cfg = train_config(tiny_model_dir, trajectories, out)
    flags = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v is not None]
    cmd = [sys.executable, "-m", "promptbake.cli", "train", *flags]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoint" / "state.pt").exists():
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = checkpoint.load_checkpoint(out)  # whatever moment it died, a whole checkpoint
    assert state is not None and state["epoch"] >= 1

    # the same command with --resume true finishes it like the uninterrupted run
    _, metrics = train_command.run_train(
        train_config(tiny_model_dir, trajectories, out, resume=True), echo=False
    )
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    assert kl_curve(metrics) == pytest.approx(kl_curve(base_metrics), rel=1e-4)
    assert_same_lora(lora_of(out), lora_of(base_out), atol=1e-5)


def test_non_finite_loss_stops_naming_epoch_and_batch_and_keeps_checkpoint(
    tiny_model_dir, trajectories, baseline, tmp_path, monkeypatch
):
    base_out, base_metrics = baseline
    out = tmp_path / "run"
    patch_batch_kl(monkeypatch, at_call=4 + 3, action="nan")  # epoch 2, batch 3 of 4
    with pytest.raises(UserError) as e:
        train_command.run_train(train_config(tiny_model_dir, trajectories, out), echo=False)
    msg = str(e.value)
    assert "non-finite loss" in msg and "epoch 2, batch 3/4" in msg
    assert "checkpoint after epoch 1" in msg and "--resume true" in msg
    # the last good checkpoint is the epoch-1 state, untouched by the bad step
    assert checkpoint.load_checkpoint(out)["epoch"] == 1
    assert_same_lora(
        lora_of(out), load_file(str(base_out / "epoch_1" / "adapter_model.safetensors"))
    )
    assert all(torch.isfinite(t).all() for t in lora_of(out).values())
    # and the run continues from it
    monkeypatch.undo()
    _, metrics = train_command.run_train(
        train_config(tiny_model_dir, trajectories, out, resume=True), echo=False
    )
    assert kl_curve(metrics) == pytest.approx(kl_curve(base_metrics), rel=1e-6)


def test_huge_learning_rate_is_caught_as_non_finite(tiny_model_dir, trajectories, tmp_path):
    cfg = train_config(tiny_model_dir, trajectories, tmp_path / "run", learning_rate=1e30)
    with pytest.raises(
        UserError, match=r"non-finite loss .* at epoch 1, batch [2-4]/4.*before any"
    ):
        train_command.run_train(cfg, echo=False)
    assert checkpoint.load_checkpoint(tmp_path / "run") is None
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_resume_refuses_a_checkpoint_of_another_setup(tiny_model_dir, trajectories, baseline):
    base_out, _ = baseline
    saved = checkpoint.load_checkpoint(base_out)["args"]
    cfg = train_config(tiny_model_dir, trajectories, base_out, resume=True, r=8, num_epochs=5)
    with pytest.raises(UserError, match=r"cannot resume: .*--r 4 \(now 8\)"):
        checkpoint.changed_args(saved, dataclasses.asdict(cfg))
    ok = dataclasses.asdict(dataclasses.replace(cfg, r=4, learning_rate=1e-3))
    assert checkpoint.changed_args(saved, ok) == ["learning_rate", "num_epochs"]
    same_file = {"data_path": "./" + saved["data_path"].lstrip("/")}
    assert checkpoint.changed_args({"data_path": saved["data_path"].lstrip("/")}, same_file) == []


def test_resume_with_nothing_to_resume_starts_fresh(tiny_model_dir, trajectories, tmp_path):
    out = tmp_path / "run"
    _, metrics = train_command.run_train(
        train_config(tiny_model_dir, trajectories, out, resume=True, num_epochs=1), echo=False
    )
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert checkpoint.load_checkpoint(out)["epoch"] == 1


# ---------------------------------------------------------------- atomic checkpoints
def test_crash_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = checkpoint_run(out, model, opt, sched)
    checkpoint.save_checkpoint(run, 1)

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(run, 2)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(out)["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]  # no temp dir left

    # a crash between the two renames: only checkpoint.old exists, and it is used
    os.replace(out / "checkpoint", out / "checkpoint.old")
    assert checkpoint.load_checkpoint(out)["epoch"] == 1

    # a truncated state file is refused with a clear message, not loaded
    (out / "checkpoint.old" / "state.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError, match="unreadable.*delete"):
        checkpoint.load_checkpoint(out)


def test_checkpoint_restores_rng_and_learning_rate(tmp_path):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    for _ in range(2):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        sched.step()
    torch.manual_seed(123)
    run = checkpoint_run(
        tmp_path, model, opt, sched, best=0.5, metrics=[{"epoch": 1}], args={"learning_rate": 1e-2}
    )
    checkpoint.save_checkpoint(run, 2)
    expected = torch.rand(5)
    state = checkpoint.load_checkpoint(tmp_path)

    fresh = torch.nn.Linear(3, 3)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=5e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 4))
    checkpoint.restore(state, fresh, opt2, sched2, lr=5e-3)
    assert torch.equal(torch.rand(5), expected)
    assert torch.equal(fresh.weight, model.weight)
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3 * 3 / 4)  # new base, same schedule
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert state["best"] == 0.5 and state["metrics"] == [{"epoch": 1}]
