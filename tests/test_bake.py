"""`promptbake bake` end to end on the tiny Qwen3: files, and the teacher cache it keeps
from generation.

    python -m pytest tests/test_bake.py -q

``bake`` keeps the prompted model's log-probs while sampling and trains against them
(teacher.cache_from_generation) instead of running the teacher again. That is only
right if every kept row lands on its own trajectory: the same bake with the teacher
recomputed every step (``--teacher_cache off``) must give the same training curve.
"""

import json

from test_compare import DATA

from promptbake.cli import main
from promptbake.configs import BakeConfig
from promptbake.flags import config_values


def bake(tiny_model_dir, out, *extra):
    argv = ["bake", "--model_name", str(tiny_model_dir), "--device", "cpu"]
    argv += ["--x0_file", str(DATA / "zorblax_x0.md")]
    argv += ["--question_dataset", str(DATA / "identity_train.jsonl")]
    argv += ["--num_questions", "5", "--num_sequences_per_question", "3", "--val_fraction", "0.2"]
    argv += ["--max_sequence_length", "6", "--num_epochs", "2", "--batch_size", "4"]
    argv += ["--gen_batch_size", "8", "--learning_rate", "3e-3", "--out_dir", str(out), *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bake_trains_on_the_teacher_kept_from_generation(tiny_model_dir, tmp_path):
    kept = bake(tiny_model_dir, tmp_path / "kept")
    log = (tmp_path / "kept" / "train_loop.log").read_text()
    assert "kept from generation" in log
    for name in (
        "trajectories_train.jsonl",
        "trajectories_val.jsonl",
        "adapter_config.json",
        "adapter_model.safetensors",
        "summary.json",
        "report.md",
    ):
        assert (tmp_path / "kept" / name).is_file(), name

    # the run's args.json is the bake's flags (a valid `bake --config`), not training's
    args = json.loads((tmp_path / "kept" / "args.json").read_text())
    cfg = BakeConfig(**config_values(BakeConfig, args, "args.json"))
    assert (cfg.gen_batch_size, cfg.batch_size, cfg.val_fraction) == (8, 4, 0.2)

    recomputed = bake(tiny_model_dir, tmp_path / "off", "--teacher_cache", "off")
    assert "teacher cache" not in (tmp_path / "off" / "train_loop.log").read_text()
    # the same samples (same seed), so the same rows; the losses agree to float rounding
    assert [m["epoch"] for m in kept] == [m["epoch"] for m in recomputed] == [0, 1, 2]
    for a, b in zip(kept[1:], recomputed[1:]):
        assert abs(a["train_kl"] - b["train_kl"]) <= 1e-4 * b["train_kl"] + 1e-6
        assert abs(a["val_kl"] - b["val_kl"]) <= 1e-4 * b["val_kl"] + 1e-6
    assert kept[2]["train_kl"] < kept[1]["train_kl"]  # it trains
