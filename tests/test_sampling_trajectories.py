"""The generation stage (promptbake.sampling.trajectories): trajectory files on the tiny
random Qwen3.

    python -m pytest tests/test_sampling_trajectories.py -q

Every row follows the schema, the same seed writes the same bytes, the .meta.json sidecar
records the run, batches are planned by length, and an interrupted run resumes to the
very same file (in-process here; killed with SIGKILL as a process too).
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import PIRATE, SAMPLING_QUESTIONS, bias_towards, gen_args, gen_config, subprocess_env

from promptbake import __version__
from promptbake.cli import main as cli_main
from promptbake.configs import GenerateConfig
from promptbake.errors import UserError
from promptbake.generate import run_generate
from promptbake.models import end_of_turn_ids, tokenizer_fingerprint
from promptbake.prompts import encode, format_prompt
from promptbake.sampling import trajectories
from promptbake.sampling.trajectories import generate_trajectories, plan_batches
from promptbake.schema import TRAJECTORY_KEYS, generated_ids, read_meta


def cfg(**kw) -> GenerateConfig:
    base = dict(
        model_name="tiny",
        device="cpu",
        x0_file="x0.md",
        question_dataset="q.jsonl",
        traj_out_file="out.jsonl",
        num_questions=3,
        num_sequences_per_question=2,
        max_sequence_length=6,
        min_sequence_length=1,
        batch_size=4,
        seed=7,
    )
    base.update(kw)
    return GenerateConfig(**base)


# ---------------------------------------------------------------- lengths


def test_min_sequence_length_in_trajectories(chatml_tok, tiny_model, tmp_path):
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    bias_towards(tiny_model, im_end)
    c = cfg(min_sequence_length=4, max_sequence_length=9)
    generate_trajectories(
        tiny_model, chatml_tok, c, PIRATE, SAMPLING_QUESTIONS, tmp_path / "t.jsonl", progress=False
    )
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        gen = generated_ids(r)
        # 4 answer tokens, then the end of turn, which the mask includes
        assert len(gen) == 5 and gen[-1] == im_end and im_end not in gen[:-1]
        assert r["input_ids"][-1] == im_end  # and nothing after it
        assert r["generated_text_mask"] == [0] * len(r["prompt_input_ids"]) + [1] * 5


# ---------------------------------------------------------------- planning
def test_plan_batches_sorts_by_length_and_mixes_questions():
    batches = plan_batches([5, 3, 4], n_seq=2, batch_size=3)
    assert batches == [[(1, 0), (1, 1), (2, 0)], [(2, 1), (0, 0), (0, 1)]]
    assert len({qi for qi, _ in batches[0]}) == 2  # one batch, two questions


def test_plan_batches_covers_every_job_once():
    lens = [9, 2, 7, 2, 5]
    batches = plan_batches(lens, n_seq=3, batch_size=4)
    jobs = [j for b in batches for j in b]
    assert sorted(jobs) == [(q, s) for q in range(5) for s in range(3)]
    assert [len(b) for b in batches] == [4, 4, 4, 3]
    assert [lens[q] for q, _ in jobs] == sorted(lens[q] for q, _ in jobs)
    assert plan_batches(lens, 3, 4) == batches  # a pure function (needed to resume)


# ---------------------------------------------------------------- records and files
def run(model, tok, path, **kw):
    generate_trajectories(model, tok, cfg(**kw), PIRATE, SAMPLING_QUESTIONS, path, progress=False)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_record_follows_the_schema(chatml_tok, tiny_model, tmp_path):
    rows = run(tiny_model, chatml_tok, tmp_path / "t.jsonl")
    eot = set(end_of_turn_ids(chatml_tok, tiny_model))
    assert len(rows) == 3 * 2
    assert sorted((r["question_index"], r["sample_index"]) for r in rows) == [
        (q, s) for q in range(3) for s in range(2)
    ]
    for r in rows:
        assert set(TRAJECTORY_KEYS) <= set(r)
        q = SAMPLING_QUESTIONS[r["question_index"]]["question"]
        assert r["question"] == q
        assert r["prompt_input_ids"] == encode(
            chatml_tok, format_prompt(PIRATE, q, True, chatml_tok)
        )
        assert r["prompt_input_ids_nosys"] == encode(
            chatml_tok, format_prompt(PIRATE, q, False, chatml_tok)
        )
        assert r["prompt_text"] == format_prompt(PIRATE, q, True, chatml_tok)
        assert r["prompt_text_nosys"] == format_prompt(PIRATE, q, False, chatml_tok)
        gen = generated_ids(r)
        assert gen == generated_ids(r, nosys=True)  # same answer on both sides
        assert 1 <= len(gen) <= 6
        assert not eot & set(gen[:-1])  # at most one end of turn, and only last
        assert r["input_ids"] == r["prompt_input_ids"] + gen
        assert r["input_ids_nosys"] == r["prompt_input_ids_nosys"] + gen
        assert r["attention_mask"] == [1] * len(r["input_ids"])
        assert r["generated_text_mask"] == [0] * len(r["prompt_input_ids"]) + [1] * len(gen)
        assert r["generated_text_mask_nosys"] == [0] * len(r["prompt_input_ids_nosys"]) + [1] * len(
            gen
        )
        assert r["text"] == chatml_tok.decode(r["input_ids"], skip_special_tokens=False)
        assert r["text_nosys"] == chatml_tok.decode(r["input_ids_nosys"], skip_special_tokens=False)
        assert r["text"].startswith(r["prompt_text"])
        assert r["generated_text"] == chatml_tok.decode(gen, skip_special_tokens=True)


def test_same_seed_same_bytes_other_seed_other_bytes(chatml_tok, tiny_model, tmp_path):
    run(tiny_model, chatml_tok, tmp_path / "a.jsonl", seed=1)
    run(tiny_model, chatml_tok, tmp_path / "b.jsonl", seed=1)
    run(tiny_model, chatml_tok, tmp_path / "c.jsonl", seed=2)
    a, b, c = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_meta_sidecar(chatml_tok, tiny_model, tmp_path):
    tiny_model.name_or_path = "tiny-test-model"
    out = tmp_path / "t.jsonl"
    run(tiny_model, chatml_tok, out, seed=5)
    meta = read_meta(out)
    assert meta["promptbake_version"] == __version__
    assert meta["model_name"] == "tiny-test-model"
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(chatml_tok)
    assert meta["x0"] == PIRATE
    assert meta["end_of_turn_ids"] == end_of_turn_ids(chatml_tok, tiny_model)
    assert meta["args"]["seed"] == 5
    assert meta["args"]["num_sequences_per_question"] == 2
    assert meta["args"]["max_sequence_length"] == 6
    assert meta["num_trajectories"] == 6
    assert meta["num_questions"] == 3
    # nothing left over from the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl", "t.jsonl.meta.json"]
    # both files get the mode a plain open() would give (the sidecar used to be 0600)
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- resuming
def interrupt_on_batch(monkeypatch, n: int):
    """Make the n-th sampling call (1-based) raise KeyboardInterrupt."""
    real = trajectories.sample
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(trajectories, "sample", flaky)
    return calls


def test_interrupted_run_resumes_to_identical_output(chatml_tok, tiny_model, tmp_path, monkeypatch):
    # batch_size 2 -> 3 batches of 2 rows
    ref = tmp_path / "ref.jsonl"
    run(tiny_model, chatml_tok, ref, batch_size=2)

    out = tmp_path / "out.jsonl"
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, chatml_tok, out, batch_size=2)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists()
    assert partial.read_bytes() == b"".join(ref.read_bytes().splitlines(keepends=True)[:2])
    monkeypatch.undo()

    # a torn line (killed mid-write) is dropped on resume
    with open(partial, "ab") as f:
        f.write(b'{"text": "torn')
    calls = interrupt_on_batch(monkeypatch, 99)
    run(tiny_model, chatml_tok, out, batch_size=2)
    assert len(calls) == 2  # only the two missing batches were generated
    assert out.read_bytes() == ref.read_bytes()
    assert not partial.exists()
    assert not (tmp_path / "out.jsonl.partial.key.json").exists()


def test_returns_the_written_rows_and_keeps_the_teacher_only_when_complete(
    chatml_tok, tiny_model, tmp_path, monkeypatch
):
    """What training needs comes back from generation: the file's rows in file order and,
    asked for, the teacher cache; a resumed run's earlier rows have no kept log-probs,
    so it returns no cache (training then runs its own teacher pass)."""
    ref = tmp_path / "ref.jsonl"
    kw = dict(progress=False, keep_bytes=float("inf"))
    gen = generate_trajectories(
        tiny_model, chatml_tok, cfg(batch_size=2), PIRATE, SAMPLING_QUESTIONS, ref, **kw
    )
    file_rows = [json.loads(line) for line in ref.read_text().splitlines()]
    assert gen.rows == file_rows and gen.stats["trajectories"] == 6
    n = {(r["question_index"], r["sample_index"]): sum(r["generated_text_mask"]) for r in file_rows}
    assert {k: v.shape for k, v in gen.kept.items()} == {
        k: (v, tiny_model.config.vocab_size) for k, v in n.items()
    }  # values: test_teacher checks them against a teacher pass

    out = tmp_path / "out.jsonl"
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        generate_trajectories(
            tiny_model, chatml_tok, cfg(batch_size=2), PIRATE, SAMPLING_QUESTIONS, out, **kw
        )
    monkeypatch.undo()
    resumed = generate_trajectories(
        tiny_model, chatml_tok, cfg(batch_size=2), PIRATE, SAMPLING_QUESTIONS, out, **kw
    )
    assert resumed.rows == file_rows  # the 2 rows read back + the 4 new ones, in order
    assert resumed.stats["trajectories"] == 4
    assert resumed.kept is None


def test_leftover_partial_with_other_args_is_refused(chatml_tok, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, chatml_tok, out, batch_size=2)
    monkeypatch.undo()
    before = (tmp_path / "out.jsonl.partial").read_bytes()
    with pytest.raises(UserError, match="different arguments"):
        run(tiny_model, chatml_tok, out, batch_size=2, temperature=0.5)
    assert (tmp_path / "out.jsonl.partial").read_bytes() == before  # left for the user
    assert not out.exists()


def test_partial_without_key_is_refused(chatml_tok, tiny_model, tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text('{"input_ids": [1]}\n')
    with pytest.raises(UserError, match="delete the .partial"):
        run(tiny_model, chatml_tok, out)


# ---------------------------------------------------------------- resuming a process killed with SIGKILL
@pytest.mark.slow
def test_generation_killed_with_sigkill_resumes_to_identical_file(
    tiny_model_dir, resume_inputs, tmp_path
):
    ref = tmp_path / "ref.jsonl"
    run_generate(gen_config(tiny_model_dir, resume_inputs, ref))
    n_rows = len(ref.read_bytes().splitlines())
    assert n_rows == 60  # 10 questions x 6 answers, in 30 batches of 2

    out = tmp_path / "out.jsonl"
    partial = Path(str(out) + ".partial")
    cmd = [
        sys.executable,
        "-m",
        "promptbake.cli",
        "generate",
        *gen_args(tiny_model_dir, resume_inputs, out),
    ]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_bytes().count(b"\n") >= 2:
                break  # the first batch is on disk
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the run finished before it was killed: nothing was tested"
    done = partial.read_bytes().count(b"\n")
    assert 2 <= done < n_rows

    # the same command again finishes the file: no duplicated, no lost trajectories
    assert cli_main(["generate", *gen_args(tiny_model_dir, resume_inputs, out)]) == 0
    assert out.read_bytes() == ref.read_bytes()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({(r["question_index"], r["sample_index"]) for r in rows}) == n_rows
    assert not partial.exists()
