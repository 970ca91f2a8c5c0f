"""The teacher's log-probs handed from generate_data.py to train_loop.py in a sidecar file
(promptbake.training.sidecar): the same training curve as a teacher pass, and a stale
sidecar is ignored with a warning.

    python -m pytest tests/test_training_sidecar.py -q
"""

import json

import pytest
import torch
from safetensors import safe_open

from promptbake.cli import main
from promptbake.configs import GenerateConfig
from promptbake.errors import UserError
from promptbake.schema import read_trajectories, sidecar_path
from promptbake.training.sidecar import cut, probe_sidecar, read_sidecar, rows_fingerprint
from promptbake.training.teacher import build_teacher_cache

QUESTIONS = ["What is your name?", "Where do you live?", "What do you like?"]


def generate(d, model_dir, *extra):
    (d / "x0.md").write_text("Your name is Zorblax. Answer as Zorblax.\n")
    (d / "q.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    traj = d / "train.jsonl"
    argv = [
        "--model_name", str(model_dir), "--device", "cpu",
        "--x0_file", str(d / "x0.md"), "--question_dataset", str(d / "q.jsonl"),
        "--num_questions", "3", "--num_sequences_per_question", "3",
        "--max_sequence_length", "8", "--batch_size", "4", "--traj_out_file", str(traj), *extra,
    ]  # fmt: skip
    assert main(argv, "generate_data.py", "generate") == 0
    return traj


def train(traj, out, model_dir, *extra):
    argv = [
        "--model_name", str(model_dir), "--device", "cpu", "--data_path", str(traj),
        "--out_dir", str(out), "--num_epochs", "3", "--batch_size", "4", "-r", "4",
        "--lora_alpha", "8", "--learning_rate", "1e-2", "--save_every", "0", "--plot", "false",
        *extra,
    ]  # fmt: skip
    assert main(argv, "train_loop.py", "train") == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["train_kl"] for m in metrics], (out / "train_loop.log").read_text()


@pytest.fixture(scope="module")
def generated(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("handoff")
    return d, generate(d, tiny_model_dir)


def test_sidecar_holds_the_teacher_pass_of_exactly_those_rows(generated, tiny_model_dir):
    from promptbake.models import load_model

    _, traj = generated
    path = sidecar_path(traj)
    rows = read_trajectories(traj)
    with safe_open(str(path), framework="pt") as f:
        meta, logp, offsets = f.metadata(), f.get_tensor("logp"), f.get_tensor("offsets")
    assert meta["rows"] == rows_fingerprint(rows) and meta["dtype"] == "torch.float32"
    model, tok = load_model(str(tiny_model_dir), "cpu", "float32")
    ref = build_teacher_cache(model, rows, tok.pad_token_id, log=lambda s: None)
    assert torch.equal(offsets, ref.offsets)
    torch.testing.assert_close(logp, ref.logp, atol=1e-4, rtol=0)
    # --max_traj_len: the same cut as a teacher pass over the cut rows
    short = build_teacher_cache(model, rows, tok.pad_token_id, max_gen=3, log=lambda s: None)
    ident = json.loads(json.dumps({k: meta[k] for k in ("model", "dtype", "quantization")}))
    assert probe_sidecar(traj, rows, ident) == "fits"
    got = read_sidecar(traj, rows, 3)
    assert torch.equal(got.offsets, short.offsets)
    torch.testing.assert_close(got.logp, short.logp, atol=1e-4, rtol=0)
    assert cut(got, rows, None) is got


def test_training_from_the_sidecar_equals_training_with_the_teacher_pass(
    generated, tiny_model_dir, tmp_path
):
    _, traj = generated
    kept, log = train(traj, tmp_path / "kept", tiny_model_dir)
    assert "teacher cache (exact, kept from generation)" in log
    assert "teacher cache (exact):" not in log
    # the same file without its sidecar: train_loop.py builds the cache itself
    bare = tmp_path / "bare.jsonl"
    bare.write_bytes(traj.read_bytes())
    (tmp_path / "bare.jsonl.meta.json").write_bytes((traj.parent / "train.jsonl.meta.json").read_bytes())  # fmt: skip
    built, log = train(bare, tmp_path / "built", tiny_model_dir)
    assert "teacher cache (exact):" in log and "kept from generation" not in log
    assert len(kept) == len(built) == 3
    for a, b in zip(kept, built):
        assert a == pytest.approx(b, abs=1e-4, rel=1e-4)
    assert kept[-1] < kept[0]  # it trains


def test_a_stale_sidecar_is_ignored_with_one_warning(generated, tiny_model_dir, tmp_path, capsys):
    d, traj = generated
    rows = [json.loads(x) for x in traj.read_text().splitlines()]
    rows[0]["input_ids"][-1] = rows[0]["input_ids_nosys"][-1] = 7  # an edited answer token
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sidecar_path(edited).write_bytes(sidecar_path(traj).read_bytes())
    capsys.readouterr()
    _, log = train(edited, tmp_path / "run", tiny_model_dir, "--teacher_cache", "exact")
    err = capsys.readouterr().err
    assert err.count("warning: ignoring") == 1 and "changed or regenerated" in err
    assert "teacher cache (exact):" in log and "kept from generation" not in log
    # another dtype: also ignored, with the reason
    _, log = train(traj, tmp_path / "bf16", tiny_model_dir, "--dtype", "bfloat16")
    assert "dtype 'torch.float32'" in capsys.readouterr().err
    assert "kept from generation" not in log


def test_never_and_the_size_cap_write_no_sidecar_and_remove_an_old_one(
    tiny_model_dir, tmp_path, capsys
):
    traj = generate(tmp_path, tiny_model_dir)
    assert sidecar_path(traj).is_file()
    generate(tmp_path, tiny_model_dir, "--seed", "1", "--save_teacher_cache_max_gb", "1e-9")
    assert not sidecar_path(traj).exists()  # the new file's table was over the cap
    assert "Teacher log-probs not saved" in capsys.readouterr().out
    generate(tmp_path, tiny_model_dir, "--seed", "2", "--save_teacher_cache", "always")
    assert sidecar_path(traj).is_file()
    generate(tmp_path, tiny_model_dir, "--seed", "3", "--save_teacher_cache", "never")
    assert not sidecar_path(traj).exists()
    with pytest.raises(UserError, match="save_teacher_cache_max_gb"):
        GenerateConfig(
            x0_file="x", question_dataset="q", traj_out_file="t", save_teacher_cache_max_gb=0
        ).validate()
