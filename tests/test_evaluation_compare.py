"""`promptbake compare` (promptbake.evaluation.compare): per-trajectory NLL under base/baked x
with/without the prompt.

    python -m pytest tests/test_evaluation_compare.py -q
"""

import copy
import json

import pytest
import tiny
import torch
import torch.nn.functional as F
from tiny import DATA_X0

from promptbake.adapters import load_adapter, set_adapter_scale
from promptbake.cli import main
from promptbake.configs import CompareConfig, TrainConfig
from promptbake.errors import UserError
from promptbake.evaluation.compare import compare, override_prompt, trajectory_nll
from promptbake.models import load_model
from promptbake.schema import read_trajectories
from promptbake.training.loop import train


def reference_nll(model, rec, nosys):
    """-sum log p(generated tokens) from the full logits of one unpadded sequence."""
    sfx = "_nosys" if nosys else ""
    ids = torch.tensor([rec["input_ids" + sfx]])
    mask = torch.tensor(rec["generated_text_mask" + sfx], dtype=torch.bool)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = mask.nonzero()[:, 0]  # generated token positions; predicted by row p - 1
    return float(-logp[pos - 1, ids[0, pos]].sum())


def test_nll_matches_full_logit_reference(baked_run):
    model, tok, _ = load_adapter(baked_run, device="cpu", dtype="float32")
    rows = read_trajectories(baked_run / "trajectories_val.jsonl")
    scores = trajectory_nll(model, tok, rows, batch_size=4, chunk_size=5)  # padded, chunked
    base = model.get_base_model()
    for i, rec in enumerate(rows):
        assert scores["base"]["tokens"][i] == sum(rec["generated_text_mask"])
        with model.disable_adapter():
            want_base = reference_nll(base, rec, nosys=True)
            want_prompted = reference_nll(base, rec, nosys=False)
        assert scores["base"]["nll"][i] == pytest.approx(want_base, rel=1e-4, abs=1e-4)
        assert scores["prompted"]["nll"][i] == pytest.approx(want_prompted, rel=1e-4, abs=1e-4)
        assert scores["baked"]["nll"][i] == pytest.approx(
            reference_nll(model, rec, nosys=True), rel=1e-4, abs=1e-4
        )
    # the adapter really changes the scores, and scale 0 removes it exactly
    assert scores["baked"]["nll"] != scores["base"]["nll"]
    set_adapter_scale(model, 0.0)
    zero = trajectory_nll(model, tok, rows, batch_size=4)
    assert zero["baked"]["nll"] == pytest.approx(zero["base"]["nll"], abs=1e-5)
    assert zero["re-prompted"]["nll"] == pytest.approx(zero["prompted"]["nll"], abs=1e-5)


def test_prompt_override_rerenders_from_the_question(baked_run, tiny_model_dir):
    _, tok = load_model(str(tiny_model_dir), "cpu", "float32")
    rows = read_trajectories(baked_run / "trajectories_val.jsonl")
    same = override_prompt(rows, tok, DATA_X0)
    for a, b in zip(rows, same):  # the original prompt re-rendered: identical ids
        assert a["input_ids"] == b["input_ids"]
        assert a["input_ids_nosys"] == b["input_ids_nosys"]
    other = override_prompt(rows, tok, "You are a pirate. Say arr.")
    for a, b in zip(rows, other):
        assert b["input_ids"] != a["input_ids"]
        gen = [t for t, m in zip(a["input_ids"], a["generated_text_mask"]) if m]
        assert b["input_ids"][-len(gen) :] == gen  # same tokens scored
        assert "pirate" in b["prompt_text"]
    with pytest.raises(UserError, match="question"):
        override_prompt([{k: v for k, v in rows[0].items() if k != "question"}], tok, "x")


def test_compare_command_writes_table_json_and_plots(baked_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(["compare", "--adapter", str(baked_run), "--out_dir", str(out), "--batch_size", "4"])
        == 0
    )
    text = capsys.readouterr().out
    assert "re-prompted" in text and "bake fidelity" in text
    res = json.loads((out / "compare.json").read_text())
    assert res["num_trajectories"] == 6
    assert set(res["summary"]) == {"base", "prompted", "baked", "re-prompted"}
    t = res["trajectories"][0]
    assert t["baked"] != t["base"] and t["tokens"] > 0
    assert res["heldout_kl"]["kl_base"] > 0
    assert len(list(out.glob("nll_*_vs_*.png"))) == 6
    assert "| condition |" in (out / "compare.md").read_text()

    # --prompt_override + --path_prefix: the base (no prompt) column cannot change
    (tmp_path / "pirate.md").write_text("You are a pirate. Say arr.")
    assert (
        main(
            [
                "compare",
                "--adapter",
                str(baked_run),
                "--out_dir",
                str(out),
                "--prompt_override",
                str(tmp_path / "pirate.md"),
                "--path_prefix",
                "pirate_",
                "--plot",
                "false",
            ]
        )
        == 0
    )
    res2 = json.loads((out / "pirate_compare.json").read_text())
    assert res2["prompt_override"].startswith("You are a pirate")
    for a, b in zip(res["trajectories"], res2["trajectories"]):
        assert b["base"] == pytest.approx(a["base"], abs=1e-4)
        assert b["prompted"] != pytest.approx(a["prompted"], abs=1e-4)


def test_compare_errors_are_one_line(baked_run, tmp_path, capsys):
    assert (
        main(["compare", "--adapter", str(baked_run), "--data_file", str(tmp_path / "no.jsonl")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data_file")
    assert main(["compare", "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_baking_moves_unprompted_nll_towards_prompted(smollm, tmp_path):
    """On the bundled model, after a short bake the baked model WITHOUT the prompt scores the
    prompted model's samples closer to how the prompted model does than the base model does."""
    model, tok = copy.deepcopy(smollm[0]), smollm[1]
    model.name_or_path = "smollm2-135m"
    rows = tiny.sample_heldout(
        model, tok, tmp_path / "traj.jsonl", n_questions=3, n_seq=2, max_len=10
    )
    cfg = TrainConfig(
        model_name="smollm2-135m",
        data_path=str(tmp_path / "traj.jsonl"),
        out_dir=str(tmp_path / "run"),
        num_epochs=3,
        batch_size=6,
        learning_rate=5e-3,
        r=8,
        lora_alpha=16.0,
        save_every=0,
        plot=False,
    )
    peft, _ = train(cfg, model, tok, rows, None, echo=False)
    peft.eval()
    res = compare(
        CompareConfig(adapter=str(tmp_path / "run"), data_file=str(tmp_path / "traj.jsonl")),
        model=peft,
        tokenizer=tok,
    )
    s = res["summary"]
    assert s["baked"]["mean_abs_diff_to_prompted"] < s["base"]["mean_abs_diff_to_prompted"]
    assert s["baked"]["nll_per_traj"] < s["base"]["nll_per_traj"]
    assert res["heldout_kl"]["kl_baked"] < res["heldout_kl"]["kl_base"]
