"""`promptbake chat` with piped input: mode switching, the adapter scale, errors."""

import io
import json
import sys

import pytest
from test_adapters import make_adapter
from test_compare import X0

from promptbake.adapters import load_adapter
from promptbake.cli import main
from promptbake.repl import ChatConfig, chat


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    d = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("run"), seed=4)
    (d / "summary.json").write_text(json.dumps({"prompt": X0}))
    return d


def talk(run, script: str, **kw) -> list[str]:
    model, tok, _ = load_adapter(run, device="cpu", dtype="float32")
    out = io.StringIO()
    cfg = ChatConfig(adapter=str(run), max_new_tokens=6, **kw)
    chat(cfg, io.StringIO(script), out, model=model, tokenizer=tok)
    return out.getvalue().splitlines()


def answer_text(line: str) -> str:
    return line.split("] ", 1)[1] if "] " in line else ""


def test_modes_scale_and_commands(run):
    q = "What is your name?"
    script = "\n".join(
        [q, "/base", q, "/scale 0", "/baked", q, "/prompted", q, "/reprompted", q, "/scale 1.5",
         "/all", "/prompt", "/frobnicate", "/scale x", "/quit", "never answered"]
    )  # fmt: skip
    lines = talk(run, script)
    assert lines[0].startswith("[baked x1] ")
    assert lines[1] == "mode: base" and lines[2].startswith("[base] ")
    assert lines[3] == "adapter scale: 0"
    assert lines[4] == "mode: baked (adapter scale 0)" and lines[5].startswith("[baked x0] ")
    assert answer_text(lines[5]) == answer_text(lines[2])  # scale 0 is the base model
    assert answer_text(lines[0]) != answer_text(lines[2])  # the adapter changes the answer
    assert lines[6] == "mode: prompted" and lines[7].startswith("[prompted] ")
    assert lines[8].startswith("mode: re-prompted") and lines[9].startswith("[re-prompted x0] ")
    assert answer_text(lines[9]) == answer_text(lines[7])
    assert lines[10] == "adapter scale: 1.5"
    assert [ln.split("]")[0] for ln in lines[11:15]] == [
        "[base",
        "[prompted",
        "[baked x1.5",
        "[re-prompted x1.5",
    ]
    assert lines[15] == X0  # /prompt
    assert lines[16].startswith("error: unknown command /frobnicate")
    assert lines[17].startswith("error: /scale needs a number")
    assert len(lines) == 18  # /quit stopped reading


def test_without_adapter_only_base_and_prompted(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/baked\n/prompted\n"))
    argv = ["chat", "--model_name", str(tiny_model_dir), "--max_new_tokens", "4"]
    assert main(argv) == 0  # end of input ends the chat
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[base] ")
    assert lines[1].startswith("error: mode baked needs an adapter")
    assert lines[2].startswith("error: mode prompted needs the prompt")
    assert main([*argv, "--mode", "baked"]) == 2
    assert capsys.readouterr().err.startswith("error: --mode baked")
