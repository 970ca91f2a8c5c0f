"""Command configs (promptbake.configs, promptbake.flags): BakeConfig composed from the
stage configs, --config files, and the validation of flag values.

python -m pytest tests/test_configs.py -q
"""

import dataclasses
import json

import pytest
from tiny import assert_one_error, copy_traj, run_train

from promptbake.cli import main, parse_args
from promptbake.configs import BAKE_DEFAULTS, BakeConfig, GenerateConfig, PursueConfig, TrainConfig
from promptbake.errors import UserError
from promptbake.flags import config_values, flag_values, from_namespace


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
    assert (bake["r"], bake["lora_alpha"], bake["learning_rate"]) == (8, 16.0, 2e-3)
    assert (bake["num_epochs"], bake["patience"], bake["batch_size"]) == (12, 3, 4)
    assert bake["target_modules"] == "q_proj,k_proj,v_proj,o_proj"
    assert (bake["divergence"], bake["on_policy"], bake["gen_batch_size"]) == ("forward_kl", 0, 32)
    assert (bake["max_sequence_length"], bake["num_sequences_per_question"]) == (64, 4)
    assert (bake["num_questions"], bake["teacher_cache"], bake["save_every"]) == (64, "exact", 0)
    assert defaults(PursueConfig)["r"] == 8 and defaults(PursueConfig)["out_dir"] == "runs/pursuit"


def test_bake_help_says_why_a_default_differs_and_stages_keep_their_help():
    bake = {f.name: f.metadata["help"] for f in dataclasses.fields(BakeConfig)}
    train = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    for name in ("learning_rate", "patience", "on_policy"):
        assert bake[name].startswith(train[name] + ". Here: "), name
        assert "Here:" not in train[name]
    assert bake["seed"] == train["seed"]  # an unchanged default keeps the stage's text


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


# ---------------------------------------------------------------- --config FILE
def config_of(cls, argv: list[str], only: str | None = None):
    return from_namespace(cls, parse_args(argv, "promptbake", only))


def test_config_file_alone_sets_the_flags(tmp_path):
    f = tmp_path / "train.json"
    values = {"num_epochs": 3, "r": 4, "learning_rate": 0.002, "plot": False, "max_traj_len": 9}
    f.write_text(json.dumps({**values, "data_path": "d.jsonl", "target_modules": "q_proj"}))
    cfg = config_of(TrainConfig, ["train", "--config", str(f)])
    assert cfg == TrainConfig(**values, data_path="d.jsonl", target_modules="q_proj")
    assert cfg.batch_size == 10  # not in the file: the flag's default


def test_command_line_flags_override_the_file(tmp_path):
    f = tmp_path / "train.json"
    f.write_text(json.dumps({"num_epochs": 3, "r": 4, "batch_size": 2}))
    # -r 32 is the default, given explicitly: it still wins over the file's 4
    cfg = config_of(TrainConfig, ["--config", str(f), "--num_epochs", "5", "-r", "32"], "train")
    assert (cfg.num_epochs, cfg.r, cfg.batch_size) == (5, 32, 2)


def test_yaml_config_for_bake(tmp_path):
    f = tmp_path / "bake.yaml"
    f.write_text(
        "prompt: Your name is Zorblax.\nr: 16\nteacher_cache: topk\nenable_thinking: null\n"
        "learning_rate: 2e-3\ngen_batch_size: 4\n"
    )
    cfg = config_of(BakeConfig, ["bake", "--config", str(f), "--num_epochs", "2"])
    assert (cfg.prompt, cfg.r, cfg.teacher_cache) == ("Your name is Zorblax.", 16, "topk")
    assert (cfg.learning_rate, cfg.gen_batch_size, cfg.num_epochs) == (2e-3, 4, 2)
    assert cfg.lora_alpha == 16.0  # bake's own default, not the file's


