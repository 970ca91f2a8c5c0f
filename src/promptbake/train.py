"""Stage 2: train a LoRA so the unprompted model matches the prompted one.

    python train_loop.py --model_name smollm2-135m --data_path data/zorblax.jsonl \\
        --val_path data/zorblax_val.jsonl --out_dir results/zorblax -r 8 --lora_alpha 16

setup -> fit -> validate, as plain functions. For every trajectory the teacher is the
model with the adapter disabled reading (system + question + answer); the student is
the same model with the adapter enabled reading (question + answer). The loss is the
full-vocabulary KL at every generated token (loss.py), computed only on the hidden
states of the rows that predict a generated token: the LM head never runs on the
prompt, and the [tokens x vocab] tensors are built a chunk at a time.

Position alignment: the logits at position p predict token p + 1, so the row that
predicts generated token t is t - 1. The first generated token's distribution is
therefore matched, the end-of-turn token too, and nothing after it.

Writes to --out_dir: args.json, train_loop.log, metrics.jsonl, kl_curve.png, the
best-validation adapter (adapter_config.json, adapter_model.safetensors) and
epoch_N/ every --save_every epochs. The adapter loads with plain
``PeftModel.from_pretrained(base_model, out_dir)``. After every epoch the whole
training state goes to checkpoint/ (checkpoint.py): ``--resume true`` continues a
killed run from there.

Under ``torchrun --nproc_per_node N`` every global batch of --batch_size rows is split
across the N processes and the LoRA gradients are summed (distributed.py); only rank 0
writes files. ``--fsdp true`` also shards the model's layers across them (FSDP2).

Speed-ups, each a switch (measured in bench/README.md): --teacher_cache computes the
frozen teacher once instead of every epoch (``promptbake bake`` keeps it from
generation, so the teacher never runs), --prefix_reuse runs each shared prompt
prefix once per batch, for teacher and student (forward.py),
--length_bucketing batches similar lengths, --gradient_checkpointing trades compute for
memory; on CUDA out-of-memory a step is redone in row slices with the same gradient
(backward_kl) instead of crashing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, distributed
from .batches import bucket_order, collate, make_batches
from .configs import LoraArgs, TrainConfig
from .data import read_meta, read_trajectories, write_json, write_jsonl
from .errors import UserError, warn
from .forward import base_of
from .models import load_model, load_tokenizer, tokenizer_fingerprint
from .objective import backward_kl, evaluate_kl
from .teacher import TeacherCache, build_teacher_cache


# ---------------------------------------------------------------- setup
def linear_module_names(model) -> list[str]:
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    return sorted(names)


def add_lora(model, lora: LoraArgs):
    """Wrap `model` in a fresh LoRA adapter; unknown target modules are a clear error."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(
            f"--target_modules {','.join(missing)} not found in the model; its linear modules "
            f"are: {', '.join(available)}"
        )
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


def check_fingerprint(path: str, tokenizer) -> None:
    meta = read_meta(path)
    if meta is None:
        warn(f"{path} has no .meta.json sidecar; cannot check it was made with this tokenizer")
        return
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"{path} was generated with another tokenizer (model {meta.get('model_name')!r}); "
            "train with that model's --model_name or regenerate the data"
        )


def check_out_dir(out_dir: str) -> Path:
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; give a directory path")
    return p


def check_token_ids(rows: list[dict], model) -> None:
    """Ids beyond the embedding would crash deep in torch: data from another model's
    tokenizer (a file without a .meta.json sidecar gets this far)."""
    vocab = base_of(model).get_input_embeddings().num_embeddings
    top = max(max(r["input_ids"] + r["input_ids_nosys"], default=0) for r in rows)
    if top >= vocab:
        raise UserError(
            f"the trajectories hold token id {top}, but the model has {vocab} ids: they were "
            "generated with another model's tokenizer; regenerate them with this --model_name"
        )


