"""`promptbake bake` end to end on the tiny Qwen3: files, and the teacher cache it keeps
from generation.

    python -m pytest tests/test_cmd_bake.py -q

``bake`` keeps the prompted model's log-probs while sampling and trains against them
(teacher.cache_from_generation) instead of running the teacher again. That is only
right if every kept row lands on its own trajectory: the same bake with the teacher
recomputed every step (``--teacher_cache off``) must give the same training curve.
"""

import json

from tiny import DATA

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


def test_bake_on_policy_trains_on_the_students_answers(tiny_model_dir, tmp_path, monkeypatch):
    """`bake --on_policy 1`: every training batch is the student's own answers (sampled
    without the prompt, adapter on) to the bake's training questions, never the
    validation ones nor the prompted model's trajectories."""
    from promptbake.training import loop as train
    from promptbake.training import onpolicy

    sampled, trained = [], []
    real_sample, real_collate = onpolicy.sample, train.collate

    def spy_sample(model, prompts, *a, **kw):
        sampled.append(([list(p) for p in prompts], model.training))
        return real_sample(model, prompts, *a, **kw)

    def spy_collate(rows, *a, **kw):
        trained.append(list(rows))
        return real_collate(rows, *a, **kw)

    monkeypatch.setattr(onpolicy, "sample", spy_sample)
    monkeypatch.setattr(train, "collate", spy_collate)
    out = tmp_path / "on"
    metrics = bake(tiny_model_dir, out, "--on_policy", "1")

    train_rows = [json.loads(x) for x in (out / "trajectories_train.jsonl").open()]
    val_rows = [json.loads(x) for x in (out / "trajectories_val.jsonl").open()]
    train_prompts = {tuple(r["prompt_input_ids_nosys"]) for r in train_rows}
    val_prompts = {tuple(r["prompt_input_ids_nosys"]) for r in val_rows}
    # 4 training questions x 3 answers = 12 rows, batch size 4: 3 batches, 2 epochs
    assert len(train_rows) == 12 and len(sampled) == 6
    for prompts, training in sampled:
        assert len(prompts) == 4 and not training  # sampled in eval mode (no dropout)
        assert {tuple(p) for p in prompts} <= train_prompts  # no system prompt, no val question
        assert not {tuple(p) for p in prompts} & val_prompts
    assert len(trained) == 6 and all(r.get("on_policy") for rows in trained for r in rows)
    # what was trained on is what was sampled
    assert [[r["prompt_input_ids_nosys"] for r in rows] for rows in trained] == [
        p for p, _ in sampled
    ]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    args = json.loads((out / "args.json").read_text())
    assert args["on_policy"] == 1.0


def test_validation_split_is_the_fraction_with_one_question_each_side():
    from promptbake.bake import n_validation, split_questions

    # (questions, --val_fraction) -> validation questions, by hand
    table = {
        (12, 0.1): 1,
        (16, 0.25): 4,
        (64, 0.1): 6,
        (5, 0.2): 1,
        (3, 0.9): 2,  # one left to train on
        (1, 0.1): 1,  # and bake_questions refuses: no training question left
        (12, 0.0): 0,  # --val_fraction 0: no validation
    }
    assert {k: n_validation(*k) for k in table} == table
    qs = [{"question": f"q{i}"} for i in range(16)]
    train, val = split_questions(qs, 0.25)
    assert (len(train), len(val)) == (12, 4) and not {q["question"] for q in val} & {
        q["question"] for q in train
    }
