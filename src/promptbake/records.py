"""Inputs on disk: prompts, question sets, the trajectory schema (writing: files.py).

Question sets are JSONL with a ``question`` field (SQuAD style). A trajectory file is
JSONL, one line per sampled answer, with the original scripts' keys:

    prompt_text / prompt_input_ids             system + question, rendered, up to the assistant header
    prompt_text_nosys / prompt_input_ids_nosys  the same without the system prompt
    input_ids / input_ids_nosys                prompt ids + generated ids (no padding)
    attention_mask                             all ones (ids carry no padding)
    generated_text_mask(_nosys)                1 on the generated ids up to and including the
                                               first end-of-turn token, 0 on the prompt
    text / text_nosys                          the decoded input ids (special tokens kept)

plus ``question``, ``question_index``, ``sample_index`` and ``generated_text``. The
generated ids are identical in the prompted and unprompted rows by construction.
Every row also carries the original script's names for the unprompted side
(``noprompt_text``, ``noprompt_input_ids``, ``nosys_input_str``, ``nosys_input_ids``)
so tools written for the original files read ours.
A sidecar ``<file>.meta.json`` records the model, tokenizer fingerprint, x0 (text, or
the list of chat messages of a conversation prompt), generation arguments and row count.

`read_trajectories` also reads files in the original ``generate_data.py`` layout (input
ids right-padded with eos, mask zero at every eos, no ``*_nosys`` keys; see
`ORIGINAL_KEYS`) and converts them to this schema.
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
from .models import end_of_turn_ids, tokenizer_fingerprint

TRAJECTORY_KEYS = (
    "text",
    "input_ids",
    "attention_mask",
    "prompt_text",
    "prompt_text_nosys",
    "prompt_input_ids",
    "prompt_input_ids_nosys",
    "text_nosys",
    "input_ids_nosys",
    "generated_text_mask",
    "generated_text_mask_nosys",
    # the original script's names for the unprompted side, same values
    "noprompt_text",
    "noprompt_input_ids",
    "nosys_input_str",
    "nosys_input_ids",
)

# What the original generate_data.py writes (input ids right-padded with eos, the mask
# zero on the prompt and at every eos). `nosys_input_ids` there re-tokenizes the decoded
# text and drops its first token, so it is not trusted: the unprompted side is rebuilt
# from `noprompt_input_ids` + the generated ids.
ORIGINAL_KEYS = ("input_ids", "prompt_input_ids", "noprompt_input_ids", "generated_text_mask")
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


# ---------------------------------------------------------------- reading trajectories
def _id_list(obj: dict, key: str, where: str, *, mask: bool = False) -> list[int]:
    """obj[key] checked to be a list of token ids (ints >= 0) or of 0/1 mask values."""
    v = obj.get(key)
    ok = isinstance(v, list) and all(type(x) is int for x in v)
    if ok and mask:
        ok = all(x in (0, 1) for x in v)
    elif ok:
        ok = all(x >= 0 for x in v)
    if not ok:
        kind = "a list of 0/1 integers" if mask else "a list of token ids (integers >= 0)"
        raise UserError(f"{where}: {key} must be {kind}; the file is damaged or not trajectories")
    return v


def _check_own_row(obj: dict, where: str) -> dict:
    """A row in our layout: ids/mask pairs of equal length, zeros (prompt) then ones."""
    for side in ("", "_nosys"):
        ids = _id_list(obj, "input_ids" + side, where)
        mask = _id_list(obj, "generated_text_mask" + side, where, mask=True)
        if len(ids) != len(mask):
            raise UserError(f"{where}: ids and masks differ in length")
        n_prompt = mask.index(1) if 1 in mask else len(mask)
        if any(m == 0 for m in mask[n_prompt:]):
            raise UserError(
                f"{where}: generated_text_mask{side} has zeros after the first generated "
                "token (padding?); a trajectory is its prompt ids then its generated ids"
            )
    if sum(obj["generated_text_mask"]) != sum(obj["generated_text_mask_nosys"]):
        raise UserError(
            f"{where}: prompted and unprompted rows have different numbers of generated tokens"
        )
    if generated_ids(obj) != generated_ids(obj, nosys=True):
        raise UserError(f"{where}: prompted and unprompted rows hold different generated ids")
    return obj


def _from_original_row(obj: dict, where: str, tokenizer, eot: list[int]) -> dict:
    """A row in the original layout converted to ours: the generated ids are the ids after
    the prompt, up to and including the first end-of-turn id (the rest is eos padding)."""
    ids = _id_list(obj, "input_ids", where)
    prompt = _id_list(obj, "prompt_input_ids", where)
    noprompt = _id_list(obj, "noprompt_input_ids", where)
    mask = _id_list(obj, "generated_text_mask", where, mask=True)
    if len(mask) != len(ids):
        raise UserError(f"{where}: input_ids and generated_text_mask differ in length")
    if ids[: len(prompt)] != prompt:
        raise UserError(f"{where}: input_ids does not start with prompt_input_ids")
    if any(mask[: len(prompt)]):
        raise UserError(f"{where}: generated_text_mask is not zero on the prompt")
    gen = cut_at_end_of_turn(ids[len(prompt) :], eot)
    extra = {k: obj[k] for k in ("question", "question_index", "sample_index") if k in obj}
    return make_trajectory(tokenizer, prompt, noprompt, gen, **extra)


def _layout(obj: dict, where: str) -> str:
    if "input_ids_nosys" in obj:
        return "own"
    if all(k in obj for k in ORIGINAL_KEYS):
        return "original"
    missing = [k for k in ("input_ids", "input_ids_nosys", "generated_text_mask") if k not in obj]
    raise UserError(
        f"{where}: missing {', '.join(missing or ['input_ids_nosys'])}; "
        "is this a trajectory file written by generate_data.py?"
    )


def _check_row_count(path: str | Path, what: str, n: int) -> None:
    """More rows than the sidecar records: the file was written twice (two runs at once)
    or appended to, so rows repeat; refused. Fewer: a subset (e.g. a train/val split that
    kept the sidecar); said once, then used."""
    n_meta = (read_meta(path) or {}).get("num_trajectories")
    if not isinstance(n_meta, int) or n_meta == n:
        return
    if n > n_meta:
        raise UserError(
            f"{what} {path}: holds {n} trajectories but its .meta.json records {n_meta}; "
            "the file was written twice or appended to; regenerate it"
        )
    warn(f"{what} {path}: holds {n} of the {n_meta} trajectories its .meta.json records")


def read_trajectories(path: str | Path, what: str = "--data_path", tokenizer=None) -> list[dict]:
    """Trajectory records in our schema, checked so training fails early and clearly.

    Reads our own files and the original generate_data.py's (converted; needs the
    model's `tokenizer` for its end-of-turn ids). Every row is checked (ids are
    integers >= 0, masks 0/1 and as long as the ids, both sides share the generated
    ids); a file with no generated token at all, or with more rows than its .meta.json
    sidecar records, is refused.
    """
    rows, layouts = [], set()
    eot: list[int] | None = None
    for lineno, obj in iter_jsonl(path, what):
        where = f"{what} {path}, line {lineno}"
        layout = _layout(obj, where)
        layouts.add(layout)
        if layout == "own":
            rows.append(_check_own_row(obj, where))
            continue
        if tokenizer is None:
            raise UserError(
                f"{where}: a file in the original generate_data.py layout can only be read "
                "with the model's tokenizer (pass --model_name)"
            )
        if eot is None:
            eot = end_of_turn_ids(tokenizer)
        rows.append(_from_original_row(obj, where, tokenizer, eot))
    if not rows:
        raise UserError(f"{what} {path}: the file has no trajectories")
    if len(layouts) > 1:
        raise UserError(f"{what} {path}: mixes rows of two layouts (ours and the original's)")
    if not any(any(r["generated_text_mask"]) for r in rows):
        raise UserError(
            f"{what} {path}: none of its {len(rows)} trajectories has a generated token; "
            "there is nothing to train on (regenerate with a larger --max_sequence_length)"
        )
    _check_row_count(path, what, len(rows))
    if layouts == {"original"}:
        warn(
            f"{what} {path}: read {len(rows)} trajectories in the original generate_data.py "
            "layout (generated ids cut after the first end-of-turn token, eos padding dropped)"
        )
    return rows


def meta_path(traj_path: str | Path) -> Path:
    return Path(str(traj_path) + ".meta.json")


# the fields of a .meta.json that are read back, and their JSON types
META_FIELDS: dict[str, Any] = {
    "num_trajectories": int,
    "tokenizer_fingerprint": str,
    "model_name": (str, type(None)),
    "x0": (str, list),
    "args": dict,
    "end_of_turn_ids": list,
}


def read_meta(traj_path: str | Path) -> dict | None:
    """The .meta.json of a trajectory file (None when there is none), checked."""
    p = meta_path(traj_path)
    if not p.is_file():
        return None
    return read_json(p, hint="delete it or regenerate the data", fields=META_FIELDS)


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


# ---------------------------------------------------------------- the schema
def make_trajectory(
    tokenizer,
    prompt_ids: list[int],
    prompt_ids_nosys: list[int],
    generated_ids: list[int],
    **extra: Any,
) -> dict:
    """One trajectory record. `generated_ids` must already be cut after the first end-of-turn."""
    ids = list(prompt_ids) + list(generated_ids)
    ids_nosys = list(prompt_ids_nosys) + list(generated_ids)

    def dec(x: list[int]) -> str:
        return tokenizer.decode(x, skip_special_tokens=False)

    rec = {
        "text": dec(ids),
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "prompt_text": dec(prompt_ids),
        "prompt_text_nosys": dec(prompt_ids_nosys),
        "prompt_input_ids": list(prompt_ids),
        "prompt_input_ids_nosys": list(prompt_ids_nosys),
        "text_nosys": dec(ids_nosys),
        "input_ids_nosys": ids_nosys,
        "generated_text_mask": [0] * len(prompt_ids) + [1] * len(generated_ids),
        "generated_text_mask_nosys": [0] * len(prompt_ids_nosys) + [1] * len(generated_ids),
        "generated_text": tokenizer.decode(generated_ids, skip_special_tokens=True),
    }
    # the original's names for the same unprompted side (its readers look for these)
    rec["noprompt_text"] = rec["prompt_text_nosys"]
    rec["noprompt_input_ids"] = rec["prompt_input_ids_nosys"]
    rec["nosys_input_str"] = rec["text_nosys"]
    rec["nosys_input_ids"] = rec["input_ids_nosys"]
    rec.update(extra)
    return rec


def cut_at_end_of_turn(ids: list[int], eot_ids: set[int] | list[int]) -> list[int]:
    """Keep tokens up to and including the first end-of-turn token (padding follows it)."""
    eot = set(eot_ids)
    for i, t in enumerate(ids):
        if t in eot:
            return ids[: i + 1]
    return ids


def generated_ids(rec: dict, nosys: bool = False) -> list[int]:
    suffix = "_nosys" if nosys else ""
    ids, mask = rec["input_ids" + suffix], rec["generated_text_mask" + suffix]
    return [i for i, m in zip(ids, mask) if m]


def group_identical(keys: list) -> tuple[list[int], list[int]]:
    """(group of each item, first item of each group): equal keys form one group, the
    groups numbered in order of first appearance. Shared prompts are found this way in
    generation (sampling.hf.shared_prefill) and in training (training.batches.prefix_groups)."""
    seen: dict = {}
    group, reps = [], []
    for i, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(reps)
            reps.append(i)
        group.append(seen[key])
    return group, reps


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


# ---------------------------------------------------------------- input checks
def check_fingerprint(path: str, tokenizer, meta: dict | None = None) -> None:
    """The trajectories at `path` were made with `tokenizer` (its .meta.json says so)."""
    meta = read_meta(path) if meta is None else meta
    if meta is None:
        warn(f"{path} has no .meta.json sidecar; cannot check it was made with this tokenizer")
        return
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"{path} was generated with another tokenizer (model {meta.get('model_name')!r}); "
            "train with that model's --model_name or regenerate the data"
        )


def check_token_ids(rows: list[dict], model) -> None:
    """Ids beyond the embedding would crash deep in torch: data from another model's
    tokenizer (a file without a .meta.json sidecar gets this far)."""
    vocab = model.get_input_embeddings().num_embeddings
    top = max(max(r["input_ids"] + r["input_ids_nosys"], default=0) for r in rows)
    if top >= vocab:
        raise UserError(
            f"the trajectories hold token id {top}, but the model has {vocab} ids: they were "
            "generated with another model's tokenizer; regenerate them with this --model_name"
        )


def sidecar_path(traj_path: str | Path) -> Path:
    return Path(str(traj_path) + ".teacher.safetensors")
