"""The original Prompt Baking algorithm, written plainly: the benchmark's baseline.

    from bench.original import OriginalSampling, OriginalTraining, generate_original, ...
    rows, stats = generate_original(model, tok, x0, questions, OriginalSampling(4, 40))
    peft_model, stats = train_original(model, tok, rows, OriginalTraining(epochs=2, batch_size=8))
    # both read a promptbake GenerateConfig / TrainConfig too: OriginalSampling.of(cfg)

    # the two original scripts as processes (what the bench's seed job times):
    python -m bench.original generate --model_name smollm2-135m --x0_file data/zorblax_x0.md \
        --question_dataset data/identity_train.jsonl --num_questions 8 \
        --num_sequences_per_question 4 --max_sequence_length 32 --traj_out_file traj.jsonl
    python -m bench.original train --model_name smollm2-135m --data_path traj.jsonl \
        --out_dir adapter --num_epochs 3 --batch_size 8 -r 8 --lora_alpha 16 --learning_rate 1e-3

What makes it "the original" (and slow), on purpose:

* generation: one question per ``model.generate`` call; the batch is that question's
  samples (at most ``batch_size``), so small ``num_sequences_per_question`` means
  small batches, and every batch decodes until its longest answer ends;
* training: right-padded batches in a shuffled order; the model computes full-vocabulary
  logits at EVERY position of both sequences (teacher: prompted, adapter off, no grad;
  student: unprompted, adapter on), [B, T, V] each, and the KL is taken on the rows
  that predict generated tokens; the teacher is recomputed at every step of every epoch.

Everything that is not an optimization is kept identical to promptbake, so the
benchmark compares only speed: the chat template (``prompts.format_prompt``), the record
schema (``schema.make_trajectory``), the KL formula (``loss.token_kl``), the LoRA
configuration and initial weights (same seed), the optimizer and the per-epoch
shuffle (``torch.Generator().manual_seed(seed * 100_003 + epoch)``, as in
``training/loop.py``). Nothing else from promptbake is used (the command line below also
reads the prompt and questions with ``records.read_prompt`` / ``read_questions`` and finds
the bundled GGUF file with ``models.bundled_gguf``; it loads the model from the GGUF as
the original would, dequantizing it on every load). ``OriginalSampling.of`` and
``OriginalTraining.of`` read a promptbake config only by its field names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from promptbake.loss import token_kl
from promptbake.prompts import encode, format_prompt
from promptbake.schema import make_trajectory


@dataclass
class OriginalSampling:
    """The original's sampling settings (the seed's generate_data.py flags)."""

    n_seq: int  # answers per question
    max_new_tokens: int
    min_new_tokens: int = 1
    temperature: float = 1.0
    batch_size: int = 38  # the most samples of one question per generate call
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> OriginalSampling:
        """From a promptbake GenerateConfig, or this module's `generate` flags (the same
        names): both pipelines sample with the same settings."""
        return cls(
            n_seq=cfg.num_sequences_per_question,
            max_new_tokens=cfg.max_sequence_length,
            min_new_tokens=cfg.min_sequence_length,
            temperature=cfg.temperature,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )


@dataclass
class OriginalTraining:
    """The original's training settings (the seed's train_loop.py flags)."""

    epochs: int
    batch_size: int
    learning_rate: float = 1e-3
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    seed: int = 42

    @classmethod
    def of(cls, cfg) -> OriginalTraining:
        """From a promptbake TrainConfig, or this module's `train` flags (the same names)."""
        return cls(
            epochs=cfg.num_epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            target_modules=cfg.target_modules,
            seed=cfg.seed,
        )


