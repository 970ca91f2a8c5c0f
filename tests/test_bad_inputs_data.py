"""Bad data inputs end in one ``error:`` line, exit 2, and leave nothing behind.

    python -m pytest tests/test_bad_inputs_data.py -q

Each case is a row: what the user gives, which command runs it (through
``promptbake.cli.main``, as generate_data.py / train_loop.py / ``promptbake`` do), and a
fragment the one error line must hold. The output location must not exist afterwards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import tiny
from tiny import BINARY, PIRATE_QUESTIONS, float_mask, negative_id, null_ids, write_rows

from promptbake.cli import main
from promptbake.guards import exclusive_lock
from promptbake.models import tokenizer_fingerprint


def one_error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [p for p in re.split(r"[\r\n]+", err) if p.strip() and not re.search(r"\d+%\|", p)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


# ---------------------------------------------------------------- the inputs


def padded_mask(r):  # the original's eos padding inside our layout: a 0 after the 1s
    for side in ("", "_nosys"):
        r[1]["input_ids" + side].append(0)
        r[1]["generated_text_mask" + side].append(0)


TRAJ_CASES = {
    # name: (edit the rows, generated ids per row, sidecar row count, message fragments)
    "negative id": (negative_id, 2, None, ["line 2", "input_ids", "integers >= 0"]),
    "null ids": (null_ids, 2, None, ["line 2", "input_ids_nosys"]),
    "non-integer mask": (float_mask, 2, None, ["line 2", "generated_text_mask", "0/1"]),
    "padding in our layout": (padded_mask, 2, None, ["line 2", "zeros after"]),
    "no generated tokens": (None, 0, None, ["none of its 2 trajectories", "generated token"]),
    "more rows than the sidecar": (None, 2, 1, ["holds 2", "records 1", "written twice"]),
}


@pytest.mark.parametrize("case", sorted(TRAJ_CASES))
def test_bad_trajectory_file_refused_by_train(case, tmp_path, tiny_model_dir, capsys):
    edit, n_gen, n_meta, fragments = TRAJ_CASES[case]
    tok = tiny.chatml_tokenizer("tiny")
    recs = tiny.small_rows(tok, n_gen)
    if edit:
        edit(recs)
    meta = None
    if n_meta is not None:
        meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tok), "num_trajectories": n_meta}
    data = write_rows(tmp_path / "t.jsonl", recs, meta)
    out = tmp_path / "run"
    argv = ["--model_name", str(tiny_model_dir), "--device", "cpu", "--data_path", str(data)]
    rc = main([*argv, "--out_dir", str(out), "--num_epochs", "1"], "train_loop.py", "train")
    line = one_error_line(capsys, rc)
    for frag in ["--data_path", str(data), *fragments]:
        assert frag in line, (frag, line)
    assert not out.exists()


# ---------------------------------------------------------------- prompts and question files

PROMPT_CASES = {
    # name: (x0 file name, its bytes, fragments)
    "binary x0 file": ("x0.md", BINARY, ["--x0_file", "not UTF-8"]),
    "latin-1 x0 file": ("x0.md", "Tu es un pirate, très poli.".encode("latin-1"), ["not UTF-8"]),
    "NUL bytes in x0 file": ("x0.md", b"be nice\x00\x00", ["NUL"]),
    "empty x0 file": ("x0.md", b"", ["empty"]),
    "whitespace x0 file": ("x0.md", b"  \n\t\n", ["empty"]),
    "x0 .json not JSON": ("x0.json", b"[{'role': 'system'}]", ["not valid JSON"]),
    "x0 .json not a list": ("x0.json", b'{"role": "system", "content": "hi"}', ["a list"]),
    "x0 .json empty list": ("x0.json", b"[]", ["a list"]),
    "x0 .json bad role": (
        "x0.json",
        b'[{"role": "tool", "content": "hi"}]',
        ["message 1", "'tool'", "system, user, assistant"],
    ),
    "x0 .json empty content": (
        "x0.json",
        b'[{"role": "system", "content": "hi"}, {"role": "user", "content": "  "}]',
        ["message 2", "non-empty string content"],
    ),
    "x0 .json content not a string": (
        "x0.json",
        b'[{"role": "system", "content": ["hi"]}]',
        ["message 1", "string content"],
    ),
    "x0 .json extra key": (
        "x0.json",
        b'[{"role": "system", "content": "hi", "name": "x"}]',
        ["message 1", "only role, content"],
    ),
}


def gen_argv(d: Path, model_dir, x0: Path, questions: Path) -> list[str]:
    return [
        "--model_name", str(model_dir), "--device", "cpu", "--x0_file", str(x0),
        "--question_dataset", str(questions), "--traj_out_file", str(d / "out" / "t.jsonl"),
        "--num_questions", "2", "--num_sequences_per_question", "1",
        "--max_sequence_length", "3", "--batch_size", "2",
    ]  # fmt: skip


def question_file(d: Path) -> Path:
    q = d / "q.jsonl"
    q.write_text("".join(json.dumps({"question": s}) + "\n" for s in PIRATE_QUESTIONS[:2]))
    return q


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_bad_x0_file_refused_by_generate(case, tmp_path, tiny_model_dir, capsys):
    name, content, fragments = PROMPT_CASES[case]
    x0 = tmp_path / name
    x0.write_bytes(content)
    argv = gen_argv(tmp_path, tiny_model_dir, x0, question_file(tmp_path))
    line = one_error_line(capsys, main(argv, "generate_data.py", "generate"))
    for frag in [str(x0), *fragments]:
        assert frag in line, (frag, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [BINARY, '{"question": "très"}\n'.encode("latin-1")])
def test_non_utf8_question_file(content, tmp_path, tiny_model_dir, capsys):
    x0 = tmp_path / "x0.md"
    x0.write_text("Be a pirate.\n")
    q = tmp_path / "q.jsonl"
    q.write_bytes(content)
    argv = gen_argv(tmp_path, tiny_model_dir, x0, q)
    line = one_error_line(capsys, main(argv, "generate_data.py", "generate"))
    assert "--question_dataset" in line and "line 1" in line and "not UTF-8" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["bake", "eval"])
@pytest.mark.parametrize("prompt", ["   ", "", "\n\t"])
def test_whitespace_prompt_refused(command, prompt, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    qflag = "--question_dataset" if command == "bake" else "--questions"
    argv = [command, "--model_name", str(tiny_model_dir), "--device", "cpu", "--prompt", prompt]
    scorer = ["--scorer", "allcaps"] if command == "eval" else []
    rc = main([*argv, *scorer, qflag, str(question_file(tmp_path)), "--out_dir", str(out)])
    line = one_error_line(capsys, rc)
    assert "--prompt" in line and "empty or only whitespace" in line
    assert not out.exists()


# ---------------------------------------------------------------- two writers, one output
def test_second_writer_refused_and_leaves_nothing(tmp_path, tiny_model_dir, capsys):
    x0 = tmp_path / "x0.md"
    x0.write_text("Be a pirate.\n")
    out = tmp_path / "out" / "t.jsonl"
    argv = gen_argv(tmp_path, tiny_model_dir, x0, question_file(tmp_path))
    with exclusive_lock(out, "--traj_out_file") as lock:  # the first run, still writing
        assert lock.read_text() == f"{os.getpid()}\n"
        line = one_error_line(capsys, main(argv, "generate_data.py", "generate"))
        assert f"pid {os.getpid()}" in line and "another run" in line
        assert sorted(p.name for p in out.parent.iterdir()) == ["t.jsonl.lock"]
    assert not (tmp_path / "out").exists()  # the holder removes its lock and the folder it made
    # the same command now runs, and leaves no lock behind
    assert main(argv, "generate_data.py", "generate") == 0
    written = ["t.jsonl", "t.jsonl.meta.json", "t.jsonl.teacher.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == written
    assert len(out.read_text().splitlines()) == 2


def test_refused_generation_leaves_no_partial(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A run refused after it started (here: sampling fails) leaves no .partial/key, so
    the corrected command is not blocked as "an unfinished run with different arguments"."""
    from promptbake.errors import UserError
    from promptbake.sampling import trajectories as generate

    def refuse(*a, **k):
        raise UserError("the model cannot sample that")

    x0 = tmp_path / "x0.md"
    x0.write_text("Be a pirate.\n")
    argv = gen_argv(tmp_path, tiny_model_dir, x0, question_file(tmp_path))
    with monkeypatch.context() as m:
        m.setattr(generate, "sample", refuse)
        line = one_error_line(capsys, main(argv, "generate_data.py", "generate"))
    assert "cannot sample" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert main([*argv, "--max_sequence_length", "2"], "generate_data.py", "generate") == 0
