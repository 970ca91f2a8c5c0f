"""A training run's state and its setup, before the first step (loop.train runs it).

    state = read_resume(cfg)     # before anything is written: refuses a mismatch
    run = setup(cfg, model, tokenizer, train_rows, val_rows, echo=True, student=None)
    resume(run, state)           # --resume true: weights, optimizer, RNG, epoch, patience

:class:`Run` holds what the loop needs between epochs; :func:`setup` wraps the model
in a fresh LoRA (:func:`add_lora`; gradient checkpointing, FSDP shards), makes the
optimizer and schedule and the output directory, and cuts the validation rows into
this process's batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..configs import LoraArgs, TrainConfig
from ..configs.stages import LR_SCHEDULES
from ..errors import UserError
from ..files import human_bytes, write_json, write_jsonl
from ..guards import prepare_out_dir
from ..models import pad_id
from . import checkpoint, onpolicy
from .batches import Batch, collate, make_batches
from .forward import autocast_dtype, base_of
from .outputs import RunLog, Tracker
from .teacher import TeacherCache


def linear_module_names(model) -> list[str]:
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    return sorted(names)


def lora_targets(model, lora: LoraArgs) -> list[str]:
    """The --target_modules names, each checked to name linear modules of `model`."""
    targets = [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(
            f"--target_modules {','.join(missing)} not found in the model; its linear modules "
            f"are: {', '.join(available)}"
        )
    return targets


# bytes a trained LoRA parameter takes: float32 weight, gradient and AdamW's two moments
TRAIN_BYTES_PER_PARAM = 16


def lora_params(model, lora: LoraArgs) -> int:
    """How many parameters the LoRA of `lora` adds to `model`: r x (in + out) for every
    targeted linear module, computed from the module shapes before anything is allocated."""
    targets = set(lora_targets(model, lora))
    return sum(
        lora.r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: free GPU memory, or the CPU's
    MemAvailable; None when it cannot be told."""
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            return torch.cuda.mem_get_info(device)[0]
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_lora_fits(model, lora: LoraArgs) -> None:
    """Refuse, before any LoRA weight is allocated (and in bake before sampling), a rank
    whose weights, gradients and optimizer state cannot fit the device's free memory:
    ``-r 100000000`` would otherwise ask torch for hundreds of GB and die in a traceback."""
    n = lora_params(model, lora)
    need = n * TRAIN_BYTES_PER_PARAM
    device = next(model.parameters()).device
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(
            f"-r {lora.r}: the LoRA on {lora.target_modules} would have {n:.3g} parameters, "
            f"{human_bytes(need)} with their gradients and AdamW state, more than the "
            f"{human_bytes(free)} free on {device.type}; choose a smaller -r (or fewer "
            "--target_modules)"
        )


def add_lora(model, lora: LoraArgs):
    """Wrap `model` in a fresh LoRA adapter; unknown target modules are a clear error,
    and so is a LoRA too large for the device (:func:`check_lora_fits`)."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = lora_targets(model, lora)
    check_lora_fits(model, lora)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        inference_mode=False,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias="none",
        target_modules=targets,
    )
    return get_peft_model(model, config)


def prepare_model(cfg: TrainConfig, model):
    """Gradient checkpointing, a fresh LoRA (the same on every process), FSDP shards."""
    if cfg.gradient_checkpointing:  # before peft wraps it: the layers recompute in backward
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name in transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg)
    distributed.broadcast_params(p for p in model.parameters() if p.requires_grad)
    if cfg.fsdp:  # shard the layers (base + LoRA weights) across the processes
        distributed.fsdp_shard(model)
    return model


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier: linear warm-up over `warmup_steps`, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def decay_factor(progress: float, schedule: str) -> float:
    """The multiplier after warm-up at `progress` (0: warm-up done, 1: the end of the
    run): 1 throughout (constant), or falling to 0 at the end (linear, cosine)."""
    p = min(1.0, max(0.0, progress))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from {LR_SCHEDULES}")


def run_progress(
    step: int, warmup_steps: int, total_steps: int, elapsed_s: float = 0.0, budget_s: float = 0.0
) -> float:
    """How far a run is from the end of warm-up (0) to its end (1): the epoch ceiling
    (`total_steps` optimizer steps, counted after warm-up) or, with a time budget
    (`budget_s` > 0), `elapsed_s` / `budget_s`, whichever end comes first."""
    by_steps = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    by_time = elapsed_s / budget_s if budget_s > 0 else 0.0
    return min(1.0, max(0.0, by_steps, by_time))


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant", progress: float = 0.0):
    """The learning-rate multiplier of optimizer step `step` (0-based): the linear
    warm-up, capped by the schedule's decay at `progress` (:func:`run_progress`)."""
    return min(warmup_factor(step, warmup_steps), decay_factor(progress, schedule))


