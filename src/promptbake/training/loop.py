"""The training loop: a LoRA so that the unprompted model matches the prompted one.

    model, metrics = train(cfg, model, tok, train_rows, val_rows, teacher=plan, table=table)

The train command (train.py; train_loop.py) reads and checks the inputs, loads the model
and decides the teacher plan (targets.py); bake.py does the same in one process. :func:`train` is
``setup -> fit_epoch -> validate -> end_epoch``, as plain functions over one
:class:`Run`. For every trajectory the teacher is the model with the adapter disabled
reading (system + question + answer); the student is the same model with the adapter
enabled reading (question + answer). The loss is the full-vocabulary divergence at
every generated token (objective.py, ../loss.py), computed only on the hidden states of
the rows that predict a generated token: the LM head never runs on the prompt, and the
[tokens x vocab] tensors are built a chunk at a time.

Position alignment: the logits at position p predict token p + 1, so the row that
predicts generated token t is t - 1. The first generated token's distribution is
therefore matched, the end-of-turn token too, and nothing after it.

Writes to --out_dir (outputs.py): args.json, train_loop.log, metrics.jsonl,
kl_curve.png (at the end, and after an epoch when the last one is 30 s old), the
best-validation adapter (adapter_config.json,
adapter_model.safetensors), epoch_N/ every --save_every epochs and, with --report_to
tensorboard, tensorboard/. The adapter loads with plain
``PeftModel.from_pretrained(base_model, out_dir)``. After every epoch the whole
training state goes to checkpoint/ (checkpoint.py): ``--resume true`` continues a
killed run from there, ``--resume false`` starts over; without either, an --out_dir
holding a checkpoint is refused (nothing is deleted unasked). --patience N stops after
N epochs without a better validation KL; --on_policy F trains a share of the batches on
the student's own answers (onpolicy.py).

Under ``torchrun --nproc_per_node N`` every global batch of --batch_size rows is split
across the N processes and the LoRA gradients are summed (distributed.py); only rank 0
writes files. ``--fsdp true`` also shards the model's layers across them (FSDP2).

A step does not wait for the device: KL sums stay on it, token counts come from the
host's batches, and the non-finite check reads the PREVIOUS step's loss (the device
has the current one queued by then). It still stops before anything is saved.

Speed-ups, each a switch (measured in bench/README.md): the teacher's targets come from
a table when one fits (targets.py: kept from generation, the sidecar, or one pass
before epoch 1), else the teacher runs every step; --prefix_reuse runs each shared prompt prefix once per batch, for teacher and
student (forward.py), --length_bucketing batches similar lengths,
--gradient_checkpointing trades compute for memory; on CUDA out-of-memory a step is
redone in row slices with the same gradient (backward_kl) instead of crashing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..configs import TrainConfig
from ..errors import Interrupted, UserError
from ..files import append_line
from ..models import peak_gpu_memory
from . import checkpoint, objective, onpolicy
from .batches import Batch, bucket_order, collate
from .outputs import plot_curves, save_adapter
from .setup import Run, read_resume, resume, setup
from .targets import TeacherPlan, plan_teacher, teacher_table, training_facts
from .teacher import TeacherCache, kl_rows

POSTFIX_EVERY = 8  # progress-bar loss every this many steps
# kl_curve.png after an epoch only when the last one is this old (and always at the end):
# drawing it costs ~0.4 CPU s (more with matplotlib's import), a lot next to short epochs
PLOT_EVERY_S = 30.0
UNREAD = object()  # train(resume_state=...) not given: read the checkpoint here


def non_finite_message(value: float, epoch: int, bi: int, n_batches: int, saved: int, out) -> str:
    where = f"non-finite loss ({value}) at epoch {epoch}, batch {bi + 1}/{n_batches}"
    if saved:
        return (
            f"{where}; stopped, keeping the checkpoint after epoch {saved} in "
            f"{checkpoint.checkpoint_dir(out)}: rerun with --resume true and a lower "
            "--learning_rate (or --dtype float32) to continue from it"
        )
    return (
        f"{where}; stopped before any epoch finished: lower --learning_rate or use --dtype float32"
    )


# ---------------------------------------------------------------- fit
def validate(run: Run) -> dict:
    """Held-out KL over every process's share of the validation rows."""
    v = objective.evaluate_kl(run.model, run.val_batches, run.cfg.kl_chunk_size)
    if run.cfg.fsdp:
        objective.evaluate_kl(run.model, run.val_idle, run.cfg.kl_chunk_size)  # counts nothing
    n_share = len(run.val_share)
    kl, n_tok, kl_seq, n_seq = distributed.all_reduce_sum(
        [v["kl"] * v["tokens"], v["tokens"], v["kl_seq"] * n_share, n_share]
    )
    return {"kl": kl / max(n_tok, 1), "kl_seq": kl_seq / max(n_seq, 1), "tokens": int(n_tok)}


