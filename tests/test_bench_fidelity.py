"""The fidelity benchmark's bookkeeping, on fake results (no model):

    python -m pytest tests/test_bench_fidelity.py -q

Reading a method at the time budget, the KL ratio and behaviour share, the table and
target verdicts, the README section, the plot, method flags and the question splits.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`

from bench import fidelity  # noqa: E402
from bench import fidelity_report as report  # noqa: E402
from promptbake.errors import UserError  # noqa: E402


def curve(points):
    """[(t, kl, val_kl)] -> curve records, epoch 0 first."""
    return [{"epoch": i, "t": t, "kl": kl, "val_kl": v} for i, (t, kl, v) in enumerate(points)]


def fake_results():
    paper = curve([(10, 0.5, 0.6), (20, 0.2, 0.3), (30, 0.1, 0.15), (40, 0.12, 0.2)])
    ours = curve([(10, 0.5, 0.6), (25, 0.06, 0.1), (38, 0.03, 0.05), (55, 0.01, 0.01)])
    tasks = {
        "persona": {
            "scorer": "marker:Zorblax",
            "kl_base": 0.5,
            "behaviour": {"base": 0.0, "prompted": 0.8},
            "methods": {
                "paper": {
                    "flags": {"num_epochs": 3},
                    "budget_s": 40.0,
                    "total_s": 41.0,
                    "curve": paper,
                    "read": {**report.read_at(paper, 40.0), "baked": 0.6},
                },
                "ours": {
                    "flags": {"learning_rate": 0.002},
                    "budget_s": 40.0,
                    "total_s": 56.0,
                    "curve": ours,
                    "read": {**report.read_at(ours, 40.0), "baked": 0.8},
                },
            },
        }
    }
    return {
        "machine": "test-box",
        "quick": False,
        "date": "2026-01-01 00:00",
        "torch": "x",
        "threads": 2,
        "loadavg_before": [0.1],
        "loadavg_after": [0.2],
        "seconds": 123.0,
        "sizes": fidelity.Sizes().__dict__,
        "methods": {"paper": {"num_epochs": 3}, "ours": {"learning_rate": 0.002}},
        "tasks": tasks,
    }


def test_read_at_keeps_best_validation_epoch_within_budget():
    c = curve([(10, 0.5, 0.6), (20, 0.2, 0.3), (30, 0.1, 0.15), (40, 0.12, 0.2), (50, 0.0, 0.0)])
    assert report.read_at(c, 40.0)["epoch"] == 2  # epoch 3 is worse on validation
    assert report.read_at(c, 49.0)["epoch"] == 2
    assert report.read_at(c, 48.0, slack=0.05)["epoch"] == 4  # 50 <= 48 * 1.05
    assert report.read_at(c, 5.0)["epoch"] == 0  # nothing finished: the unbaked model
    no_val = [{**p, "val_kl": None} for p in c]
    assert report.read_at(no_val, 40.0)["epoch"] == 3  # no validation: the last epoch


def test_rows_ratios_and_targets():
    res = fake_results()
    rows = {m: r for _, m, r in report.rows(res)}
    assert rows["paper"]["epoch"] == 2 and rows["ours"]["epoch"] == 2
    assert rows["paper"]["kl_ratio"] == pytest.approx(0.1 / 0.5)
    assert rows["ours"]["kl_ratio"] == pytest.approx(0.03 / 0.5)
    assert rows["paper"]["share"] == pytest.approx(0.6 / 0.8)
    assert (rows["paper"]["kl_ok"], rows["paper"]["behaviour_ok"]) == (False, False)
    assert (rows["ours"]["kl_ok"], rows["ours"]["behaviour_ok"]) == (True, True)
    assert not report.targets_met(res, "paper") and report.targets_met(res, "ours")
    assert not report.targets_met(res, "nonexistent")


def test_behaviour_share_edge_cases():
    assert report.behaviour_share(0.0, 0.0) == 1.0
    assert report.behaviour_share(0.5, 0.0) == float("inf")
    assert report.behaviour_share(0.3, 0.6) == pytest.approx(0.5)


def test_table_and_description():
    res = fake_results()
    text = report.table(res)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].startswith("bake")
    assert "0.200 MISS" in lines[1] and "75% MISS" in lines[1] and "30 / 40 / 41" in lines[1]
    assert "0.060 ok" in lines[2] and "100% ok" in lines[2] and "0.00 / 0.80 / 0.80" in lines[2]
    md = report.describe(res)
    assert "| persona | ours | 0.060 ok |" in md
    assert "`ours` meets both targets" in md and "`paper` misses a target" in md
    json.dumps(res)  # the results are plain JSON


def test_write_readme_replaces_only_the_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{report.README_START}\nold\n{report.README_END}\ntail\n")
    report.write_readme(readme, ["new 1\n", "new 2\n"])
    assert readme.read_text() == (
        f"head\n{report.README_START}\nnew 1\n\nnew 2\n{report.README_END}\ntail\n"
    )
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    report.write_readme(plain, ["x"])
    assert plain.read_text() == "no markers\n"


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "kl.png"
    report.plot(fake_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_are_bake_flags():
    methods = fidelity.default_methods()
    assert list(methods)[0] == "paper" and methods["paper"]["learning_rate"] == 1e-3
    fidelity.check_methods(methods)
    with pytest.raises(UserError, match="no_such_flag"):
        fidelity.check_methods({"x": {"no_such_flag": 1}})
    with pytest.raises(UserError, match="out_dir"):
        fidelity.check_methods({"x": {"out_dir": "elsewhere"}})
    assert fidelity.parse_method('a={"learning_rate": 0.01}') == ("a", {"learning_rate": 0.01})
    for bad in ["a", "a=[1]", "a={bad json", '={"r": 4}']:
        with pytest.raises(UserError):
            fidelity.parse_method(bad)


@pytest.mark.parametrize("name", list(fidelity.TASKS))
def test_tasks_held_out_questions_are_disjoint(name):
    task = fidelity.TASKS[name]
    train, heldout = fidelity.task_questions(task, fidelity.FULL)
    assert len(train) == fidelity.FULL.n_train_q and len(heldout) == fidelity.FULL.n_heldout_q
    every_train = {q["question"] for q in fidelity.select(task, task.train, task.train_slice)}
    assert not every_train & {q["question"] for q in heldout}
    if task.scorer == "math":  # every held-out question has a gold answer
        assert all(q["answer"].startswith("####") for q in heldout)


def test_overlapping_split_is_refused():
    t = fidelity.TASKS["cot"]
    leaky = fidelity.Task(**{**t.__dict__, "heldout_slice": (25, 45)})
    with pytest.raises(UserError, match="held-out questions also in training"):
        fidelity.task_questions(leaky, fidelity.FULL)
