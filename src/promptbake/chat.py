"""`promptbake chat`: talk to the base, prompted, baked or re-prompted model in a terminal.

    promptbake chat --adapter runs/zorblax
    printf 'What is your name?\\n/base\\nWhat is your name?\\n' | promptbake chat --adapter runs/zorblax

Each line you type is a question, answered in the current mode. Each mode keeps its
own conversation: a question is rendered with the model's chat template after that
mode's earlier questions and answers (the first one exactly like the training prompts),
so switching modes never mixes two models' answers into one history. Commands:

    /base  /prompted  /baked  /reprompted    switch mode (also /mode NAME)
    /scale S                                 set the adapter scale (0 base, 1 baked, 1.5 ...)
    /all [QUESTION]                          answer QUESTION (or the last one) in every mode
    /clear                                   forget every mode's conversation
    /prompt                                  show the baked prompt
    /help                                    this list
    /quit                                    leave (end of input works too)

Piped input works: no prompt string is printed when stdin is not a terminal, and each
answer is printed as one line ``[mode xS] answer``, which makes the command testable.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TextIO

from .adapters import adapter_dir, load_model_and_adapter, resolve_prompt, set_adapter_scale
from .configs import ChatConfig
from .configs.choices import MODES
from .errors import UserError
from .evaluation.conditions import CONDITIONS, Answering, answer_ids
from .prompts import encode, format_prompt, manual_chatml
from .sampling.seam import context_limit

HELP = __doc__.split("Commands:")[1].split("Piped input")[0].rstrip()
ALIASES = {"reprompted": "re-prompted", "re-prompted": "re-prompted"}


@dataclass
class ChatState:
    mode: str
    scale: float
    prompt: str | None
    has_adapter: bool
    last_question: str | None = None
    # mode -> its conversation so far, as (question, answer) turns
    history: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    last_prompt: str | None = None  # the last conversation sent to the model, rendered


def _mode_error(state: ChatState, mode: str) -> str | None:
    cond = CONDITIONS[mode]
    if cond.adapter and not state.has_adapter:
        return f"mode {mode} needs an adapter (start with --adapter DIR)"
    if cond.prompted and state.prompt is None:
        return f"mode {mode} needs the prompt (start with --x0_file or --prompt)"
    return None


def render_conversation(
    tok,
    system: str | None,
    history: list[tuple[str, str]],
    question: str,
    enable_thinking: bool | None = None,
) -> str:
    """The conversation (system prompt, past turns, the new question) rendered up to the
    assistant header with the model's chat template; without past turns it is
    chat.format_prompt's string, the training prompt."""
    if not history:
        return format_prompt(system, question, system is not None, tok, enable_thinking)
    if getattr(tok, "chat_template", None) is None:  # ChatML by hand, turn by turn
        past = "".join(
            manual_chatml(system if i == 0 else None, q) + f"{a}<|im_end|>\n"
            for i, (q, a) in enumerate(history)
        )
        return past + manual_chatml(None, question)
    messages = [] if system is None else [{"role": "system", "content": system}]
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


def reply(model, tok, cfg: ChatConfig, state: ChatState, question: str, mode: str) -> str:
    """Answer `question` in `mode`, after that mode's conversation, and add the turn to it."""
    cond = CONDITIONS[mode]
    if cond.adapter:
        set_adapter_scale(model, state.scale)
    history = state.history.setdefault(mode, [])
    system = state.prompt if cond.prompted else None
    text = state.last_prompt = render_conversation(
        tok, system, history, question, cfg.enable_thinking
    )
    ids = encode(tok, text)
    limit = context_limit(model)
    if limit is not None and len(ids) + cfg.max_new_tokens > limit:
        raise UserError(
            f"that line was skipped: the conversation would be {len(ids)} tokens, plus "
            f"--max_new_tokens {cfg.max_new_tokens}, over the model's context of {limit}; "
            "shorten it, or /clear the conversation"
        )
    with cond.context(model):
        how = Answering(
            cfg.max_new_tokens, cfg.temperature or None, seed=cfg.seed, engine=cfg.engine
        )
        answer = answer_ids(model, tok, [ids], how)[0]
    history.append((question, answer))
    tag = f"{mode} x{state.scale:g}" if cond.adapter else mode
    return f"[{tag}] " + " ".join(answer.split())