def epoch_plan(run: Run, epoch: int) -> tuple[list[list[int]], set[int]]:
    """The epoch's global batches (row indices; reshuffled each epoch) and which of
    them are on-policy."""
    cfg = run.cfg
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(run.train_rows), generator=gen).tolist()
    if cfg.length_bucketing:
        order = bucket_order(run.train_rows, order, cfg.batch_size, gen, cfg.max_traj_len)
    chunks = [order[j : j + cfg.batch_size] for j in range(0, len(order), cfg.batch_size)]
    if cfg.on_policy <= 0:
        return chunks, set()
    return chunks, onpolicy.pick_batches(len(chunks), cfg.on_policy, cfg.seed, epoch)


def load_batch(run: Run, epoch: int, bi: int, chunk: list[int], on_policy: bool):
    """This process's share of global batch `bi`: (Batch or None, teacher target or
    None, global KL-row count). The count is known on the host, so dividing the
    gradients by it needs nothing from the device."""
    cfg = run.cfg
    if not on_policy:
        mine = distributed.shard(chunk)
        n_glob = sum(kl_rows(run.train_rows[i], cfg.max_traj_len) for i in chunk)
        if not mine:
            return None, None, n_glob
        target = None if run.cache is None else run.cache.target(mine)  # stays on the CPU
        rows = [run.train_rows[i] for i in mine]
        return collate(rows, run.pad, cfg.max_traj_len), target, n_glob
    picks = onpolicy.pick_questions(len(run.student.prompts), len(chunk), cfg.seed, epoch, bi)
    seed = onpolicy.batch_seed(cfg.seed, epoch, bi)
    rows = onpolicy.student_rows(
        run.model, run.tokenizer, run.student, distributed.shard(picks), seed
    )
    n_local = sum(kl_rows(r, cfg.max_traj_len) for r in rows)
    (n_glob,) = distributed.all_reduce_sum([n_local])  # each process sampled its own rows
    batch = collate(rows, run.pad, cfg.max_traj_len) if rows else None
    return batch, None, int(n_glob)


def train_step(run: Run, batch: Batch | None, target, n_glob: int) -> tuple:
    """One optimizer step on this process's share; returns (KL sum, per-sequence KL
    sum, sequences), the sums as device tensors (nothing is read back here)."""
    cfg, model = run.cfg, run.model
    run.opt.zero_grad(set_to_none=True)
    zero = torch.zeros((), device=run.device)
    if batch is None:  # this process has no rows in a short last batch
        kl_sum, seq_sum, n_seq = zero, zero, 0
        if cfg.fsdp:  # an idle pass: zero gradients, but FSDP's collectives run
            empty = None if run.cache is None else run.cache.target([])
            objective.backward_kl(model, run.idle.to(run.device), cfg.kl_chunk_size, teacher=empty)
    else:
        # backward of the KL SUM here; the gradients are divided below
        kl, per_seq, run.parts = objective.backward_kl(
            model, batch.to(run.device), cfg.kl_chunk_size, teacher=target,
            prefix_reuse=cfg.prefix_reuse, parts=run.parts,
            divergence=cfg.divergence, beta=cfg.jsd_beta, autocast=run.autocast,
        )  # fmt: skip
        kl_sum, seq_sum, n_seq = kl.sum(), per_seq.sum(), per_seq.numel()
    # Each process divides its KL sum by the GLOBAL token count and the gradients are
    # summed over processes (all_reduce_grads; see distributed.py for why not DDP), so
    # a step equals one process's step on the whole batch. With one process this is
    # the plain token mean.
    params = run.params
    for p in params:
        if p.grad is not None:
            p.grad.div_(max(n_glob, 1))
    distributed.all_reduce_grads(params)
    run.opt.step()
    run.sched.step()
    return kl_sum, seq_sum, n_seq


