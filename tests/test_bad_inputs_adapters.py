"""Bad adapter inputs and model-load options, through the CLI: one `error:` line, exit 2,
nothing written or changed.

    python -m pytest tests/test_bad_inputs_adapters.py -q

Each row: a setup that builds the bad input under `tmp_path` and returns the command's
argv, and a substring the one error line must hold. The files under `tmp_path` are
compared (names, bytes, modes) before and after the run.
"""

import importlib.util
import io
import sys

import pytest
import tiny
from tiny import (
    chain_entry,
    copy_adapter,
    foreign_adapter,
    make_adapter,
    merge_into,
    pickle_only,
    truncated,
)

from promptbake.cli import main


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """A good adapter for the tiny Qwen3, and another base model it does not fit."""
    root = tmp_path_factory.mktemp("bad_inputs")
    other = tiny.save_tiny_model(root / "other_base", kind="tiny", seed=1, hidden_size=32)
    return {"adapter": make_adapter(tiny_model_dir, root / "adapter"), "other": other}


def no_weights(built, tmp_path, tiny_model_dir):
    a = copy_adapter(built, tmp_path)
    (a / "adapter_model.safetensors").unlink()
    return ["merge", "--adapter", str(a), "--out", str(tmp_path / "m")]


def merge_onto_file(built, tmp_path, tiny_model_dir):
    (tmp_path / "f").write_text("x")
    return ["merge", "--adapter", str(built["adapter"]), "--out", str(tmp_path / "f")]


def with_flags(command, *flags):
    def setup(built, tmp_path, tiny_model_dir):
        if command == "merge":
            argv = ["merge", "--adapter", str(built["adapter"]), "--out", str(tmp_path / "m")]
        else:
            tiny.adapter_inputs(tmp_path, tiny_model_dir)
            argv = ["train", "--data_path", str(tmp_path / "traj.jsonl"), "--out_dir",
                    str(tmp_path / "run"), "--model_name", str(tiny_model_dir)]  # fmt: skip
        return argv + list(flags)

    return setup


def without_package(name, command, *flags):
    """As if `name` were not installed."""

    def setup(built, tmp_path, tiny_model_dir, monkeypatch):
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a)
        )
        return with_flags(command, *flags)(built, tmp_path, tiny_model_dir)

    setup.needs_monkeypatch = True
    return setup


ROWS = [
    ("foreign adapter: merge", foreign_adapter("merge"), "was trained on"),
    ("foreign adapter: eval", foreign_adapter("eval"), "was trained on"),
    ("foreign adapter: chat", foreign_adapter("chat"), "was trained on"),
    ("foreign adapter: compare", foreign_adapter("compare"), "was trained on"),
    ("truncated safetensors", truncated, "is damaged"),
    ("pickle-only adapter", pickle_only, "adapter_model.bin, a pickle"),
    ("adapter without weights", no_weights, "no adapter_model.safetensors"),
    ("chain: absolute path", chain_entry("ABS"), "outside this pursuit run"),
    ("chain: .. escape", chain_entry("../../elsewhere"), "outside this pursuit run"),
    ("chain: itself", chain_entry("."), "outside this pursuit run"),
    (
        "merge over a folder with config.json",
        merge_into({"config.json": "{}", "notes.md": "mine"}),
        "not a model directory written by promptbake merge",
    ),
    ("merge over a plain folder", merge_into({"keep.txt": "mine"}), "no .promptbake-merged"),
    ("merge onto a file", merge_onto_file, "is a file"),
    ("merge quantized", with_flags("merge", "--load_in_4bit", "true"), "full-precision"),
    (
        "both quantizations",
        with_flags("train", "--load_in_8bit", "true", "--load_in_4bit", "true"),
        "exclude each other",
    ),
    (
        "flash attention not installed",
        without_package("flash_attn", "train", "--attn_implementation", "flash_attention_2"),
        "pip install flash-attn",
    ),
    (
        "bitsandbytes not installed",
        without_package("bitsandbytes", "train", "--load_in_8bit", "true"),
        "pip install bitsandbytes",
    ),
]


def snapshot(root):
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize(("setup", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_leaves_nothing(
    setup, expected, built, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    extra = (monkeypatch,) if getattr(setup, "needs_monkeypatch", False) else ()
    argv = setup(built, tmp_path, tiny_model_dir, *extra)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    before, adapter_before = snapshot(tmp_path), snapshot(built["adapter"])
    capsys.readouterr()
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert snapshot(tmp_path) == before
    assert snapshot(built["adapter"]) == adapter_before
