"""`promptbake eval` (promptbake.evaluation.eval): answers under base / prompted / baked /
re-prompted, pluggable scorers."""

import json

import pytest
from tiny import DATA, DATA_X0, make_adapter

from promptbake.cli import main
from promptbake.configs import EvalConfig
from promptbake.errors import UserError
from promptbake.evaluation import scorers
from promptbake.evaluation.eval import parse_modes, parse_scales, parse_scorers, plan_runs


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    d = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("run"), seed=2)
    (d / "summary.json").write_text(json.dumps({"prompt": DATA_X0}))  # what bake records
    return d


def test_parse_scorers_keeps_commas_inside_a_regex():
    assert [s.name for s in parse_scorers("marker:Zorblax")] == ["marker:Zorblax"]
    assert [s.name for s in parse_scorers("marker:a,b")] == ["marker:a,b"]
    names = [s.name for s in parse_scorers("marker:Zorblax, allcaps,math,mc:ABCD,lang:fr")]
    assert names == ["marker:Zorblax", "allcaps", "math", "mc:ABCD", "lang:fr"]
    with pytest.raises(UserError, match="unknown scorer"):
        parse_scorers("regex:x")


def test_scorer_kinds_are_read_from_the_registry(monkeypatch):
    help_text = EvalConfig.__dataclass_fields__["scorer"].metadata["help"]
    for kind in scorers.scorer_kinds():
        assert kind in scorers.SCORER_SPECS and kind in help_text
    # a kind registered in scorers.py is split out of a list with no other change
    shout = scorers.Scorer("shout", lambda text, ex: float(text.isupper()))
    monkeypatch.setitem(scorers._REGISTRY, "shout", (lambda arg: shout, "shout"))
    assert [s.name for s in parse_scorers("marker:a,b,shout")] == ["marker:a,b", "shout"]


def test_modes_and_scales():
    assert parse_modes(None, True) == ["base", "prompted", "baked", "re-prompted"]
    assert parse_modes(None, False) == ["base", "prompted"]
    with pytest.raises(UserError, match="need --adapter"):
        parse_modes("base,baked", False)
    with pytest.raises(UserError, match="unknown"):
        parse_modes("baked,cooked", True)
    assert parse_scales("0, 0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(UserError, match="numbers"):
        parse_scales("half")
    for text in ("inf", "0,nan", "1,-inf"):
        with pytest.raises(UserError, match="is not a finite number"):
            parse_scales(text)
    assert plan_runs(["base", "baked"], [1.0]) == [("base", "base", 1.0), ("baked", "baked", 1.0)]
    assert [r[0] for r in plan_runs(["prompted", "baked", "re-prompted"], [0.0, 1.5])] == [
        "prompted",
        "baked@0",
        "baked@1.5",
        "re-prompted@0",
        "re-prompted@1.5",
    ]


def test_eval_command_scores_every_mode(run, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["eval", "--adapter", str(run), "--questions", str(DATA / "identity_heldout.jsonl")]
    argv += ["--num_questions", "4", "--max_new_tokens", "6", "--out_dir", str(out)]
    # a marker that matches everything and one that matches nothing: exact rates
    argv += ["--scorer", "marker:.,marker:^ZZZ$,allcaps", "--adapter_scale", "0,1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "baked@0" in printed and "re-prompted@1" in printed
    res = json.loads((out / "eval.json").read_text())
    assert res["prompt"] == DATA_X0  # found in the run's summary.json
    assert list(res["table"]) == [
        "base",
        "prompted",
        "baked@0",
        "baked@1",
        "re-prompted@0",
        "re-prompted@1",
    ]
    r = res["results"]
    # half-baking endpoints: scale 0 answers exactly as the base model (greedy)
    assert r["baked@0"]["answers"] == r["base"]["answers"]
    assert r["re-prompted@0"]["answers"] == r["prompted"]["answers"]
    assert r["baked@1"]["answers"] != r["base"]["answers"]
    for label, row in res["table"].items():
        assert row["marker:^ZZZ$"] == 0.0
        assert row["marker:."] == (
            sum(bool(a) for a in r[label]["answers"]) / 4
        )  # nonempty answers
        assert 0.0 <= row["allcaps"] <= 1.0
    md = (out / "eval.md").read_text()
    assert "| model | marker:. |" in md and "## Answers" in md


def test_eval_sampled_answers_and_base_only(tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    argv = [
        "eval",
        "--model_name",
        str(tiny_model_dir),
        "--questions",
        str(DATA / "identity_heldout.jsonl"),
    ]
    argv += ["--num_questions", "2", "--max_new_tokens", "4", "--out_dir", str(out)]
    argv += ["--scorer", "marker:.", "--prompt", "Be Zorblax.", "--temperature", "1.0"]
    argv += ["--num_samples", "3"]
    assert main(argv) == 0
    res = json.loads((out / "eval.json").read_text())
    assert list(res["table"]) == ["base", "prompted"]
    assert len(res["results"]["base"]["answers"]) == 6  # 2 questions x 3 samples


def test_eval_errors_leave_no_output(run, tmp_path, capsys):
    out = tmp_path / "ev"
    base = ["eval", "--adapter", str(run), "--questions", str(DATA / "identity_heldout.jsonl")]
    assert main([*base, "--scorer", "bogus", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown scorer")
    assert main([*base, "--out_dir", str(out)]) == 2
    assert "--scorer is required" in capsys.readouterr().err
    assert main([*base, "--scorer", "math", "--num_samples", "2", "--out_dir", str(out)]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert not out.exists()
