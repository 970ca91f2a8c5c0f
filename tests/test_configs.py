"""Command configs: BakeConfig composed from the stage configs, and --config files.

python -m pytest tests/test_configs.py -q
"""

import dataclasses

from promptbake.configs import (
    BAKE_DEFAULTS,
    BakeConfig,
    GenerateConfig,
    PursueConfig,
    TrainConfig,
)


def defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_bake_config_has_every_stage_field_with_bake_defaults_on_top():
    bake = defaults(BakeConfig)
    for stage in (GenerateConfig, TrainConfig):
        for name, default in defaults(stage).items():
            assert name in bake, name
            if name in BAKE_DEFAULTS:
                assert bake[name] == BAKE_DEFAULTS[name]
            elif name != "batch_size":  # generation's and training's: training's wins
                assert bake[name] == default, name
    # today's bake defaults (README, `promptbake bake --help`)
    assert (bake["r"], bake["lora_alpha"], bake["learning_rate"]) == (8, 16.0, 1e-3)
    assert (bake["num_epochs"], bake["batch_size"], bake["gen_batch_size"]) == (4, 8, 32)
    assert (bake["max_sequence_length"], bake["num_sequences_per_question"]) == (64, 4)
    assert (bake["num_questions"], bake["teacher_cache"], bake["save_every"]) == (64, "exact", 0)
    assert defaults(PursueConfig)["r"] == 8 and defaults(PursueConfig)["out_dir"] == "runs/pursuit"


def test_stage_configs_take_bake_values_field_by_field():
    cfg = BakeConfig(
        prompt="Be brief.",
        out_dir="runs/x",
        gen_batch_size=5,
        batch_size=3,
        engine="hf",
        weight_decay=0.25,
        teacher_topk=7,
        cache_implementation="static",
        r=4,
    )
    gen = cfg.generate_config("t.jsonl")
    assert (gen.batch_size, gen.engine, gen.cache_implementation) == (5, "hf", "static")
    assert (gen.traj_out_file, gen.shuffle, gen.num_questions) == ("t.jsonl", False, 64)
    train = cfg.train_config()
    assert (train.batch_size, train.weight_decay, train.teacher_topk, train.r) == (3, 0.25, 7, 4)
    assert train.data_path.endswith("trajectories_train.jsonl") and train.out_dir == "runs/x"
    cfg.validate()