@dataclass
class Pending:
    """A step whose loss is still on the device: checked one step later."""

    loss: torch.Tensor  # the global KL sum
    n_glob: int
    bi: int
    lr: float
    seconds: float


def settle(run: Run, p: Pending | None, epoch: int, n_batches: int) -> float | None:
    """Read a finished step's loss: stop on a non-finite one (before anything is
    saved, naming its epoch and batch), report it to the tracker; the token mean."""
    if p is None:
        return None
    value = float(p.loss)
    if not math.isfinite(value):
        msg = non_finite_message(value, epoch, p.bi, n_batches, run.saved, run.out)
        raise UserError(msg)
    mean = value / max(p.n_glob, 1)
    if run.tracker is not None:
        step = (epoch - 1) * n_batches + p.bi + 1
        run.tracker.step(step, mean, p.lr, p.n_glob / max(p.seconds, 1e-9))
    return mean


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all processes, on the device (no host round trip)."""
    if distributed.active():
        t = t.detach().clone()
        torch.distributed.all_reduce(t)
    return t


def fit_epoch(run: Run, epoch: int, echo: bool) -> dict:
    """One pass over the training batches; the epoch's metrics (before validation)."""
    cfg = run.cfg
    run.model.train()
    chunks, on_policy = epoch_plan(run, epoch)
    n_batches = len(chunks)
    tot = torch.zeros((), dtype=torch.float64, device=run.device)
    seq_tot = torch.zeros((), dtype=torch.float64, device=run.device)
    n_tok = n_seq = steps = 0
    pending = None
    t0 = t_step = time.perf_counter()
    desc = f"epoch {epoch}/{cfg.num_epochs}"
    pbar = tqdm(chunks, desc=desc, leave=False, disable=not (echo and run.main))
    for bi, chunk in enumerate(pbar):
        # at least one step, so the epoch has a loss; another only if it and the
        # epoch's validation and save still end within --max_train_seconds
        if bi > 0 and out_of_time(run, run.step_s + run.end_s):
            break
        batch, target, n_glob = load_batch(run, epoch, bi, chunk, bi in on_policy)
        kl_sum, seq_sum, k = train_step(run, batch, target, n_glob)
        steps += 1
        tot += kl_sum
        seq_tot += seq_sum
        n_tok += 0 if batch is None else batch.num_tokens
        n_seq += k
        mean = settle(run, pending, epoch, n_batches)  # the previous step: done by now
        now = time.perf_counter()
        lr = run.sched.get_last_lr()[0]
        pending = Pending(sum_over_ranks(kl_sum), n_glob, bi, lr, now - t_step)
        run.step_s, t_step = now - t_step, now
        if mean is not None and bi % POSTFIX_EVERY == 0:
            pbar.set_postfix(kl=f"{mean:.4f}")
    settle(run, pending, epoch, n_batches)
    tot, n_tok, seq_tot, n_seq = distributed.all_reduce_sum(
        [float(tot), n_tok, float(seq_tot), n_seq]
    )
    secs = time.perf_counter() - t0
    return {
        "epoch": epoch,
        "train_kl": tot / max(n_tok, 1),
        "train_kl_seq": seq_tot / max(n_seq, 1),
        "tokens_per_s": n_tok / max(secs, 1e-9),
        "seconds": secs,
        "lr": run.sched.get_last_lr()[0],
        "steps": steps,
        "partial": steps < n_batches,
    }