@pytest.mark.parametrize(
    "content, fragments",
    [
        ({"num_epoch": 3}, ["unknown key 'num_epoch'", "valid keys:", "num_epochs"]),
        ({"x0_file": "x", "traj_out_file": "y"}, ["unknown key 'traj_out_file'"]),
        ({"num_epochs": "many"}, ["num_epochs expects int, got 'many'"]),
        ({"num_epochs": 2.5}, ["num_epochs expects int"]),
        ({"num_epochs": True}, ["num_epochs expects int"]),
        ({"num_epochs": None}, ["num_epochs expects int, got None"]),
        ({"plot": "maybe"}, ["plot expects true or false"]),
        ({"teacher_cache": "all"}, ["teacher_cache must be one of auto, off, exact, topk"]),
        ([1, 2], ["expected a mapping"]),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, content, fragments):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(content))
    cmd = "bake" if "traj_out_file" in content else "train"
    assert_one_error(capsys, main([cmd, "--config", str(f)]), str(f), *fragments)
    assert list(tmp_path.iterdir()) == [f]


def test_unreadable_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("r = 4")
    (tmp_path / "c.yaml").write_text("r: [4\n")
    rc = main(["train", "--config", str(tmp_path / "c.toml")])
    assert_one_error(capsys, rc, "expected a .json, .yaml or .yml file")
    assert_one_error(
        capsys, main(["train", "--config", str(tmp_path / "c.yaml")]), "not valid YAML"
    )
    rc = main(["data", "--config", str(tmp_path / "none.json"), "squad"])
    assert_one_error(capsys, rc, "none.json", "cannot read it")


def test_args_json_repeats_a_training_run(traj, tiny_model_dir, tmp_path):
    data = copy_traj(traj, tmp_path)
    assert run_train(tiny_model_dir, data, tmp_path / "run", "--learning_rate", "3e-3") == 0
    args = tmp_path / "run" / "args.json"
    first = TrainConfig(**json.loads(args.read_text()))
    assert config_of(TrainConfig, ["train", "--config", str(args)]) == first
    again = ["--config", str(args), "--out_dir", str(tmp_path / "again")]
    assert main(again, prog="train_loop.py", only="train") == 0
    name = "adapter_model.safetensors"
    assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()


def test_generation_sidecar_and_bake_args_are_valid_configs(traj, tmp_path):
    meta = json.loads((traj.parent / "t.jsonl.meta.json").read_text())
    cfg = config_of(GenerateConfig, ["generate", "--config", str(traj) + ".meta.json"])
    assert cfg == GenerateConfig(**meta["args"])
    # bake writes flag_values(cfg) to its args.json (bake.py)
    bake = BakeConfig(prompt="Be brief.", r=4, engine="hf", gen_batch_size=3)
    f = tmp_path / "args.json"
    f.write_text(json.dumps(flag_values(bake)))
    assert config_of(BakeConfig, ["bake", "--config", str(f)]) == bake
    assert config_values(BakeConfig, flag_values(bake), "x") == flag_values(bake)


# ---------------------------------------------------------------- validation of the stage configs
def test_new_flags_are_validated():
    with pytest.raises(UserError, match="teacher_topk"):
        TrainConfig(data_path="d", out_dir="o", teacher_topk=0).validate()
    with pytest.raises(UserError, match="teacher_cache_max_gb"):
        TrainConfig(data_path="d", out_dir="o", teacher_cache_max_gb=0).validate()


def test_patience_is_validated():
    with pytest.raises(UserError, match="--patience must be >= 0"):
        TrainConfig(data_path="d", out_dir="o", patience=-1).validate()
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match=r"--on_policy must be in \[0, 1\]"):
            TrainConfig(data_path="d", out_dir="o", on_policy=bad).validate()
    with pytest.raises(UserError, match=r"--jsd_beta 2.0 is outside \[0, 1\]"):
        TrainConfig(data_path="d", out_dir="o", jsd_beta=2.0).validate()


def test_max_train_seconds_is_validated():
    for bad in (-1.0, float("inf")):
        with pytest.raises(UserError, match="--max_train_seconds"):
            TrainConfig(data_path="d", out_dir="o", max_train_seconds=bad).validate()


def test_a_reason_with_a_percent_sign_keeps_help_printable():
    import argparse
    from dataclasses import dataclass

    from promptbake.configs.fields import with_defaults
    from promptbake.flags import add_arguments

    @with_defaults({"temperature": 1.0}, {"temperature": "kept 50% of the name"})
    @dataclass
    class Cfg(GenerateConfig):
        pass

    parser = argparse.ArgumentParser()
    add_arguments(parser, Cfg)
    assert "kept 50% of the name" in " ".join(parser.format_help().split())
