"""`promptbake chat`: talk to the base, prompted, baked or re-prompted model in a terminal.

    promptbake chat --adapter runs/zorblax
    printf 'What is your name?\\n/base\\nWhat is your name?\\n' | promptbake chat --adapter runs/zorblax

Each line you type is a question, answered in the current mode (single turn: every
question starts a fresh conversation, rendered like the training prompts). Commands:

    /base  /prompted  /baked  /reprompted    switch mode (also /mode NAME)
    /scale S                                 set the adapter scale (0 base, 1 baked, 1.5 ...)
    /all [QUESTION]                          answer QUESTION (or the last one) in every mode
    /prompt                                  show the baked prompt
    /help                                    this list
    /quit                                    leave (end of input works too)

Piped input works: no prompt string is printed when stdin is not a terminal, and each
answer is printed as one line ``[mode xS] answer``, which makes the command testable.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from .adapters import adapter_dir, load_model_and_adapter, resolve_prompt, set_adapter_scale
from .configs import ChatConfig
from .errors import UserError
from .evals import MODE_SETTINGS, MODES
from .evaluate import answer

HELP = __doc__.split("Commands:")[1].split("Piped input")[0].rstrip()
ALIASES = {"reprompted": "re-prompted", "re-prompted": "re-prompted"}


@dataclass
class ChatState:
    mode: str
    scale: float
    prompt: str | None
    has_adapter: bool
    last_question: str | None = None


def _mode_error(state: ChatState, mode: str) -> str | None:
    use_prompt, adapter_on = MODE_SETTINGS[mode]
    if adapter_on and not state.has_adapter:
        return f"mode {mode} needs an adapter (start with --adapter DIR)"
    if use_prompt and state.prompt is None:
        return f"mode {mode} needs the prompt (start with --x0_file or --prompt)"
    return None


def reply(model, tok, cfg: ChatConfig, state: ChatState, question: str, mode: str) -> str:
    use_prompt, adapter_on = MODE_SETTINGS[mode]
    if adapter_on:
        set_adapter_scale(model, state.scale)
    text = answer(
        model,
        tok,
        [{"question": question}],
        system=state.prompt if use_prompt else None,
        adapter=adapter_on,
        max_new_tokens=cfg.max_new_tokens,
        enable_thinking=cfg.enable_thinking,
        temperature=cfg.temperature or None,
        seed=cfg.seed,
    )[0]
    tag = f"{mode} x{state.scale:g}" if adapter_on else mode
    return f"[{tag}] " + " ".join(text.split())


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
    if cmd == "mode":
        cmd = arg.lower()
    cmd = ALIASES.get(cmd, cmd)
    if cmd in MODES:
        err = _mode_error(state, cmd)
        if err:
            return f"error: {err}"
        state.mode = cmd
        return f"mode: {cmd}" + (
            f" (adapter scale {state.scale:g})" if MODE_SETTINGS[cmd][1] else ""
        )
    if cmd == "scale":
        try:
            state.scale = float(arg)
        except ValueError:
            return "error: /scale needs a number, e.g. /scale 0.5"
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
            line = stdin.readline()
            if not line:  # end of input
                break
            out = handle(line, model, tokenizer, cfg, state)
        except KeyboardInterrupt:  # Ctrl-C leaves the chat quietly, not with a traceback
            print(file=stdout)
            break
        if out is None:
            break
        if out:
            print(out, file=stdout, flush=True)
