"""The fidelity benchmark's bookkeeping, on fake results (no model):

    python -m pytest tests/test_bench_fidelity.py -q

Reading a method at the time budget, the spread over seeds, KL ratio, top-1 agreement and
behaviour share, the table and target verdicts, the README sections, the plot, method
flags, the question splits, training budgets and the screen's variants and table.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`

from bench import fidelity  # noqa: E402
from bench import fidelity_report as report  # noqa: E402
from bench import fidelity_tasks as ftasks  # noqa: E402
from promptbake.errors import UserError  # noqa: E402


def curve(points):
    """[(t, kl, val_kl)] -> curve records, epoch 0 first."""
    return [
        {"epoch": i, "t": t, "kl": kl, "top1": 1 - kl, "val_kl": v}
        for i, (t, kl, v) in enumerate(points)
    ]


def run(c, seed, baked, budget=40.0, total=41.0):
    return {
        "seed": seed,
        "budget_s": budget,
        "total_s": total,
        "curve": c,
        "read": {**report.read_at(c, budget), "baked": baked},
    }


def fake_results():
    paper = curve([(10, 0.5, 0.6), (20, 0.2, 0.3), (30, 0.1, 0.15), (40, 0.12, 0.2)])
    paper2 = curve([(10, 0.5, 0.6), (20, 0.2, 0.3), (30, 0.14, 0.15), (40, 0.12, 0.2)])
    ours = curve([(10, 0.5, 0.6), (25, 0.06, 0.1), (38, 0.03, 0.05), (55, 0.01, 0.01)])
    ours2 = curve([(10, 0.5, 0.6), (25, 0.06, 0.1), (38, 0.02, 0.05), (55, 0.01, 0.01)])
    tasks = {
        "persona": {
            "scorer": "marker:Zorblax",
            "kl_base": 0.5,
            "top1_base": 0.5,
            "behaviour": {"base": 0.0, "prompted": 0.8},
            "methods": {
                "paper": {
                    "flags": {"num_epochs": 3},
                    "runs": [run(paper, 42, 0.6), run(paper2, 43, 0.4)],
                },
                "ours": {
                    "flags": {"learning_rate": 0.002},
                    "runs": [run(ours, 42, 0.8, total=56.0), run(ours2, 43, 0.8, total=56.0)],
                },
            },
        }
    }
    return {
        "machine": "test-box",
        "quick": False,
        "command": "python -m bench.fidelity --tasks persona --seeds 2",
        "date": "2026-01-01 00:00",
        "torch": "x",
        "threads": 2,
        "loadavg_before": [0.1],
        "loadavg_after": [0.2],
        "seconds": 123.0,
        "seeds": [42, 43],
        "sizes": ftasks.Sizes().__dict__,
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


def test_rows_ratios_spread_and_targets():
    res = fake_results()
    rows = {m: r for _, m, r in report.rows(res)}
    assert rows["paper"]["epochs"] == [2, 2] and rows["ours"]["epochs"] == [2, 2]
    ratio = rows["paper"]["kl_ratio"]
    assert ratio["mean"] == pytest.approx(0.12 / 0.5) and ratio["n"] == 2
    assert (ratio["min"], ratio["max"]) == (pytest.approx(0.2), pytest.approx(0.28))
    assert ratio["sd"] == pytest.approx(0.08 / 2**0.5)  # sample sd of two values
    assert rows["ours"]["kl_ratio"]["mean"] == pytest.approx(0.025 / 0.5)
    assert rows["paper"]["share"]["mean"] == pytest.approx(0.5 / 0.8)
    assert rows["paper"]["top1"]["mean"] == pytest.approx(1 - 0.12)
    assert (rows["paper"]["kl_ok"], rows["paper"]["behaviour_ok"]) == (False, False)
    assert (rows["ours"]["kl_ok"], rows["ours"]["behaviour_ok"]) == (True, True)
    assert not report.targets_met(res, "paper") and report.targets_met(res, "ours")
    assert not report.targets_met(res, "nonexistent")
    assert report.misses(res, "paper") == [
        "persona: KL ratio 0.240, +0.140 over 0.10",
        "persona: behaviour 62% of prompted, 32 points under 95%",
    ]
    assert report.misses(res, "ours") == []


def test_stats_and_spread():
    st = report.stats([0.2, 0.4, 0.3])
    assert st["mean"] == pytest.approx(0.3) and st["sd"] == pytest.approx(0.1)
    assert report.spread(st) == "0.300 ± 0.100 (0.200-0.400)"
    assert report.spread(report.stats([0.25])) == "0.250"  # one seed: no spread
    assert report.spread(report.stats([0.5, 1.0]), pct=True) == "75% ± 35% (50%-100%)"
    assert report.stats([1.0, float("inf")])["mean"] == float("inf")


def test_behaviour_share_edge_cases():
    assert report.behaviour_share(0.0, 0.0) == 1.0
    assert report.behaviour_share(0.5, 0.0) == float("inf")
    assert report.behaviour_share(0.3, 0.6) == pytest.approx(0.5)


def test_table_and_description():
    res = fake_results()
    text = report.table(res)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].startswith("bake")
    assert "0.240 ± 0.057 (0.200-0.280) MISS" in lines[1]
    assert "62% ± 18% (50%-75%) MISS" in lines[1] and "30 / 40 / 41" in lines[1]
    assert "0.500 -> 0.880" in lines[1]  # top-1 agreement: base -> baked
    assert "0.050 ± 0.014 (0.040-0.060) ok" in lines[2] and "0.00 / 0.80 / 0.80" in lines[2]
    md = report.describe(res)
    assert "| persona | ours | 0.050 ± 0.014 (0.040-0.060) ok |" in md
    assert "`ours` meets both targets" in md
    assert "`paper` misses a target on at least one bake: persona: KL ratio 0.240" in md
    assert "Seeds: 42, 43" in md and "`python -m bench.fidelity --tasks persona --seeds 2`" in md
    assert "**a note**" in report.describe({**res, "note": "a note"}) and "**" not in md
    json.dumps(res)  # the results are plain JSON


def test_write_readme_replaces_only_the_section(tmp_path):
    readme = tmp_path / "README.md"
    screen = (report.SCREEN_START, report.SCREEN_END)
    readme.write_text(
        f"head\n{report.README_START}\nold\n{report.README_END}\nmid\n"
        f"{screen[0]}\nold screen\n{screen[1]}\ntail\n"
    )
    report.write_readme(readme, ["new 1\n", "new 2\n"])
    report.write_readme(readme, ["screen\n"], screen)
    assert readme.read_text() == (
        f"head\n{report.README_START}\nnew 1\n\nnew 2\n{report.README_END}\nmid\n"
        f"{screen[0]}\nscreen\n{screen[1]}\ntail\n"
    )
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    report.write_readme(plain, ["x"])
    assert plain.read_text() == "no markers\n"


def test_readme_has_both_sections():
    text = fidelity.README.read_text()
    for marker in (report.README_START, report.README_END, report.SCREEN_START, report.SCREEN_END):
        assert text.count(marker) == 1, marker


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "kl.png"
    report.plot(fake_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_are_bake_flags():
    methods = ftasks.default_methods()
    assert list(methods)[0] == "paper" and methods["paper"]["learning_rate"] == 1e-3
    ftasks.check_methods(methods)
    with pytest.raises(UserError, match="no_such_flag"):
        ftasks.check_methods({"x": {"no_such_flag": 1}})
    with pytest.raises(UserError, match="out_dir"):
        ftasks.check_methods({"x": {"out_dir": "elsewhere"}})
    assert ftasks.parse_method('a={"learning_rate": 0.01}') == ("a", {"learning_rate": 0.01})
    for bad in ["a", "a=[1]", "a={bad json", '={"r": 4}']:
        with pytest.raises(UserError):
            ftasks.parse_method(bad)


def test_sizes_validate_on_four_questions_and_move_a_share_by_at_most_5_points():
    for sizes in (ftasks.FULL,):
        assert ftasks.n_validation(sizes) >= 4
        assert 1 / sizes.n_heldout_q <= 0.05 and sizes.n_heldout_q >= 20
    assert ftasks.n_validation(ftasks.FULL) == 4  # as bake.split_questions cuts them
    from promptbake.bake import split_questions

    qs = [{"question": str(i)} for i in range(ftasks.FULL.n_train_q)]
    _, val = split_questions(qs, ftasks.FULL.val_fraction)
    assert len(val) == ftasks.n_validation(ftasks.FULL)


@pytest.mark.parametrize("name", list(ftasks.TASKS))
def test_tasks_held_out_questions_are_disjoint(name):
    task = ftasks.TASKS[name]
    train, heldout = ftasks.task_questions(task, ftasks.FULL)
    assert len(train) == ftasks.FULL.n_train_q and len(heldout) == ftasks.FULL.n_heldout_q
    pool = ftasks.select(task, task.train, task.train_slice)

    def norm(q):
        return " ".join(q.lower().replace("?", " ").replace(".", " ").split())

    assert not {norm(q["question"]) for q in pool} & {norm(q["question"]) for q in heldout}
    assert len({q["question"] for q in heldout}) == len(heldout)  # no duplicates
    if task.scorer == "math":  # every held-out question has a gold answer
        assert all(q["answer"].startswith("####") for q in heldout)
    # other seeds pick other training questions from the same pool; held-out stays
    other, heldout2 = ftasks.task_questions(task, ftasks.FULL, seed=43)
    assert heldout2 == heldout and other != train


def test_overlapping_split_is_refused():
    t = ftasks.TASKS["cot"]
    leaky = ftasks.Task(**{**t.__dict__, "heldout_slice": (15, 45)})
    with pytest.raises(UserError, match="held-out questions also in training"):
        ftasks.task_questions(leaky, ftasks.FULL)


def test_rare_bake_is_a_name_in_a_longer_persona():
    task = ftasks.TASKS["rare"]
    assert task.scorer == "marker:Quibbleton"
    x0 = Path(fidelity.ROOT / task.x0_file).read_text()
    assert "Quibbleton" in x0 and len(x0.split()) > 20


def test_timed_bake_trains_for_what_is_left_of_the_total_time(tmp_path, monkeypatch):
    import promptbake.bake as bake_module

    task = ftasks.TASKS["persona"]
    cfg = fidelity.bake_config(
        task, ftasks.FULL, {"num_sequences_per_question": 16}, tmp_path / "q", tmp_path / "o"
    )
    assert cfg.num_sequences_per_question == 16  # a method may change the shared sizes
    assert cfg.val_fraction == ftasks.FULL.val_fraction and cfg.seed == 42
    assert fidelity.bake_config(task, ftasks.FULL, {}, "q", "o", seed=44).seed == 44
    now = [100.0]
    monkeypatch.setattr(fidelity, "clock", lambda: now[0])
    seen = []
    monkeypatch.setattr(
        bake_module, "train_stage", lambda c, *a, **k: seen.append(c.max_train_seconds)
    )

    before_training = [25.0]

    def fake_bake(c):  # load + generation take 25 s, then training
        now[0] += before_training[0]
        bake_module.train_stage(c)
        return {"ok": True}

    monkeypatch.setattr(bake_module, "bake", fake_bake)
    assert fidelity.timed_bake(cfg, 60.0) == {"ok": True}
    assert seen == [35.0] and cfg.max_train_seconds == 35.0
    before_training[0] = 100.0  # sampling alone took longer than the budget: one second
    fidelity.timed_bake(cfg, 60.0)
    assert seen[-1] == 1.0
    assert bake_module.train_stage is not fidelity.timed_bake  # restored after the bake
    cfg.max_train_seconds = 0.0
    fidelity.timed_bake(cfg, None)  # the paper's run: no budget
    assert seen[-1] == 0.0


def test_screen_variants_change_one_axis_of_ours():
    from bench import fidelity_screen as screen

    methods = screen.variants()
    ftasks.check_methods(methods)
    assert set(methods) == {
        "divergence:reverse_kl", "divergence:jsd0.5", "answers:n8", "answers:n16",
        "temperature:t1.5", "temperature:t2.0", "schedule:linear", "schedule:cosine",
        "on_policy:op0.25",
    }  # fmt: skip
    assert screen.changed(methods["divergence:jsd0.5"]) == "divergence=jsd, jsd_beta=0.5"
    assert screen.changed(methods["schedule:cosine"]) == "lr_schedule=cosine, warmup_steps=4"
    assert screen.changed(ftasks.OURS) == "-"
    assert list(screen.variants("schedule")) == ["schedule:linear", "schedule:cosine"]
    # single variants, an axis given twice counts once
    assert list(screen.variants("schedule:linear,divergence,schedule")) == [
        "schedule:linear", "divergence:reverse_kl", "divergence:jsd0.5", "schedule:cosine",
    ]  # fmt: skip
    with pytest.raises(UserError, match="--axes"):
        screen.variants("nope")
    args = fidelity.parse_args(["--screen", "--axes", "temperature", "--quick"])
    picked = fidelity.pick_methods(args)
    assert list(picked) == ["paper", "ours", "temperature:t1.5", "temperature:t2.0"]
    assert all(m["num_epochs"] <= 2 for m in picked.values())
    with pytest.raises(UserError, match="--screen"):
        fidelity.pick_methods(fidelity.parse_args(["--axes", "temperature"]))


def test_screen_table():
    from bench import fidelity_screen as screen

    res = fake_results()
    res["methods"]["ours"] = dict(ftasks.OURS)
    res["methods"]["paper"] = ftasks.default_methods()["paper"]
    text = screen.describe(res)
    assert "### screen: test-box" in text
    line = next(x for x in text.splitlines() if x.startswith("| ours |"))
    assert (
        "| - | 0.050±0.014 / 0.975 / 100% | 0.050 / 0.975 / 100% | +0.000 / +0.000 / +0 pts |"
        in line
    )
    line = next(x for x in text.splitlines() if x.startswith("| paper |"))
    assert "0.240±0.057 / 0.880 / 62%" in line and "+0.190 / -0.095 / -38 pts" in line


def test_validation_picks():
    res = fake_results()
    v = report.validation_picks(res)
    # paper seed 42: read epoch 2 (kl 0.1) is the held-out best by 40 s; seed 43 too
    # (0.14 < 0.2 and 0.12 at 40 s: epoch 3 is best on held-out, validation picked 2)
    assert v["runs"] == 4 and v["best_picked"] == 3
    assert v["ratio_lost"] == pytest.approx((0.14 - 0.12) / 0.5 / 4)
    assert v["top1_lost"] == pytest.approx(0.02 / 4)
    text = report.describe(res)
    assert (
        "(validation questions per bake: 4) picked the epoch with the best held-out KL in 3 of 4"
        in text
    )
    # --read_only: a run whose curve has unscored epochs by T is left out, not misread
    first = res["tasks"]["persona"]["methods"]["paper"]["runs"][0]
    del next(p for p in first["curve"] if p["epoch"] == 1)["kl"]
    assert report.validation_picks(res)["runs"] == 3


def test_merge_results_of_side_by_side_runs():
    a, b = fake_results(), fake_results()
    b["tasks"] = {"rare": b["tasks"].pop("persona")}
    b["command"], b["seconds"] = "python -m bench.fidelity --tasks rare", 900.0
    merged = fidelity.merge_results([a, b])
    assert list(merged["tasks"]) == [*a["tasks"], "rare"] and merged["seconds"] == 900.0
    b["methods"]["paper"] = {"num_epochs": 9}
    with pytest.raises(UserError, match="method 'paper' with other flags"):
        fidelity.merge_results([a, b])


def test_merge_results_adds_seeds_and_keeps_only_some_methods():
    a, b = fake_results(), fake_results()  # a: seeds 42, 43; b: seed 44, and a screen variant
    b["seeds"], b["command"] = [44], "python -m bench.fidelity --first_seed 44 --seeds 1"
    for m in b["tasks"]["persona"]["methods"].values():
        m["runs"] = [dict(m["runs"][0], seed=44)]
    b["methods"]["linear"] = {"lr_schedule": "linear"}
    b["tasks"]["persona"]["methods"]["linear"] = {"flags": {}, "runs": [{"seed": 44}]}
    merged = fidelity.merge_results([a, b], only=["paper", "ours"])
    assert merged["seeds"] == [42, 43, 44] and list(merged["methods"]) == ["paper", "ours"]
    runs = merged["tasks"]["persona"]["methods"]["ours"]["runs"]
    assert [r["seed"] for r in runs] == [42, 43, 44]
    assert set(merged["tasks"]["persona"]["methods"]) == {"paper", "ours"}
    assert report.rows(merged)[1][2]["kl_ratio"]["n"] == 3  # the table sees 3 seeds
    with pytest.raises(UserError, match="a seed is in two files"):
        fidelity.merge_results([a, a])
    b["tasks"]["persona"]["kl_base"] = 0.7
    with pytest.raises(UserError, match="evaluated differently"):
        fidelity.merge_results([a, b])
