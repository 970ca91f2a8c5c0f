"""Fixed-string tests for promptbake.evaluation.scorers (no model needed)."""

from __future__ import annotations

import sys

import pytest

from promptbake.errors import UserError
from promptbake.evaluation.scorers import (
    Scorer,
    allcaps_share,
    extract_choice,
    extract_gold_number,
    extract_pred_number,
    language_share,
    marker,
    math_answer,
    mc_letter,
    parse_scorer,
    score_all,
)

GSM8K_GOLD = {
    "question": "How much?",
    "answer": "She sells 1,000 + 234 = <<1000+234=1234>>1,234 cups.\n#### 1,234",
}

FRENCH = (
    "Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans. "
    "Chaque matin, je prends le métro pour aller au travail. "
    "Le soir, j'aime lire un bon livre ou me promener le long de la Seine.\n"
    "La réponse est simple : il faut toujours vérifier ses calculs avant de conclure."
)
ENGLISH = (
    "Hello, my name is Mary and I have lived in London for ten years. "
    "Every morning I take the underground to get to work. "
    "In the evening I like to read a good book or walk along the river.\n"
    "The answer is simple: always check your calculations before concluding."
)


# ----------------------------------------------------------------- predicted numbers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 72.", 72.0),
        ("The answer is $1,234.50.", 1234.5),
        ("the ANSWER is 5", 5.0),
        ("The final answer is: **$1,000**.", 1000.0),
        ("The answer is **18**", 18.0),
        ("So we get \\boxed{42}.", 42.0),
        ("The answer is \\boxed{17}. Then 3 remain.", 17.0),
        ("The answer is -5.", -5.0),
        ("The answer is \u22124", -4.0),
        ("It drops to -3.5 degrees", -3.5),
        ("He owes $-5", -5.0),
        ("The answer is 3. Wait, the answer is 4.", 4.0),
        ("First 3 apples, then 7 more, so 10 in total", 10.0),
        ("20-5 = 15", 15.0),
        ("12 - 5", 5.0),
        ("values 1,2,3", 3.0),
        ("It costs .5 dollars", 0.5),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_pred_number(text, expected):
    assert extract_pred_number(text) == expected


# ----------------------------------------------------------------- gold numbers


@pytest.mark.parametrize(
    "example, expected",
    [
        (GSM8K_GOLD, 1234.0),
        ({"answer": "Half of 144 is 72.\n#### 72"}, 72.0),
        ({"answer": "#### -8"}, -8.0),
        ({"Answer": 8.0}, 8.0),  # SVAMP
        ({"answer": 8.0}, 8.0),
        ({"answer": "9 (apples)"}, 9.0),  # ASDiv
        ({"answer": "0.5 (m)"}, 0.5),
        ({"answer": 72}, 72.0),
        ({"answer": "72"}, 72.0),
        ({"answer": "1,234"}, 1234.0),
        ({"answer": True}, None),
        ({"answer": "none"}, None),
        ({"question": "no answer field"}, None),
    ],
)
def test_extract_gold_number(example, expected):
    assert extract_gold_number(example) == expected


def test_math_answer_scores():
    s = math_answer()
    assert s.name == "math"
    assert s("Adding up, the answer is 1,234.", GSM8K_GOLD) == 1.0
    assert s("The answer is 1234.0", GSM8K_GOLD) == 1.0
    assert s("The answer is 1,235.", GSM8K_GOLD) == 0.0
    assert s("8 pens", {"Answer": 8.0}) == 1.0  # 8 == 8.0 via the last-number fallback
    assert s("so 9 apples", {"answer": "9 (apples)"}) == 1.0
    assert s("The answer is 0.5000000001", {"answer": "0.5 (m)"}) == 1.0  # within 1e-6
    assert s("The answer is 0.51", {"answer": "0.5 (m)"}) == 0.0
    assert s("I don't know.", {"answer": "#### 0"}) == 0.0  # no number -> 0.0
    assert s("The answer is -5", {"answer": "#### -5"}) == 1.0


def test_math_answer_missing_gold_is_user_error():
    with pytest.raises(UserError, match="no numeric"):
        math_answer()("The answer is 3", {"question": "q"})


# ----------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (B)", "B"),
        ("Let me think. The answer is (b).", "B"),
        ("Answer: C", "C"),
        ("**Answer:** D", "D"),
        ("The correct answer is option E.", "E"),
        ("**B**", "B"),
        ("I pick **(A)** here", "A"),
        ("B. Because the sky is blue.", "B"),
        ("(C) since it is larger", "C"),
        ("B", "B"),
        ("B. at first, but the answer is D.", "D"),
        ("The answer is a number", None),  # article "a", not choice A
        ("Answer: Carbon", None),
        ("This is **important** A dog", None),
        ("Options: (A) 1 (B) 2 (C) 3", None),  # restated options are not an answer
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, "ABCDE") == expected


def test_extract_choice_respects_choice_set():
    assert extract_choice("The answer is E", "ABCD") is None
    assert extract_choice("The answer is E", "ABCDE") == "E"


def test_mc_letter_gold_letter_and_index():
    s = mc_letter()
    assert s.name == "mc"
    assert s("The answer is (B)", {"answer": "B"}) == 1.0
    assert s("The answer is (B)", {"answer": 1}) == 1.0
    assert s("The answer is (B)", {"answer": "(b)"}) == 1.0
    assert s("The answer is (B)", {"answer": 0}) == 0.0
    assert s("no idea", {"answer": "B"}) == 0.0


