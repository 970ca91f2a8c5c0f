"""The names a flag chooses from, kept here so that every config can list them without
importing the stage that implements them (configs stay near the ground).

Each stage checks at import that its registry has exactly these names
(sampling.seam.ENGINES, evaluation.conditions.CONDITIONS, evaluation.scorers, data),
and tests/test_configs.py checks it too, so a name added here without its
implementation, or the other way round, fails at once.
"""

from __future__ import annotations

# sampling engines (sampling/): auto picks one for the device
ENGINE_NAMES: tuple[str, ...] = ("auto", "hf", "static", "vllm")

# the four conditions a model is run under (evaluation/conditions.py), in table order
MODES: tuple[str, ...] = ("base", "prompted", "baked", "re-prompted")

# public question sets `promptbake data` fetches (data.py)
DATASET_NAMES: tuple[str, ...] = ("squad", "gsm8k")

# scorer kind -> its spec forms, for --help and error texts (evaluation/scorers.py)
SCORER_USAGE: dict[str, str] = {
    "marker": "marker:REGEX",
    "lang": "lang:CODE (e.g. lang:fr)",
    "allcaps": "allcaps",
    "math": "math",
    "mc": "mc, mc:LETTERS (e.g. mc:ABCD)",
}
SCORER_SPECS = ", ".join(SCORER_USAGE.values())
