"""The shipped data files (data/): well formed, disjoint where they must be, and listed in
data/README.md.

    python -m pytest tests/test_shipped_data.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"

# file -> (id pattern, minimum count, required fields)
JSONL_FILES = {
    "questions.jsonl": (r"q\d{4}", 220, ("id", "question")),
    "identity_train.jsonl": (r"it\d{3}", 40, ("id", "question")),
    "identity_heldout.jsonl": (r"ih\d{3}", 12, ("id", "question")),
    "math_questions.jsonl": (r"m\d{3}", 40, ("id", "question", "answer")),
}
PROMPTS = [
    "truth_x0.md",
    "zorblax_x0.md",
    "pirate_x0.md",
    "french_x0.md",
    "caps_x0.md",
    "cot_math_x0.md",
]


def _load(name: str) -> list[dict]:
    records = []
    with open(DATA / name, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{name}:{lineno}: blank line"
            rec = json.loads(line)
            assert isinstance(rec, dict), f"{name}:{lineno}: not an object"
            records.append(rec)
    return records


def _norm(q: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", q.lower()).split())


# --- (a) every shipped JSONL parses, has its fields, unique ids/questions, counts


@pytest.mark.parametrize("name", sorted(JSONL_FILES))
def test_jsonl_well_formed(name: str) -> None:
    id_pattern, min_count, fields = JSONL_FILES[name]
    records = _load(name)
    assert len(records) >= min_count
    for rec in records:
        assert set(rec) == set(fields), rec
        for field in fields:
            assert isinstance(rec[field], str) and rec[field].strip(), rec
        assert re.fullmatch(id_pattern, rec["id"]), rec["id"]
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids), "duplicate ids"
    questions = [_norm(r["question"]) for r in records]
    assert len(set(questions)) == len(questions), "duplicate questions"


def test_general_questions_are_short_and_not_about_identity() -> None:
    identity = re.compile(r"\b(your name|who are you|yourself|call you)\b", re.IGNORECASE)
    for rec in _load("questions.jsonl"):
        assert len(rec["question"].split()) < 30, rec
        assert not identity.search(rec["question"]), rec


@pytest.mark.parametrize("name", PROMPTS)
def test_prompt_files_nonempty(name: str) -> None:
    text = (DATA / name).read_text(encoding="utf-8")
    assert text.strip()
    assert text.endswith("\n")


def test_cot_math_prompt_has_four_worked_answers() -> None:
    text = (DATA / "cot_math_x0.md").read_text(encoding="utf-8")
    assert len(re.findall(r"^The answer is \d+\.$", text, re.MULTILINE)) == 4


def test_readme_lists_every_file() -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for name in [*JSONL_FILES, *PROMPTS]:
        assert f"`{name}`" in readme, name
    assert "promptbake data squad" in readme and "promptbake data gsm8k" in readme


# --- (b) identity held-out set is disjoint from train and asks for the name


def test_identity_heldout_disjoint_from_train() -> None:
    train = {_norm(r["question"]) for r in _load("identity_train.jsonl")}
    heldout = {_norm(r["question"]) for r in _load("identity_heldout.jsonl")}
    assert not train & heldout


def test_identity_heldout_has_direct_name_questions() -> None:
    direct = re.compile(r"\b(name|called|call you)\b", re.IGNORECASE)
    hits = [r for r in _load("identity_heldout.jsonl") if direct.search(r["question"])]
    assert len(hits) >= 10


# --- (c) math answers are GSM8K-style "#### N"


def test_math_answers_format() -> None:
    for rec in _load("math_questions.jsonl"):
        assert re.fullmatch(r"#### -?\d+", rec["answer"]), rec


# --- (d) the demo persona prompt is exact


def test_zorblax_prompt_exact() -> None:
    assert (DATA / "zorblax_x0.md").read_text(encoding="utf-8") == "Your name is Zorblax.\n"