def test_mc_letter_bad_gold_is_user_error():
    with pytest.raises(UserError):
        mc_letter("ABCD")("A", {"answer": "E"})
    with pytest.raises(UserError):
        mc_letter("ABCD")("A", {"answer": 4})
    with pytest.raises(UserError):
        mc_letter("ABCD")("A", {"question": "q"})


# ----------------------------------------------------------------- allcaps


@pytest.mark.parametrize(
    "text, expected",
    [
        ("HELLO world", 0.5),
        ("HELLO WORLD!", 1.0),
        ("I HAVE 3 CATS!", 1.0),
        ("hello", 0.0),
        ("123 !?", 0.0),
        ("", 0.0),
    ],
)
def test_allcaps_share(text, expected):
    assert allcaps_share()(text, {}) == expected


# ----------------------------------------------------------------- marker


def test_marker_case_insensitive_by_default():
    s = marker("Zorblax")
    assert s.name == "marker:Zorblax"
    assert s("I am ZORBLAX, your guide.", {}) == 1.0
    assert s("i am zorblax", {}) == 1.0
    assert s("I am Bob.", {}) == 0.0
    assert s("", {}) == 0.0


def test_marker_case_sensitive_round_trips():
    s = marker("Zorblax", ignore_case=False)
    assert s("zorblax", {}) == 0.0
    assert s("Zorblax", {}) == 1.0
    again = parse_scorer(s.name)
    assert again("zorblax", {}) == 0.0
    assert again("Zorblax", {}) == 1.0


def test_marker_bad_regex():
    with pytest.raises(UserError, match="bad regex"):
        marker("(unclosed")


# ----------------------------------------------------------------- language


def test_language_share_french_and_english():
    fr = language_share("fr")
    assert fr.name == "lang:fr"
    assert fr(FRENCH, {}) > 0.9
    assert fr(ENGLISH, {}) == 0.0
    assert language_share("en")(ENGLISH, {}) > 0.9


def test_language_share_mixed_and_empty():
    fr = language_share("fr")
    mixed = (
        "Bonjour, je suis très content de vous voir aujourd'hui.\n"
        "This sentence is clearly written in the English language."
    )
    assert fr(mixed, {}) == 0.5
    assert fr("", {}) == 0.0
    assert fr("42. 7! ok", {}) == 0.0  # every fragment has < 3 letters


def test_language_share_is_deterministic():
    fr = language_share("fr")
    text = "Oui. Non. Peut-être demain, ou jamais.\nC'est la vie."
    assert len({fr(text, {}) for _ in range(5)}) == 1


def test_language_share_unknown_code():
    with pytest.raises(UserError, match="unknown language code"):
        language_share("french")


def test_language_share_without_langdetect(monkeypatch):
    # A None entry in sys.modules makes `import langdetect...` raise ImportError.
    monkeypatch.setitem(sys.modules, "langdetect", None)
    monkeypatch.setitem(sys.modules, "langdetect.detector_factory", None)
    with pytest.raises(UserError, match=r"pip install 'promptbake\[eval\]'"):
        language_share("fr")


# ----------------------------------------------------------------- registry / parse_scorer


@pytest.mark.parametrize(
    "spec, name",
    [
        ("marker:Zorblax", "marker:Zorblax"),
        ("marker:a:b", "marker:a:b"),  # only the first ":" splits
        ("lang:fr", "lang:fr"),
        ("lang:FR", "lang:fr"),
        ("allcaps", "allcaps"),
        ("math", "math"),
        ("mc", "mc"),
        ("mc:ABCD", "mc:ABCD"),
        ("mc:abcd", "mc:ABCD"),
    ],
)
def test_parse_scorer_names(spec, name):
    s = parse_scorer(spec)
    assert isinstance(s, Scorer)
    assert s.name == name
    assert parse_scorer(s.name).name == name


def test_parse_scorer_works_end_to_end():
    assert parse_scorer("marker:zorb")("ZORBLAX", {}) == 1.0
    assert parse_scorer("math")("The answer is 72.", {"answer": "#### 72"}) == 1.0
    assert parse_scorer("mc:ABCD")("Answer: D", {"answer": 3}) == 1.0
    assert parse_scorer("allcaps")("HELLO world", {}) == 0.5


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "bogus",
        "exact:42",
        "marker",
        "marker:",
        "lang",
        "lang:",
        "allcaps:1",
        "math:x",
        "mc:",
        "mc:A",
        "mc:AA",
        "mc:A1",
    ],
)
def test_parse_scorer_errors(spec):
    with pytest.raises(UserError) as info:
        parse_scorer(spec)
    assert "\n" not in str(info.value)


def test_parse_scorer_unknown_lists_valid_specs():
    with pytest.raises(
        UserError, match=r"unknown scorer 'bogus'; valid: marker:REGEX.*lang:.*allcaps.*math.*mc"
    ):
        parse_scorer("bogus")


# ----------------------------------------------------------------- score_all


def test_score_all_mean_and_empty():
    s = parse_scorer("marker:yes")
    assert score_all(["yes", "no", "YES", "nope"], [{}, {}, {}, {}], s) == 0.5
    assert score_all([], [], s) == 0.0
    with pytest.raises(ValueError):
        score_all(["yes"], [], s)
