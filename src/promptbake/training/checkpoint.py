"""Training state on disk, so a killed run resumes where it stopped (``--resume true``).

    promptbake train ... --out_dir runs/x                 # killed in epoch 7
    promptbake train ... --out_dir runs/x --resume true   # continues after epoch 6
    promptbake train ... --out_dir runs/x --resume false  # deletes it, starts over
    promptbake train ... --out_dir runs/x                 # refused: say true or false

After every epoch training.loop writes ``<out_dir>/checkpoint/``:

    adapter_config.json, adapter_model.safetensors   the adapter after that epoch (peft format)
    state.pt   LoRA weights, optimizer, scheduler, torch/CUDA/python/numpy RNG states,
               epoch, best validation score, epochs since it improved (--patience),
               metrics so far, and the arguments of the run
    checksums.json   the sha256 of each file above, written last: a file changed or
               damaged after the save (a flipped byte of a LoRA tensor loads fine) is
               refused on resume (:func:`check_checksums`), never resumed silently;
               so is a missing checksums.json (state.pt says it was written). Only a
               checkpoint of an older promptbake, which had none, resumes unchecked,
               with a warning

The directory is written under a temporary name and swapped in by renames, so a crash
leaves either the previous checkpoint or the new one, never a half-written one: the
previous one is moved to ``checkpoint.old`` first and removed only once the new one is
in place, and :func:`load_checkpoint` falls back to it. ``state.pt`` holds only tensors
and plain Python values and is read with ``torch.load(weights_only=True)``.

Resuming refuses a checkpoint made with a different model, data or LoRA shape
(:data:`MUST_MATCH`); other changes (more epochs, a lower learning rate after a
non-finite loss) are allowed and reported.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import distributed
from ..adapters import save_peft
from ..errors import UserError, warn
from ..files import atomic_dir, atomic_write, sha256_file, write_json
from ..records import read_json


class Run(Protocol):
    """What a checkpoint reads of a training run (training.setup.Run has it all)."""

    out: Path
    model: Any
    opt: torch.optim.Optimizer
    sched: Any
    best: float
    bad_epochs: int
    metrics: list[dict]
    args: dict


FORMAT = 1
DIR_NAME = "checkpoint"

# Arguments that define what is being trained: a checkpoint made with other values
# cannot be continued meaningfully (other weights, other data, other batches).
MUST_MATCH = (
    "model_name",
    "data_path",
    "val_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "batch_size",
    "max_traj_len",
    "seed",
)


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / DIR_NAME


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # plain values, so that torch.load(weights_only=True) accepts them
        "numpy": [np_state[0], np_state[1].tolist(), *(x for x in np_state[2:])],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by name, whole, on the CPU.

    Under --fsdp they are gathered from their shards: every process must call this.
    """
    return {
        n: distributed.full_state(p.detach()).cpu().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with whole tensors (gathered under --fsdp: every
    process must call this)."""
    return distributed.full_state(optimizer.state_dict())


def load_trainable(model, lora: dict[str, torch.Tensor]) -> None:
    """Copy whole LoRA tensors by parameter name into `model` (into this process's
    shards under --fsdp)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in lora.items():
            params[n].copy_(distributed.shard_like(t, params[n]))


def save_checkpoint(
    run: Run, epoch: int, lora: dict | None = None, optimizer_sd: dict | None = None
) -> Path:
    """Write `run`'s state after `epoch` to ``<out_dir>/checkpoint`` atomically (the old
    one moved to ``checkpoint.old`` until the new one is in place); return that path.

    `lora` and `optimizer_sd`: :func:`trainable_state` and :func:`optimizer_state`,
    gathered by the caller (under --fsdp every process must, and only rank 0 calls this);
    by default read from `run`'s model and optimizer.
    """
    lora = trainable_state(run.model) if lora is None else lora
    final = checkpoint_dir(run.out)
    state = {
        "format": FORMAT,
        "epoch": epoch,
        "best": run.best,
        "bad_epochs": run.bad_epochs,  # so --patience survives a resume
        "metrics": run.metrics,
        "args": run.args,
        "lora": lora,
        "optimizer": run.opt.state_dict() if optimizer_sd is None else optimizer_sd,
        "scheduler": run.sched.state_dict(),
        "rng": _rng_state(),
        "checksums": CHECKSUMS,  # this checkpoint has them (an older one had none)
    }
    with atomic_dir(final, aside=run.out / (DIR_NAME + ".old")) as tmp:
        if hasattr(run.model, "save_pretrained"):
            save_peft(run.model, tmp, lora)  # no Hub request
        with atomic_write(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
        write_checksums(tmp)
    return final


CHECKSUMS = "checksums.json"


def write_checksums(folder: Path) -> None:
    """<folder>/checksums.json: the sha256 of every file in the checkpoint folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}
    write_json(folder / CHECKSUMS, {"format": FORMAT, "sha256": sums})


def check_checksums(folder: Path) -> None:
    """Refuse a checkpoint whose files differ from the checksums recorded at its save
    (one line naming the file): damage on disk, or a file edited since."""
    fix = f"delete {folder} (or rerun with --resume false) to start over"
    path = folder / CHECKSUMS
    if not path.is_file():
        raise UserError(
            f"{folder} has no {CHECKSUMS}, though its state.pt records one (damaged), so its "
            f"files cannot be checked; {fix}"
        )
    record = read_json(path, hint=fix, fields={"sha256": dict}, required=("sha256",))
    for name, digest in sorted(record["sha256"].items()):
        p = folder / name
        if not p.is_file():
            raise UserError(f"{p} is missing from the checkpoint; {fix}")
        if sha256_file(p) != digest:
            raise UserError(
                f"{p} does not match the sha256 recorded when the checkpoint was saved (damaged "
                f"or changed since); {fix}"
            )


def load_checkpoint(out_dir: str | Path, map_location: Any = "cpu") -> dict | None:
    """The saved state (see module docstring), or None when `out_dir` has no checkpoint.

    A checkpoint that cannot be read is an error, not a silent fresh start.
    """
    out_dir = Path(out_dir)
    for d in (checkpoint_dir(out_dir), out_dir / (DIR_NAME + ".old")):
        path = d / "state.pt"
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise UserError(
                f"{path} is unreadable ({type(e).__name__}); delete {d} to start over"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"{path} is not a promptbake checkpoint; delete {d} to start over")
        if state.get("checksums") is None and not (d / CHECKSUMS).exists():
            warn(f"{d} was written by an older promptbake, without checksums: resuming "
                 "from it unchecked")  # fmt: skip
        else:
            check_checksums(d)
        return state
    return None


def remove_checkpoint(out_dir: str | Path) -> None:
    """Drop a previous run's checkpoint (a fresh run must not be resumed from it)."""
    for name in (DIR_NAME, DIR_NAME + ".old"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
    for stale in Path(out_dir).glob(f".tmp-{DIR_NAME}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def unsaid_message(out_dir: str | Path, state: dict) -> str:
    """Why a run over a checkpoint without --resume is refused, and the two ways on."""
    args, epoch = state["args"], state["epoch"]
    total, patience = args.get("num_epochs"), args.get("patience") or 0
    stopped = patience > 0 and state.get("bad_epochs", 0) >= patience  # --patience ended it
    if total is not None and epoch < total and not stopped:
        what = f"an unfinished run (epoch {epoch} of {total})"
        cont = "--resume true to continue it"
    else:
        what = f"a finished run ({epoch} epochs)"
        cont = "--resume true to continue it (with a larger --num_epochs)"
    return f"{out_dir} holds the checkpoint of {what}: add {cont} or --resume false to start over"


def changed_args(saved: dict, current: dict) -> list[str]:
    """Names of the arguments that differ; raises UserError if one of MUST_MATCH does."""

    def norm(k: str, v):  # data/x.jsonl and ./data/x.jsonl are the same file
        return os.path.normpath(v) if k.endswith("_path") and isinstance(v, str) else v

    keys = set(saved) | set(current)
    diff = sorted(k for k in keys if norm(k, saved.get(k)) != norm(k, current.get(k)))
    bad = [k for k in diff if k in MUST_MATCH]
    if bad:
        shown = ", ".join(f"--{k} {saved.get(k)!r} (now {current.get(k)!r})" for k in bad)
        raise UserError(
            f"cannot resume: the checkpoint was made with {shown}; rerun with the same "
            "values, or use --resume false (or another --out_dir) to start over"
        )
    return [k for k in diff if k != "resume"]


def restore(state: dict, model, optimizer: torch.optim.Optimizer, scheduler, lr: float) -> None:
    """Load weights, optimizer, scheduler and RNG from `state` into a freshly set-up run.

    `lr` is this run's --learning_rate: when it differs from the checkpoint's, it
    replaces the saved one (the scheduler's multiplier still applies).
    """
    params = dict(model.named_parameters())
    missing = [n for n in state["lora"] if n not in params]
    if missing or len(state["lora"]) != sum(p.requires_grad for p in params.values()):
        raise UserError(
            "cannot resume: the checkpoint's adapter does not match this model "
            f"({len(missing)} unknown parameters); delete the checkpoint to start over"
        )
    load_trainable(model, state["lora"])
    optimizer.load_state_dict(distributed.shard_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    old_lr = state["args"].get("learning_rate")
    if old_lr and old_lr != lr:  # keep the schedule's multiplier, change the base
        scheduler.base_lrs = [lr for _ in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["initial_lr"] = lr
            g["lr"] = g["lr"] * lr / old_lr
    _set_rng_state(state["rng"])
