"""The generation stage: sample trajectories from the *prompted* model into a file.

    gen = generate_trajectories(model, tok, cfg, x0, questions, "data/t.jsonl")
    gen.rows, gen.stats, gen.kept     # the records written, rates, kept log-probs (or None)

The commands around it: generate.py (generate_data.py) and bake.py. For every question we render the conversation with the system prompt (x0) and
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

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__, distributed
from ..configs import GenerateConfig
from ..errors import UserError
from ..files import append_bytes, atomic_write, write_json, writing
from ..models import end_of_turn_ids, tokenizer_fingerprint
from ..prompts import render_prompts
from ..records import read_json
from ..schema import make_trajectory, meta_path, read_trajectories, sidecar_path
from .seam import Sampling, check_context, sample


@dataclass
class Generation:
    """What a generation run hands to training, so nothing is re-read or re-joined.

    ``rows``: every trajectory of the written file, in file order (the records
    schema.read_trajectories would return). ``kept``: with a keep budget, the sampler's
    log-probs of every row, by (question_index, sample_index) (the teacher's targets,
    training.teacher.cache_from_generation turns them into its table); None when any row
    has no kept log-probs (a resumed run's earlier rows, or several processes), and
    training then runs its own teacher pass.
    """

    rows: list[dict]
    stats: dict
    kept: dict | None = None


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


def sampling_settings(cfg: GenerateConfig) -> Sampling:
    """The sampling settings of a generation config."""
    return Sampling(
        max_new_tokens=cfg.max_sequence_length,
        min_new_tokens=cfg.min_sequence_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        cache_implementation=cfg.cache_implementation,
        compile=cfg.compile,
        vllm_memory=cfg.vllm_memory,
    )


def batch_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_identity(model_name: str, model) -> dict:
    """What says which model samples: its name (a local path made absolute, so ./m and
    /abs/m match) and a hash of its config (what the weights' shapes and the
    architecture depend on; the tokenizer's fingerprint is the key's too)."""
    p = Path(model_name).expanduser()
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    volatile = ("_name_or_path", "transformers_version", "_commit_hash")
    values = {k: v for k, v in values.items() if k not in volatile}
    return {
        "name": str(p.resolve()) if p.exists() else model_name,
        "config_sha256": _sha256_json(json.loads(json.dumps(values, default=str))),
    }


def _resume_key(
    cfg: GenerateConfig, fingerprint: str, x0: str | list[dict], questions: list[dict], model
) -> dict:
    """What an unfinished run must share with the one that continues it: the arguments,
    and the CONTENT of every input (the prompt, the question records actually used, the
    model and its tokenizer), so an input edited after a kill is never mixed into one
    file with rows sampled from the old one."""
    args = dataclasses.asdict(cfg)
    args.pop("traj_out_file")
    return {
        "args": args,
        "tokenizer_fingerprint": fingerprint,
        "x0": x0,
        "questions_sha256": _sha256_json(questions),
        "model": model_identity(cfg.model_name, model),
    }


# the key's entries that are inputs (content), with what to call them in a refusal
_KEY_INPUTS = {
    "x0": "the prompt",
    "questions_sha256": "the question records",
    "model": "the model",
    "tokenizer_fingerprint": "the tokenizer",
}


def _completed(partial: Path, batches: list[list[tuple[int, int]]]) -> tuple[list[dict], int]:
    """(records, batches) already complete in `partial`; trims a torn last batch or line."""
    if not partial.exists():
        return [], 0
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
    return good[:keep], done


def _shard_path(partial: Path, rank: int) -> Path:
    return Path(f"{partial}.rank{rank}")


def side_files(out_path: str | Path) -> list[Path]:
    """The files a generation writes beside <out_path>: its .meta.json, the teacher
    sidecar, the unfinished run's .partial and resume key, and the writer's lock."""
    partial = Path(f"{out_path}.partial")
    return [
        meta_path(out_path), sidecar_path(out_path), partial, Path(f"{partial}.key.json"),
        Path(f"{out_path}.lock"),
    ]  # fmt: skip


def _check_resume_key(partial: Path, key_path: Path, key: dict) -> None:
    """Refuse to continue an unfinished run made with other arguments, other inputs (an
    edited question file, prompt or model) or another process count."""
    fix = "delete the .partial file (and its .key.json) to start over"
    old = read_json(key_path, hint=fix) if key_path.exists() else None
    key = json.loads(json.dumps(key))
    if old == key:
        return
    if old is not None:
        same = {k: v for k, v in old.items() if k != "world_size"} == {
            k: v for k, v in key.items() if k != "world_size"
        }
        changed = [what for k, what in _KEY_INPUTS.items() if old.get(k) != key.get(k)]
        if old.get("args") == key["args"] and changed:
            raise UserError(
                f"{partial} is an unfinished run, but the inputs changed since it was "
                f"started ({', '.join(changed)}); rows of the old and new inputs must not mix "
                f"in one file: restore them and rerun to finish it, or {fix}"
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


@contextlib.contextmanager
def _no_leftovers_on_failure(partial: Path, key_path: Path, fresh: bool):
    """A fresh run that fails before writing a row removes its empty .partial and key:
    left behind, they would block the corrected command ("unfinished run")."""
    try:
        yield
    except BaseException:
        if fresh and (not partial.exists() or partial.stat().st_size == 0):
            partial.unlink(missing_ok=True)
            key_path.unlink(missing_ok=True)
        raise


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


@dataclass
class _Run:
    """Where one generation run writes and what it has already done."""

    partial: Path  # <out>.partial: the whole file, complete only at the end
    key_path: Path  # the arguments of the unfinished run, to refuse a different one
    own: Path  # the file this process appends to (its shard under torchrun)
    mine: list[int]  # the batch indices this process samples
    done: list[dict]  # records already in `own` from an interrupted run
    done_batches: int
    fresh: bool  # a new run in one process: its leftovers are removed if it fails early


def _open_run(
    cfg: GenerateConfig, fingerprint: str, x0: str, questions, model, out_path: Path, batches
) -> _Run:
    """Check or write the resume key and find the finished part of `own`.

    Under torchrun, rank r samples batches r, r + world, ... into its own shard file
    (<out>.partial.rank<r>); batches are seeded by their index, so the merged file is
    the one a single process writes. One process writes <out>.partial itself.
    """
    partial = Path(str(out_path) + ".partial")
    key_path = Path(str(partial) + ".key.json")
    key = _resume_key(cfg, fingerprint, x0, questions, model)
    distributed.init(cfg.device)
    world = distributed.world_size()
    mine = list(range(distributed.rank(), len(batches), world))
    own = partial if world == 1 else _shard_path(partial, distributed.rank())
    if world > 1:
        key["world_size"] = world
    unfinished = partial.exists() or any(_shard_path(partial, r).exists() for r in range(world))
    if unfinished:  # every process reads the same files: all refuse, or none does
        _check_resume_key(partial, key_path, key)
    distributed.barrier()  # all have read the key before it is written
    if not unfinished and distributed.is_main():
        write_json(key_path, key)
    done, done_batches = _completed(own, [batches[i] for i in mine])
    if done_batches:
        print(f"Resuming {own}: {done_batches}/{len(mine)} batches already done")
    fresh = not unfinished and world == 1
    return _Run(partial, key_path, own, mine, done, done_batches, fresh)


@dataclass
class _Work:
    """What every batch of one generation samples from."""

    model: object
    tokenizer: object
    cfg: GenerateConfig
    prompts: list[tuple[list[int], list[int]]]  # (with the prompt, without) per question
    questions: list[dict]
    batches: list[list[tuple[int, int]]]


@dataclass
class _Kept:
    """The sampler's log-probs of each row, kept while their bytes stay within `budget`;
    past it they are all dropped (a table that big is not kept at all)."""

    budget: float
    rows: dict | None = field(default_factory=dict)
    nbytes: int = 0

    def add(self, batch: list[tuple[int, int]], logprobs) -> None:
        if self.rows is None:
            return
        self.rows.update(zip(batch, logprobs))
        tensors = [t for row in logprobs for t in (row if isinstance(row, tuple) else (row,))]
        self.nbytes += sum(t.numel() * t.element_size() for t in tensors)
        if self.nbytes > self.budget:
            self.rows = None


def _sample_into(f, work: _Work, todo: list[int], kept: _Kept | None, pbar) -> tuple[list, int]:
    """Sample batches `todo` and append their records to `f` (unbuffered, binary), one
    write per batch (a kill loses at most one batch); returns (records, new tokens)."""
    cfg, tok = work.cfg, work.tokenizer
    settings = sampling_settings(cfg)
    eot = end_of_turn_ids(tok, work.model)
    records, n_tokens, t0 = [], 0, time.perf_counter()
    for bi in todo:
        batch = work.batches[bi]
        torch.manual_seed(batch_seed(cfg.seed, bi))
        keep = kept is not None and kept.rows is not None
        out = sample(
            work.model, [work.prompts[qi][0] for qi, _ in batch], settings,
            pad_id=tok.pad_token_id, eot_ids=eot, return_logprobs=keep, engine=cfg.engine,
        )  # fmt: skip
        if keep:
            kept.add(batch, out.kept())
        new = [
            make_trajectory(
                tok,
                *work.prompts[qi],
                gen,
                question=work.questions[qi]["question"],
                question_index=qi,
                sample_index=si,
                batch_index=bi,
            )  # fmt: skip
            for (qi, si), gen in zip(batch, out.new_ids)
        ]
        # a batch is appended whole or not at all (a full disk: one line, the batches
        # before it kept for the resume)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new).encode("utf-8")
        append_bytes(f.name, data, "the trajectories", f=f)
        records += new
        n_tokens += sum(len(g) for g in out.new_ids)
        pbar.update(len(batch))
        pbar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    with writing(f.name, "the trajectories"):
        os.fsync(f.fileno())
    return records, n_tokens


def _finish(model, cfg, run: _Run, out_path: Path, fingerprint, x0, eot, batches, n_q) -> None:
    """Rank 0: merge the shards, write the sidecar, and rename the complete file into place."""
    if distributed.world_size() > 1:
        _merge_shards(run.partial, batches, distributed.world_size())
    meta = {
        "promptbake_version": __version__,
        "model_name": getattr(model, "name_or_path", None),
        "tokenizer_fingerprint": fingerprint,
        "x0": x0,
        "end_of_turn_ids": eot,
        "args": dataclasses.asdict(cfg),
        "num_trajectories": sum(len(b) for b in batches),
        "num_questions": n_q,
    }
    write_json(meta_path(out_path), meta)
    # the old file's teacher table must not outlive it (run_generate writes a new one)
    sidecar_path(out_path).unlink(missing_ok=True)
    os.replace(run.partial, out_path)  # the complete file appears at once
    run.key_path.unlink(missing_ok=True)


def generate_trajectories(
    model,
    tokenizer,
    cfg: GenerateConfig,
    x0: str | list[dict],
    questions: list[dict],
    out_path: str | Path,
    *,
    progress: bool = True,
    keep_bytes: float = 0,
) -> Generation:
    """Sample cfg.num_sequences_per_question answers for each question, write them,
    and return them (:class:`Generation`).

    Resumes from ``<out_path>.partial`` when the same arguments were used; refuses when
    they differ. ``keep_bytes``: keep the sampler's log-probs at every sampled token, up
    to this many bytes (training.targets decides it), and return them as
    :attr:`Generation.kept`; a resumed or multi-process run keeps none, and so does one
    whose table passes the budget.
    Under torchrun every process returns the whole file's rows (read back after the merge).
    """
    out_path = Path(out_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    prompts = render_prompts(tokenizer, x0, questions, cfg.enable_thinking)
    # every prompt is checked before anything is written (no .partial, no key to block a
    # corrected command); the prompted side is the longer one
    check_context(model, [p[0] for p in prompts], cfg.max_sequence_length)
    batches = plan_batches(
        [len(p[0]) for p in prompts], cfg.num_sequences_per_question, cfg.batch_size
    )
    run = _open_run(cfg, fingerprint, x0, questions, model, out_path, batches)
    main = distributed.is_main()
    # kept log-probs only when they will cover every row: one process, nothing resumed
    alone = not run.done and distributed.world_size() == 1
    kept = _Kept(keep_bytes) if keep_bytes > 0 and alone else None
    work = _Work(model, tokenizer, cfg, prompts, questions, batches)
    pbar = tqdm(
        total=sum(len(batches[i]) for i in run.mine),
        initial=len(run.done),
        unit="traj",
        desc="generating",
        disable=not (progress and main),
    )
    t0 = time.perf_counter()
    # (the bar is closed on failure too, so an error line starts a line of its own)
    with (
        _no_leftovers_on_failure(run.partial, run.key_path, run.fresh),
        pbar,
        open(run.own, "ab", buffering=0) as f,
    ):
        todo = run.mine[run.done_batches :]
        new, n_tokens = _sample_into(f, work, todo, kept, pbar)
    pbar.close()
    elapsed = time.perf_counter() - t0
    # totals over all processes; the all-reduce also waits until every shard is complete
    n_new, n_tokens = (int(x) for x in distributed.all_reduce_sum([len(new), n_tokens]))
    if main:
        eot = end_of_turn_ids(tokenizer, model)
        _finish(model, cfg, run, out_path, fingerprint, x0, eot, batches, len(questions))
    distributed.barrier()  # no process returns before the file is in place
    rows = run.done + new if distributed.world_size() == 1 else read_trajectories(out_path)
    stats = {
        "trajectories": n_new,
        "new_tokens": n_tokens,
        "seconds": elapsed,
        "traj_per_s": n_new / max(elapsed, 1e-9),
        "tokens_per_s": n_tokens / max(elapsed, 1e-9),
    }
    return Generation(rows, stats, None if kept is None else kept.rows)
