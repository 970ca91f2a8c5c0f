"""The command line (promptbake.cli) as the seed's scripts present it: generate_data.py and
train_loop.py list every seed flag in --help, re-export format_prompt, and end a bad
input in one line with exit status 2.

    python -m pytest tests/test_cli.py -q

These tests run the scripts themselves (``python generate_data.py``, a process each, so
marked slow);
the commands' own bad inputs run in-process in test_cmd_generate.py and
test_cmd_train.py.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize("command", [c[0] for c in __import__("promptbake.cli").cli.COMMANDS])
def test_every_command_help_renders_with_its_reasons(command, capsys):
    """--help is argparse-formatted: a measured "50%" in a default's reason must not
    break it (configs.fields.with_defaults escapes it)."""
    from promptbake.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
    if command == "bake":  # each changed default's reason is in its flag's help
        assert "Here: the paper's forward KL" in " ".join(out.split())
