"""Scorers: pure functions that grade one model answer against one question record.

A scorer maps ``(answer_text, example) -> float`` in ``[0, 1]``, where ``example`` is
the question record from a JSONL question set (``{"question": ..., "answer": ...}``).
No model is involved, so every scorer is cheap, deterministic and unit-testable.

Usage::

    from promptbake.scorers import parse_scorer, score_all

    scorer = parse_scorer("math")          # or "marker:Zorblax", "lang:fr", "allcaps", "mc:ABCD"
    scorer.name                            # "math"
    scorer("... The answer is 72.", {"answer": "...\\n#### 72"})   # 1.0
    score_all(answers, examples, scorer)   # mean over the question set

Spec strings accepted by :func:`parse_scorer` (the CLI's ``--scorer`` values):

* ``marker:REGEX`` - 1.0 if REGEX matches anywhere (case-insensitive; write
  ``(?-i:REGEX)`` for a case-sensitive match).
* ``lang:CODE``    - share of sentences that langdetect labels as CODE (``fr``, ``de``, ...).
* ``allcaps``      - share of cased letters that are uppercase.
* ``math``         - 1.0 if the predicted final number equals the gold number
  (GSM8K ``#### N``, SVAMP numeric ``Answer``, ASDiv ``"9 (apples)"``, plain numbers).
* ``mc`` / ``mc:LETTERS`` - 1.0 if the extracted choice letter equals the gold letter
  (or the 0-based gold index); default letters ``ABCDE``.

A malformed spec, or a record with no usable gold answer, raises
:class:`promptbake.errors.UserError` (one line, printed by the CLI without a traceback).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..configs.choices import SCORER_SPECS, SCORER_USAGE
from ..errors import UserError

__all__ = [
    "Scorer",
    "SCORER_SPECS",
    "allcaps_share",
    "extract_choice",
    "extract_gold_number",
    "extract_pred_number",
    "language_share",
    "marker",
    "math_answer",
    "mc_letter",
    "parse_scorer",
    "score_all",
    "scorer_kinds",
]

ScoreFn = Callable[[str, dict], float]


@dataclass(frozen=True)
class Scorer:
    """A named scoring function; call it as ``scorer(answer_text, example) -> float``.

    ``name`` is a spec string that :func:`parse_scorer` maps back to an equivalent
    scorer, so it can label eval tables and be stored in result files.
    """

    name: str
    fn: ScoreFn = field(repr=False, compare=False)

    def __call__(self, text: str, example: dict) -> float:
        return float(self.fn(text, example))


# --------------------------------------------------------------------------- marker


def marker(pattern: str, ignore_case: bool = True) -> Scorer:
    """1.0 if the regex ``pattern`` matches anywhere in the answer, else 0.0.

    Used for persona checks such as "does the model still call itself Zorblax".
    """
    if not pattern:
        raise UserError("marker scorer needs a regex, e.g. marker:Zorblax")
    try:
        rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as e:
        raise UserError(f"marker scorer: bad regex {pattern!r}: {e}") from None

    def score(text: str, example: dict) -> float:
        return 1.0 if rx.search(text or "") else 0.0

    # A scoped inline flag keeps the name a valid, equivalent spec for parse_scorer
    # (which always compiles with IGNORECASE).
    name = f"marker:{pattern}" if ignore_case else f"marker:(?-i:{pattern})"
    return Scorer(name, score)


# --------------------------------------------------------------------------- language

# Sentence boundaries: Western and CJK end punctuation, plus line breaks (models often
# answer in bullet lists without final periods). Decimal points split "3.5" into two
# short numeric fragments, which the letter-count filter then drops, so that is harmless.
_SENTENCE_SPLIT = re.compile(r"[.!?;。！？；…]+|\n+")

_LANGDETECT_MISSING = "language scoring needs langdetect: pip install 'promptbake[eval]'"


def _split_sentences(text: str) -> list[str]:
    """Sentence-ish fragments with at least 3 letters (shorter ones carry no language)."""
    parts = (p.strip() for p in _SENTENCE_SPLIT.split(text or ""))
    return [p for p in parts if sum(c.isalpha() for c in p) >= 3]


def _langdetect_codes() -> set[str]:
    """Language codes langdetect knows, read from its profile folder (no profile load)."""
    try:
        from langdetect.detector_factory import PROFILES_DIRECTORY
    except ImportError:
        raise UserError(_LANGDETECT_MISSING) from None
    try:
        return set(os.listdir(PROFILES_DIRECTORY))
    except OSError:  # unusual install layout: skip validation rather than fail
        return set()


def language_share(lang: str = "fr") -> Scorer:
    """Share of the answer's sentences that langdetect labels as ``lang``.

    Sentences are split on sentence punctuation and newlines; fragments with fewer
    than 3 letters are skipped. A sentence whose language cannot be detected counts
    as "not ``lang``". Empty answer (or nothing left after filtering) -> 0.0.

    ``lang`` is a langdetect code; a bare prefix also matches regional codes
    (``zh`` matches ``zh-cn`` and ``zh-tw``).
    """
    lang = (lang or "").strip().lower()
    if not lang:
        raise UserError("lang scorer needs a language code, e.g. lang:fr")
    # Check for langdetect when the scorer is built (i.e. when the CLI parses its flags),
    # not at scoring time after minutes of generation.
    codes = _langdetect_codes()
    if codes and lang not in codes and not any(c.split("-")[0] == lang for c in codes):
        raise UserError(
            f"lang scorer: unknown language code {lang!r}; use a langdetect code such as "
            f"{', '.join(sorted(codes)[:12])}, ..."
        )

    def score(text: str, example: dict) -> float:
        sentences = _split_sentences(text)
        if not sentences:
            return 0.0
        from langdetect import DetectorFactory, detect
        from langdetect.lang_detect_exception import LangDetectException

        # langdetect samples n-grams at random; a fixed seed makes scores reproducible.
        # Set on every call because other code may have changed the class attribute.
        DetectorFactory.seed = 0
        hits = 0
        for s in sentences:
            try:
                got = detect(s)
            except LangDetectException:  # e.g. only digits/symbols left: not `lang`
                continue
            if got == lang or got.split("-")[0] == lang:
                hits += 1
        return hits / len(sentences)

    return Scorer(f"lang:{lang}", score)


# --------------------------------------------------------------------------- all caps


def allcaps_share() -> Scorer:
    """Share of cased letters that are uppercase ("HELLO world" -> 0.5).

    Only letters count: digits, punctuation and caseless scripts (CJK, Arabic, ...)
    are ignored, so "I HAVE 3 CATS!" scores 1.0. No cased letters -> 0.0.
    """

    def score(text: str, example: dict) -> float:
        upper = lower = 0
        for c in text or "":
            if c.isupper():
                upper += 1
            elif c.islower():
                lower += 1
        total = upper + lower
        return upper / total if total else 0.0

    return Scorer("allcaps", score)


# --------------------------------------------------------------------------- math

# One number as models write it: optional sign (ASCII or Unicode minus) and dollar sign
# in either order, thousands separators only in groups of three (so a list "1,2,3" stays
# three numbers), optional decimals. A trailing sentence period is not consumed because
# the decimal part needs at least one digit. A minus counts as a sign only when it is
# glued to the digits and not preceded by a word character, so "20-5" and "12 - 5" end
# in 5, not -5.
_SIGN = r"(?<![\w.])[-\u2212]"
_NUM = (
    rf"(?:{_SIGN}\$?|\$\s?[-\u2212]?)?(?:\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+)(?:\.\d+)?"
    rf"|{_SIGN}?\.\d+"
)
_NUM_RE = re.compile(_NUM)

# "The answer is N" / "The final answer is: **$1,234.50**." / "The answer is \boxed{7}".
_ANSWER_IS_RE = re.compile(
    r"answer\s+is\s*:?\s*(?:[*_$(\s]|\\\(|\\\[|\\boxed\s*\{|\\text\s*\{)*(" + _NUM + r")",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{)?\s*(" + _NUM + r")")
_GSM8K_GOLD_RE = re.compile(r"####\s*(" + _NUM + r")")


def _to_float(num: str) -> float | None:
    """Parse one `_NUM` match ("-$1,234.50" -> -1234.5)."""
    s = num.replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    try:
        return float(s)
    except ValueError:
        return None


def extract_pred_number(text: str) -> float | None:
    """The model's final numeric answer, or None if the text has no number.

    Priority: the last "The answer is N" (the format the CoT prompt asks for), then the
    last ``\\boxed{N}``, then the last number anywhere (models that forget the format
    usually still end with the result).
    """
    text = text or ""
    for rx in (_ANSWER_IS_RE, _BOXED_RE):
        found = rx.findall(text)
        if found:
            return _to_float(found[-1])
    found = _NUM_RE.findall(text)
    return _to_float(found[-1]) if found else None


def _is_number(x: Any) -> bool:
    # bool is an int subclass; a True/False gold is a data error, not the number 1/0.
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def extract_gold_number(example: dict) -> float | None:
    """The gold number of a question record, or None if it has none.

    Supports GSM8K (``answer`` ends with ``#### 72``), SVAMP (numeric ``Answer`` or
    ``answer``), ASDiv (``answer`` like ``"9 (apples)"``) and plain numbers or numeric
    strings in ``answer``.
    """
    for key in ("answer", "Answer"):
        if key not in example:
            continue
        gold = example[key]
        if _is_number(gold):
            return float(gold)
        if not isinstance(gold, str):
            continue
        gsm = _GSM8K_GOLD_RE.findall(gold)
        if gsm:
            # The last "####" is the final answer line; rationales never contain another.
            return _to_float(gsm[-1])
        # Plain "72" / "1,234" / "0.5 (m)" / "9 (apples)": the leading number is the
        # answer, the parenthesised unit is not.
        m = _NUM_RE.search(gold)
        if m:
            return _to_float(m.group(0))
    return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def math_answer() -> Scorer:
    """1.0 if the predicted final number equals the gold number (tolerance 1e-6).

    Raises UserError for a record with no numeric gold answer: scoring it 0.0 silently
    would make a broken question set look like a weak model.
    """

    def score(text: str, example: dict) -> float:
        gold = extract_gold_number(example)
        if gold is None:
            raise UserError(
                f"math scorer: question record has no numeric 'answer'/'Answer': {_short(example)}"
            )
        pred = extract_pred_number(text)
        return 1.0 if pred is not None and _close(pred, gold) else 0.0

    return Scorer("math", score)


# --------------------------------------------------------------------------- multiple choice

_DEFAULT_CHOICES = "ABCDE"


@functools.lru_cache(maxsize=32)  # built once per choice set, not once per answer
def _choice_patterns(choices: str) -> list[re.Pattern[str]]:
    """Letter patterns in priority order for a given set of choice letters.

    Letters are matched in upper case only, except inside parentheses, so the article
    "a" in "the answer is a number" is never read as choice A. A letter must not be
    followed by another letter ("Answer: Carbon" is not C).
    """
    up = re.escape(choices.upper())
    low = re.escape(choices.lower())
    letter = rf"(?:\(([{up}{low}])\)|\[([{up}])\]|([{up}]))(?![A-Za-z])"
    return [
        # "The answer is (B)", "the correct answer is: **C**", "Answer: C", "answer - D"
        re.compile(
            r"(?i:answer)(?:\s+(?:is|would\s+be|will\s+be)|\s*[:\-=])\s*:?\s*"
            r"(?:\*\*|__|\$|\\boxed\{|(?i:option|choice)\s+)*\s*" + letter
        ),
        # "**B**", "**(B)**", "**B.**": the closing "**" is required, otherwise the end
        # of an earlier bold span followed by the article "A" would count.
        re.compile(rf"\*\*\s*(?:\(([{up}{low}])\)|([{up}]))[.):]?\s*\*\*"),
        # Lone letter at the very start: "B", "B.", "(B)", "B) because ..."
        re.compile(rf"\A\s*(?:\(([{up}{low}])\)|([{up}])(?=[.):]|\s*\Z))"),
    ]


def extract_choice(text: str, choices: str = _DEFAULT_CHOICES) -> str | None:
    """The chosen letter (upper case) or None.

    Recognises, in priority order: the last "answer is (B)" / "Answer: C" phrase, the
    last bold letter ``**B**``, a lone letter opening the answer ("B." / "(B)" / "B").
    A bare "(B)" elsewhere is not taken: answers often restate every option that way.
    """
    text = text or ""
    for rx in _choice_patterns(choices):
        found = [next(g for g in m.groups() if g) for m in rx.finditer(text)]
        if found:
            return found[-1].upper()
    return None


def _gold_choice(example: dict, choices: str) -> str:
    gold = example.get("answer")
    if isinstance(gold, int) and not isinstance(gold, bool):
        if 0 <= gold < len(choices):
            return choices[gold]
    elif isinstance(gold, str):
        letter = gold.strip().strip("()[].").strip().upper()
        if len(letter) == 1 and letter in choices:
            return letter
    raise UserError(
        f"mc scorer: 'answer' must be one of the letters {choices} or a 0-based index "
        f"below {len(choices)}, got {gold!r} in {_short(example)}"
    )


def mc_letter(choices: str = _DEFAULT_CHOICES) -> Scorer:
    """1.0 if the extracted choice letter equals the gold ``answer`` (letter or 0-based index)."""
    choices = (choices or "").strip().upper()
    if not re.fullmatch(r"[A-Z]{2,26}", choices) or len(set(choices)) != len(choices):
        raise UserError(
            f"mc scorer: choices must be 2+ distinct letters, e.g. mc:ABCD (got {choices!r})"
        )

    def score(text: str, example: dict) -> float:
        gold = _gold_choice(example, choices)
        return 1.0 if extract_choice(text, choices) == gold else 0.0

    return Scorer("mc" if choices == _DEFAULT_CHOICES else f"mc:{choices}", score)


# --------------------------------------------------------------------------- registry


def _no_arg(kind: str, factory: Callable[[], Scorer]) -> Callable[[str | None], Scorer]:
    def build(arg: str | None) -> Scorer:
        if arg is not None:
            raise UserError(
                f"scorer {kind!r} takes no argument (got {kind}:{arg}); valid: {SCORER_SPECS}"
            )
        return factory()

    return build


def _needs_arg(kind: str, factory: Callable[[str], Scorer]) -> Callable[[str | None], Scorer]:
    def build(arg: str | None) -> Scorer:
        if not arg:
            raise UserError(f"scorer {kind!r} needs an argument; valid: {SCORER_SPECS}")
        return factory(arg)

    return build


# kind -> (builder taking the text after the first ":" (None when there is no ":"),
# its spec forms for help and error texts). The one list of scorer kinds: the CLI's
# help, evals' spec splitting and every error message read it from here.
_BUILDERS: dict[str, Callable[[str | None], Scorer]] = {
    "marker": _needs_arg("marker", marker),
    "lang": _needs_arg("lang", language_share),
    "allcaps": _no_arg("allcaps", allcaps_share),
    "math": _no_arg("math", math_answer),
    "mc": lambda arg: mc_letter(_DEFAULT_CHOICES if arg is None else arg),
}
assert tuple(_BUILDERS) == tuple(SCORER_USAGE), "configs.choices.SCORER_USAGE lists the scorers"
_REGISTRY = {kind: (build, SCORER_USAGE[kind]) for kind, build in _BUILDERS.items()}


def scorer_kinds() -> list[str]:
    """The scorer kinds (the part of a spec before ":"), as registered."""
    return list(_REGISTRY)


def parse_scorer(spec: str) -> Scorer:
    """Build a scorer from a CLI spec string (see the module docstring for the list).

    Only the first ":" separates kind and argument, so regexes may contain colons.
    """
    spec = (spec or "").strip()
    kind, sep, arg = spec.partition(":")
    entry = _REGISTRY.get(kind.strip().lower())
    if entry is None:
        raise UserError(f"unknown scorer {spec!r}; valid: {SCORER_SPECS}")
    return entry[0](arg if sep else None)


def score_all(texts: Sequence[str], examples: Sequence[dict], scorer: ScoreFn) -> float:
    """Mean score over paired answers and question records; empty -> 0.0."""
    if len(texts) != len(examples):
        raise ValueError(f"score_all: {len(texts)} answers but {len(examples)} examples")
    if not texts:
        return 0.0
    return sum(scorer(t, ex) for t, ex in zip(texts, examples, strict=True)) / len(texts)


def _short(example: dict, limit: int = 120) -> str:
    """A one-line, length-capped rendering of a record for error messages."""
    s = " ".join(repr(example).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."
