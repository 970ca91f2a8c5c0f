"""`promptbake train` / ``train_loop.py``: bake trajectories into a LoRA adapter.

    python train_loop.py --model_name smollm2-135m --data_path data/zorblax.jsonl \\
        --val_path data/zorblax_val.jsonl --out_dir results/zorblax -r 8 --lora_alpha 16

:func:`run_train` reads and checks every input before the model loads (the output
folder, a checkpoint to resume, the trajectories and their sidecars, the tokenizer),
loads the model, decides where the teacher's targets come from (training.targets: a
table generate_data.py wrote next to --data_path, one built before epoch 1, or the
teacher every step) and hands all of it to the training loop (training.loop.train).

--out_dir is a run folder (files.py): refused when the tool did not write it (no
``.promptbake-run``) and it holds a file the run writes (training.outputs.RUN_WRITES:
README.md, args.json, ...), or when it or a file written there is an input; it is
locked for the whole run, so a second run into it is refused at once.
"""

from __future__ import annotations

import contextlib

from . import distributed
from .configs import TrainConfig
from .guards import check_not_inputs, check_run_dir, run_dir_lock
from .models import load_model, load_tokenizer, model_options
from .schema import check_fingerprint, check_token_ids, read_meta, read_trajectories
from .training import onpolicy
from .training.loop import train
from .training.outputs import RUN_WRITES, check_report_to
from .training.setup import check_lora_fits, read_resume
from .training.sidecar import model_identity, probe_sidecar, quantization, read_sidecar
from .training.targets import plan_teacher, training_facts


def train_inputs(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    """Every input file of a training run, for guards.check_not_inputs."""
    return [
        ("--data_path", cfg.data_path),
        ("--val_path", cfg.val_path),
        ("--x0_file", cfg.x0_file),
        ("--question_dataset", cfg.question_dataset),
        ("--model_name", cfg.model_name),  # a local model folder (a hub id is none)
    ]


def run_train(cfg: TrainConfig, echo: bool = True):
    """The whole stage from a config; returns (peft model, epoch metrics)."""
    cfg.validate()
    distributed.init(cfg.device)  # no-op unless launched by torchrun
    # fail on a bad --out_dir before loading anything, but create it only once every
    # input has been checked: a failed run leaves no empty run directory behind. A
    # folder promptbake did not write is refused when it holds a file the run writes,
    # and no output may be an input.
    check_run_dir(cfg.out_dir, RUN_WRITES)
    check_not_inputs([("--out_dir", cfg.out_dir, RUN_WRITES)], train_inputs(cfg))
    check_report_to(cfg.report_to)
    # one run at a time in a run folder, for the whole run (rank 0 holds it)
    with run_dir_lock(cfg.out_dir) if distributed.is_main() else contextlib.nullcontext():
        return _run_train(cfg, echo)


def _run_train(cfg: TrainConfig, echo: bool):
    state = read_resume(cfg)  # a refused resume leaves the run's files as they were
    tokenizer = load_tokenizer(cfg.model_name, cfg.trust_remote_code)  # cheap: before weights
    # (the tokenizer also reads files in the original generate_data.py layout)
    train_rows = read_trajectories(cfg.data_path, "--data_path", tokenizer)
    val_rows = read_trajectories(cfg.val_path, "--val_path", tokenizer) if cfg.val_path else None
    meta = read_meta(cfg.data_path)
    check_fingerprint(cfg.data_path, tokenizer, meta)
    if cfg.val_path:
        check_fingerprint(cfg.val_path, tokenizer)
    source = None
    if cfg.on_policy > 0:
        source = onpolicy.read_source(cfg.x0_file, cfg.question_dataset, meta)
    where = (cfg.device, cfg.dtype)
    if cfg.fsdp:  # into CPU memory (it may not fit one GPU); fsdp_shard moves the shards
        where = distributed.fsdp_load_args(cfg.device, cfg.dtype)
    model, tokenizer = load_model(
        cfg.model_name, *where, cfg.trust_remote_code, **model_options(cfg), tokenizer=tokenizer
    )
    check_token_ids(train_rows + (val_rows or []), model)
    check_lora_fits(model, cfg)  # before anything is allocated or written
    student = None
    if source is not None:
        student = onpolicy.student_prompts(source, tokenizer, model, cfg.max_traj_len)
    ident = model_identity(cfg.model_name, model, quantization(cfg))
    start = state["epoch"] if state else 0
    sidecar = "absent"  # a generate_data.py table counts only where an exact one would
    if cfg.teacher_cache in ("auto", "exact") and cfg.on_policy < 1:
        sidecar = probe_sidecar(cfg.data_path, train_rows, ident)
    plan = plan_teacher(training_facts(cfg, model, train_rows, start=start, sidecar=sidecar))
    table = None
    if plan.source == "sidecar":
        table = read_sidecar(cfg.data_path, train_rows, cfg.max_traj_len)
        if table is None:  # damaged on disk (warned): plan as without a usable sidecar
            facts = training_facts(cfg, model, train_rows, start=start, sidecar="stale")
            plan = plan_teacher(facts)
    return train(
        cfg, model, tokenizer, train_rows, val_rows, echo, teacher=plan, table=table,
        student=student, resume_state=state,
    )  # fmt: skip
