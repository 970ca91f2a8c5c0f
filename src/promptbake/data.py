"""Fetch public question sets (SQuAD, GSM8K) into promptbake's JSONL format.

Usage (needs network and the optional ``datasets`` package,
``pip install 'promptbake[data]'``)::

    promptbake data squad            # data/squad_train.jsonl, data/squad_validation.jsonl
    promptbake data gsm8k            # data/gsm8k_train.jsonl, data/gsm8k_validation.jsonl

or from Python::

    from promptbake.fetch import fetch_dataset
    paths = fetch_dataset("squad", "data", max_rows=2000)

Records written:

* squad: ``{"id", "question", "context", "answers"}`` where ``answers`` is the
  list of gold answer strings (hub dataset ``rajpurkar/squad``, splits
  ``train`` and ``validation``).
* gsm8k: ``{"id", "question", "answer"}`` where ``answer`` is the GSM8K
  solution ending in ``#### N`` (hub dataset ``openai/gsm8k``, config
  ``main``; its ``test`` split is written as ``gsm8k_validation.jsonl``).

Every file is written atomically (files.write_jsonl: a temp file in the same folder, then
``os.replace``), so an interrupted fetch never leaves a half-written set.
Any download failure (no network, hub unreachable, offline mode) becomes a
one-line :class:`~promptbake.errors.UserError` that says how to get the data
anyway. Offline, use the bundled ``data/questions.jsonl`` and
``data/math_questions.jsonl`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from .configs.choices import DATASET_NAMES
from .errors import UserError
from .files import write_jsonl

__all__ = ["DATASET_NAMES", "fetch_command", "fetch_dataset"]


@dataclass(frozen=True)
class _Spec:
    """Where a public dataset lives on the hub and how its splits map to files."""

    hub_id: str
    config: str | None
    # (hub split, promptbake split): the file is f"{name}_{promptbake split}.jsonl"
    splits: tuple[tuple[str, str], ...]
    offline_fallback: str


_SPECS: dict[str, _Spec] = {
    "squad": _Spec(
        hub_id="rajpurkar/squad",
        config=None,
        splits=(("train", "train"), ("validation", "validation")),
        offline_fallback="data/questions.jsonl",
    ),
    "gsm8k": _Spec(
        hub_id="openai/gsm8k",
        config="main",
        splits=(("train", "train"), ("test", "validation")),
        offline_fallback="data/math_questions.jsonl",
    ),
}

assert tuple(_SPECS) == DATASET_NAMES, "configs.choices.DATASET_NAMES lists the sets"

_MISSING_DATASETS = (
    "fetching public datasets needs the `datasets` package: pip install 'promptbake[data]'"
)


def _convert_rows(name: str, split: str, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Turn raw hub rows of dataset `name` into promptbake records.

    `split` is the hub split the rows came from (it names GSM8K ids, which
    the hub rows lack). Pure: no I/O, so it is testable without a network.
    """
    if name == "squad":
        out = []
        for row in rows:
            answers = row["answers"]
            texts = answers["text"] if isinstance(answers, Mapping) else answers
            out.append(
                {
                    "id": str(row["id"]),
                    "question": str(row["question"]).strip(),
                    "context": str(row["context"]),
                    "answers": [str(t) for t in texts],
                }
            )
        return out
    if name == "gsm8k":
        return [
            {
                "id": f"gsm8k-{split}-{i:05d}",
                "question": str(row["question"]).strip(),
                "answer": str(row["answer"]).strip(),
            }
            for i, row in enumerate(rows)
        ]
    raise UserError(_unknown_name_message(name))


def _unknown_name_message(name: str) -> str:
    return f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}"


def _download_failed(name: str, spec: _Spec, exc: BaseException) -> UserError:
    offline = [
        v
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    ]
    why = f"offline mode: {offline[0]}={os.environ[offline[0]]}" if offline else "no network?"
    detail = " ".join(str(exc).split())[:160]
    cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    first = f"data/{name}_{spec.splits[0][1]}.jsonl"
    return UserError(
        f"could not download {name} from the Hugging Face Hub ({spec.hub_id}; {why}; {cause}): "
        f"run `promptbake data {name}` on a machine with internet and copy {first} here, "
        f"or use the bundled offline set {spec.offline_fallback}"
    )


def fetch_dataset(
    name: str, out_dir: str | Path = "data", *, max_rows: int | None = None
) -> list[Path]:
    """Download public dataset `name` ("squad" or "gsm8k") into `out_dir` as JSONL.

    Writes one file per split, ``{out_dir}/{name}_train.jsonl`` and
    ``{out_dir}/{name}_validation.jsonl``, and returns their paths. `max_rows`
    keeps only the first N rows of each split. All splits are downloaded
    before anything is written, so a failed fetch leaves no new files.

    Raises UserError for an unknown name, a missing ``datasets`` package, or
    any download failure.
    """
    key = name.strip().lower()
    if key not in _SPECS:
        raise UserError(_unknown_name_message(name))
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
    ):
        raise UserError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    spec = _SPECS[key]

    try:
        import datasets
    except ImportError as exc:
        raise UserError(_MISSING_DATASETS) from exc

    converted: list[tuple[str, list[dict[str, Any]]]] = []
    for hub_split, our_split in spec.splits:
        try:
            ds = datasets.load_dataset(spec.hub_id, spec.config, split=hub_split)
            rows = list(islice(iter(ds), max_rows))
        except Exception as exc:  # network, hub and offline errors take many shapes
            raise _download_failed(key, spec, exc) from exc
        converted.append((our_split, _convert_rows(key, hub_split, rows)))

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    paths: list[Path] = []
    for our_split, records in converted:
        path = out / f"{key}_{our_split}.jsonl"
        try:
            write_jsonl(path, records)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
        paths.append(path)
    return paths


def fetch_command(cfg) -> None:
    """`promptbake data NAME`: fetch_dataset with a DataConfig (configs/tools.py)."""
    cfg.validate()
    for path in fetch_dataset(cfg.name, cfg.out_dir, max_rows=cfg.max_rows):
        print(f"wrote {path}")
