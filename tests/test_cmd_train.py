"""The train command (promptbake.train) as train_loop.py runs it, on the tiny random Qwen3:
generate_data.py + train_loop.py end to end with every output file checked, and bad
inputs that must end in one clear line.

    python -m pytest tests/test_cmd_train.py -q

Every bad input exits with status 2, prints one line starting with ``error:`` on stderr
(no traceback) and leaves no output behind. The commands run in-process through
``promptbake.cli.main`` exactly as generate_data.py / train_loop.py call it.
"""

import copy
import json
import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny import (
    PIRATE,
    PIRATE_QUESTIONS,
    ZORBLAX,
    assert_one_error,
    copy_traj,
    loop_config,
    loop_rows,
    messages,
    run_train,
)
from transformers import AutoModelForCausalLM

from promptbake import train as train_command
from promptbake.cli import main
from promptbake.configs import TrainConfig
from promptbake.errors import UserError
from promptbake.files import write_jsonl


# ---------------------------------------------------------------- end to end, every file
@pytest.fixture(scope="module")
def e2e(tiny_model_dir, tmp_path_factory):
    """generate_data.py then train_loop.py (the seed's interfaces) on the saved tiny model."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("e2e")
    (d / "x0.md").write_text(PIRATE + "\n")
    (d / "q.jsonl").write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in PIRATE_QUESTIONS)
    )
    common = ["--model_name", str(tiny_model_dir), "--device", "cpu"]
    gen = [
        "--x0_file", str(d / "x0.md"), "--question_dataset", str(d / "q.jsonl"),
        "--num_questions", "3", "--num_sequences_per_question", "2",
        "--max_sequence_length", "6", "--batch_size", "4",
    ]  # fmt: skip
    for name, seed in (("train", "42"), ("val", "1")):
        argv = [*common, *gen, "--traj_out_file", str(d / f"{name}.jsonl"), "--seed", seed]
        assert main(argv, "generate_data.py", "generate") == 0
    out = d / "run"
    argv = [
        *common, "--data_path", str(d / "train.jsonl"), "--val_path", str(d / "val.jsonl"),
        "--out_dir", str(out), "--num_epochs", "2", "--batch_size", "4", "-r", "4",
        "--lora_alpha", "8", "--learning_rate", "1e-2", "--save_every", "1",
    ]  # fmt: skip
    assert main(argv, "train_loop.py", "train") == 0
    torch.set_num_threads(n)
    return d, out


def test_e2e_args_json(e2e, tiny_model_dir):
    d, out = e2e
    args = json.loads((out / "args.json").read_text())
    assert args["model_name"] == str(tiny_model_dir)
    assert args["data_path"] == str(d / "train.jsonl")
    assert args["val_path"] == str(d / "val.jsonl")
    assert args["num_epochs"] == 2
    assert args["batch_size"] == 4
    assert args["r"] == 4
    assert args["lora_alpha"] == 8
    assert args["learning_rate"] == 1e-2
    assert args["save_every"] == 1
    assert args["target_modules"] == "q_proj,k_proj,v_proj,o_proj"


def test_e2e_log_and_metrics(e2e):
    _, out = e2e
    lines = (out / "train_loop.log").read_text().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ", line) for line in lines)
    for epoch in (1, 2):
        assert sum(f" epoch {epoch}: train KL" in line for line in lines) == 1
    assert sum("epoch 0 (before training)" in line for line in lines) == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["train_kl"] is None
    for m in metrics:
        assert math.isfinite(m["val_kl"]) and m["val_kl"] >= 0
    for m in metrics[1:]:
        assert math.isfinite(m["train_kl"]) and m["train_kl"] >= 0
        assert m["tokens_per_s"] > 0


def test_e2e_plot_and_adapter_files(e2e):
    _, out = e2e
    assert (out / "kl_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for d in (out, out / "epoch_1", out / "epoch_2"):
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == 4
        assert cfg["lora_alpha"] == 8
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        weights = load_file(d / "adapter_model.safetensors")
        # 2 layers x 4 modules x (A, B)
        assert len(weights) == 16
        assert all("lora_A" in k or "lora_B" in k for k in weights)
    b1 = load_file(out / "epoch_1" / "adapter_model.safetensors")
    b2 = load_file(out / "epoch_2" / "adapter_model.safetensors")
    assert any(not torch.equal(b1[k], b2[k]) for k in b1)  # epoch 2 trained further
    assert not (out / "epoch_3").exists()


def test_e2e_adapter_loads_with_plain_peft(e2e, tiny_model_dir):
    _, out = e2e
    weights = load_file(out / "adapter_model.safetensors")
    b_norm = sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 0  # trained: B moved away from its zero init
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    baked = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        diff = (baked(ids).logits - base(ids).logits).abs().max()
    assert diff > 1e-4


def test_e2e_trajectory_files(e2e):
    d, _ = e2e
    a = (d / "train.jsonl").read_text().splitlines()
    b = (d / "val.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 6
    assert a != b  # another seed
    assert json.loads((d / "train.jsonl.meta.json").read_text())["args"]["seed"] == 42


# ---------------------------------------------------------------- bad inputs
def test_train_works(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    assert run_train(tiny_model_dir, data, tmp_path / "run") == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert not [line for line in messages(capsys.readouterr().err) if line.startswith("warning")]


def test_train_missing_data_file(tiny_model_dir, tmp_path, capsys):
    rc = run_train(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "run")
    assert_one_error(capsys, rc, "--data_path", "missing.jsonl", "no such file")
    assert not (tmp_path / "run").exists()


def test_train_data_that_is_not_trajectories(tiny_model_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "Why?"}) + "\n")
    rc = run_train(tiny_model_dir, q, tmp_path / "run")
    assert_one_error(capsys, rc, "line 1", "missing input_ids", "generate_data.py")
    assert not (tmp_path / "run").exists()


def test_train_empty_data_file(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text("\n")
    rc = run_train(tiny_model_dir, tmp_path / "t.jsonl", tmp_path / "run")
    assert_one_error(capsys, rc, "no trajectories")
    assert not (tmp_path / "run").exists()


def test_train_mismatched_tokenizer_fingerprint(traj, tiny_model_dir, tmp_path, capsys):
    def edit(meta):
        meta["tokenizer_fingerprint"] = "0123456789abcdef"
        meta["model_name"] = "Qwen/Qwen3-1.7B"

    data = copy_traj(traj, tmp_path, meta_edit=edit)
    rc = run_train(tiny_model_dir, data, tmp_path / "run")
    assert_one_error(capsys, rc, "another tokenizer", "Qwen/Qwen3-1.7B")
    assert not (tmp_path / "run").exists()


def test_train_mismatched_fingerprint_in_val_file(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    (tmp_path / "v").mkdir()
    val = copy_traj(traj, tmp_path / "v", meta_edit=lambda m: m.update(tokenizer_fingerprint="x"))
    rc = run_train(tiny_model_dir, data, tmp_path / "run", "--val_path", str(val))
    assert_one_error(capsys, rc, "another tokenizer", str(val))


def test_train_without_sidecar_warns_and_runs(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path, sidecar=False)
    assert run_train(tiny_model_dir, data, tmp_path / "run") == 0
    warnings = [line for line in messages(capsys.readouterr().err) if line.startswith("warning")]
    assert len(warnings) == 1 and "no .meta.json sidecar" in warnings[0]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_train_ids_outside_the_vocabulary(traj, tiny_model_dir, tmp_path, capsys):
    # e.g. Qwen3 trajectories (ids up to 151668) without a sidecar, trained on the tiny model
    rows = [json.loads(line) for line in traj.read_text().splitlines()]
    rows[1]["input_ids"][-1] = 151645
    rows[1]["input_ids_nosys"][-1] = 151645
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = run_train(tiny_model_dir, data, tmp_path / "run")
    capsys_err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in capsys_err
    lines = [m for m in messages(capsys_err) if not m.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "151645" in lines[0] and "another model's tokenizer" in lines[0]
    assert not (tmp_path / "run").exists()


def test_train_unknown_target_module(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    rc = run_train(tiny_model_dir, data, tmp_path / "run", "--target_modules", "q_proj,c_attn")
    line = assert_one_error(capsys, rc, "c_attn")
    names = line.split("linear modules are:")[1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in names
    assert not (tmp_path / "run").exists()


def test_train_out_dir_that_is_a_file(traj, tiny_model_dir, tmp_path, capsys):
    data = copy_traj(traj, tmp_path)
    (tmp_path / "run").write_text("precious")
    rc = run_train(tiny_model_dir, data, tmp_path / "run")
    assert_one_error(capsys, rc, "--out_dir", "is a file")
    assert (tmp_path / "run").read_text() == "precious"


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--num_epochs", "0"], "--num_epochs must be positive"),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["-r", "0"], "-r must be positive"),
        (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    ],
)
def test_train_bad_numbers(traj, tiny_model_dir, tmp_path, capsys, flags, fragment):
    rc = run_train(tiny_model_dir, traj, tmp_path / "run", *flags)
    assert_one_error(capsys, rc, fragment)
    assert not (tmp_path / "run").exists()


def test_on_policy_without_prompt_or_questions_is_refused_before_loading(
    tiny_model_dir, chatml_tok, tmp_path, monkeypatch
):
    data = tmp_path / "t.jsonl"
    write_jsonl(data, loop_rows(chatml_tok))  # no .meta.json sidecar
    monkeypatch.setattr(train_command, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = loop_config(tmp_path, "run", model_name=str(tiny_model_dir), data_path=str(data))
    with pytest.raises(UserError, match="--on_policy needs the baked prompt: pass --x0_file"):
        train_command.run_train(TrainConfig(**{**vars(cfg), "on_policy": 0.5}), echo=False)
    (tmp_path / "x0.md").write_text(ZORBLAX)
    cfg = TrainConfig(**{**vars(cfg), "on_policy": 0.5, "x0_file": str(tmp_path / "x0.md")})
    with pytest.raises(UserError, match="--on_policy needs the training questions"):
        train_command.run_train(cfg, echo=False)
    assert not (tmp_path / "run").exists()