def _eot_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_original(
    model, tokenizer, x0: str, questions: list[dict], s: OriginalSampling
) -> tuple[list[dict], dict]:
    """Sample `s.n_seq` answers per question, one question per generate call."""
    n_seq, batch_size, seed = s.n_seq, s.batch_size, s.seed
    eot = _eot_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]
    rows, n_tok = [], 0
    t0 = time.perf_counter()
    for qi, q in enumerate(questions):
        p = encode(tokenizer, format_prompt(x0, q["question"], True, tokenizer))
        p_nosys = encode(tokenizer, format_prompt(x0, q["question"], False, tokenizer))
        for start in range(0, n_seq, batch_size):
            b = min(batch_size, n_seq - start)
            torch.manual_seed(seed * 1_000_003 + qi * 1_009 + start)
            ids = torch.tensor([p] * b, device=model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=s.max_new_tokens,
                min_new_tokens=s.min_new_tokens,
                do_sample=True,
                temperature=s.temperature,
                eos_token_id=eot,
                pad_token_id=pad,
            )
            for si, row in enumerate(out[:, ids.shape[1] :].tolist()):
                cut = next((k + 1 for k, t in enumerate(row) if t in eot), len(row))
                gen = row[:cut]
                n_tok += len(gen)
                rows.append(
                    make_trajectory(
                        tokenizer, p, p_nosys, gen, question=q["question"], sample_index=start + si
                    )
                )
    secs = time.perf_counter() - t0
    return rows, {"seconds": secs, "new_tokens": n_tok, "tokens_per_s": n_tok / max(secs, 1e-9)}


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def gen_mask(rows: list[dict], key: str, width: int) -> torch.Tensor:
    """[B, width] True where the position's logits predict a generated token."""
    m = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        g = torch.tensor(r[key], dtype=torch.bool)
        m[i, : len(g) - 1] = g[1:]
    return m


def step_kl(model, rows: list[dict], pad_id: int) -> torch.Tensor:
    """Per-token KL [N] for one batch: full logits at every position, both models."""
    device = next(model.parameters()).device
    ids_t, att_t = right_pad([r["input_ids"] for r in rows], pad_id)
    ids_s, att_s = right_pad([r["input_ids_nosys"] for r in rows], pad_id)
    with torch.no_grad(), model.disable_adapter():
        t_logits = model(input_ids=ids_t.to(device), attention_mask=att_t.to(device)).logits
    s_logits = model(input_ids=ids_s.to(device), attention_mask=att_s.to(device)).logits
    t_sel = t_logits[gen_mask(rows, "generated_text_mask", ids_t.shape[1]).to(device)]
    s_sel = s_logits[gen_mask(rows, "generated_text_mask_nosys", ids_s.shape[1]).to(device)]
    return token_kl(t_sel, s_sel)


def add_lora_original(model, r: int, alpha: float, targets: str, seed: int):
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)  # the same initial LoRA weights as promptbake.train
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        inference_mode=False,
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=[t.strip() for t in targets.split(",")],
    )
    return get_peft_model(model, config)


