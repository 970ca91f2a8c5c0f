"""Is it baked? Everything that measures a baked adapter.

conditions.py  the four conditions (base, prompted, baked, re-prompted) and answers
measures.py    per-trajectory NLL and per-token KL between conditions (bake fidelity)
scorers.py     behaviour scorers: marker, language, all caps, math, multiple choice
report.py      report.md of a bake, and the table helpers
compare.py     the `compare` command: NLL under the four conditions, scatter plots
eval.py        the `eval` command: answer a question set per condition and scale, score it
"""