@dataclass
class LRSchedule:
    """The LambdaLR multiplier of a run (--lr_schedule, --warmup_steps).

    A callable object, so LambdaLR saves its ``__dict__`` with the scheduler state (the
    checkpoint): ``elapsed_s``, the training seconds up to the last step, is how a
    resumed run continues a time-budget schedule where it stopped (:meth:`resumed`).
    """

    schedule: str
    warmup_steps: int
    total_steps: int  # the epoch ceiling: --num_epochs x batches per epoch
    budget_s: float = 0.0  # --max_train_seconds (0: none)
    elapsed_s: float = 0.0
    origin: float = field(default_factory=lambda: time.perf_counter())  # clock at 0 s

    def __call__(self, step: int) -> float:
        self.elapsed_s = time.perf_counter() - self.origin
        if self.budget_s > 0 and self.schedule != "constant" and distributed.active():
            # under torchrun every process must step with the same learning rate: the
            # mean of their clocks (every process steps the scheduler at the same points)
            (total,) = distributed.all_reduce_sum([self.elapsed_s])
            self.elapsed_s = total / distributed.world_size()
        progress = run_progress(
            step, self.warmup_steps, self.total_steps, self.elapsed_s, self.budget_s
        )
        return lr_factor(step, self.warmup_steps, self.schedule, progress)

    def resumed(self, settings: dict) -> float:
        """After LambdaLR.load_state_dict put a checkpoint's values into ``__dict__``:
        this run's own `settings` again (its flags may differ), the saved training
        seconds kept and counted on from now; returns those seconds."""
        spent = float(self.__dict__.get("elapsed_s") or 0.0)
        self.__dict__.update(
            {k: settings[k] for k in ("schedule", "warmup_steps", "total_steps", "budget_s")}
        )
        self.elapsed_s, self.origin = spent, time.perf_counter() - spent
        return spent


@dataclass
class Run:
    """One training run's inputs and its state between epochs."""

    cfg: TrainConfig
    model: Any
    tokenizer: Any
    train_rows: list[dict]
    val_rows: list[dict]
    out: Path
    log: RunLog
    opt: torch.optim.Optimizer
    sched: Any
    pad: int
    idle: Batch  # a pass that predicts nothing, for processes without rows under FSDP
    student: onpolicy.StudentPrompts | None = None
    tracker: Tracker | None = None
    cache: TeacherCache | None = None
    val_share: list[dict] = field(default_factory=list)  # this process's validation rows
    val_batches: list[Batch] = field(default_factory=list)
    val_idle: list[Batch] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    best: float = math.inf
    best_state: dict | None = None  # LoRA weights of the best epoch, handed back at the end
    bad_epochs: int = 0  # epochs since `best` improved (--patience)
    start: int = 0  # epochs already done
    saved: int = 0  # the epoch of the checkpoint on disk
    parts: int = 1  # row slices per step; grows on CUDA out-of-memory (backward_kl)
    deadline: float = math.inf  # time.perf_counter() at which --max_train_seconds runs out
    # the last optimizer step's and end-of-epoch work's (validate, save) seconds: the
    # run stops stepping early enough to finish both within --max_train_seconds
    step_s: float = 0.0
    end_s: float = 0.0
    autocast: torch.dtype | None = None  # --autocast resolved for this device and model
    plotted: int = 0  # epochs (metrics entries) in the last kl_curve.png
    plot_time: float = field(default_factory=time.monotonic)  # when it was drawn

    @property
    def args(self) -> dict:
        """Every argument of the run, as args.json and the checkpoint record them."""
        return dataclasses.asdict(self.cfg)

    @property
    def main(self) -> bool:
        return distributed.is_main()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def lr_schedule(cfg: TrainConfig, n_train_rows: int) -> LRSchedule:
    """The run's multiplier; its clock starts now, as --max_train_seconds' does."""
    per_epoch = math.ceil(n_train_rows / cfg.batch_size)
    return LRSchedule(
        cfg.lr_schedule, cfg.warmup_steps, cfg.num_epochs * per_epoch, cfg.max_train_seconds
    )


