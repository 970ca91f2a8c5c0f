"""`promptbake merge`: a merged full model that plain from_pretrained loads, tokenizer included."""

import copy

import pytest
import torch
from test_adapters import IDS, logits, make_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from promptbake.adapters import attach_adapter
from promptbake.chat import format_prompt
from promptbake.cli import main
from promptbake.models import load_model


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=3)


def test_merged_logits_equal_base_plus_adapter(tiny_model_dir, adapter, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--device", "cpu"]) == 0

    base, tok = load_model(str(tiny_model_dir), "cpu", "float32")
    peft = attach_adapter(copy.deepcopy(base), adapter).eval()
    want = logits(peft, IDS)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got = logits(merged, IDS)
    assert (want - logits(base, IDS)).abs().max() > 1e-3  # merging changed the weights
    assert (got - want).abs().max() < 1e-4

    mtok = AutoTokenizer.from_pretrained(out)
    q = "What is your name?"
    assert format_prompt("Be brief.", q, tokenizer=mtok) == format_prompt(
        "Be brief.", q, tokenizer=tok
    )
    assert mtok("hello world")["input_ids"] == tok("hello world")["input_ids"]

    # merging again replaces the directory; scale 0 writes the base model back
    assert (
        main(["merge", "--adapter", str(adapter), "--out", str(out), "--adapter_scale", "0"]) == 0
    )
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(again, IDS), logits(base, IDS), atol=1e-6, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_merge_refuses_to_overwrite_a_non_model_directory(adapter, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "not a model" in err[0]
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