def prepare_out_dir(out_dir: str) -> Path:
    p = check_out_dir(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


class RunLog:
    """Timestamped lines to <out_dir>/train_loop.log, echoed to the console."""

    def __init__(self, path: Path, echo: bool = True):
        self.path, self.echo = path, echo

    def __call__(self, msg: str) -> None:
        line = f"{datetime.now().isoformat(timespec='seconds')} {msg}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.echo:
            tqdm.write(line)


def save_adapter(model, out_dir: Path, lora: dict | None = None) -> None:
    """peft save_pretrained into a temp dir, then rename each file into place.

    `lora`: the weights to write (checkpoint.trainable_state), when the model's own
    are FSDP shards."""
    from .adapters import save_peft

    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-adapter-"))
    try:
        save_peft(model, tmp, lora)  # no Hub request, the user's file modes
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plot_curves(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(m["epoch"], m["train_kl"]) for m in metrics if m.get("train_kl") is not None]
    va = [(m["epoch"], m["val_kl"]) for m in metrics if m.get("val_kl") is not None]
    if tr:
        ax.plot(*zip(*tr), "o-", label="train KL")
    if va:
        ax.plot(*zip(*va), "s-", label="validation KL")
    ax.set_xlabel("epoch")
    ax.set_ylabel("KL(prompted || baked) per token (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


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


def train(
    cfg: TrainConfig,
    model=None,
    tokenizer=None,
    train_rows: list[dict] | None = None,
    val_rows: list[dict] | None = None,
    echo: bool = True,
    teacher_cache: TeacherCache | None = None,
):
    """Run training from a config; returns (peft model, list of epoch metrics).

    Pass `model`/`tokenizer` to reuse a loaded model (promptbake bake) and
    `train_rows`/`val_rows` to skip reading files. `teacher_cache`: an exact teacher
    cache of `train_rows` kept from generation (teacher.cache_from_generation), used
    instead of a teacher pass when --teacher_cache is exact.
    """
    cfg.validate()
    distributed.init(cfg.device)  # no-op unless launched by torchrun
    main = distributed.is_main()  # the one process that writes files
    # fail on a bad --out_dir before loading anything, but create it only once every
    # input has been checked: a failed run leaves no empty run directory behind
    check_out_dir(cfg.out_dir)
    if train_rows is None:
        train_rows = read_trajectories(cfg.data_path, "--data_path")
    if val_rows is None and cfg.val_path:
        val_rows = read_trajectories(cfg.val_path, "--val_path")
    if not train_rows:
        raise UserError("the training set is empty")
    if tokenizer is None:  # cheap: check the data against it before loading the weights
        tokenizer = load_tokenizer(cfg.model_name, cfg.trust_remote_code)
    for p in (cfg.data_path, cfg.val_path):
        if p and Path(p).is_file():
            check_fingerprint(p, tokenizer)
    if model is None:
        where = (cfg.device, cfg.dtype)
        if cfg.fsdp:  # into CPU memory (it may not fit one GPU); fsdp_shard moves the shards
            where = distributed.fsdp_load_args(cfg.device, cfg.dtype)
        model, tokenizer = load_model(cfg.model_name, *where, cfg.trust_remote_code)
    check_token_ids(train_rows + (val_rows or []), model)

    if cfg.gradient_checkpointing:  # before peft wraps it: the layers recompute in backward
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name in transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg)
    out = prepare_out_dir(cfg.out_dir)
    distributed.broadcast_params(p for p in model.parameters() if p.requires_grad)
    if cfg.fsdp:  # shard the layers (base + LoRA weights) across the processes
        distributed.fsdp_shard(model)
    device = next(model.parameters()).device
    if main:
        write_json(out / "args.json", dataclasses.asdict(cfg))
        if not cfg.resume:
            (out / "train_loop.log").unlink(missing_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
    log = RunLog(out / "train_loop.log", echo) if main else (lambda msg: None)
    n_train, n_all = (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )
    log(
        f"model {cfg.model_name} on {device}; LoRA r={cfg.r} alpha={cfg.lora_alpha} on "
        f"{cfg.target_modules}: {n_train:,} trainable of {n_all:,} parameters"
    )
    log(f"{len(train_rows)} training and {len(val_rows or [])} validation trajectories")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    world = distributed.world_size()
    if world > 1:
        log(f"data parallel on {world} processes: each step splits {cfg.batch_size} rows")
    if distributed.is_sharded(model):
        log(f"FSDP: each decoder layer's weights are sharded across the {world} processes")
    # each process validates its share of the rows; validate() sums the shares
    val_share = distributed.shard(val_rows or [])
    val_batches = (
        make_batches(val_share, cfg.batch_size, pad, cfg.max_traj_len) if val_share else []
    )
    # FSDP: every process runs the same passes; one with fewer rows runs idle ones
    idle = distributed.idle_batch(collate(train_rows[:1], pad, cfg.max_traj_len))
    val_idle = [idle] * (distributed.max_over_ranks(len(val_batches)) - len(val_batches))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )

    metrics: list[dict] = []

    def record(m: dict) -> None:
        metrics.append(m)
        if main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(m) + "\n")

    def validate() -> dict:
        v = evaluate_kl(model, val_batches, cfg.kl_chunk_size)
        if cfg.fsdp:
            evaluate_kl(model, val_idle, cfg.kl_chunk_size)  # counts nothing
        kl, n_tok, kl_seq, n_seq = distributed.all_reduce_sum(
            [v["kl"] * v["tokens"], v["tokens"], v["kl_seq"] * len(val_share), len(val_share)]
        )
        return {"kl": kl / max(n_tok, 1), "kl_seq": kl_seq / max(n_seq, 1), "tokens": int(n_tok)}

    best = math.inf
    best_state = None  # LoRA weights of the best epoch, handed back at the end
    start = 0  # epochs already done
    # rank 0 reads it and hands it to all: other nodes need not see rank 0's disk
    state = distributed.on_main(lambda: checkpoint.load_checkpoint(out)) if cfg.resume else None
    if state is not None:
        changed = checkpoint.changed_args(state["args"], dataclasses.asdict(cfg))
        checkpoint.restore(state, model, opt, sched, cfg.learning_rate)
        start, best, metrics = state["epoch"], state["best"], list(state["metrics"])
        log(
            f"resumed from {checkpoint.checkpoint_dir(out)} after epoch {start}"
            + (f" (changed: {', '.join(changed)})" if changed else "")
        )
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out}, starting from the beginning")
    elif main:
        checkpoint.remove_checkpoint(out)  # a previous run's state must not be resumed later
    if main and cfg.resume:  # metrics.jsonl = the checkpoint's epochs, nothing half-done
        write_jsonl(out / "metrics.jsonl", metrics)
    if val_rows and start == 0:
        v = validate()
        log(f"epoch 0 (before training): val KL {v['kl']:.4f}/token, {v['kl_seq']:.3f}/sequence")
        record({"epoch": 0, "train_kl": None, "val_kl": v["kl"], "val_kl_seq": v["kl_seq"]})

    cache = None  # --teacher_cache: the frozen teacher's log-probs, computed once
    if teacher_cache is not None and cfg.teacher_cache == "exact":
        cache = teacher_cache
        log(f"teacher cache (exact, kept from generation): {len(cache.logp)} rows")
    elif cfg.teacher_cache != "off" and start < cfg.num_epochs:
        cache = build_teacher_cache(
            model,
            train_rows,
            pad,
            mode=cfg.teacher_cache,
            topk=cfg.teacher_topk,
            max_gb=cfg.teacher_cache_max_gb,
            batch_size=cfg.batch_size,
            max_gen=cfg.max_traj_len,
            chunk_size=cfg.kl_chunk_size,
            prefix_reuse=cfg.prefix_reuse,
            log=log,
        )
    parts = 1  # row slices per step; grows on CUDA out-of-memory (backward_kl)
    saved = start  # the epoch of the checkpoint on disk
    for epoch in range(start + 1, cfg.num_epochs + 1):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # reshuffle each epoch
        order = torch.randperm(len(train_rows), generator=gen).tolist()
        if cfg.length_bucketing:
            order = bucket_order(train_rows, order, cfg.batch_size, gen, cfg.max_traj_len)
        batches = make_batches(train_rows, cfg.batch_size, pad, cfg.max_traj_len, order, True)
        tot, n_tok, seq_tot, n_seq = 0.0, 0, 0.0, 0
        t0 = time.perf_counter()
        pbar = tqdm(
            batches,
            desc=f"epoch {epoch}/{cfg.num_epochs}",
            leave=False,
            disable=not (echo and main),
        )
        for bi, b in enumerate(pbar):
            opt.zero_grad(set_to_none=True)
            if b is None:  # this process has no rows in a short last batch
                kl = per_seq = torch.zeros(0, device=device)
                if cfg.fsdp:  # an idle pass: zero gradients, but FSDP's collectives run
                    empty = None if cache is None else cache.target([])
                    backward_kl(model, idle.to(device), cfg.kl_chunk_size, teacher=empty)
            else:
                rows_b = distributed.shard(order[bi * cfg.batch_size : (bi + 1) * cfg.batch_size])
                target = None if cache is None else cache.target(rows_b)  # stays on the CPU
                # backward of the KL SUM here; the gradients are divided below
                kl, per_seq, parts = backward_kl(
                    model,
                    b.to(device),
                    cfg.kl_chunk_size,
                    teacher=target,
                    prefix_reuse=cfg.prefix_reuse,
                    parts=parts,
                )
            # Each process divides its KL sum by the GLOBAL token count and the gradients
            # are summed over processes (all_reduce_grads; see distributed.py for why not
            # DDP), so a step equals one process's step on the whole batch. With one
            # process this is the plain token mean.
            local_sum = float(kl.sum())
            kl_sum, n_glob = distributed.all_reduce_sum([local_sum, kl.numel()])
            if not math.isfinite(kl_sum):
                raise UserError(non_finite_message(kl_sum, epoch, bi, len(batches), saved, out))
            for p in params:
                if p.grad is not None:
                    p.grad.div_(max(n_glob, 1))
            distributed.all_reduce_grads(params)
            opt.step()
            sched.step()
            tot += local_sum
            n_tok += kl.numel()
            seq_tot += float(per_seq.sum())
            n_seq += per_seq.numel()
            pbar.set_postfix(kl=f"{kl_sum / max(n_glob, 1):.4f}")
        tot, n_tok, seq_tot, n_seq = distributed.all_reduce_sum([tot, n_tok, seq_tot, n_seq])
        secs = time.perf_counter() - t0
        model.eval()
        m = {
            "epoch": epoch,
            "train_kl": tot / max(n_tok, 1),
            "train_kl_seq": seq_tot / max(n_seq, 1),
            "tokens_per_s": n_tok / max(secs, 1e-9),
            "seconds": secs,
            "lr": sched.get_last_lr()[0],
        }
        if val_rows:
            v = validate()
            m.update(val_kl=v["kl"], val_kl_seq=v["kl_seq"])
        score = m.get("val_kl", m["train_kl"])
        m["best"] = score < best
        # whole tensors, gathered on every process under --fsdp; rank 0 writes them
        lora, opt_sd = checkpoint.trainable_state(model), checkpoint.optimizer_state(opt)
        if m["best"]:
            best = score
            best_state = lora
            if main:
                save_adapter(model, out, lora)
        if main and cfg.save_every and epoch % cfg.save_every == 0:
            d = out / f"epoch_{epoch}"
            d.mkdir(exist_ok=True)
            save_adapter(model, d, lora)
        record(m)
        if main:  # after every epoch, so a killed run resumes here (--resume true)
            checkpoint.save_checkpoint(
                out,
                model=model,
                optimizer=opt,
                scheduler=sched,
                epoch=epoch,
                best=best,
                metrics=metrics,
                args=dataclasses.asdict(cfg),
                lora=lora,
                optimizer_sd=opt_sd,
            )
        saved = epoch
        val_txt = f", val KL {m['val_kl']:.4f}" if "val_kl" in m else ""
        log(
            f"epoch {epoch}: train KL {m['train_kl']:.4f}/token ({m['train_kl_seq']:.3f}/seq)"
            f"{val_txt}, {m['tokens_per_s']:.0f} tok/s{' *best*' if m['best'] else ''}"
        )
        if main and cfg.plot:
            plot_curves(metrics, out / "kl_curve.png")
    if best_state is not None:  # hand back the model that was saved, not the last epoch's
        checkpoint.load_trainable(model, best_state)
    log(f"done: best {'validation' if val_rows else 'training'} KL {best:.4f}; adapter in {out}")
    return model, metrics


def run_train(cfg: TrainConfig):
    return train(cfg)
