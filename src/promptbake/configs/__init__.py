"""Every command's config: one dataclass per command is the single source of truth for
its defaults, ``--help`` text and validation, for the seed scripts and the ``promptbake``
CLI alike.

The rule: every command's config dataclass lives in this package (stages.py: the pipeline's stages; tools.py: the is-it-baked tools; fields.py: how a field is declared and checked), and its module
imports it (GenerateConfig -> generate.py, TrainConfig -> train.py, BakeConfig -> bake.py,
PursueConfig -> pursue.py, CompareConfig -> compare.py, EvalConfig -> evals.py,
ChatConfig -> repl.py, MergeConfig -> adapters.py, DataConfig -> fetch.py). A field added here is a flag of its
command (and of every command built from it) with no other edit.

    cfg = GenerateConfig(x0_file="x0.md", question_dataset="q.jsonl", traj_out_file="t.jsonl")
    cfg.validate()

flags.py turns a config into command-line flags (and reads --config files); cli.py lists
the commands.
"""

from .choices import DATASET_NAMES, ENGINE_NAMES, MODES, SCORER_SPECS, SCORER_USAGE
from .fields import check_regex, field_values, opt, require, require_finite, with_defaults
from .stages import (
    BAKE_DEFAULTS,
    BAKE_WHY,
    BakeConfig,
    GenerateConfig,
    LoraArgs,
    ModelArgs,
    PursueConfig,
    TrainConfig,
)
from .tools import ChatConfig, CompareConfig, DataConfig, EvalConfig, MergeConfig

__all__ = [
    "DATASET_NAMES",
    "ENGINE_NAMES",
    "MODES",
    "SCORER_SPECS",
    "SCORER_USAGE",
    "BAKE_DEFAULTS",
    "BAKE_WHY",
    "BakeConfig",
    "ChatConfig",
    "CompareConfig",
    "DataConfig",
    "EvalConfig",
    "GenerateConfig",
    "LoraArgs",
    "MergeConfig",
    "ModelArgs",
    "PursueConfig",
    "TrainConfig",
    "check_regex",
    "field_values",
    "opt",
    "require",
    "require_finite",
    "with_defaults",
]
