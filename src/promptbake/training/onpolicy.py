"""On-policy baking (``--on_policy F``): a share F of each epoch's batches are the
student's own answers instead of the prompted model's.

    promptbake train --data_path data/t.jsonl --out_dir runs/x --on_policy 0.5

For such a batch the student (adapter on, no system prompt), as it is at that step,
answers training questions through the sampling seam (sampling.sample); each answer
becomes a trajectory record (data.make_trajectory) and is trained on like any other,
the teacher (prompted, adapter off) scoring the student's tokens per step (no cache
holds them). The questions and the prompt come from ``--x0_file`` /
``--question_dataset`` or from the trajectory file's ``.meta.json`` sidecar, which
also gives the sampling settings (temperature, lengths, top-p/top-k).

Reproducible: which batches are on-policy is a seeded draw per epoch, and each such
batch samples under its own seed from (seed, epoch, batch index, rank) in a forked RNG,
so the training RNG stream is untouched and a resumed run samples the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..errors import UserError
from ..models import end_of_turn_ids, pad_id
from ..prompts import render_prompts
from ..records import read_prompt, read_questions, select_questions
from ..sampling.seam import Sampling, sample
from ..schema import make_trajectory

# the generation stage's defaults (configs.GenerateConfig), for a sidecar without them
DEFAULT_GENERATION = {"max_sequence_length": 300, "min_sequence_length": 1, "temperature": 1.0}


@dataclass
class StudentSource:
    """What on-policy batches sample from, read before the model loads."""

    x0: str
    questions: list[dict]
    gen_args: dict  # the generation stage's arguments (sidecar "args"), maybe empty


@dataclass
class StudentPrompts:
    """The training questions, rendered, and how to sample the student's answers."""

    prompts: list[tuple[list[int], list[int]]]  # (with system prompt, without) per question
    settings: Sampling
    eot_ids: list[int]
    engine: str = "auto"


def read_source(
    x0_file: str | None, question_dataset: str | None, meta: dict | None
) -> StudentSource:
    """The prompt and training questions: flags first, else the sidecar; a clear
    UserError when neither names them."""
    meta = meta or {}
    args = meta.get("args") or {}
    if x0_file:
        x0 = read_prompt(x0_file)
    elif meta.get("x0"):
        x0 = meta["x0"]
    else:
        raise UserError(
            "--on_policy needs the baked prompt: pass --x0_file (the trajectory file has no "
            ".meta.json sidecar naming it)"
        )
    if question_dataset:
        return StudentSource(x0, read_questions(question_dataset), args)
    path = args.get("question_dataset")
    if not path:
        raise UserError(
            "--on_policy needs the training questions: pass --question_dataset (the "
            "trajectory file has no .meta.json sidecar naming them)"
        )
    if not all(Path(p.strip()).is_file() for p in str(path).split(",")):
        raise UserError(
            f"--on_policy: the sidecar's question set {path} is not found from here; "
            "pass --question_dataset"
        )
    questions = select_questions(
        read_questions(path),
        int(args.get("num_questions", 100)),
        int(args.get("seed", 42)),
        bool(args.get("shuffle", True)),
    )
    return StudentSource(x0, questions, args)


def student_prompts(
    source: StudentSource, tokenizer, model, max_traj_len: int | None
) -> StudentPrompts:
    """Render the questions and fix the sampling settings (answers no longer than
    --max_traj_len: training would cut them there anyway)."""
    a = {**DEFAULT_GENERATION, **{k: v for k, v in source.gen_args.items() if v is not None}}
    max_new = int(a["max_sequence_length"])
    if max_traj_len is not None:
        max_new = min(max_new, max_traj_len)
    settings = Sampling(
        max_new_tokens=max_new,
        min_new_tokens=min(int(a["min_sequence_length"]), max_new),
        temperature=float(a["temperature"]),
        top_p=a.get("top_p"),
        top_k=a.get("top_k"),
        vllm_memory=a.get("vllm_memory"),
    )
    prompts = render_prompts(
        tokenizer, source.x0, source.questions, source.gen_args.get("enable_thinking")
    )
    return StudentPrompts(
        prompts, settings, end_of_turn_ids(tokenizer, model), a.get("engine", "auto")
    )


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63)
    return s


def pick_batches(n_batches: int, share: float, seed: int, epoch: int) -> set[int]:
    """Which of an epoch's batches are on-policy: round(share * n) of them, a seeded draw."""
    k = round(share * n_batches)
    if k == 0:
        return set()
    gen = torch.Generator().manual_seed(_mix(seed, epoch, 7))
    return set(torch.randperm(n_batches, generator=gen)[:k].tolist())


def pick_questions(n_questions: int, n_rows: int, seed: int, epoch: int, bi: int) -> list[int]:
    """The questions of on-policy batch `bi` (global, the same on every process)."""
    gen = torch.Generator().manual_seed(_mix(seed, epoch, bi, 11))
    return torch.randint(n_questions, (n_rows,), generator=gen).tolist()


def student_rows(
    model, tokenizer, student: StudentPrompts, questions: list[int], seed: int
) -> list[dict]:
    """Trajectory records of the student's answers to `questions` (indices into
    ``student.prompts``), sampled with the adapter on and no system prompt."""
    if not questions:
        return []
    was_training = model.training
    model.eval()  # no LoRA dropout while sampling
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = sample(
                model,
                [student.prompts[q][1] for q in questions],
                student.settings,
                pad_id=pad_id(tokenizer),
                eot_ids=student.eot_ids,
                engine=student.engine,
            )
    finally:
        model.train(was_training)
    return [
        make_trajectory(tokenizer, *student.prompts[q], gen, question_index=q, on_policy=True)
        for q, gen in zip(questions, out.new_ids)
    ]


def batch_seed(seed: int, epoch: int, bi: int) -> int:
    """This process's sampling seed for on-policy batch `bi` of `epoch`."""
    return _mix(seed, epoch, bi, distributed.rank())
