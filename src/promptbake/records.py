"""Inputs the user gives: prompt files, question sets, any JSON file read back.

    from promptbake.records import read_prompt, read_questions, select_questions
    x0 = read_prompt("data/zorblax_x0.md")          # text, or a .json list of chat messages
    questions = select_questions(read_questions("data/questions.jsonl"), 20, seed=42)

Question sets are JSONL with a ``question`` field (SQuAD style). Every reader checks
what it is given before it opens it (a directory, a FIFO or a device is said to be one),
drops a UTF-8 byte order mark, and turns anything malformed into one line naming the
file, the line and how to fix it (errors.UserError). The trajectory schema, the
records generation writes and training reads, is schema.py; writing is files.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError, warn

CHAT_ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------- reading inputs
def check_input_file(path: str | Path, what: str, hint: str = "") -> Path:
    """`path` as a Path when it is a regular file (a symlink to one counts); else one line
    saying what it is: missing, a directory, a FIFO, a device such as /dev/null, a socket.
    Decided by os.stat before anything opens it, so a FIFO never blocks the run. Every
    input reader starts here (read_text, iter_jsonl, --config files)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file{f' ({hint})' if hint else ''}") from None
    except NotADirectoryError:
        raise UserError(f"{what} {path}: no such file (a part of the path is a file)") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode):
        return p
    kind = _NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "something else")
    raise UserError(f"{what} {path}: is {kind}, not a regular file; give the path of a file")


_NOT_REGULAR = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_text(path: str | Path, what: str) -> str:
    """A whole text file as a str; a missing, binary or non-UTF-8 file is a one-line error.
    A UTF-8 byte order mark at its start is dropped (it is no part of the text)."""
    p = check_input_file(path, what, "give the path of a text file with the prompt")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {path}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}; "
            "a binary file?); save it as UTF-8 text"
        ) from None
    if "\x00" in text:
        raise UserError(f"{what} {path}: holds NUL bytes (a binary file?); give a text file")
    return text.removeprefix(BOM)


BOM = "\ufeff"  # the UTF-8 byte order mark some editors write at a file's start


def prompt_text(text: str, what: str = "--prompt") -> str:
    """A prompt given as text, stripped; only whitespace is refused (it would bake nothing)."""
    if not text.strip():
        raise UserError(f"{what}: the prompt is empty or only whitespace; give the prompt to bake")
    return text.strip()


def check_messages(messages: Any, what: str) -> list[dict]:
    """A conversation prompt: a non-empty list of {"role", "content"} chat messages.

    Roles are system/user/assistant, contents non-empty strings; the messages are
    rendered before the question on the prompted side only (chat.format_prompt).
    """
    hint = 'expected a list like [{"role": "system", "content": "..."}, ...]'
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{what}: {hint}")
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise UserError(
                f"{what}: message {n} must be an object with only role, content; {hint}"
            )
        if m.get("role") not in CHAT_ROLES:
            raise UserError(
                f"{what}: message {n} has role {m.get('role')!r}; use one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{what}: message {n} ({m['role']}) needs a non-empty string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_prompt(path: str | Path, what: str = "--x0_file") -> str | list[dict]:
    """The prompt to bake: a text/Markdown file (a system prompt), or a ``.json`` file
    holding a list of chat messages (a conversation prefix: system and/or few-shot
    user/assistant turns). Missing, binary, empty or malformed is a one-line error."""
    text = read_text(path, what)
    if Path(path).suffix.lower() == ".json":
        try:
            messages = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{what} {path}: not valid JSON ({e.msg}, line {e.lineno}); a .json prompt "
                "file holds a list of chat messages"
            ) from None
        return check_messages(messages, f"{what} {path}")
    if not text.strip():
        raise UserError(f"{what} {path}: the file is empty; write the prompt to bake into it")
    return text.strip()