def handle(line: str, model, tok, cfg: ChatConfig, state: ChatState) -> str | None:
    """One input line -> the text to print; None means quit."""
    line = line.strip()
    if not line:
        return ""
    if not line.startswith("/"):
        err = _mode_error(state, state.mode)
        if err:
            return f"error: {err}"
        state.last_question = line
        return reply(model, tok, cfg, state, line, state.mode)
    cmd, _, arg = line[1:].partition(" ")
    cmd, arg = cmd.lower(), arg.strip()
    if cmd in ("quit", "exit", "q"):
        return None
    if cmd in ("help", "h", "?"):
        return HELP
    if cmd == "prompt":
        return state.prompt or "(no prompt: pass --x0_file or --prompt)"
    if cmd == "clear":
        state.history.clear()
        return "conversation cleared (every mode)"
    if cmd == "mode":
        cmd = arg.lower()
    cmd = ALIASES.get(cmd, cmd)
    if cmd in MODES:
        err = _mode_error(state, cmd)
        if err:
            return f"error: {err}"
        state.mode = cmd
        return f"mode: {cmd}" + (
            f" (adapter scale {state.scale:g})" if CONDITIONS[cmd].adapter else ""
        )
    if cmd == "scale":
        try:
            scale = float(arg)
        except ValueError:
            return "error: /scale needs a number, e.g. /scale 0.5"
        if not math.isfinite(scale):  # as --adapter_scale nan is refused
            return (
                f"error: /scale needs a finite number, got {arg}; the scale stays {state.scale:g}"
            )
        state.scale = scale
        if not state.has_adapter:
            return "error: no adapter loaded; the scale has no effect"
        return f"adapter scale: {state.scale:g}"
    if cmd == "all":
        question = arg or state.last_question
        if not question:
            return "error: /all needs a question (or ask one first)"
        state.last_question = question
        modes = [m for m in MODES if _mode_error(state, m) is None]
        return "\n".join(reply(model, tok, cfg, state, question, m) for m in modes)
    return f"error: unknown command /{cmd}; type /help"


NOT_UTF8 = "error: that line is not UTF-8 text; it was skipped (set your terminal to UTF-8)"
_BAD = object()  # read_line's answer for a line that does not decode


def read_line(stdin: TextIO):
    """One line of input: the text, None at end of input, or ``_BAD`` when its bytes are
    not UTF-8 (the chat says so and goes on; a text stream would raise mid-line)."""
    raw = getattr(stdin, "buffer", None)
    try:
        if raw is None:
            line = stdin.readline()
            return line or None
        data = raw.readline()
        return data.decode("utf-8") if data else None
    except UnicodeDecodeError:
        return _BAD


def chat(
    cfg: ChatConfig,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    model=None,
    tokenizer=None,
) -> None:
    """The read-answer loop; pass `model`/`tokenizer` to skip loading (tests)."""
    cfg.validate()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    adapter = adapter_dir(cfg.adapter) if cfg.adapter else None
    prompt = resolve_prompt(cfg.x0_file, cfg.prompt, cfg.adapter)
    state = ChatState(
        mode=cfg.mode or ("baked" if adapter else "base"),
        scale=cfg.adapter_scale,
        prompt=prompt,
        has_adapter=adapter is not None,
    )
    err = _mode_error(state, state.mode)
    if err:
        raise UserError(f"--mode {state.mode}: {err}")
    if model is None:
        model, tokenizer = load_model_and_adapter(adapter, cfg)
    interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
    if interactive:
        print(f"mode: {state.mode}; type /help for commands, /quit to leave", file=stdout)
    while True:
        if interactive:
            print(f"{state.mode}> ", end="", file=stdout, flush=True)
        try:
            line = read_line(stdin)
            if line is None:  # end of input
                break
            out = NOT_UTF8 if line is _BAD else handle(line, model, tokenizer, cfg, state)
        except KeyboardInterrupt:  # Ctrl-C leaves the chat quietly, not with a traceback
            print(file=stdout)
            break
        except UserError as e:  # a line the model cannot take: said, and the chat goes on
            out = f"error: {e}"
        if out is None:
            break
        if out:
            print(out, file=stdout, flush=True)
