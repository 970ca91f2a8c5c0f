"""Stage 1: sample trajectories from the *prompted* model.

    python generate_data.py --model_name smollm2-135m --x0_file data/zorblax_x0.md \\
        --question_dataset data/questions.jsonl --num_questions 20 \\
        --num_sequences_per_question 4 --traj_out_file data/zorblax.jsonl

For every question we render the conversation with the system prompt (x0) and
without it, sample answers from the prompted conversation, and store both token
sequences with the same generated ids (see data.py for the schema).

What differs from the original script, and why:
* batches mix questions: sequences are sorted by prompt length and cut into
  batches of --batch_size, so a batch is full even when --num_sequences_per_question
  is small, and left padding stays short;
* the attention mask comes from real lengths, never from ``id == pad_token_id``
  (with pad = eos, Qwen's ``<|im_end|>`` inside the prompt was masked out);
* --min_sequence_length counts NEW tokens (``min_new_tokens``), not prompt + answer;
* each batch draws from its own seed (seed, batch index), so a run is reproducible
  and an interrupted run resumes exactly: output goes to ``<file>.partial``, flushed
  batch by batch, and is renamed to ``<file>`` only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .chat import encode, format_prompt
from .configs import GenerateConfig
from .data import make_trajectory, meta_path, read_prompt, read_questions, write_json
from .errors import UserError, warn
from .models import end_of_turn_ids, load_model, tokenizer_fingerprint

Prompt = tuple[list[int], list[int]]  # (ids with system prompt, ids without)


def select_questions(questions: list[dict], n: int, seed: int, shuffle: bool = True) -> list[dict]:
    """The first n questions after a seeded shuffle; warn if fewer exist."""
    qs = list(questions)
    if shuffle:
        random.Random(seed).shuffle(qs)
    if n > len(qs):
        warn(f"--num_questions {n} but the dataset has {len(qs)} questions; using all {len(qs)}")
    return qs[:n]


def render_prompts(
    tokenizer, x0: str, questions: list[dict], enable_thinking: bool | None = None
) -> list[Prompt]:
    out = []
    for q in questions:
        with_sys = format_prompt(x0, q["question"], True, tokenizer, enable_thinking)
        no_sys = format_prompt(x0, q["question"], False, tokenizer, enable_thinking)
        out.append((encode(tokenizer, with_sys), encode(tokenizer, no_sys)))
    return out


def plan_batches(
    prompt_lens: list[int], n_seq: int, batch_size: int
) -> list[list[tuple[int, int]]]:
    """(question index, sample index) jobs, sorted by prompt length, cut into batches.

    Sorting by length keeps left padding short; the order is a pure function of the
    inputs, so batch k is the same batch in every run (needed for resuming).
    """
    jobs = sorted(
        ((qi, si) for qi in range(len(prompt_lens)) for si in range(n_seq)),
        key=lambda j: (prompt_lens[j[0]], j[0], j[1]),
    )
    return [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a [B, L] id tensor; the mask marks real tokens by position, not by value."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def cut_at_end_of_turn(ids: list[int], eot_ids: set[int] | list[int]) -> list[int]:
    """Keep tokens up to and including the first end-of-turn token (padding follows it)."""
    eot = set(eot_ids)
    for i, t in enumerate(ids):
        if t in eot:
            return ids[: i + 1]
    return ids


def sampling_kwargs(cfg: GenerateConfig) -> dict:
    kw = {"do_sample": True, "temperature": cfg.temperature}
    if cfg.top_p is not None:
        kw["top_p"] = cfg.top_p
    if cfg.top_k is not None:
        kw["top_k"] = cfg.top_k
    return kw


@torch.no_grad()
def sample_batch(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eot_ids: list[int],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    **sampling,
) -> list[list[int]]:
    """Generate one mixed batch; return each row's new ids, cut after the first end-of-turn."""
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eot_ids,
        pad_token_id=pad_id,
        **sampling,
    )
    new = out[:, ids.shape[1] :].tolist()
    return [cut_at_end_of_turn(row, eot_ids) for row in new]


def batch_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def _resume_key(cfg: GenerateConfig, fingerprint: str, x0: str) -> dict:
    args = dataclasses.asdict(cfg)
    args.pop("traj_out_file")
    return {"args": args, "tokenizer_fingerprint": fingerprint, "x0": x0}


def _completed(partial: Path, batches: list[list[tuple[int, int]]]) -> tuple[int, int]:
    """(rows, batches) already complete in `partial`; trims a torn last batch or line."""
    if not partial.exists():
        return 0, 0
    lines = partial.read_bytes().split(b"\n")
    good = []
    for line in lines:
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn final line (killed mid-write)
    keep, done = 0, 0
    for b in batches:
        if keep + len(b) > len(good):
            break
        keep, done = keep + len(b), done + 1
    with open(partial, "wb") as f:  # drop anything past the last whole batch
        f.write(b"".join(line + b"\n" for line in lines[:keep]))
    return keep, done


