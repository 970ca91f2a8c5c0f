"""Where the teacher's targets come from: one plan per run, decided here and nowhere else.

    plan = plan_teacher(TeacherFacts(flag="auto", sampler="full", table_bytes=2e8, budget_bytes=4e9))
    plan.source          # "kept": generation keeps the sampler's log-probs, no teacher pass
    plan.keep            # True: generation is asked to keep them
    python -m pytest tests/test_training_targets.py -q   # every combination, as a table

The teacher is the prompted base model (adapter off); its log-probs at every generated
token are what the student is trained towards. They come from one of:

    kept         the sampler's own full log-probs, computed while generating (bake): no teacher pass
    sidecar      the exact table generate_data.py wrote next to the trajectories (train_loop.py)
    build        one teacher pass over the training rows before epoch 1: an exact table
    topk_kept    top-k + tail straight from the sampler's raw log-probs (vLLM): approximate
    topk         a top-k + tail table built by a teacher pass before epoch 1: approximate
    every_step   no table: the teacher runs at every step (exact; the table would not fit,
                 or --teacher_cache off)
    none         no table is needed: every batch is on-policy, or no epoch is left

The plan follows from four facts (:class:`TeacherFacts`): what this run's sampler can
hand back (full log-probs, top-k + tail, nothing), the exact table's size against
--teacher_cache_max_gb, the files present (a sidecar that fits these rows, or a stale
one), and --teacher_cache. An exact plan is never swapped for an approximation unasked:
top-k only when --teacher_cache topk names it. A kept table that does not arrive (a
resumed generation keeps none) falls back to :attr:`TeacherPlan.fallback`.

:func:`teacher_table` turns a plan into the table the training loop reads
(training.teacher.TeacherCache), or None when the teacher runs every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .forward import base_of
from .teacher import TeacherCache, build_teacher_cache, cache_bytes, kl_rows

FLAGS = ("auto", "exact", "off", "topk")  # --teacher_cache
SAMPLERS = ("full", "topk", "none")  # what generation hands back
SIDECARS = ("absent", "fits", "stale")
SOURCES = ("kept", "sidecar", "build", "topk_kept", "topk", "every_step", "none")


@dataclass(frozen=True)
class TeacherFacts:
    """What a run knows before it decides where the teacher's targets come from."""

    flag: str = "auto"  # --teacher_cache
    sampler: str = "none"  # what this run's generation hands back (none: no generation)
    table_bytes: float = 0  # the exact float32 [tokens x vocab] table of the training rows
    budget_bytes: float = math.inf  # --teacher_cache_max_gb, in bytes
    sidecar: str = "absent"  # a generate_data.py table next to --data_path
    needed: bool = True  # False: every batch is on-policy, or no epoch is left

    def __post_init__(self):
        for value, allowed in ((self.flag, FLAGS), (self.sampler, SAMPLERS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        if self.sidecar not in SIDECARS:
            raise ValueError(f"sidecar {self.sidecar!r} is not one of {SIDECARS}")


@dataclass(frozen=True)
class TeacherPlan:
    source: str  # one of SOURCES
    reason: str  # one line for the run's log
    fallback: str | None = None  # for kept tables: the source when none arrives

    @property
    def keep(self) -> bool:
        """Whether generation should keep the sampler's log-probs for training."""
        return self.source in ("kept", "topk_kept")

    @property
    def keep_bytes(self) -> float:
        """Generation's keep budget: unbounded when the plan keeps (the bound was checked
        when planning), else nothing."""
        return math.inf if self.keep else 0.0


def plan_teacher(f: TeacherFacts) -> TeacherPlan:
    """The one decision (see the module docstring for the sources)."""
    gb = f"{f.table_bytes / 1e9:.2f} GB"
    fits = f.table_bytes <= f.budget_bytes
    if not f.needed:
        return TeacherPlan("none", "teacher table: none needed (no off-policy epoch left)")
    if f.flag == "off":
        return TeacherPlan("every_step", "teacher: runs every step (--teacher_cache off)")
    if f.flag == "topk":
        if f.sampler == "topk":
            why = "teacher cache (top-k + tail, kept from the sampler's raw log-probs: approximate)"
            return TeacherPlan("topk_kept", why, fallback="topk")
        return TeacherPlan("topk", "teacher: top-k + tail table built before epoch 1 (approximate)")
    build = "build" if fits else "every_step"
    if not fits:
        return TeacherPlan(
            "every_step",
            f"teacher: the exact table ({gb}) exceeds --teacher_cache_max_gb "
            f"{f.budget_bytes / 1e9:g}; the teacher runs every step instead (exact, slower; "
            "--teacher_cache topk trades exactness for speed)",
        )
    if f.sampler == "full":
        return TeacherPlan("kept", "teacher cache (exact, kept from generation)", build)
    if f.sidecar == "fits":
        why = "teacher cache (exact, kept from generation), read from the trajectories' sidecar"
        return TeacherPlan("sidecar", why)
    return TeacherPlan("build", f"teacher: exact table built before epoch 1 ({gb})")


def sidecar_keep(save: str, max_gb: float, sampler: str) -> float:
    """Bytes of log-probs generate_data.py keeps for its sidecar file: none with
    --save_teacher_cache never or a sampler without full log-probs, any amount with
    always, up to --save_teacher_cache_max_gb with auto."""
    if save == "never" or sampler != "full":
        return 0.0
    return math.inf if save == "always" else max_gb * 1e9


def exact_table_bytes(rows: list[dict], vocab: int, max_gen: int | None) -> int:
    """Bytes of the exact table of `rows` (their KL rows after --max_traj_len)."""
    return cache_bytes(sum(kl_rows(r, max_gen) for r in rows), vocab, "exact", 0)


def training_facts(
    cfg,
    model,
    rows: list[dict],
    *,
    sampler: str = "none",
    sidecar: str = "absent",
    start: int = 0,
    table_bytes: float | None = None,
) -> TeacherFacts:
    """The facts of a training run (`cfg` a TrainConfig; `start` the epochs already done).
    `table_bytes` overrides the exact table's size of `rows`, e.g. bake's bound before
    the rows exist."""
    if table_bytes is None:
        vocab = base_of(model).get_output_embeddings().weight.shape[0]
        table_bytes = exact_table_bytes(rows, vocab, cfg.max_traj_len)
    return TeacherFacts(
        flag=cfg.teacher_cache,
        sampler=sampler,
        table_bytes=table_bytes,
        budget_bytes=cfg.teacher_cache_max_gb * 1e9,
        sidecar=sidecar,
        needed=cfg.on_policy < 1 and start < cfg.num_epochs,
    )


def teacher_table(
    plan: TeacherPlan,
    model,
    rows: list[dict],
    pad: int,
    cfg,
    table: TeacherCache | None = None,
    log: Callable[[str], None] = print,
) -> TeacherCache | None:
    """The table the plan names: `table` as handed over (kept, sidecar), one built now
    (build, topk; `cfg` a TrainConfig), or None (every_step, none)."""
    source = plan.source
    if plan.keep or source == "sidecar":
        if table is not None:
            log(f"{plan.reason}: {len(table.logp)} rows")
            return table
        source = plan.fallback or "every_step"
        log(f"teacher: no table arrived from generation (a resumed run keeps none): {source}")
    if source in ("build", "topk"):
        if source == "build":
            log(plan.reason)
        return build_teacher_cache(
            model, rows, pad, mode="exact" if source == "build" else "topk",
            topk=cfg.teacher_topk, batch_size=cfg.batch_size, max_gen=cfg.max_traj_len,
            chunk_size=cfg.kl_chunk_size, prefix_reuse=cfg.prefix_reuse, log=log,
        )  # fmt: skip
    if source == "every_step":
        log(plan.reason)
    return None
