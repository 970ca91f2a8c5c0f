"""Several processes (GPUs, nodes) on torch.distributed, configured by torchrun's environment.

    torchrun --nproc_per_node 4 train_loop.py --data_path d.jsonl --out_dir runs/x ...
    torchrun --nproc_per_node 4 generate_data.py --traj_out_file d.jsonl ...
    torchrun --nnodes 2 --node_rank 0 --master_addr host0 --master_port 29500 \\
        --nproc_per_node 8 -m promptbake.cli train ...
    torchrun --nproc_per_node 4 train_loop.py --fsdp true ...   # model sharded too

torchrun (and ``accelerate launch``) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init` reads them and joins the process group: NCCL when the model
runs on CUDA (each process on GPU LOCAL_RANK), gloo on CPU. Without those variables
every helper here is a no-op for one process, so the stages run unchanged in a plain
``python`` call.

Why training all-reduces LoRA gradients by hand instead of wrapping the model in
DistributedDataParallel: each step runs the same peft model twice, the teacher with
the adapter disabled under no_grad and the student with it enabled, both by calling the
decoder directly (forward.selected_hidden) and with checkpointed KL chunks. DDP's reducer
hooks only the wrapper's forward and assumes one forward per backward, so it would
either miss the student pass or need find_unused_parameters and still fight the
checkpointing. The trainable LoRA weights are small (r=32 on Qwen3-1.7B's attention:
12.8M parameters, 51 MB in float32), so one flattened all-reduce after backward costs
little next to a step and needs no overlap with compute; in exact arithmetic it gives
the single-process gradient of the global batch (see the loop in train.train).

FSDP (``--fsdp true``, for models that do not fit one GPU): :func:`fsdp_shard` applies
PyTorch's FSDP2 ``fully_shard`` to every decoder layer (its frozen base weights and
its LoRA weights alike), with the decoder as the root. Each layer's weights are
all-gathered just before it runs and freed after, and its LoRA gradients are
reduce-scattered (summed, like all_reduce_grads, which then has nothing to do) in
backward. The embeddings, the final norm and the LM head stay whole on every GPU: the
loss may use the LM head's weight outside its module call (loss.py), which a sharded
weight would break, and they are a small part of a large model. Every layer call is a collective, so all processes must
run the same passes in the same order: a process with no rows in a short last batch
runs an idle pass (:func:`idle_batch`), evaluation is padded to the same number of
batches (--prefix_reuse is one packed decoder pass per batch, like the plain forward). Checkpoints and
adapters hold whole tensors (:func:`full_state`, gathered on every process, written by
rank 0), the same files as without FSDP, so a run can resume with or without it.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

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
    use_cuda = _use_cuda(device)
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    atexit.register(shutdown)


def _use_cuda(device: str | None) -> bool:
    """Whether the stage's --device puts the model on CUDA (then the group runs NCCL)."""
    return torch.cuda.is_available() and str(device or "auto").split(":")[0] in ("auto", "cuda")


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
    counts as zeros, and ends with the summed gradient like the others. Parameters
    sharded by FSDP (DTensors) are left alone: FSDP summed their gradients in backward.
    """
    if not active():
        return
    params = [p for p in params if not _is_dtensor(p)]
    if not params:
        return
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


# ---------------------------------------------------------------- FSDP (--fsdp true)
def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fsdp_load_args(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype) for loading a model that :func:`fsdp_shard` will shard.

    The whole model is loaded into CPU memory, since it may not fit one GPU, in the
    dtype it trains in on `device` (bfloat16 for auto on CUDA); sharding then moves
    each process's share of it to its GPU.
    """
    from .models import resolve_device, resolve_dtype

    dt = resolve_dtype(dtype, resolve_device(device))
    return "cpu", str(dt).removeprefix("torch.")


def fsdp_shard(model) -> None:
    """Shard `model` (a peft model, after its LoRA is attached) across the processes
    with FSDP2, in place; see the module docstring for what is sharded and why.

    Parameters end on this process's device (its GPU under NCCL, else the CPU) and
    gradients are summed over the processes, not averaged: with the caller dividing
    by the global token count, a step equals one process's step on the whole batch.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not active():
        raise UserError(
            "--fsdp true shards the model across processes: launch with torchrun "
            "--nproc_per_node N (N >= 2)"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UserError(f"--fsdp: {type(decoder).__name__} has no .layers list to shard")
    device = _comm_device()
    in_layers = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    # FSDP moves what it shards to `device`; the rest (embeddings, norm, LM head,
    # rotary buffers) is moved here, tensor by tensor, so tied weights stay tied
    for mod in model.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and id(t) not in in_layers and t.device != device:
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.to(device)
                else:
                    mod._buffers[name] = t.to(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    outside = {p for p in decoder.parameters() if id(p) not in in_layers}
    fully_shard(decoder, mesh=mesh, ignored_params=outside)  # the root: one lazy init
    for m in (*layers, decoder):
        # FSDP averages gradients over processes by default; sum them instead
        # (SUM is also the only reduction gloo offers)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)


def is_sharded(model) -> bool:
    """True when `model` holds FSDP-sharded parameters."""
    return any(_is_dtensor(p) for p in model.parameters())


def idle_batch(batch: T) -> T:
    """The first row of `batch` (a batches.Batch), predicting no token.

    Under FSDP a process with nothing to do in a pass runs this instead: the decoder
    runs on one row, so the process takes part in every layer's collectives, and the
    KL has no rows, so it adds nothing to losses, counts or gradients.
    """
    sides = {}
    for f in dataclasses.fields(batch):
        side = getattr(batch, f.name)
        sides[f.name] = dataclasses.replace(
            side,
            input_ids=side.input_ids[:1],
            attention_mask=side.attention_mask[:1],
            pred_mask=torch.zeros_like(side.pred_mask[:1]),
        )
    return dataclasses.replace(batch, **sides)


def max_over_ranks(value: int) -> int:
    """The largest of `value` over all processes."""
    if not active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def full_state(obj: Any) -> Any:
    """`obj` (a state dict, nested dicts/lists) with each FSDP-sharded tensor replaced by
    the whole tensor, on the CPU; other values are returned as they are.

    A collective under FSDP: every process must call it, in the same order.
    """
    if _is_dtensor(obj):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return obj


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor `t` cut like the FSDP-sharded `like` (this process's share of
    it), or `t` itself when `like` is not sharded. Every process must hold all of `t`."""
    if not _is_dtensor(like):
        return t
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: each process cuts its share from its own copy, no messages
    return distribute_tensor(
        t.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An ``optimizer.state_dict()`` of whole tensors (what checkpoints hold), with the
    per-parameter tensors cut like the optimizer's FSDP-sharded parameters, ready for
    ``optimizer.load_state_dict``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    if not any(_is_dtensor(p) for p in params) or len(ids) != len(params):
        return state_dict  # nothing sharded (or a mismatch load_state_dict reports)
    state = dict(state_dict["state"])
    for i, p in zip(ids, params):
        if i in state:
            state[i] = {
                k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                for k, v in state[i].items()
            }
    return {**state_dict, "state": state}