# ---------------------------------------------------------------- after each epoch
def end_epoch(run: Run, m: dict) -> None:
    """Validate, keep the best adapter, count epochs without progress, checkpoint, log."""
    cfg, out, epoch = run.cfg, run.out, m["epoch"]
    run.model.eval()
    if run.val_rows:
        v = validate(run)
        m.update(val_kl=v["kl"], val_kl_seq=v["kl_seq"])
    score = m.get("val_kl", m["train_kl"])
    m["best"] = score < run.best
    run.bad_epochs = 0 if m["best"] else run.bad_epochs + 1
    # whole tensors, gathered on every process under --fsdp; rank 0 writes them
    lora, opt_sd = checkpoint.trainable_state(run.model), checkpoint.optimizer_state(run.opt)
    if m["best"]:
        run.best, run.best_state = score, lora
        if run.main:
            save_adapter(run.model, out, lora)
    if run.main and cfg.save_every and epoch % cfg.save_every == 0:
        d = out / f"epoch_{epoch}"
        d.mkdir(exist_ok=True)
        save_adapter(run.model, d, lora)
    record(run, m)
    if run.main:  # after every epoch, so a killed run resumes here (--resume true)
        checkpoint.save_checkpoint(run, epoch, lora, opt_sd)
    run.saved = epoch
    val_txt = f", val KL {m['val_kl']:.4f}" if "val_kl" in m else ""
    run.log(
        f"epoch {epoch}: train KL {m['train_kl']:.4f}/token ({m['train_kl_seq']:.3f}/seq)"
        f"{val_txt}, {m['tokens_per_s']:.0f} tok/s{' *best*' if m['best'] else ''}"
    )
    plot(run)


def plot(run: Run, final: bool = False) -> None:
    """kl_curve.png: at the end of the run, and after an epoch when the last plot is
    PLOT_EVERY_S old (a killed run keeps a recent one)."""
    if not (run.main and run.cfg.plot) or run.plotted == len(run.metrics):
        return
    if final or time.monotonic() - run.plot_time >= PLOT_EVERY_S:
        plot_curves(run.metrics, run.out / "kl_curve.png")
        run.plotted, run.plot_time = len(run.metrics), time.monotonic()


def out_of_time(run: Run, reserve: float = 0.0) -> bool:
    """--max_train_seconds is spent, or would be after `reserve` more seconds (work that
    must still fit: a step, the epoch's validation and save). Every process asks at the
    same points and they agree (the slowest one's clock decides), so none waits in a
    collective alone."""
    if run.deadline == math.inf:
        return False
    late = time.perf_counter() + reserve >= run.deadline
    return bool(distributed.max_over_ranks(int(late)))


def timed(run: Run, work, *args) -> None:
    """`work(run, *args)`, its seconds kept as the end-of-epoch cost (run.end_s)."""
    t0 = time.perf_counter()
    work(run, *args)
    run.end_s = time.perf_counter() - t0


def patience_spent(run: Run) -> bool:
    """--patience N: N epochs in a row without a better score."""
    return run.cfg.patience > 0 and run.bad_epochs >= run.cfg.patience


def record(run: Run, m: dict) -> None:
    """Keep an epoch's metrics: in memory, in metrics.jsonl, in the tracker."""
    run.metrics.append(m)
    if run.main:
        append_line(run.out / "metrics.jsonl", json.dumps(m))
        if run.tracker is not None:
            run.tracker.epoch(m["epoch"], m)


def validate_before_training(run: Run) -> None:
    v = validate(run)
    run.log(f"epoch 0 (before training): val KL {v['kl']:.4f}/token, {v['kl_seq']:.3f}/sequence")
    record(run, {"epoch": 0, "train_kl": None, "val_kl": v["kl"], "val_kl_seq": v["kl_seq"]})


