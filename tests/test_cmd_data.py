"""The data command (promptbake.data): hub rows become promptbake records, and fetching
works, or fails in one line, without a network.

    python -m pytest tests/test_cmd_data.py -q
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from promptbake.configs import DATASET_NAMES
from promptbake.data import _convert_rows, fetch_dataset
from promptbake.errors import UserError

# --- (a) hub rows -> promptbake records


def test_convert_squad_rows() -> None:
    rows = [
        {
            "id": "5733be284776f41900661182",
            "title": "Some_Title",
            "context": "The bridge was finished in 1932.",
            "question": "  When was the bridge finished? ",
            "answers": {"text": ["1932", "in 1932"], "answer_start": [26, 23]},
        }
    ]
    assert _convert_rows("squad", "train", rows) == [
        {
            "id": "5733be284776f41900661182",
            "question": "When was the bridge finished?",
            "context": "The bridge was finished in 1932.",
            "answers": ["1932", "in 1932"],
        }
    ]


def test_convert_gsm8k_rows() -> None:
    rows = [
        {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 4 * 5?", "answer": "4 * 5 = 20\n#### 20\n"},
    ]
    assert _convert_rows("gsm8k", "test", rows) == [
        {
            "id": "gsm8k-test-00000",
            "question": "Ann has 2 apples and buys 3. How many?",
            "answer": "2 + 3 = 5\n#### 5",
        },
        {"id": "gsm8k-test-00001", "question": "What is 4 * 5?", "answer": "4 * 5 = 20\n#### 20"},
    ]


def test_convert_unknown_name() -> None:
    with pytest.raises(UserError):
        _convert_rows("mnist", "train", [])


# --- (b) fetch_dataset without a network


def _one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_fetch_squad_offline_raises_user_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as exc:
        fetch_dataset("squad", tmp_path)
    msg = _one_line(exc)
    assert "datasets" in msg or "squad" in msg
    assert not list(tmp_path.iterdir())


def test_fetch_without_datasets_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match=r"pip install 'promptbake\[data\]'"):
        fetch_dataset("gsm8k", tmp_path)


def _fake_datasets(load_dataset) -> types.ModuleType:
    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset
    return mod


@pytest.mark.parametrize(
    ("offline_env", "why"), [(None, "no network?"), ("0", "no network?"), ("1", "offline mode")]
)
def test_fetch_hub_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline_env: str | None, why: str
) -> None:
    def load_dataset(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'rajpurkar/squad' on the Hub\n(LocalEntryNotFoundError)"
        )

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    if offline_env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    with pytest.raises(UserError) as exc:
        fetch_dataset("squad", tmp_path)
    msg = _one_line(exc)
    assert "could not download squad" in msg
    assert why in msg
    assert "data/questions.jsonl" in msg
    assert not list(tmp_path.iterdir())


def test_fetch_with_fake_hub_writes_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return [
            {"question": f"{split} question {i}?", "answer": f"step\n#### {i}"} for i in range(5)
        ]

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    out = tmp_path / "new" / "data"
    paths = fetch_dataset("GSM8K", out, max_rows=3)
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert paths == [out / "gsm8k_train.jsonl", out / "gsm8k_validation.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["gsm8k_train.jsonl", "gsm8k_validation.jsonl"]
    lines = paths[1].read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [
        {
            "id": f"gsm8k-test-{i:05d}",
            "question": f"test question {i}?",
            "answer": f"step\n#### {i}",
        }
        for i in range(3)
    ]


@pytest.mark.parametrize("bad", ["mnist", "", "squad2"])
def test_fetch_unknown_name(bad: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        fetch_dataset(bad, tmp_path)
    msg = _one_line(exc)
    for name in DATASET_NAMES:
        assert name in msg


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_fetch_bad_max_rows(bad, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="max_rows"):
        fetch_dataset("squad", tmp_path, max_rows=bad)
