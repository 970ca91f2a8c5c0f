"""`promptbake chat` with piped input: mode switching, the adapter scale, errors."""

import io
import json
import sys

import pytest
from tiny import DATA_X0, make_adapter

from promptbake.adapters import load_adapter
from promptbake.chat import HELP, NOT_UTF8, ChatState, chat, handle
from promptbake.cli import main
from promptbake.configs import ChatConfig
from promptbake.evaluation.conditions import Answering, answer_ids
from promptbake.prompts import encode, format_prompt


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    d = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("run"), seed=4)
    (d / "summary.json").write_text(json.dumps({"prompt": DATA_X0}))
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
        [q, "/base", q, "/scale 0", "/clear", "/baked", q, "/prompted", q, "/reprompted", q,
         "/scale 1.5", "/all", "/prompt", "/frobnicate", "/scale x", "/quit", "never answered"]
    )  # fmt: skip
    lines = talk(run, script)
    assert lines[0].startswith("[baked x1] ")
    assert lines[1] == "mode: base" and lines[2].startswith("[base] ")
    assert lines[3] == "adapter scale: 0"
    assert lines[4] == "conversation cleared (every mode)"  # baked forgets its first turn
    assert lines[5] == "mode: baked (adapter scale 0)" and lines[6].startswith("[baked x0] ")
    assert answer_text(lines[6]) == answer_text(lines[2])  # scale 0 is the base model
    assert answer_text(lines[0]) != answer_text(lines[2])  # the adapter changes the answer
    assert lines[7] == "mode: prompted" and lines[8].startswith("[prompted] ")
    assert lines[9].startswith("mode: re-prompted") and lines[10].startswith("[re-prompted x0] ")
    assert answer_text(lines[10]) == answer_text(lines[8])
    assert lines[11] == "adapter scale: 1.5"
    assert [ln.split("]")[0] for ln in lines[12:16]] == [
        "[base",
        "[prompted",
        "[baked x1.5",
        "[re-prompted x1.5",
    ]
    assert lines[16] == DATA_X0  # /prompt
    assert lines[17].startswith("error: unknown command /frobnicate")
    assert lines[18].startswith("error: /scale needs a number")
    assert "/clear" in HELP
    assert len(lines) == 19  # /quit stopped reading  # /quit stopped reading


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


def test_each_mode_keeps_its_own_conversation_and_clear_forgets_it(tiny_model, chatml_tok):
    tok, q1, q2 = chatml_tok, "What is your name?", "And where do you live?"
    cfg = ChatConfig(model_name="tiny", max_new_tokens=5)
    state = ChatState(mode="base", scale=1.0, prompt=DATA_X0, has_adapter=False)

    def greedy(text: str) -> str:
        return answer_ids(tiny_model, tok, [encode(tok, text)], Answering(5))[0]

    first = handle(q1, tiny_model, tok, cfg, state)
    a1 = greedy(format_prompt(None, q1, False, tok))  # the first turn: the training prompt
    assert first == "[base] " + " ".join(a1.split())
    second = handle(q2, tiny_model, tok, cfg, state)
    # the second question is rendered after the first turn, through the chat template
    past = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
    rendered = tok.apply_chat_template(
        [*past, {"role": "user", "content": q2}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.count(q1) == 1 and a1 in rendered and rendered.index(q1) < rendered.index(q2)
    assert state.last_prompt == rendered
    a2 = greedy(rendered)
    assert second == "[base] " + " ".join(a2.split())
    assert state.history == {"base": [(q1, a1), (q2, a2)]}

    # another mode has its own conversation: the system prompt, none of base's turns
    handle("/prompted", tiny_model, tok, cfg, state)
    third = handle(q2, tiny_model, tok, cfg, state)
    a3 = greedy(format_prompt(DATA_X0, q2, True, tok))
    assert third == "[prompted] " + " ".join(a3.split())
    assert state.history["prompted"] == [(q2, a3)] and len(state.history["base"]) == 2
    assert state.last_prompt == format_prompt(DATA_X0, q2, True, tok)

    assert handle("/clear", tiny_model, tok, cfg, state).startswith("conversation cleared")
    assert state.history == {}
    handle("/base", tiny_model, tok, cfg, state)
    assert handle(q2, tiny_model, tok, cfg, state) == "[base] " + " ".join(
        greedy(format_prompt(None, q2, False, tok)).split()
    )
    assert state.last_prompt == format_prompt(None, q2, False, tok)  # a fresh conversation


def test_bytes_that_are_not_utf8_give_one_line(tiny_model_dir, monkeypatch, capsys):
    x0 = "Zorblax \u00e9"
    raw = b"/prompt\n" + b"caf\xe9 \xff\n" + b"/prompt\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    argv = ["chat", "--model_name", str(tiny_model_dir), "--prompt", x0, "--max_new_tokens", "2"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [x0, NOT_UTF8, x0] and "Traceback" not in err
