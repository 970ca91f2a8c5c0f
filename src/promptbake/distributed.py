"""Several processes (GPUs, nodes) on torch.distributed, configured by torchrun's environment.

    torchrun --nproc_per_node 4 train_loop.py --data_path d.jsonl --out_dir runs/x ...
    torchrun --nproc_per_node 4 generate_data.py --traj_out_file d.jsonl ...
    torchrun --nnodes 2 --node_rank 0 --master_addr host0 --master_port 29500 \\
        --nproc_per_node 8 -m promptbake.cli train ...

torchrun (and ``accelerate launch``) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init` reads them and joins the process group: NCCL when the model
runs on CUDA (each process on GPU LOCAL_RANK), gloo on CPU. Without those variables
every helper here is a no-op for one process, so the stages run unchanged in a plain
``python`` call.

Why training all-reduces LoRA gradients by hand instead of wrapping the model in
DistributedDataParallel: each step runs the same peft model twice, the teacher with
the adapter disabled under no_grad and the student with it enabled, both by calling the
decoder directly (train.selected_hidden) and with checkpointed KL chunks. DDP's reducer
hooks only the wrapper's forward and assumes one forward per backward, so it would
either miss the student pass or need find_unused_parameters and still fight the
checkpointing. The trainable LoRA weights are small (r=32 on Qwen3-1.7B's attention:
12.8M parameters, 51 MB in float32), so one flattened all-reduce after backward costs
little next to a step and needs no overlap with compute; in exact arithmetic it gives
the single-process gradient of the global batch (see the loop in train.train).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")


def world_size() -> int:
    """Number of processes in the job (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank, 0..world_size-1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the one process that writes files and prints (rank 0)."""
    return rank() == 0


def active() -> bool:
    """True when a process group with more than one member is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: str | None = "auto") -> None:
    """Join the process group described by torchrun's environment; idempotent.

    `device` is the stage's --device: NCCL serves CUDA tensors, gloo CPU ones, so the
    backend follows where the model runs. On CUDA each process is pinned to GPU
    LOCAL_RANK first, so a later ``.to("cuda")`` lands on its own GPU.
    """
    if world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    use_cuda = torch.cuda.is_available() and str(device or "auto").split(":")[0] in (
        "auto",
        "cuda",
    )
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    atexit.register(shutdown)


def shutdown() -> None:
    """Leave the process group (torch warns at exit when a group is left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective buffers live: the process's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of a few numbers over all processes (float64, so counts stay exact)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum `.grad` of `params` over all processes, in one flattened all-reduce.

    A parameter without a gradient (a process that had no rows in a short last batch)
    counts as zeros, and ends with the summed gradient like the others.
    """
    if not active():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.float().reshape(-1) for g in grads])  # summed in float32
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype, copy=True)
        offset += n


def broadcast_params(params: Iterable[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of `params` to every process (same start, whatever the RNG did)."""
    if not active():
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result, or its UserError, to every process.

    For reading what rank 0 alone wrote (the training checkpoint): on several nodes the
    other ranks may not see rank 0's disk, and all ranks must take the same decision.
    """
    if not active():
        return fn()
    box: list = [None]
    if is_main():
        try:
            box = [("ok", fn())]
        except UserError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every world_size-th one, starting at its rank.

    The shares are disjoint, cover `items`, and differ in length by at most one; the
    last ones may be empty when `items` is shorter than the world.
    """
    return list(items[rank() :: world_size()])
