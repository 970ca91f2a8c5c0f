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
  batch by batch, and is renamed to ``<file>`` only when complete;
* under ``torchrun --nproc_per_node N`` process r samples batches r, r + N, ... and
  rank 0 merges the shards: the same file as one process, the work split N ways.
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

from . import __version__, distributed
from .chat import encode, format_prompt
from .configs import GenerateConfig
from .data import (
    atomic_write,
    group_identical,
    make_trajectory,
    meta_path,
    read_prompt,
    read_questions,
    write_json,
)
from .errors import UserError, warn
from .models import cache_arg, end_of_turn_ids, load_model, tokenizer_fingerprint

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


def left_pad(
    seqs: list[list[int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a [B, L] id tensor; the mask marks real tokens by position, not by value.
    `multiple` rounds L up (a static cache then sees few distinct shapes: few recompiles)."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
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
    if cfg.cache_implementation == "static":  # transformers compiles it on CUDA
        kw["cache_implementation"] = "static"
        kw["disable_compile"] = not cfg.compile
    return kw


def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of every prompt but its last token, computed once per DISTINCT
    prompt and repeated for the rows that share it; None when no two rows share one.

    A batch holds --num_sequences_per_question copies of each prompt, so the prompt
    pass (most of a short answer's cost) runs once per question instead of once per
    sample. ``generate`` continues from the cache with the same positions and mask, so
    the samples are those of a plain call, up to float rounding.
    """
    if ids.shape[1] < 2:
        return None
    # each row's distinct prompt; each distinct prompt's first row
    group, reps = group_identical([tuple(row) for row in ids.tolist()])
    if len(reps) == ids.shape[0]:
        return None
    pre, pre_mask = ids[reps, :-1], mask[reps, :-1]
    # left padding: positions count real tokens, as generate() computes them
    pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    key = cache_arg(decoder)
    out = decoder(input_ids=pre, attention_mask=pre_mask, position_ids=pos, use_cache=True)
    cache = getattr(out, key)
    cache.batch_select_indices(torch.tensor(group, device=ids.device))
    return cache


@torch.no_grad()
def sample_batch(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eot_ids: list[int],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    return_logprobs: bool = False,
    **sampling,
):
    """Generate one mixed batch; return each row's new ids, cut after the first end-of-turn.

    With ``return_logprobs``, also each row's [n_i, V] float32 CPU log-probs of the
    model's own (temperature 1, unprocessed) next-token distribution at its n_i kept
    tokens: exactly the teacher's targets at those positions, a by-product of sampling
    (teacher.cache_from_generation). On CUDA out-of-memory the batch is generated in
    two halves (recursively) with a warning, instead of crashing (seed troubleshooting 2).
    """
    static = sampling.get("cache_implementation") == "static"
    ids, mask = left_pad(prompts, pad_id, 64 if static else 1)
    ids, mask = ids.to(model.device), mask.to(model.device)
    try:
        extra = {}
        cache = None if static else shared_prefill(model, ids, mask)
        if cache is not None:
            extra[cache_arg(model.get_decoder())] = cache
        if return_logprobs:
            extra.update(output_logits=True, return_dict_in_generate=True)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=eot_ids,
            pad_token_id=pad_id,
            **sampling,
            **extra,
        )
        cache = None
        seqs = out.sequences if return_logprobs else out
        new = [cut_at_end_of_turn(row, eot_ids) for row in seqs[:, ids.shape[1] :].tolist()]
        if not return_logprobs:
            return new
        steps = torch.stack(out.logits, 1)  # [B, steps, V], raw logits
        logps = [steps[i, : len(n)].float().log_softmax(-1).cpu() for i, n in enumerate(new)]
        return new, logps
    except torch.cuda.OutOfMemoryError:
        if len(prompts) == 1:
            raise UserError(
                "CUDA out of memory generating one sequence: lower --max_sequence_length"
            ) from None
    # outside the except block, so the failed attempt's tensors are already freed
    ids = mask = cache = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = (len(prompts) + 1) // 2
    warn(f"CUDA out of memory at {len(prompts)} sequences: splitting the batch in two")
    kw = dict(pad_id=pad_id, eot_ids=eot_ids, max_new_tokens=max_new_tokens)
    kw.update(min_new_tokens=min_new_tokens, return_logprobs=return_logprobs, **sampling)
    a, b = sample_batch(model, prompts[:half], **kw), sample_batch(model, prompts[half:], **kw)
    if not return_logprobs:
        return a + b
    return a[0] + b[0], a[1] + b[1]


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


def _shard_path(partial: Path, rank: int) -> Path:
    return Path(f"{partial}.rank{rank}")


def _check_resume_key(partial: Path, key_path: Path, key: dict) -> None:
    """Refuse to continue an unfinished run made with other arguments (or process count)."""
    old = json.loads(key_path.read_text()) if key_path.exists() else None
    if old == json.loads(json.dumps(key)):
        return
    if old is not None:
        same = {k: v for k, v in old.items() if k != "world_size"} == json.loads(
            json.dumps({k: v for k, v in key.items() if k != "world_size"})
        )
        if same:
            raise UserError(
                f"{partial} is an unfinished run made by {old.get('world_size', 1)} "
                f"process(es), this one has {key.get('world_size', 1)}; rerun it with the same "
                "torchrun --nproc_per_node to finish it, or delete the .partial files to start over"
            )
    raise UserError(
        f"{partial} is an unfinished run with different arguments; rerun that command "
        "to finish it, or delete the .partial file to start over"
    )


def _merge_shards(partial: Path, batches: list[list[tuple[int, int]]], world: int) -> None:
    """Interleave the processes' shard files into `partial` in batch order, atomically.

    Rank r wrote batches r, r + world, ... in order, so batch k is the next len(batch k)
    lines of shard k % world: the result is byte for byte a single process's file.
    """
    shards = [_shard_path(partial, r) for r in range(world)]
    lines = [[ln + b"\n" for ln in s.read_bytes().split(b"\n")[:-1]] for s in shards]
    pos = [0] * world
    merged = []
    for bi, b in enumerate(batches):
        r = bi % world
        merged.extend(lines[r][pos[r] : pos[r] + len(b)])
        pos[r] += len(b)
    if pos != [len(x) for x in lines]:
        raise RuntimeError(f"shard files hold {[len(x) for x in lines]} lines, expected {pos}")
    with atomic_write(partial, "wb") as f:
        f.write(b"".join(merged))
    for s in shards:
        s.unlink()


def generate_trajectories(
    model,
    tokenizer,
    cfg: GenerateConfig,
    x0: str,
    questions: list[dict],
    out_path: str | Path,
    *,
    progress: bool = True,
    logprobs: dict | None = None,
) -> dict:
    """Sample cfg.num_sequences_per_question answers for each question and write them.

    Returns throughput stats. Resumes from ``<out_path>.partial`` when the same
    arguments were used; refuses when they differ. With a `logprobs` dict, the
    prompted model's log-probs at each newly sampled answer's tokens are stored in it
    under (question_index, sample_index) ([n, V] float32 on the CPU; see
    teacher.cache_from_generation); rows a resumed run had already written get none.
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
    # Under torchrun, rank r samples batches r, r + world, ... into its own shard file
    # (<out>.partial.rank<r>); batches are seeded by their index, so the merged file is
    # the one a single process writes. One process writes <out>.partial itself.
    distributed.init(cfg.device)
    world, main = distributed.world_size(), distributed.is_main()
    mine = list(range(distributed.rank(), len(batches), world))
    own = partial if world == 1 else _shard_path(partial, distributed.rank())
    if world > 1:
        key["world_size"] = world
    unfinished = partial.exists() or any(_shard_path(partial, r).exists() for r in range(world))
    if unfinished:  # every process reads the same files: all refuse, or none does
        _check_resume_key(partial, key_path, key)
    distributed.barrier()  # all have read the key before it is written
    if not unfinished and main:
        write_json(key_path, key)
    done_rows, done_batches = _completed(own, [batches[i] for i in mine])
    if done_batches:
        print(f"Resuming {own}: {done_batches}/{len(mine)} batches already done")

    n_traj = done_rows
    n_tokens = 0
    t0 = time.perf_counter()
    pbar = tqdm(
        total=sum(len(batches[i]) for i in mine),
        initial=done_rows,
        unit="traj",
        desc="generating",
        disable=not (progress and main),
    )
    with open(own, "a", encoding="utf-8") as f:
        for bi in mine[done_batches:]:
            batch = batches[bi]
            torch.manual_seed(batch_seed(cfg.seed, bi))
            gens = sample_batch(
                model,
                [prompts[qi][0] for qi, _ in batch],
                pad_id=tokenizer.pad_token_id,
                eot_ids=eot,
                max_new_tokens=cfg.max_sequence_length,
                min_new_tokens=cfg.min_sequence_length,
                return_logprobs=logprobs is not None,
                **sampling_kwargs(cfg),
            )
            if logprobs is not None:
                gens, lps = gens
                logprobs.update(zip(batch, lps))
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
    # totals over all processes; the all-reduce also waits until every shard is complete
    n_new, n_tokens = (int(x) for x in distributed.all_reduce_sum([n_traj - done_rows, n_tokens]))

    if main:
        if world > 1:
            _merge_shards(partial, batches, world)
        meta = {
            "promptbake_version": __version__,
            "model_name": getattr(model, "name_or_path", None),
            "tokenizer_fingerprint": fingerprint,
            "x0": x0,
            "end_of_turn_ids": eot,
            "args": dataclasses.asdict(cfg),
            "num_trajectories": sum(len(b) for b in batches),
            "num_questions": len(questions),
        }
        write_json(meta_path(out_path), meta)
        os.replace(partial, out_path)  # the complete file appears at once
        key_path.unlink(missing_ok=True)
    distributed.barrier()  # no process returns before the file is in place
    return {
        "trajectories": n_new,
        "new_tokens": n_tokens,
        "seconds": elapsed,
        "traj_per_s": n_new / max(elapsed, 1e-9),
        "tokens_per_s": n_tokens / max(elapsed, 1e-9),
    }


def run_generate(cfg: GenerateConfig, model=None, tokenizer=None) -> dict:
    """The whole stage from a config: read inputs, load the model (unless given), write."""
    cfg.validate()
    distributed.init(cfg.device)  # before loading: each process takes its own GPU
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
    if not distributed.is_main():
        return stats
    print(
        f"Generated {stats['trajectories']} trajectories, {stats['new_tokens']} new tokens in "
        f"{stats['seconds']:.1f} s ({stats['traj_per_s']:.2f} traj/s, "
        f"{stats['tokens_per_s']:.1f} tok/s)"
    )
    print(f"Dataset saved to {out}")
    return stats
