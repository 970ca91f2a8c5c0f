"""The benchmark's jobs as settings, and the one mapping from a job to promptbake's
configs: every job, pipeline and process of the bench gets its GenerateConfig from
`job_generate_config` and its TrainConfig from `job_train_config`, and the original
(bench/original.py) reads the same configs (`OriginalSampling.of`, `OriginalTraining.of`).

    from bench.jobs import QUICK, Job, job_generate_config, job_train_config
    cfg = job_generate_config(Job(), "traj.jsonl")           # the CPU job's generation
    tcfg = job_train_config(Job(), "traj.jsonl", "out", prefix_reuse=False)

* Job(): the CPU job (bench/cpu.py) and the seed job (bench/seed.py); QUICK is the tiny
  random model (--quick).
* GpuJob(): the GPU job (bench/gpu_measure.py: run_gpu), the seed's Example 1 sizes; its
  training settings are also those `make bench-gpu` (bench/gpu.py) times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from promptbake.configs import GenerateConfig, TrainConfig

# Training variants, each on the same trajectories for the same epochs. "plain" is
# promptbake with every switchable speed-up off: what is left (always on) is the LM head
# at generated positions only and the chunked KL.
EXACT = {"teacher_cache": "exact", "prefix_reuse": True}
KEPT = "kept"  # pseudo-flag: train with the exact teacher cache kept from generation
# on by default in promptbake train (the cache: when it fits); off in "plain"
OFF = {"prefix_reuse": False, "teacher_cache": "off"}
VARIANTS: list[tuple[str, str, dict]] = [
    ("plain", "logits at generated positions + fused chunked KL (always on)", OFF),
    ("+bucketing", "plain + length bucketing", {**OFF, "length_bucketing": True}),
    (
        "+prefix_reuse",
        "plain + shared prefixes run once per batch (teacher and student)",
        {"prefix_reuse": True, "teacher_cache": "off"},
    ),
    (
        "+cache_exact",
        "plain + exact teacher cache (a teacher pass)",
        {**OFF, "teacher_cache": "exact"},
    ),
    (
        "+cache_topk",
        "plain + top-k teacher cache (approximate)",
        {**OFF, "teacher_cache": "topk"},
    ),
    ("+cache_exact+prefix", "plain + exact teacher cache + prefix reuse", EXACT),
    # "ours" keeps only exact speed-ups, so its held-out KL is the original's up to rounding
    ("ours", "prefix reuse + exact teacher cache kept from generation", {**EXACT, KEPT: True}),
    (
        "ours+ckpt",
        "ours + gradient checkpointing (memory for compute)",
        {**EXACT, KEPT: True, "gradient_checkpointing": True},
    ),
]


@dataclass
class Job:
    """One benchmark job's sizes and hyper-parameters (identical for both pipelines);
    the default is the CPU job: a demo-size persona bake of the bundled SmolLM2-135M."""

    model: str = "smollm2-135m"  # or "tiny" (random, for --quick)
    x0_file: str = "data/zorblax_x0.md"
    train_questions: str = "data/identity_train.jsonl"
    heldout_questions: str = "data/identity_heldout.jsonl"
    n_train_q: int = 8
    n_val_q: int = 4
    n_seq: int = 4
    max_new_tokens: int = 32
    min_new_tokens: int = 1
    temperature: float = 1.0
    gen_batch_size: int = 32  # ours; the original's: one question's n_seq, at most this
    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 1e-3
    r: int = 8
    lora_alpha: float = 16.0
    kl_chunk_size: int = 512  # what --kl_chunk_size 0 (auto) is on the CPU
    teacher_topk: int = 64
    seed: int = 42
    variants: list[str] = field(default_factory=lambda: [v[0] for v in VARIANTS])


QUICK = Job(
    model="tiny",
    n_train_q=4,
    n_val_q=2,
    n_seq=2,
    max_new_tokens=6,
    gen_batch_size=8,
    epochs=2,
    batch_size=3,
    teacher_topk=8,
)


@dataclass
class GpuJob(Job):
    """The GPU job: a Qwen3-1.7B-shaped model with random weights (bf16) at the seed's
    Example 1 sizes, generate + 1 epoch; the original runs on a subset and its rates are
    per token."""

    model: str = "random-qwen3-1.7b"
    x0_file: str = "data/truth_x0.md"
    train_questions: str = "data/questions.jsonl"  # the first n_train_q, in file order
    n_train_q: int = 100
    n_seq: int = 25
    max_new_tokens: int = 300
    min_new_tokens: int = 100
    temperature: float = 2.0
    gen_batch_size: int = 256
    epochs: int = 1
    batch_size: int = 10
    learning_rate: float = 1e-4
    r: int = 32
    lora_alpha: float = 1.0
    kl_chunk_size: int = 0  # train's default: auto (on CUDA, from the free memory)
    original_questions: int = 4  # the original's subset
    original_train_steps: int = 10


# ---------------------------------------------------------------- a job's configs
def job_generate_config(
    job: Job, out_path: str | Path, *, heldout: bool = False, model_name: str | None = None, **flags
) -> GenerateConfig:
    """The job's generation as a promptbake GenerateConfig writing `out_path`: its
    training questions, or with `heldout` its held-out ones; `model_name` where the
    model is loaded from elsewhere than `job.model` (a saved --quick model); `flags`:
    further GenerateConfig fields (the GPU job's cache_implementation)."""
    return GenerateConfig(
        model_name=model_name or job.model,
        x0_file=job.x0_file,
        question_dataset=job.heldout_questions if heldout else job.train_questions,
        traj_out_file=str(out_path),
        num_questions=job.n_val_q if heldout else job.n_train_q,
        num_sequences_per_question=job.n_seq,
        max_sequence_length=job.max_new_tokens,
        min_sequence_length=job.min_new_tokens,
        temperature=job.temperature,
        batch_size=job.gen_batch_size,
        seed=job.seed,
        **flags,
    )


def job_train_config(
    job: Job,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    **flags,
) -> TrainConfig:
    """The job's training as a promptbake TrainConfig on `data_path`, no checkpoints and
    no plot; `flags`: the speed-up switches of a variant (VARIANTS) and other fields."""
    return TrainConfig(
        model_name=model_name or job.model,
        data_path=str(data_path),
        out_dir=str(out_dir),
        num_epochs=job.epochs,
        batch_size=job.batch_size,
        learning_rate=job.learning_rate,
        r=job.r,
        lora_alpha=job.lora_alpha,
        save_every=0,
        kl_chunk_size=job.kl_chunk_size,
        teacher_topk=job.teacher_topk,
        plot=False,
        seed=job.seed,
        **flags,
    )
