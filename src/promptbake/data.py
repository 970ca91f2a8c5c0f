"""Inputs and outputs on disk: prompts, question sets, the trajectory schema, atomic writes.

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
A sidecar ``<file>.meta.json`` records the model, tokenizer fingerprint, x0 text and
generation arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

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
)


# ---------------------------------------------------------------- atomic writes
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file beside `path`, rename over it on success, delete it on failure.

    A reader never sees a half-written file: either the old one or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc), else the one at import."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return _UMASK


def apply_umask(path: str | Path) -> None:
    """Give `path` (a file, or a directory and all it holds) the modes open()/mkdir() give:
    0o666 / 0o777 less the umask. mkstemp, mkdtemp and safetensors create 0600 / 0700,
    which the user's other accounts (a serving user, a shared group) cannot read."""
    umask, path = current_umask(), Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------- reading inputs
def read_prompt(path: str | Path, what: str = "--x0_file") -> str:
    """The prompt to bake, from a text/Markdown file; missing or empty is an error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"{what} {path}: no such file (give the path of a text file with the prompt)"
        )
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        raise UserError(f"{what} {path}: the file is empty; write the prompt to bake into it")
    return text


def iter_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path}: no such file")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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


def read_questions(paths: str | Path | list, what: str = "--question_dataset") -> list[dict]:
    """Question records from one or more JSONL files (comma-separated string allowed)."""
    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p]
    out: list[dict] = []
    for path in paths:
        for lineno, obj in iter_jsonl(path, what):
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise UserError(
                    f"{what} {path}, line {lineno}: no non-empty 'question' field "
                    '(each line needs {"question": "..."})'
                )
            out.append(obj)
    if not out:
        raise UserError(f"{what} {','.join(map(str, paths))}: no questions found")
    return out


def read_trajectories(path: str | Path, what: str = "--data_path") -> list[dict]:
    """Trajectory records, checked against the schema so training fails early and clearly."""
    rows = []
    for lineno, obj in iter_jsonl(path, what):
        missing = [
            k
            for k in (
                "input_ids",
                "input_ids_nosys",
                "generated_text_mask",
                "generated_text_mask_nosys",
            )
            if k not in obj
        ]
        if missing:
            raise UserError(
                f"{what} {path}, line {lineno}: missing {', '.join(missing)}; "
                "is this a trajectory file written by generate_data.py?"
            )
        if len(obj["input_ids"]) != len(obj["generated_text_mask"]) or len(
            obj["input_ids_nosys"]
        ) != len(obj["generated_text_mask_nosys"]):
            raise UserError(f"{what} {path}, line {lineno}: ids and masks differ in length")
        if sum(obj["generated_text_mask"]) != sum(obj["generated_text_mask_nosys"]):
            raise UserError(
                f"{what} {path}, line {lineno}: prompted and unprompted rows have different "
                "numbers of generated tokens"
            )
        rows.append(obj)
    if not rows:
        raise UserError(f"{what} {path}: the file has no trajectories")
    return rows


def meta_path(traj_path: str | Path) -> Path:
    return Path(str(traj_path) + ".meta.json")


def read_meta(traj_path: str | Path) -> dict | None:
    p = meta_path(traj_path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{p}: not valid JSON ({e.msg}); delete it or regenerate the data"
        ) from None


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
    rec.update(extra)
    return rec


def generated_ids(rec: dict, nosys: bool = False) -> list[int]:
    suffix = "_nosys" if nosys else ""
    ids, mask = rec["input_ids" + suffix], rec["generated_text_mask" + suffix]
    return [i for i, m in zip(ids, mask) if m]


def group_identical(keys: list) -> tuple[list[int], list[int]]:
    """(group of each item, first item of each group): equal keys form one group, the
    groups numbered in order of first appearance. Shared prompts are found this way in
    generation (engine_hf.shared_prefill) and in training (batches.prefix_groups)."""
    seen: dict = {}
    group, reps = [], []
    for i, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(reps)
            reps.append(i)
        group.append(seen[key])
    return group, reps
