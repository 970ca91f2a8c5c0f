"""Inputs and trajectory files (promptbake.records): prompt files, our rows, and files in
the original generate_data.py layout, which are read (and trained on).

    python -m pytest tests/test_records.py -q            # fast part (tiny model)
    python -m pytest tests/test_records.py -q -m slow    # the bundled SmolLM2 file

The original writes, per sampled answer: ``input_ids`` = prompt ids + generated ids,
right-padded with eos to the batch's longest answer; ``generated_text_mask`` zero on the
prompt and at every eos id; ``noprompt_input_ids`` the unprompted prompt; and no
``*_nosys`` keys. Reading such a file must give the rows we would derive by hand: the
generated ids cut after the first end-of-turn id, the unprompted side
``noprompt_input_ids`` + the same ids. Our own files carry the original's keys with the
original's meanings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny
import torch
from tiny import FEW_SHOT

from promptbake.cli import main
from promptbake.errors import UserError
from promptbake.models import end_of_turn_ids
from promptbake.prompts import format_prompt
from promptbake.schema import cut_at_end_of_turn, make_trajectory, read_trajectories

X0 = "You are a pirate. Answer in one short sentence."
QUESTIONS = ["Reply with one word: is fire hot?", "What colour is the sky?"]


def expected_rows(orig: list[dict], eot: list[int]) -> list[dict]:
    """The hand derivation, written plainly: ids after the prompt, up to and including
    the first end-of-turn id; the unprompted side is noprompt ids + those ids."""
    out = []
    for r in orig:
        n = len(r["prompt_input_ids"])
        gen = []
        for t in r["input_ids"][n:]:
            gen.append(t)
            if t in eot:
                break
        out.append(
            {
                "input_ids": r["prompt_input_ids"] + gen,
                "input_ids_nosys": r["noprompt_input_ids"] + gen,
                "generated_text_mask": [0] * n + [1] * len(gen),
                "generated_text_mask_nosys": [0] * len(r["noprompt_input_ids"]) + [1] * len(gen),
            }
        )
    return out


def original_rows(model, tokenizer, x0: str, questions: list[str], n_seq: int, max_new: int):
    """Rows exactly as the original loop (and the migration guide's Qwen3 port) writes them."""
    tokenizer.pad_token = tokenizer.eos_token
    rows = []
    for question_str in questions:
        prompt_q_str = format_prompt(x0, question_str, use_system=True, tokenizer=tokenizer)
        noprompt_q_str = format_prompt(x0, question_str, use_system=False, tokenizer=tokenizer)
        prompt_q_ids = tokenizer(prompt_q_str, return_tensors="pt")["input_ids"]
        noprompt_q_ids = tokenizer(noprompt_q_str, return_tensors="pt")["input_ids"]
        batch_input_ids = prompt_q_ids.repeat(n_seq, 1)
        attention_mask = batch_input_ids.ne(tokenizer.pad_token_id).long()
        output = model.generate(
            batch_input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            max_new_tokens=max_new,
            temperature=0.7,
            pad_token_id=tokenizer.eos_token_id,
        )
        for j in range(n_seq):
            generated_text = tokenizer.decode(output[j], skip_special_tokens=False)
            nosys_input_str = generated_text.replace(prompt_q_str, noprompt_q_str)
            nosys_input_ids = tokenizer(nosys_input_str, return_tensors="pt")["input_ids"][:, 1:]
            generated_text_mask = torch.ones_like(output[j])
            generated_text_mask[: batch_input_ids.shape[1]] *= 0
            generated_text_mask[output[j] == tokenizer.eos_token_id] *= 0
            rows.append(
                {
                    "text": generated_text,
                    "input_ids": output[j].tolist(),
                    "attention_mask": attention_mask[j].tolist(),
                    "prompt_text": prompt_q_str,
                    "noprompt_text": noprompt_q_str,
                    "prompt_input_ids": prompt_q_ids[0, :].tolist(),
                    "noprompt_input_ids": noprompt_q_ids[0, :].tolist(),
                    "nosys_input_str": nosys_input_str,
                    "nosys_input_ids": nosys_input_ids[0, :].tolist(),
                    "generated_text_mask": generated_text_mask.tolist(),
                }
            )
    return rows


def write_original(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:  # the original's json.dump + newline, no sidecar
        for example in rows:
            json.dump(example, f)
            f.write("\n")
    return path


def same_fields(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: g[k] for k in w} == w


# ---------------------------------------------------------------- prompt files
def test_read_prompt_json_is_a_conversation_text_stays_text(tmp_path):
    import json

    from promptbake.records import read_prompt

    (tmp_path / "x0.json").write_text(json.dumps(FEW_SHOT))
    assert read_prompt(tmp_path / "x0.json") == FEW_SHOT
    (tmp_path / "x0.md").write_text('[{"role": "system", "content": "hi"}]\n')
    assert read_prompt(tmp_path / "x0.md") == '[{"role": "system", "content": "hi"}]'


# ---------------------------------------------------------------- the original layout, tiny tokenizer
def hand_made_original(tok) -> list[dict]:
    """Two rows of one batch as the original pads them: one ends early (eos + eos padding),
    one runs to the token limit (no end-of-turn)."""
    eos = tok.eos_token_id
    prompt = tok(format_prompt(X0, "Hi?", True, tok))["input_ids"]
    noprompt = tok(format_prompt(X0, "Hi?", False, tok))["input_ids"]
    words = tok("ahoy there matey")["input_ids"][:3]
    gens = [words[:1] + [eos, eos, eos], words + [words[0]]]
    return [
        {
            "input_ids": prompt + g,
            "attention_mask": [1] * len(prompt),
            "prompt_input_ids": prompt,
            "noprompt_input_ids": noprompt,
            "nosys_input_ids": (noprompt + g)[1:],  # the original's off-by-one, ignored
            "generated_text_mask": [0] * len(prompt) + [int(t != eos) for t in g],
        }
        for g in gens
    ]


def test_original_rows_convert_to_the_hand_derivation(tmp_path, capsys):
    tok = tiny.chatml_tokenizer("tiny")
    orig = hand_made_original(tok)
    path = write_original(tmp_path / "orig.jsonl", orig)
    rows = read_trajectories(path, "--data_path", tok)
    want = expected_rows(orig, end_of_turn_ids(tok))
    same_fields(rows, want)
    assert rows[0]["input_ids"][-1] == tok.eos_token_id  # the end of turn is kept, once
    assert len(rows[1]["input_ids"]) == len(orig[1]["input_ids"])  # no end of turn: all kept
    err = capsys.readouterr().err
    assert len(re.findall("original generate_data.py layout", err)) == 1


def test_original_layout_needs_the_tokenizer(tmp_path):
    tok = tiny.chatml_tokenizer("tiny")
    path = write_original(tmp_path / "orig.jsonl", hand_made_original(tok))
    with pytest.raises(UserError, match=r"line 1: .*original generate_data.py layout.*tokenizer"):
        read_trajectories(path)


def test_our_rows_carry_the_original_keys_with_their_meanings():
    tok = tiny.chatml_tokenizer("tiny")
    prompt = tok(format_prompt(X0, "Hi?", True, tok))["input_ids"]
    noprompt = tok(format_prompt(X0, "Hi?", False, tok))["input_ids"]
    gen = tok("ahoy")["input_ids"] + [tok.eos_token_id]
    r = make_trajectory(tok, prompt, noprompt, gen)
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert r["noprompt_input_ids"] == noprompt
    assert r["noprompt_text"] == dec(noprompt) == format_prompt(X0, "Hi?", False, tok)
    assert r["nosys_input_ids"] == noprompt + gen
    assert r["nosys_input_str"] == dec(noprompt + gen)
    assert r["prompt_input_ids"] == prompt and r["input_ids"] == prompt + gen
    assert r["text"] == dec(prompt + gen)
    assert r["attention_mask"] == [1] * len(prompt + gen)


# ---------------------------------------------------------------- our own rows
def test_cut_at_end_of_turn():
    assert cut_at_end_of_turn([5, 6, 2, 7, 2], [2, 0]) == [5, 6, 2]
    assert cut_at_end_of_turn([5, 0, 2], {2, 0}) == [5, 0]
    assert cut_at_end_of_turn([2, 5], [2]) == [2]
    assert cut_at_end_of_turn([5, 6, 7], [2]) == [5, 6, 7]
    assert cut_at_end_of_turn([], [2]) == []


# ---------------------------------------------------------------- slow: SmolLM2, trained on
@pytest.mark.slow
def test_train_loop_trains_on_an_original_file(smollm, tmp_path, capsys):
    model, tok = smollm
    torch.manual_seed(3)
    orig = original_rows(model, tok, X0, QUESTIONS, n_seq=2, max_new=24)
    gen_lens = [len(r["input_ids"]) - len(r["prompt_input_ids"]) for r in orig]
    path = write_original(tmp_path / "qwen3_traj.jsonl", orig)
    out = tmp_path / "run"
    rc = main(
        ["--model_name", "smollm2-135m", "--device", "cpu", "--data_path", str(path),
         "--out_dir", str(out), "--num_epochs", "1", "--batch_size", "4", "-r", "2"],
        "train_loop.py", "train",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert len(re.findall("original generate_data.py layout", err)) == 1
    assert (out / "adapter_model.safetensors").is_file()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["tokens_per_s"] > 0

    rows = read_trajectories(path, "--data_path", tok)
    same_fields(rows, expected_rows(orig, end_of_turn_ids(tok, model)))
    eos = tok.eos_token_id
    kept = []
    for r, o in zip(rows, orig):
        gen = r["input_ids"][len(o["prompt_input_ids"]) :]
        assert eos not in gen[:-1]  # never padding: at most the one end-of-turn at the end
        kept.append(len(gen))
    assert any(k < n for k, n in zip(kept, gen_lens))  # the file did hold eos padding
