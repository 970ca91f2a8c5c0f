"""`promptbake merge`: a merged full model that plain from_pretrained loads, tokenizer included."""

import copy
import os
import stat

import pytest
import torch
from tiny import IDS, logits, make_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from promptbake.adapters import attach_adapter
from promptbake.cli import main
from promptbake.models import load_model
from promptbake.prompts import format_prompt


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


def test_merge_refuses_a_directory_it_did_not_write_even_with_config_json(adapter, tmp_path):
    """A project folder holding a config.json (any model, or none) used to be wiped."""
    out = tmp_path / "project"
    out.mkdir()
    files = {"config.json": '{"mine": true}', "notes.md": "keep", "model.safetensors": "x"}
    for name, text in files.items():
        (out / name).write_text(text)
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temp leftovers


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_merged_files_follow_the_umask_and_carry_the_marker(adapter, tmp_path, umask):
    out = tmp_path / "merged"
    old = os.umask(umask)
    try:
        assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert (out / ".promptbake-merged").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert any(f.name.endswith(".safetensors") for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