def iter_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a one-line error."""
    p = check_input_file(path, what)
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if lineno == 1:
                    line = line.removeprefix(BOM)
            except UnicodeDecodeError:
                raise UserError(
                    f"{what} {path}, line {lineno}: not UTF-8 text (a binary file?); "
                    "give a JSONL file saved as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{what} {path}, line {lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise UserError(f"{what} {path}, line {lineno}: expected a JSON object")
            yield lineno, obj


# what chat templates use to open and close turns: <|im_start|>, <|im_end|>, <|eot_id|>,
# <|start_header_id|>, ... (ChatML, Qwen, Llama 3, Phi) and Gemma's <start_of_turn>
CHAT_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<(?:start|end)_of_turn>")


def warn_chat_tokens(what: str, path, marked: list[tuple[int, str]]) -> None:
    """One warning per input file whose questions hold chat special tokens.

    They are kept as they are, not escaped: the prompt is rendered to a string by the
    model's chat template and tokenized whole, where such a token becomes the real turn
    marker; escaping only the question's part would change how every prompt is tokenized
    (and every trajectory file and resume key made so far). A question may also use them
    on purpose (a few-shot turn), so the user is told and decides."""
    lineno, token = marked[0]
    more = f" (and {len(marked) - 1} more questions of this file)" if len(marked) > 1 else ""
    warn(
        f"{what} {path}, line {lineno}: the question holds the chat token {token}{more}; "
        "the chat template reads it as a turn boundary, so the prompt gets extra turns; "
        "remove it unless that is intended"
    )


def read_questions(paths: str | Path | list, what: str = "--question_dataset") -> list[dict]:
    """Question records from one or more JSONL files (comma-separated string allowed)."""
    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p]
    out: list[dict] = []
    for path in paths:
        marked: list[tuple[int, str]] = []  # (line, chat token) of questions holding one
        for lineno, obj in iter_jsonl(path, what):
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise UserError(
                    f"{what} {path}, line {lineno}: no non-empty 'question' field "
                    '(each line needs {"question": "..."})'
                )
            if m := CHAT_TOKEN.search(q):
                marked.append((lineno, m.group()))
            out.append(obj)
        if marked:
            warn_chat_tokens(what, path, marked)
    if not out:
        raise UserError(f"{what} {','.join(map(str, paths))}: no questions found")
    return out


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
               int: "a number", float: "a number", type(None): "null"}  # fmt: skip


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_json(
    path: str | Path,
    what: str = "",
    *,
    hint: str = "restore it, or delete it and write it again",
    fields: dict[str, Any] | None = None,
    required: tuple[str, ...] = (),
) -> dict:
    """The JSON object in a file the tool reads back (a .meta.json, args.json,
    summary.json, adapter_config.json, a resume key, a checkpoint's checksums): one
    line naming the file, what is wrong (missing, unreadable, not UTF-8, corrupt or
    truncated JSON, a list where an object belongs, a field of the wrong type) and
    `hint`, never a traceback. `fields`: {key: type or tuple of types} checked where
    present; `required`: keys that must be present."""
    where = f"{what} {path}" if what else str(path)

    def bad(problem: str) -> UserError:
        return UserError(f"{where}: {problem}; {hint}")

    p = Path(path)
    if not p.is_file():
        raise bad("no such file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise bad(f"cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text (byte {e.start}); the file is damaged") from None
    if not text.strip():
        raise bad("the file is empty (truncated?)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(
            f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the file is "
            "damaged or truncated"
        ) from None
    if not isinstance(obj, dict):
        raise bad(f"holds {_kind(obj)} where a JSON object belongs")
    for key in required:
        if key not in obj:
            raise bad(f"has no {key!r} field")
    for key, types in (fields or {}).items():
        if key in obj and not isinstance(obj[key], types):
            want = types if isinstance(types, tuple) else (types,)
            wanted = " or ".join(dict.fromkeys(_JSON_KINDS.get(t, t.__name__) for t in want))
            raise bad(f"its {key!r} is {_kind(obj[key])}, expected {wanted}")
    return obj


def distinct_questions(questions: list[dict], what: str = "--question_dataset") -> list[dict]:
    """The questions with repeats dropped (the first of each text is kept, in order), and
    one warning saying how many: a split by position would put copies of one question on
    both sides of a train/validation split."""
    seen: set[str] = set()
    out = []
    for q in questions:
        key = " ".join(q["question"].split())
        if key not in seen:
            seen.add(key)
            out.append(q)
    if len(out) < len(questions):
        n = len(questions) - len(out)
        warn(
            f"{what}: {n} duplicate question{'s' if n > 1 else ''} dropped ({len(out)} distinct "
            "kept), so that no question is in both the training and the validation split"
        )
    return out


def select_questions(questions: list[dict], n: int, seed: int, shuffle: bool = True) -> list[dict]:
    """The first n questions after a seeded shuffle; warn if fewer exist."""
    qs = list(questions)
    if shuffle:
        random.Random(seed).shuffle(qs)
    if n > len(qs):
        warn(f"--num_questions {n} but the dataset has {len(qs)} questions; using all {len(qs)}")
    return qs[:n]
