"""What a training run writes besides its checkpoint: the log, the adapter, the KL
plot and, on request, TensorBoard events.

    log = RunLog(out / "train_loop.log")        # timestamped lines, echoed to the console
    save_adapter(model, out, lora)               # peft files, each swapped in by a rename
    tracker = Tracker.open("tensorboard", out)   # --report_to; None for "none"

Only rank 0 writes: every helper here is called on the main process alone, except
:class:`RunLog`, which is silent elsewhere (``enabled=False``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from tqdm.auto import tqdm

from ..adapters import save_peft
from ..errors import UserError
from ..files import append_line, atomic_dir, save_figure

REPORT_TO = ["none", "tensorboard"]

# What a training run writes into --out_dir (glob patterns), for guards.check_run_dir: a
# folder promptbake did not write that holds one of these is refused, left untouched.
# save_peft writes the adapter files and peft's README.md model card.
RUN_WRITES = (
    "args.json", "train_loop.log", "metrics.jsonl", "kl_curve.png", "adapter_config.json",
    "adapter_model.safetensors", "README.md", "promptbake_adapter.json", "checkpoint",
    "checkpoint.old", "epoch_*", "tensorboard",
)  # fmt: skip


class RunLog:
    """Timestamped lines to <out_dir>/train_loop.log, echoed to the console; does
    nothing when not `enabled` (the processes other than rank 0)."""

    def __init__(self, path: Path, echo: bool = True, enabled: bool = True):
        self.path, self.echo, self.enabled = path, echo, enabled

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"{datetime.now().isoformat(timespec='seconds')} {msg}"
        append_line(self.path, line)
        if self.echo:
            tqdm.write(line)


def save_adapter(model, out_dir: Path, lora: dict | None = None) -> None:
    """The adapter's peft files, each renamed into `out_dir` when complete (files.atomic_dir).

    `lora`: the weights to write (checkpoint.trainable_state), when the model's own
    are FSDP shards."""
    tensors = lora.values() if lora is not None else model.parameters()
    need = sum(t.numel() * t.element_size() for t in tensors if lora is not None or t.requires_grad)
    with atomic_dir(out_dir, into=True, what="the adapter", need=need) as tmp:
        save_peft(model, tmp, lora)  # no Hub request, the user's file modes


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
    save_figure(fig, path, dpi=120)


def check_report_to(report_to: str) -> None:
    """Refuse --report_to tensorboard, before any model loads, when its package is missing."""
    if report_to != "tensorboard":
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError(
            "--report_to tensorboard needs the tensorboard package: "
            "pip install 'promptbake[tensorboard]' (or pip install tensorboard)"
        ) from None


class Tracker:
    """Scalars for an experiment tracker (--report_to): TensorBoard event files under
    <out_dir>/tensorboard. Steps count optimizer steps from the start of the run."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, report_to: str, out_dir: Path) -> Tracker | None:
        if report_to == "none":
            return None
        check_report_to(report_to)
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(log_dir=str(out_dir / "tensorboard")))

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", lr, step)
        self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)

    def epoch(self, epoch: int, m: dict) -> None:
        for key in ("train_kl", "val_kl", "val_kl_seq"):
            if m.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", m[key], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
