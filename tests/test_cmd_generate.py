"""The generate command (promptbake.generate) as generate_data.py runs it: it works, and bad
inputs end in one clear line.

    python -m pytest tests/test_cmd_generate.py -q

Every bad input exits with status 2, prints one line starting with ``error:`` on stderr
(no traceback) and leaves no output behind. The command runs in-process through
``promptbake.cli.main`` exactly as generate_data.py calls it.
"""

import json
from pathlib import Path

import pytest
from tiny import assert_one_error, messages

from promptbake.cli import main

X0 = "You are a pirate."


QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a prime number."]


@pytest.fixture
def gen_dir(tmp_path):
    (tmp_path / "x0.md").write_text(X0 + "\n")
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS)
    )
    return tmp_path


def run_generate(d: Path, tiny_model_dir, **flags) -> int:
    args = {
        "model_name": str(tiny_model_dir),
        "device": "cpu",
        "x0_file": str(d / "x0.md"),
        "question_dataset": str(d / "q.jsonl"),
        "traj_out_file": str(d / "out" / "traj.jsonl"),
        "num_questions": "3",
        "num_sequences_per_question": "2",
        "max_sequence_length": "4",
        "batch_size": "4",
    }
    args.update({k: str(v) for k, v in flags.items()})
    argv = [x for k, v in args.items() if v is not None for x in (f"--{k}", v)]
    return main(argv, prog="generate_data.py", only="generate")


def test_generate_works(gen_dir, tiny_model_dir, capsys):
    assert run_generate(gen_dir, tiny_model_dir) == 0
    rows = (gen_dir / "out" / "traj.jsonl").read_text().splitlines()
    assert len(rows) == 6
    assert "Dataset saved to" in capsys.readouterr().out


def test_missing_x0_file(gen_dir, tiny_model_dir, capsys):
    rc = run_generate(gen_dir, tiny_model_dir, x0_file=gen_dir / "nope.md")
    assert_one_error(capsys, rc, "--x0_file", "nope.md", "no such file")
    assert not (gen_dir / "out").exists()


def test_empty_x0_file(gen_dir, tiny_model_dir, capsys):
    (gen_dir / "x0.md").write_text("  \n\n")
    rc = run_generate(gen_dir, tiny_model_dir)
    assert_one_error(capsys, rc, "--x0_file", "empty")
    assert not (gen_dir / "out").exists()


def test_missing_dataset(gen_dir, tiny_model_dir, capsys):
    rc = run_generate(gen_dir, tiny_model_dir, question_dataset=gen_dir / "none.jsonl")
    assert_one_error(capsys, rc, "--question_dataset", "none.jsonl", "no such file")
    assert not (gen_dir / "out").exists()


def test_malformed_jsonl_names_the_line(gen_dir, tiny_model_dir, capsys):
    (gen_dir / "q.jsonl").write_text('{"question": "a?"}\n\n{"question": "b?"\n')
    rc = run_generate(gen_dir, tiny_model_dir)
    assert_one_error(capsys, rc, "q.jsonl", "line 3", "not valid JSON")
    assert not (gen_dir / "out").exists()


def test_line_without_question(gen_dir, tiny_model_dir, capsys):
    (gen_dir / "q.jsonl").write_text('{"question": "a?"}\n{"prompt": "b?"}\n')
    rc = run_generate(gen_dir, tiny_model_dir)
    assert_one_error(capsys, rc, "line 2", "'question'")
    assert not (gen_dir / "out").exists()


@pytest.mark.parametrize(
    "flags, fragments",
    [
        ({"num_questions": 0}, ["--num_questions must be positive"]),
        ({"batch_size": -4}, ["--batch_size must be positive", "-4"]),
        ({"temperature": 0}, ["--temperature must be > 0"]),
        (
            {"max_sequence_length": 5, "min_sequence_length": 10},
            ["--max_sequence_length (5)", "--min_sequence_length (10)"],
        ),
        ({"min_sequence_length": -1}, ["--min_sequence_length must be >= 0"]),
        ({"num_sequences_per_question": 0}, ["--num_sequences_per_question must be positive"]),
    ],
)
def test_bad_numbers(gen_dir, tiny_model_dir, capsys, flags, fragments):
    rc = run_generate(gen_dir, tiny_model_dir, **flags)
    assert_one_error(capsys, rc, *fragments)
    assert not (gen_dir / "out").exists()


def test_out_file_that_is_a_directory(gen_dir, tiny_model_dir, capsys):
    (gen_dir / "out" / "traj.jsonl").mkdir(parents=True)
    rc = run_generate(gen_dir, tiny_model_dir)
    assert_one_error(capsys, rc, "is a directory")


def test_uncached_hub_model(gen_dir, capsys):
    rc = run_generate(gen_dir, "promptbake-tests/no-such-model")
    assert_one_error(capsys, rc, "promptbake-tests/no-such-model", "--model_name smollm2-135m")
    assert not (gen_dir / "out").exists()


def test_more_questions_than_exist_warns_and_succeeds(gen_dir, tiny_model_dir, capsys):
    assert run_generate(gen_dir, tiny_model_dir, num_questions=10) == 0
    err = capsys.readouterr().err
    warnings = [line for line in messages(err) if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "--num_questions 10" in warnings[0] and "3" in warnings[0]
    assert len((gen_dir / "out" / "traj.jsonl").read_text().splitlines()) == 3 * 2