def setup(cfg, model, tokenizer, train_rows, val_rows, echo, student) -> Run:
    """Model with LoRA, optimizer, output directory, validation batches: a Run at epoch 0."""
    model = prepare_model(cfg, model)
    out = prepare_out_dir(cfg.out_dir)
    main = distributed.is_main()
    if main:
        write_json(out / "args.json", dataclasses.asdict(cfg))
        if not cfg.resume:
            (out / "train_loop.log").unlink(missing_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg, len(train_rows)))
    pad = pad_id(tokenizer)
    run = Run(
        cfg, model, tokenizer, train_rows, val_rows or [], out,
        RunLog(out / "train_loop.log", echo, enabled=main), opt, sched, pad,
        distributed.idle_batch(collate(train_rows[:1], pad, cfg.max_traj_len)),
        student=student,
        tracker=Tracker.open(cfg.report_to, out) if main else None,
    )  # fmt: skip
    head = base_of(model).get_output_embeddings().weight
    run.autocast = autocast_dtype(cfg.autocast, head.device, head.dtype)
    # each process validates its share of the rows; validate() sums the shares
    run.val_share = distributed.shard(run.val_rows)
    if run.val_share:
        run.val_batches = make_batches(run.val_share, cfg.batch_size, pad, cfg.max_traj_len)
    # FSDP: every process runs the same passes; one with fewer rows runs idle ones
    n_idle = distributed.max_over_ranks(len(run.val_batches)) - len(run.val_batches)
    run.val_idle = [run.idle] * n_idle
    log_setup(run)
    return run


def log_setup(run: Run) -> None:
    cfg, model = run.cfg, run.model
    n_train = sum(p.numel() for p in run.params)
    n_all = sum(p.numel() for p in model.parameters())
    run.log(
        f"model {cfg.model_name} on {run.device}; LoRA r={cfg.r} alpha={cfg.lora_alpha} on "
        f"{cfg.target_modules}: {n_train:,} trainable of {n_all:,} parameters"
    )
    run.log(f"{len(run.train_rows)} training and {len(run.val_rows)} validation trajectories")
    if run.autocast is not None:
        run.log(
            f"mixed precision (--autocast {cfg.autocast}): the decoder's training forwards in "
            f"{str(run.autocast).removeprefix('torch.')}, the LM head, KL and weights float32"
        )
    world = distributed.world_size()
    if world > 1:
        run.log(f"data parallel on {world} processes: each step splits {cfg.batch_size} rows")
    if distributed.is_sharded(model):
        run.log(f"FSDP: each decoder layer's weights are sharded across the {world} processes")
    if cfg.on_policy > 0:
        s = run.student.settings
        run.log(
            f"on-policy: {cfg.on_policy:g} of each epoch's batches sampled from the student on "
            f"{len(run.student.prompts)} questions (temperature {s.temperature}, at most "
            f"{s.max_new_tokens} new tokens)"
        )


def read_resume(cfg: TrainConfig) -> dict | None:
    """The checkpoint this run continues from (None: a fresh start), read and checked
    BEFORE the run writes anything (args.json, the log) or loads the model.

    ``--resume true`` with a checkpoint of another setup is refused (MUST_MATCH); a
    checkpoint with ``--resume`` not given is refused too: only ``--resume false`` (or
    another --out_dir) may delete the state of a run that took hours.
    """
    if cfg.resume is False:
        return None
    # rank 0 reads it and hands it to all: other nodes need not see rank 0's disk
    load = functools.partial(checkpoint.load_checkpoint, cfg.out_dir)
    state = distributed.on_main(load)
    if state is None:
        return None
    if cfg.resume is None:
        raise UserError(checkpoint.unsaid_message(cfg.out_dir, state))
    checkpoint.changed_args(state["args"], dataclasses.asdict(cfg))  # raises on a mismatch
    return state


def resume(run: Run, state: dict | None) -> None:
    """Continue from `state` (:func:`read_resume`); with --resume false drop the old one."""
    cfg, out = run.cfg, run.out
    if state is not None:
        changed = checkpoint.changed_args(state["args"], dataclasses.asdict(cfg))
        schedule = run.sched.lr_lambdas[0]
        settings = dict(schedule.__dict__)
        checkpoint.restore(state, run.model, run.opt, run.sched, cfg.learning_rate)
        # the same schedule and the same time budget go on: the seconds trained before
        # count (a checkpoint older than --lr_schedule carries none: 0)
        spent = schedule.resumed(settings)
        run.deadline -= spent
        run.start, run.best, run.metrics = state["epoch"], state["best"], list(state["metrics"])
        run.saved, run.bad_epochs = run.start, state.get("bad_epochs", 0)
        run.log(
            f"resumed from {checkpoint.checkpoint_dir(out)} after epoch {run.start}"
            + (f" (changed: {', '.join(changed)})" if changed else "")
        )
    elif cfg.resume:
        run.log(f"--resume: no checkpoint in {out}, starting from the beginning")
    elif run.main:  # --resume false, or nothing to keep: no stale state is resumed later
        checkpoint.remove_checkpoint(out)
    if run.main and cfg.resume:  # metrics.jsonl = the checkpoint's epochs, nothing half-done
        write_jsonl(out / "metrics.jsonl", run.metrics)