def train(
    cfg: TrainConfig,
    model,
    tokenizer,
    train_rows: list[dict],
    val_rows: list[dict] | None = None,
    echo: bool = True,
    teacher: TeacherPlan | None = None,
    table: TeacherCache | None = None,
    student: onpolicy.StudentPrompts | None = None,
    resume_state: dict | None | object = UNREAD,
):
    """Train a LoRA on loaded, checked inputs; returns (peft model, epoch metrics).

    The caller validated `cfg`, joined the process group and loaded everything
    (the train command does, and so does bake). `teacher`: where the teacher's targets
    come from (targets.plan_teacher; by default planned here from `cfg`), and `table`
    the table that plan hands over (kept from generation, or read from the sidecar).
    `student`: the questions on-policy batches sample
    from (onpolicy.student_prompts), required with --on_policy > 0. `resume_state`: the
    checkpoint :func:`read_resume` returned, when the caller read it already.
    """
    if not train_rows:
        raise UserError("the training set is empty")
    if cfg.on_policy > 0 and student is None:
        raise ValueError("--on_policy > 0 needs `student` (onpolicy.student_prompts)")
    state = read_resume(cfg) if resume_state is UNREAD else resume_state
    started = time.perf_counter()
    run = setup(cfg, model, tokenizer, train_rows, val_rows, echo, student)
    if cfg.max_train_seconds > 0:
        run.deadline = started + cfg.max_train_seconds
    resume(run, state)
    try:
        if run.val_rows and run.start == 0:
            timed(run, validate_before_training)  # the first estimate of an epoch's end
        plan = teacher or plan_teacher(training_facts(cfg, run.model, train_rows, start=run.start))
        run.cache = teacher_table(plan, run.model, run.train_rows, run.pad, cfg, table, run.log)
        for epoch in range(run.start + 1, cfg.num_epochs + 1):
            # at least one step always runs, so every run leaves an adapter
            # an epoch takes at least a step and its validation and save
            if patience_spent(run) or (
                epoch > run.start + 1 and out_of_time(run, run.step_s + run.end_s)
            ):
                break
            timed(run, end_epoch, fit_epoch(run, epoch, echo))
    except KeyboardInterrupt:
        plot(run, final=True)  # the finished epochs' curve, however recent the last plot
        raise Interrupted(interrupted_message(run)) from None
    plot(run, final=True)
    if patience_spent(run):
        run.log(
            f"stopped after epoch {run.saved}: no better "
            f"{'validation' if run.val_rows else 'training'} KL for {cfg.patience} epochs "
            f"(--patience {cfg.patience}); the best epoch's adapter is kept"
        )
    if (
        run.deadline < math.inf
        and out_of_time(run, run.step_s + run.end_s)
        and run.saved < cfg.num_epochs
    ):
        part = " (cut short)" if run.metrics and run.metrics[-1].get("partial") else ""
        run.log(
            f"stopped after epoch {run.saved}{part}: --max_train_seconds "
            f"{cfg.max_train_seconds:g} spent; the best epoch's adapter is kept"
        )
    if run.best_state is not None:  # hand back the model that was saved, not the last epoch's
        checkpoint.load_trainable(run.model, run.best_state)
    if run.tracker is not None:
        run.tracker.close()
    kind = "validation" if run.val_rows else "training"
    run.log(f"done: best {kind} KL {run.best:.4f}; adapter in {run.out}")
    peak = peak_gpu_memory(run.model)
    if peak is not None:
        run.log(peak)
    return run.model, run.metrics


def interrupted_message(run: Run) -> str:
    """What Ctrl-C in training keeps, and the command that continues from it."""
    if run.saved:
        return (
            f"interrupted in epoch {run.saved + 1}: the checkpoint after epoch {run.saved} is "
            f"kept in {checkpoint.checkpoint_dir(run.out)}; add --resume true to the same "
            "command to continue from it"
        )
    return "interrupted before the first epoch finished (no checkpoint yet): rerun the command"
