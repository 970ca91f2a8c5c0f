"""Where the teacher's targets come from (promptbake.training.targets): every combination of
the facts a run knows, with the plan it must give.

    python -m pytest tests/test_training_targets.py -q

The expected plans below are written out by hand from the rules in training/targets.py's
docstring, not computed:

* no table is needed (every batch on-policy, or no epoch left): ``none``;
* ``--teacher_cache off``: the teacher runs every step (``every_step``);
* ``--teacher_cache topk`` (the only way to an approximation): ``topk_kept`` when the
  sampler hands back top-k + tail (falling back to ``topk`` if nothing arrives), else
  ``topk``, a table built by a teacher pass;
* ``auto`` or ``exact``: an exact table. One that would not fit --teacher_cache_max_gb
  is never built: ``every_step`` (never top-k). One that fits is ``kept`` from a sampler
  with full log-probs (falling back to ``build`` if none arrives), else read from a
  ``sidecar`` that fits these rows, else built (``build``); a stale sidecar counts as
  none.
"""

import itertools
import math

import pytest

from promptbake.training.targets import TeacherFacts, plan_teacher, sidecar_keep

FITS = {"yes": (2e8, 4e9), "no": (5e9, 4e9)}  # (exact table bytes, --teacher_cache_max_gb bytes)

# --teacher_cache  sampler  fits  sidecar | needed: source, fallback | not needed
PLANS = """
auto   full  yes absent | kept build      | none
auto   full  yes fits   | kept build      | none
auto   full  yes stale  | kept build      | none
auto   full  no  absent | every_step -    | none
auto   full  no  fits   | every_step -    | none
auto   full  no  stale  | every_step -    | none
auto   topk  yes absent | build -         | none
auto   topk  yes fits   | sidecar -       | none
auto   topk  yes stale  | build -         | none
auto   topk  no  absent | every_step -    | none
auto   topk  no  fits   | every_step -    | none
auto   topk  no  stale  | every_step -    | none
auto   none  yes absent | build -         | none
auto   none  yes fits   | sidecar -       | none
auto   none  yes stale  | build -         | none
auto   none  no  absent | every_step -    | none
auto   none  no  fits   | every_step -    | none
auto   none  no  stale  | every_step -    | none
exact  full  yes absent | kept build      | none
exact  full  yes fits   | kept build      | none
exact  full  yes stale  | kept build      | none
exact  full  no  absent | every_step -    | none
exact  full  no  fits   | every_step -    | none
exact  full  no  stale  | every_step -    | none
exact  topk  yes absent | build -         | none
exact  topk  yes fits   | sidecar -       | none
exact  topk  yes stale  | build -         | none
exact  topk  no  absent | every_step -    | none
exact  topk  no  fits   | every_step -    | none
exact  topk  no  stale  | every_step -    | none
exact  none  yes absent | build -         | none
exact  none  yes fits   | sidecar -       | none
exact  none  yes stale  | build -         | none
exact  none  no  absent | every_step -    | none
exact  none  no  fits   | every_step -    | none
exact  none  no  stale  | every_step -    | none
off    full  yes absent | every_step -    | none
off    full  yes fits   | every_step -    | none
off    full  yes stale  | every_step -    | none
off    full  no  absent | every_step -    | none
off    full  no  fits   | every_step -    | none
off    full  no  stale  | every_step -    | none
off    topk  yes absent | every_step -    | none
off    topk  yes fits   | every_step -    | none
off    topk  yes stale  | every_step -    | none
off    topk  no  absent | every_step -    | none
off    topk  no  fits   | every_step -    | none
off    topk  no  stale  | every_step -    | none
off    none  yes absent | every_step -    | none
off    none  yes fits   | every_step -    | none
off    none  yes stale  | every_step -    | none
off    none  no  absent | every_step -    | none
off    none  no  fits   | every_step -    | none
off    none  no  stale  | every_step -    | none
topk   full  yes absent | topk -          | none
topk   full  yes fits   | topk -          | none
topk   full  yes stale  | topk -          | none
topk   full  no  absent | topk -          | none
topk   full  no  fits   | topk -          | none
topk   full  no  stale  | topk -          | none
topk   topk  yes absent | topk_kept topk  | none
topk   topk  yes fits   | topk_kept topk  | none
topk   topk  yes stale  | topk_kept topk  | none
topk   topk  no  absent | topk_kept topk  | none
topk   topk  no  fits   | topk_kept topk  | none
topk   topk  no  stale  | topk_kept topk  | none
topk   none  yes absent | topk -          | none
topk   none  yes fits   | topk -          | none
topk   none  yes stale  | topk -          | none
topk   none  no  absent | topk -          | none
topk   none  no  fits   | topk -          | none
topk   none  no  stale  | topk -          | none
"""
ROWS = [line.replace("|", " ").split() for line in PLANS.strip().splitlines()]
# every combination once (a check of the table itself, at import: not a test of the product)
assert sorted(tuple(r[:4]) for r in ROWS) == sorted(
    itertools.product(("auto", "exact", "off", "topk"), ("full", "topk", "none"), FITS,
                      ("absent", "fits", "stale"))
)  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "sampler", "fits", "sidecar", "source", "fallback", "not_needed"),
    ROWS,
    ids=["-".join(r[:4]) for r in ROWS],
)
def test_plan(flag, sampler, fits, sidecar, source, fallback, not_needed):
    table, budget = FITS[fits]
    facts = dict(flag=flag, sampler=sampler, table_bytes=table, budget_bytes=budget)
    plan = plan_teacher(TeacherFacts(**facts, sidecar=sidecar, needed=True))
    assert (plan.source, plan.fallback) == (source, None if fallback == "-" else fallback)
    # generation keeps the sampler's log-probs exactly when the plan is a kept one
    assert plan.keep == (source in ("kept", "topk_kept"))
    assert plan.keep_bytes == (math.inf if plan.keep else 0.0)
    assert plan.reason
    idle = plan_teacher(TeacherFacts(**facts, sidecar=sidecar, needed=False))
    assert (idle.source, idle.keep) == (not_needed, False)


@pytest.mark.parametrize(
    ("save", "max_gb", "sampler", "keep"),
    [
        # --save_teacher_cache, its max GB, the sampler: bytes generate_data.py keeps
        ("never", 2.0, "full", 0.0),
        ("auto", 2.0, "full", 2e9),
        ("always", 2.0, "full", math.inf),
        ("auto", 2.0, "topk", 0.0),
        ("always", 2.0, "none", 0.0),
    ],
)
def test_sidecar_keep_budget(save, max_gb, sampler, keep):
    assert sidecar_keep(save, max_gb, sampler) == keep


def test_facts_outside_the_choices_are_refused():
    for bad in (dict(flag="fast"), dict(sampler="vllm"), dict(sidecar="old")):
        with pytest.raises(ValueError):
            TeacherFacts(**bad)