def generate_trajectories(
    model,
    tokenizer,
    cfg: GenerateConfig,
    x0: str,
    questions: list[dict],
    out_path: str | Path,
    *,
    progress: bool = True,
) -> dict:
    """Sample cfg.num_sequences_per_question answers for each question and write them.

    Returns throughput stats. Resumes from ``<out_path>.partial`` when the same
    arguments were used; refuses when they differ.
    """
    out_path = Path(out_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    eot = end_of_turn_ids(tokenizer, model)
    prompts = render_prompts(tokenizer, x0, questions, cfg.enable_thinking)
    batches = plan_batches(
        [len(p[0]) for p in prompts], cfg.num_sequences_per_question, cfg.batch_size
    )

    partial = Path(str(out_path) + ".partial")
    key_path = Path(str(partial) + ".key.json")
    key = _resume_key(cfg, fingerprint, x0)
    if partial.exists():
        old = json.loads(key_path.read_text()) if key_path.exists() else None
        if old != json.loads(json.dumps(key)):
            raise UserError(
                f"{partial} is an unfinished run with different arguments; rerun that command "
                "to finish it, or delete the .partial file to start over"
            )
    else:
        write_json(key_path, key)
    done_rows, done_batches = _completed(partial, batches)
    if done_batches:
        print(f"Resuming {out_path}: {done_batches}/{len(batches)} batches already done")

    n_traj = done_rows
    n_tokens = 0
    t0 = time.perf_counter()
    pbar = tqdm(
        total=sum(len(b) for b in batches),
        initial=done_rows,
        unit="traj",
        desc="generating",
        disable=not progress,
    )
    with open(partial, "a", encoding="utf-8") as f:
        for bi in range(done_batches, len(batches)):
            batch = batches[bi]
            torch.manual_seed(batch_seed(cfg.seed, bi))
            gens = sample_batch(
                model,
                [prompts[qi][0] for qi, _ in batch],
                pad_id=tokenizer.pad_token_id,
                eot_ids=eot,
                max_new_tokens=cfg.max_sequence_length,
                min_new_tokens=cfg.min_sequence_length,
                **sampling_kwargs(cfg),
            )
            lines = []
            for (qi, si), gen in zip(batch, gens):
                rec = make_trajectory(
                    tokenizer,
                    prompts[qi][0],
                    prompts[qi][1],
                    gen,
                    question=questions[qi]["question"],
                    question_index=qi,
                    sample_index=si,
                    batch_index=bi,
                )
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                n_tokens += len(gen)
            f.write("".join(lines))  # one write per batch, then flush: a kill loses <= 1 batch
            f.flush()
            n_traj += len(batch)
            pbar.update(len(batch))
            pbar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        os.fsync(f.fileno())
    pbar.close()
    elapsed = time.perf_counter() - t0

    meta = {
        "promptbake_version": __version__,
        "model_name": getattr(model, "name_or_path", None),
        "tokenizer_fingerprint": fingerprint,
        "x0": x0,
        "end_of_turn_ids": eot,
        "args": dataclasses.asdict(cfg),
        "num_trajectories": n_traj,
        "num_questions": len(questions),
    }
    write_json(meta_path(out_path), meta)
    os.replace(partial, out_path)  # the complete file appears at once
    key_path.unlink(missing_ok=True)
    return {
        "trajectories": n_traj - done_rows,
        "new_tokens": n_tokens,
        "seconds": elapsed,
        "traj_per_s": (n_traj - done_rows) / max(elapsed, 1e-9),
        "tokens_per_s": n_tokens / max(elapsed, 1e-9),
    }


def run_generate(cfg: GenerateConfig, model=None, tokenizer=None) -> dict:
    """The whole stage from a config: read inputs, load the model (unless given), write."""
    cfg.validate()
    x0 = read_prompt(cfg.x0_file)
    questions = select_questions(
        read_questions(cfg.question_dataset), cfg.num_questions, cfg.seed, cfg.shuffle
    )
    out = Path(cfg.traj_out_file)
    if out.is_dir():
        raise UserError(f"--traj_out_file {out} is a directory; give a .jsonl file path")
    if model is None:
        model, tokenizer = load_model(cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code)
    stats = generate_trajectories(model, tokenizer, cfg, x0, questions, out)
    print(
        f"Generated {stats['trajectories']} trajectories, {stats['new_tokens']} new tokens in "
        f"{stats['seconds']:.1f} s ({stats['traj_per_s']:.2f} traj/s, "
        f"{stats['tokens_per_s']:.1f} tok/s)"
    )
    print(f"Dataset saved to {out}")
    return stats
