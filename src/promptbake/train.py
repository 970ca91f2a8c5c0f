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
``PeftModel.from_pretrained(base_model, out_dir)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .configs import LoraArgs, TrainConfig
from .data import read_meta, read_trajectories, write_json
from .errors import UserError, warn
from .loss import chunked_kl
from .models import load_model, tokenizer_fingerprint


# ---------------------------------------------------------------- batches
@dataclass
class Side:
    """One side (prompted or unprompted) of a batch, right-padded."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    pred_mask: torch.Tensor  # [B, L] True on rows whose logits predict a generated token

    def to(self, device) -> Side:
        return Side(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.pred_mask)))


@dataclass
class Batch:
    prompted: Side
    unprompted: Side

    @property
    def num_tokens(self) -> int:
        return int(self.prompted.pred_mask.sum())

    def to(self, device) -> Batch:
        return Batch(self.prompted.to(device), self.unprompted.to(device))


def truncate(rec: dict, max_gen: int | None) -> dict:
    """Keep only the first `max_gen` generated tokens of a trajectory (both sides)."""
    if max_gen is None:
        return rec
    out = dict(rec)
    for sfx in ("", "_nosys"):
        n_prompt = len(rec["generated_text_mask" + sfx]) - sum(rec["generated_text_mask" + sfx])
        out["input_ids" + sfx] = rec["input_ids" + sfx][: n_prompt + max_gen]
        out["generated_text_mask" + sfx] = rec["generated_text_mask" + sfx][: n_prompt + max_gen]
    return out


def make_side(seqs: list[list[int]], gen_masks: list[list[int]], pad_id: int) -> Side:
    width = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    pred = torch.zeros((B, width), dtype=torch.bool)
    for i, (s, g) in enumerate(zip(seqs, gen_masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        g = torch.tensor(g, dtype=torch.bool)
        pred[i, : len(s) - 1] = g[1:]  # row p predicts token p + 1
    return Side(ids, attn, pred)


def collate(records: list[dict], pad_id: int, max_gen: int | None = None) -> Batch:
    recs = [truncate(r, max_gen) for r in records]
    return Batch(
        make_side([r["input_ids"] for r in recs], [r["generated_text_mask"] for r in recs], pad_id),
        make_side(
            [r["input_ids_nosys"] for r in recs],
            [r["generated_text_mask_nosys"] for r in recs],
            pad_id,
        ),
    )


# ---------------------------------------------------------------- the objective on a model
def base_of(model):
    """The transformers model under a PeftModel (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_disabled(model):
    """Context in which a PeftModel runs as the base model; a no-op for plain models."""
    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


def selected_hidden(model, side: Side) -> torch.Tensor:
    """Final hidden states [N, H] at the rows that predict generated tokens."""
    decoder = base_of(model).get_decoder()
    h = decoder(input_ids=side.input_ids, attention_mask=side.attention_mask).last_hidden_state
    return h[side.pred_mask]


def batch_kl(
    model, batch: Batch, chunk_size: int = 1024, student_adapter: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(prompted base || unprompted student) [N] and per-sequence sums [B].

    The teacher is always the model with the adapter disabled, under no_grad. With
    ``student_adapter=False`` the student is the base model too: KL(prompted || base).
    """
    with torch.no_grad(), adapter_disabled(model):
        t_hidden = selected_hidden(model, batch.prompted)
    ctx = contextlib.nullcontext() if student_adapter else adapter_disabled(model)
    with ctx:
        s_hidden = selected_hidden(model, batch.unprompted)
    head = base_of(model).get_output_embeddings()
    kl = chunked_kl(t_hidden, s_hidden, head, chunk_size)
    seq_idx = batch.unprompted.pred_mask.nonzero()[:, 0]
    per_seq = torch.zeros(batch.unprompted.pred_mask.shape[0], device=kl.device)
    per_seq = per_seq.index_add(0, seq_idx, kl.detach())
    return kl, per_seq


def make_batches(
    rows: list[dict],
    batch_size: int,
    pad_id: int,
    max_gen: int | None,
    order: list[int] | None = None,
) -> list[Batch]:
    order = list(range(len(rows))) if order is None else order
    return [
        collate([rows[i] for i in order[j : j + batch_size]], pad_id, max_gen)
        for j in range(0, len(order), batch_size)
    ]


@torch.no_grad()
def evaluate_kl(
    model, batches: list[Batch], chunk_size: int = 1024, student_adapter: bool = True
) -> dict:
    """Token-mean KL and mean per-sequence KL sum over batches; builds no graph."""
    total, n_tok, seq_sum, n_seq = 0.0, 0, 0.0, 0
    device = next(model.parameters()).device
    for b in batches:
        kl, per_seq = batch_kl(model, b.to(device), chunk_size, student_adapter)
        total += float(kl.sum())
        n_tok += kl.numel()
        seq_sum += float(per_seq.sum())
        n_seq += per_seq.numel()
    return {"kl": total / max(n_tok, 1), "kl_seq": seq_sum / max(n_seq, 1), "tokens": n_tok}


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


def prepare_out_dir(out_dir: str) -> Path:
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; give a directory path")
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


def save_adapter(model, out_dir: Path) -> None:
    """peft save_pretrained into a temp dir, then rename each file into place."""
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-adapter-"))
    try:
        model.save_pretrained(tmp)
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


# ---------------------------------------------------------------- fit
def train(
    cfg: TrainConfig,
    model=None,
    tokenizer=None,
    train_rows: list[dict] | None = None,
    val_rows: list[dict] | None = None,
    echo: bool = True,
):
    """Run training from a config; returns (peft model, list of epoch metrics).

    Pass `model`/`tokenizer` to reuse a loaded model (promptbake bake) and
    `train_rows`/`val_rows` to skip reading files.
    """
    cfg.validate()
    out = prepare_out_dir(cfg.out_dir)
    if train_rows is None:
        train_rows = read_trajectories(cfg.data_path, "--data_path")
    if val_rows is None and cfg.val_path:
        val_rows = read_trajectories(cfg.val_path, "--val_path")
    if not train_rows:
        raise UserError("the training set is empty")
    if model is None:
        model, tokenizer = load_model(cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code)
    for p in (cfg.data_path, cfg.val_path):
        if p and Path(p).is_file():
            check_fingerprint(p, tokenizer)

    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg)
    device = next(model.parameters()).device
    write_json(out / "args.json", dataclasses.asdict(cfg))
    (out / "train_loop.log").unlink(missing_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    log = RunLog(out / "train_loop.log", echo)
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
    val_batches = make_batches(val_rows, cfg.batch_size, pad, cfg.max_traj_len) if val_rows else []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )

    metrics: list[dict] = []

    def record(m: dict) -> None:
        metrics.append(m)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(m) + "\n")

    best = math.inf
    if val_batches:
        v = evaluate_kl(model, val_batches, cfg.kl_chunk_size)
        log(f"epoch 0 (before training): val KL {v['kl']:.4f}/token, {v['kl_seq']:.3f}/sequence")
        record({"epoch": 0, "train_kl": None, "val_kl": v["kl"], "val_kl_seq": v["kl_seq"]})

    for epoch in range(1, cfg.num_epochs + 1):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # reshuffle each epoch
        order = torch.randperm(len(train_rows), generator=gen).tolist()
        batches = make_batches(train_rows, cfg.batch_size, pad, cfg.max_traj_len, order)
        tot, n_tok, seq_tot, n_seq = 0.0, 0, 0.0, 0
        t0 = time.perf_counter()
        pbar = tqdm(batches, desc=f"epoch {epoch}/{cfg.num_epochs}", leave=False, disable=not echo)
        for bi, b in enumerate(pbar):
            kl, per_seq = batch_kl(model, b.to(device), cfg.kl_chunk_size)
            loss = kl.sum() / max(kl.numel(), 1)
            if not torch.isfinite(loss):
                raise UserError(
                    f"non-finite loss ({float(loss)}) at epoch {epoch}, batch {bi}; lower "
                    "--learning_rate or use --dtype float32; the last saved adapter is kept"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(kl.detach().sum())
            n_tok += kl.numel()
            seq_tot += float(per_seq.sum())
            n_seq += per_seq.numel()
            pbar.set_postfix(kl=f"{float(loss):.4f}")
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
        if val_batches:
            v = evaluate_kl(model, val_batches, cfg.kl_chunk_size)
            m.update(val_kl=v["kl"], val_kl_seq=v["kl_seq"])
        score = m.get("val_kl", m["train_kl"])
        m["best"] = score < best
        if m["best"]:
            best = score
            save_adapter(model, out)
        if cfg.save_every and epoch % cfg.save_every == 0:
            d = out / f"epoch_{epoch}"
            d.mkdir(exist_ok=True)
            save_adapter(model, d)
        record(m)
        val_txt = f", val KL {m['val_kl']:.4f}" if "val_kl" in m else ""
        log(
            f"epoch {epoch}: train KL {m['train_kl']:.4f}/token ({m['train_kl_seq']:.3f}/seq)"
            f"{val_txt}, {m['tokens_per_s']:.0f} tok/s{' *best*' if m['best'] else ''}"
        )
        if cfg.plot:
            plot_curves(metrics, out / "kl_curve.png")
    log(f"done: best {'validation' if val_batches else 'training'} KL {best:.4f}; adapter in {out}")
    return model, metrics


def run_train(cfg: TrainConfig):
    return train(cfg)
