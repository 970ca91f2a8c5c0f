"""The trajectory schema: one sampled answer per JSONL line, read back and checked.

    from promptbake.schema import make_trajectory, read_trajectories
    rows = read_trajectories("data/t.jsonl", "--data_path", tokenizer)

A trajectory file is JSONL, one line per sampled answer, with the original scripts' keys:

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
the list of chat messages of a conversation prompt), generation arguments and row count;
``<file>.teacher.safetensors`` may hold the teacher's log-probs (training/sidecar.py).

`read_trajectories` also reads files in the original ``generate_data.py`` layout (input
ids right-padded with eos, mask zero at every eos, no ``*_nosys`` keys; see
`ORIGINAL_KEYS`) and converts them to this schema.
"""

from __future__ import annotations

from collections.abc import Iterator  # noqa: F401
from pathlib import Path
from typing import Any

from .errors import UserError, warn
from .models import end_of_turn_ids, tokenizer_fingerprint
from .records import iter_jsonl, read_json

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
