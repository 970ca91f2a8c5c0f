"""How a config field is declared and checked: its help, flag spellings and choices
(:func:`opt`), new defaults for inherited fields (:func:`with_defaults`), and the
one-line checks every ``validate()`` uses (:func:`require` and friends)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field
from typing import Any

from ..errors import UserError


def opt(
    default: Any, help: str, *aliases: str, choices: list | None = None, positional: bool = False
) -> Any:
    """A dataclass field carrying its CLI help, extra flag spellings and choices; a
    `positional` one is an argument without a flag (`promptbake data squad`)."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "positional": positional}
    return field(default=default, metadata=meta)


def with_defaults(defaults: dict[str, Any], why: dict[str, str] | None = None):
    """Class decorator (above ``@dataclass``): the class with new defaults for fields it
    inherits; their type, help and flag spellings stay the stage's, so a field added to a
    stage later reaches every config built from it unchanged. `why` (field -> sentence)
    appends the reason for a changed default to that field's --help text."""
    why = why or {}

    def wrap(cls: type) -> type:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted((set(defaults) | set(why)) - set(fields))
        assert not unknown, f"{cls.__name__} has no fields {unknown}"
        assert set(why) <= set(defaults), "a `why` without a changed default"

        def meta(name: str) -> dict:
            m = dict(fields[name].metadata)
            if name in why:  # argparse formats help with %: a measured "50%" stays text
                m["help"] = f"{m['help']}. Here: {why[name].replace('%', '%%')}"
            return m

        changed = [
            (name, fields[name].type, field(default=value, metadata=meta(name)))
            for name, value in defaults.items()
        ]
        namespace = {"__module__": cls.__module__, "__doc__": cls.__doc__}
        return dataclasses.make_dataclass(cls.__name__, changed, bases=(cls,), namespace=namespace)

    return wrap


def field_values(cfg: Any, cls: type) -> dict[str, Any]:
    """The values of `cls`'s fields in `cfg`, an instance of `cls` or of a config built from it."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}


def check_regex(pattern: str | None, flag: str) -> None:
    """A regex flag is checked before any work starts, not after a whole bake."""
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as e:
        raise UserError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def require_finite(cfg: Any, *names: str) -> None:
    """Float flags must be numbers: ``--temperature inf`` or ``--lora_alpha nan`` parse as
    floats, pass a ``> 0`` test (inf) or fail a later one with a misleading message (nan)."""
    for name in names:
        value = getattr(cfg, name)
        require(
            value is None or math.isfinite(value), f"--{name} must be a finite number, got {value}"
        )


# ---------------------------------------------------------------- numeric ranges
# A count, length, rank or step number above this is a typo (a 100-million-row batch, a
# billion-token answer) that would only fail deep inside torch, after work was done.
MAX_INT = 2**31 - 1
# what torch, numpy and random all accept as a seed (numpy: below 2**32)
MAX_SEED = 2**32 - 1
# sampling temperatures: below the minimum sampling is greedy in effect and the scaled
# logits overflow float32 (--temperature 1e-39 crashed); above the maximum it is noise
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


def check_int_ranges(cfg: Any) -> None:
    """Every integer field of `cfg` within [-MAX_INT, MAX_INT], its seed within
    [0, MAX_SEED]: refused in one line naming the flag, before any work."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if type(value) is not int:
            continue
        if f.name == "seed":
            require(
                0 <= value <= MAX_SEED,
                f"--seed must be in [0, {MAX_SEED}] (what torch, numpy and random accept), "
                f"got {value}",
            )
            continue
        flag = "-r" if f.name == "r" else f"--{f.name}"
        require(abs(value) <= MAX_INT, f"{flag} {value} is too large (at most {MAX_INT})")


def check_temperature(value: float, greedy_zero: bool) -> None:
    """A sampling temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE] (or 0, greedy, where
    `greedy_zero`); finiteness and sign are checked by the caller first."""
    if greedy_zero and value == 0:
        return
    zero = "0 (greedy) or " if greedy_zero else ""
    require(
        MIN_TEMPERATURE <= value <= MAX_TEMPERATURE,
        f"--temperature must be {zero}between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g} "
        f"(below it sampling is greedy in effect and the scaled logits overflow), got {value:g}",
    )