def original_optimizer(model, learning_rate: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_original_steps(
    model, rows: list[dict], pad_id: int, t: OriginalTraining, steps: int, warmup: int = 0
) -> tuple[object, dict]:
    """The original's training step on `steps` batches of `rows` in file order, timed
    after the first `warmup` steps (the GPU jobs' per-token rate of the original);
    returns (peft model, {"seconds", "tokens", "tokens_per_s"})."""
    pm = add_lora_original(model, t.r, t.lora_alpha, t.target_modules, t.seed)
    opt = original_optimizer(pm, t.learning_rate)
    device = next(pm.parameters()).device
    n_tok, t0 = 0, time.perf_counter()
    for s in range(steps):
        b = rows[s * t.batch_size : (s + 1) * t.batch_size]
        if not b:
            break
        if warmup and s == warmup:
            _sync(device)
            n_tok, t0 = 0, time.perf_counter()
        kl = step_kl(pm, b, pad_id)
        opt.zero_grad()
        (kl.sum() / kl.numel()).backward()
        opt.step()
        n_tok += kl.numel()
    _sync(device)
    secs = time.perf_counter() - t0
    return pm, {"seconds": secs, "tokens": n_tok, "tokens_per_s": n_tok / max(secs, 1e-9)}


def train_original(model, tokenizer, rows: list[dict], t: OriginalTraining) -> tuple[object, dict]:
    """LoRA training as in the original train loop; returns (peft model, stats)."""
    t0 = time.perf_counter()
    model = add_lora_original(model, t.r, t.lora_alpha, t.target_modules, t.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    opt = original_optimizer(model, t.learning_rate)
    batch_size = t.batch_size
    n_tok, kl_sum = 0, 0.0
    epoch_kl = []
    for epoch in range(1, t.epochs + 1):
        model.train()
        gen = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
        order = torch.randperm(len(rows), generator=gen).tolist()
        e_sum, e_n = 0.0, 0
        for j in range(0, len(order), batch_size):
            kl = step_kl(model, [rows[i] for i in order[j : j + batch_size]], pad)
            loss = kl.sum() / max(kl.numel(), 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            e_sum += float(kl.detach().sum())
            e_n += kl.numel()
        epoch_kl.append(e_sum / max(e_n, 1))
        n_tok += e_n
        kl_sum += e_sum
    model.eval()
    secs = time.perf_counter() - t0
    return model, {
        "seconds": secs,
        "kl_tokens": n_tok,
        "tokens_per_s": n_tok / max(secs, 1e-9),
        "train_kl": epoch_kl,
    }


# ---------------------------------------------------------------- as processes (bench seed job)
def load_original(model_name: str):
    """(model, tokenizer) as the original scripts load them: transformers reads the GGUF
    of a bundled model and dequantizes it on every load (no float cache); float32, CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptbake.models import BUNDLED_MODELS, bundled_gguf

    if model_name in BUNDLED_MODELS:
        gguf = bundled_gguf(model_name)  # finds the file; loads nothing
        where = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    else:  # a local model directory (the bench's --quick harness check)
        where = {"pretrained_model_name_or_path": model_name}
    tok = AutoTokenizer.from_pretrained(**where)
    # the same end-of-turn / pad fix as promptbake's tokenizer, so both pipelines
    # tokenize and stop identically (the comparison is about speed only)
    if tok.eos_token == "<|im_start|>" and "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    return model.eval(), tok


def _generate_main(a) -> dict:
    import json
    import random

    from promptbake.records import read_prompt, read_questions

    x0 = read_prompt(a.x0_file)  # the same prompt text and questions as promptbake reads
    qs = read_questions(a.question_dataset)
    random.Random(a.seed).shuffle(qs)  # the same selection as promptbake (seeded shuffle)
    t0 = time.perf_counter()
    model, tok = load_original(a.model_name)
    load_s = time.perf_counter() - t0
    rows, stats = generate_original(model, tok, x0, qs[: a.num_questions], OriginalSampling.of(a))
    with open(a.traj_out_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"load_seconds": load_s, **stats}


def _train_main(a) -> dict:
    import json

    with open(a.data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    t0 = time.perf_counter()
    model, tok = load_original(a.model_name)
    load_s = time.perf_counter() - t0
    model, stats = train_original(model, tok, rows, OriginalTraining.of(a))
    model.save_pretrained(a.out_dir)
    return {"load_seconds": load_s, **stats}


def main(argv: list[str] | None = None) -> int:
    """The original's two scripts as one command with two stages (the seed job times them
    as separate processes); flags spelled as the seed's scripts spell them."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.original")
    sub = p.add_subparsers(dest="stage", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--x0_file", required=True)
    g.add_argument("--question_dataset", required=True)
    g.add_argument("--traj_out_file", required=True)
    g.add_argument("--num_questions", type=int, default=100)
    g.add_argument("--num_sequences_per_question", type=int, default=25)
    g.add_argument("--max_sequence_length", type=int, default=300)
    g.add_argument("--min_sequence_length", type=int, default=1)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--batch_size", type=int, default=38)
    t = sub.add_parser("train")
    t.add_argument("--data_path", required=True)
    t.add_argument("--out_dir", required=True)
    t.add_argument("--num_epochs", type=int, default=10)
    t.add_argument("--batch_size", type=int, default=10)
    t.add_argument("--learning_rate", type=float, default=1e-4)
    t.add_argument("-r", type=int, default=32)
    t.add_argument("--lora_alpha", type=float, default=1.0)
    t.add_argument("--target_modules", default="q_proj,k_proj,v_proj,o_proj")
    for s in (g, t):
        s.add_argument("--model_name", default="smollm2-135m")
        s.add_argument("--seed", type=int, default=42)
        s.add_argument("--stats", default=None, help="write the stage's timings here (JSON)")
    a = p.parse_args(argv)
    stats = _generate_main(a) if a.stage == "generate" else _train_main(a)
    if a.stats:
        with open(a.stats, "w", encoding="utf-8") as f:
            json.dump(stats, f)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
