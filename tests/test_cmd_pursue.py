"""`promptbake pursue`: two rounds of prompt pursuit on the tiny Qwen3."""

import json

import pytest
from tiny import DATA

from promptbake.adapters import CHAIN_FILE, load_adapter
from promptbake.cli import main
from promptbake.models import load_model
from promptbake.pursue import cross_model_kl
from promptbake.schema import read_trajectories


@pytest.fixture(scope="module")
def pursuit(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pursuit")
    heldout = out.parent / "heldout.jsonl"  # 3 questions: answering is not what is tested here
    heldout.write_text("".join((DATA / "identity_heldout.jsonl").read_text().splitlines(True)[:3]))
    argv = ["pursue", "--rounds", "2", "--model_name", str(tiny_model_dir), "--device", "cpu"]
    argv += ["--x0_file", str(DATA / "zorblax_x0.md")]
    argv += ["--question_dataset", str(DATA / "identity_train.jsonl")]
    argv += ["--heldout", str(heldout), "--marker", "Zorblax"]
    argv += ["--num_questions", "4", "--num_sequences_per_question", "2", "--val_fraction", "0.25"]
    argv += ["--max_sequence_length", "6", "--num_epochs", "1", "--batch_size", "4"]
    argv += ["--answer_tokens", "3", "--out_dir", str(out)]
    assert main(argv) == 0
    return out


def test_two_rounds_are_written(pursuit):
    res = json.loads((pursuit / "pursuit.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2]
    for k in (1, 2):
        d = pursuit / f"round_{k}"
        for name in ("adapter_model.safetensors", "metrics.jsonl", "trajectories_train.jsonl"):
            assert (d / name).is_file(), f"round_{k}/{name}"
        assert json.loads((d / "pursuit_round.json").read_text())["round"] == k
    assert (pursuit / "round_1" / "report.md").is_file()  # round 1 is a normal bake
    assert not (pursuit / "round_1" / CHAIN_FILE).exists()
    chain = json.loads((pursuit / "round_2" / CHAIN_FILE).read_text())
    assert chain["merge_first"] == ["../round_1"]
    # round 2 sampled its own trajectories from the round-1 model
    t1 = read_trajectories(pursuit / "round_1" / "trajectories_train.jsonl")
    t2 = read_trajectories(pursuit / "round_2" / "trajectories_train.jsonl")
    assert len(t1) == len(t2) == 6
    assert [r["input_ids"] for r in t1] != [r["input_ids"] for r in t2]

    r0, r1, r2 = res["rounds"]
    # round 1's teacher IS the original prompted model: the two KLs coincide
    assert r1["kl_to_original"] == pytest.approx(r1["kl_to_teacher"]["kl_baked"], rel=1e-4)
    assert r0["kl_to_original"] == pytest.approx(r1["kl_to_teacher"]["kl_base"], rel=1e-4)
    assert r2["kl_to_teacher"]["kl_base"] > 0 and r2["kl_to_original"] > 0
    for r in res["rounds"]:
        assert set(r["marker"]) == {"no_prompt", "with_prompt"}
    md = (pursuit / "pursuit.md").read_text()
    assert md.count("\n| 0 | base |") == 1 and "| 2 | round 2 |" in md


def test_round_adapter_loads_as_the_whole_stack(pursuit, tiny_model_dir):
    """`--adapter round_2` merges round 1 first: the loaded stack reproduces the reported KL."""
    res = json.loads((pursuit / "pursuit.json").read_text())
    model, tok, name = load_adapter(pursuit / "round_2", device="cpu", dtype="float32")
    assert name == str(tiny_model_dir)
    base, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    rows = read_trajectories(pursuit / "round_1" / "trajectories_val.jsonl")
    kl = cross_model_kl(base, model, tok, rows)
    assert kl == pytest.approx(res["rounds"][2]["kl_to_original"], rel=1e-4)
