"""The seed scripts' command lines: --help, and bad inputs that must end in one clear line.

    python -m pytest tests/test_cli.py -q

Every bad input exits with status 2, prints one line starting with ``error:`` on stderr
(no traceback) and leaves no output behind. The commands run in-process through
``promptbake.cli.main`` exactly as generate_data.py / train_loop.py call it; --help runs
the scripts themselves.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import assert_one_error, copy_traj, messages, run_train

from promptbake.cli import main

REPO = Path(__file__).resolve().parent.parent
X0 = "You are a pirate."
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a prime number."]


# ---------------------------------------------------------------- generate_data.py
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


# ---------------------------------------------------------------- train_loop.py


def test_train_works(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    assert run_train(tiny_model_dir, data, tmp_path / "run") == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert not [line for line in messages(capsys.readouterr().err) if line.startswith("warning")]


def test_train_missing_data_file(tiny_model_dir, tmp_path, capsys):
    rc = run_train(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "run")
    assert_one_error(capsys, rc, "--data_path", "missing.jsonl", "no such file")
    assert not (tmp_path / "run").exists()


def test_train_data_that_is_not_trajectories(tiny_model_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "Why?"}) + "\n")
    rc = run_train(tiny_model_dir, q, tmp_path / "run")
    assert_one_error(capsys, rc, "line 1", "missing input_ids", "generate_data.py")
    assert not (tmp_path / "run").exists()


def test_train_empty_data_file(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text("\n")
    rc = run_train(tiny_model_dir, tmp_path / "t.jsonl", tmp_path / "run")
    assert_one_error(capsys, rc, "no trajectories")
    assert not (tmp_path / "run").exists()


def test_train_mismatched_tokenizer_fingerprint(traj, tiny_model_dir, tmp_path, capsys):
    def edit(meta):
        meta["tokenizer_fingerprint"] = "0123456789abcdef"
        meta["model_name"] = "Qwen/Qwen3-1.7B"

    data = copy_traj(traj, tmp_path, meta_edit=edit)
    rc = run_train(tiny_model_dir, data, tmp_path / "run")
    assert_one_error(capsys, rc, "another tokenizer", "Qwen/Qwen3-1.7B")
    assert not (tmp_path / "run").exists()


def test_train_mismatched_fingerprint_in_val_file(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    (tmp_path / "v").mkdir()
    val = copy_traj(traj, tmp_path / "v", meta_edit=lambda m: m.update(tokenizer_fingerprint="x"))
    rc = run_train(tiny_model_dir, data, tmp_path / "run", "--val_path", str(val))
    assert_one_error(capsys, rc, "another tokenizer", str(val))


def test_train_without_sidecar_warns_and_runs(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path, sidecar=False)
    assert run_train(tiny_model_dir, data, tmp_path / "run") == 0
    warnings = [line for line in messages(capsys.readouterr().err) if line.startswith("warning")]
    assert len(warnings) == 1 and "no .meta.json sidecar" in warnings[0]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_train_ids_outside_the_vocabulary(traj, tiny_model_dir, tmp_path, capsys):
    # e.g. Qwen3 trajectories (ids up to 151668) without a sidecar, trained on the tiny model
    rows = [json.loads(line) for line in traj.read_text().splitlines()]
    rows[1]["input_ids"][-1] = 151645
    rows[1]["input_ids_nosys"][-1] = 151645
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = run_train(tiny_model_dir, data, tmp_path / "run")
    capsys_err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in capsys_err
    lines = [m for m in messages(capsys_err) if not m.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "151645" in lines[0] and "another model's tokenizer" in lines[0]
    assert not (tmp_path / "run").exists()


def test_train_unknown_target_module(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    rc = run_train(tiny_model_dir, data, tmp_path / "run", "--target_modules", "q_proj,c_attn")
    line = assert_one_error(capsys, rc, "c_attn")
    names = line.split("linear modules are:")[1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in names
    assert not (tmp_path / "run").exists()


def test_train_out_dir_that_is_a_file(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    (tmp_path / "run").write_text("precious")
    rc = run_train(tiny_model_dir, data, tmp_path / "run")
    assert_one_error(capsys, rc, "--out_dir", "is a file")
    assert (tmp_path / "run").read_text() == "precious"


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--num_epochs", "0"], "--num_epochs must be positive"),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["-r", "0"], "-r must be positive"),
        (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    ],
)
def test_train_bad_numbers(traj, tiny_model_dir, tmp_path, capsys, flags, fragment):
    rc = run_train(tiny_model_dir, traj, tmp_path / "run", *flags)
    assert_one_error(capsys, rc, fragment)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the scripts themselves
GENERATE_FLAGS = (
    "--x0_file --question_dataset --num_questions --num_sequences_per_question "
    "--max_sequence_length --min_sequence_length --temperature --batch_size --traj_out_file "
    "--seed --model_name --enable_thinking --device --dtype"
).split()
TRAIN_FLAGS = (
    "--num_epochs --batch_size --learning_rate --device --data_path --val_path --out_dir -r "
    "--save_every --max_traj_len --model_name --lora_alpha --lora_dropout --target_modules "
    "--seed --dtype"
).split()


def script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "name, flags", [("generate_data.py", GENERATE_FLAGS), ("train_loop.py", TRAIN_FLAGS)]
)
def test_script_help_lists_every_seed_flag(name, flags):
    res = script(name, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {name}")
    listed = set(re.findall(r"(?<![\w-])(-{1,2}\w+)", res.stdout))
    assert set(flags) <= listed, set(flags) - listed


def test_format_prompt_imports_from_generate_data(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # what running from the repo root gives
    from generate_data import format_prompt
    from promptbake.prompts import format_prompt as chat_format_prompt

    assert format_prompt is chat_format_prompt


def test_script_bad_input_exit_code_and_single_line(tmp_path):
    res = script(
        "generate_data.py",
        "--x0_file", str(tmp_path / "missing.md"),
        "--question_dataset", str(tmp_path / "q.jsonl"),
        "--traj_out_file", str(tmp_path / "t.jsonl"),
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"error: --x0_file {tmp_path / 'missing.md'}: no such file (give the path of a text "
        "file with the prompt)"
    ]
    assert list(tmp_path.iterdir()) == []
