"""Issue 13, section C: the 26 inputs and faults that a sweep of 97 found failing, as one table.

    python -m pytest tests/test_bad_inputs.py -q

Each row of ``ROWS`` is (issue item, what the user does, check). Most checks are
:func:`refused`: the command (through ``promptbake.cli.main``, or the seed scripts'
entry ``main(argv, "generate_data.py", "generate")``) ends in exactly one ``error:`` line
holding a fragment, exit status 2, no traceback, and every file under the test's folder
and the shared adapter is unchanged afterwards (names, bytes, modes): nothing
half-written, nothing deleted. The non-error items check their documented behaviour
instead (14: no Hub request, 15: file modes from the umask, 11: what Ctrl-C keeps).
``EXTRA_ROWS`` are the same checks for the other commands an item names; they are not
counted in the 26. Rows that another file also covers share its builders, which live in
tiny.py (with test_bad_inputs_data.py and test_bad_inputs_adapters.py); conftest.py's
``hub_blocked`` fixture serves row 14.

Models: the tiny random Qwen3 saved to a directory (conftest ``tiny_model_dir``), so a row
that loads one takes a second.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from tiny import (
    BINARY,
    chain_entry,
    float_mask,
    foreign_adapter,
    make_adapter,
    merge_into,
    negative_id,
    null_ids,
    pickle_only,
    truncated,
    write_rows,
)

from promptbake.chat import NOT_UTF8
from promptbake.cli import main
from promptbake.errors import UserError
from promptbake.guards import exclusive_lock
from promptbake.models import load_model, tokenizer_fingerprint
from promptbake.training import objective

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a color."]
UNWRITABLE = "/proc/promptbake-no-such-dir"  # refused to root too: nothing can be created there


@dataclass
class Ctx:
    """What a row's setup may use: its own folder, the tiny model, the shared adapters."""

    tmp: Path
    model_dir: Path
    built: dict
    monkeypatch: Any
    capsys: Any
    request: Any


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter for the tiny Qwen3 and another base model it does not fit
    (the keys tiny.py's adapter builders expect)."""
    root = tmp_path_factory.mktemp("bad_inputs_table")
    other = tiny.save_tiny_model(root / "other_base", kind="tiny", seed=1, hidden_size=32)
    return {"adapter": make_adapter(tiny_model_dir, root / "adapter"), "other": other}


# ---------------------------------------------------------------- inputs a row builds
def x0(ctx: Ctx, content: bytes = b"Be a pirate.\n", name: str = "x0.md") -> Path:
    p = ctx.tmp / name
    p.write_bytes(content)
    return p


def questions(ctx: Ctx, content: bytes | None = None) -> Path:
    p = ctx.tmp / "q.jsonl"
    default = "".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS)
    p.write_bytes(default.encode() if content is None else content)
    return p


def trajectories(ctx: Ctx, edit=None, n_gen: int = 2) -> Path:
    """Two trajectory rows of the tiny tokenizer, with a sidecar naming it."""
    tok = tiny.chatml_tokenizer("tiny")
    recs = tiny.small_rows(tok, n_gen)
    if edit:
        edit(recs)
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tok), "num_trajectories": len(recs)}
    return write_rows(ctx.tmp / "t.jsonl", recs, meta)


def model(ctx: Ctx) -> list[str]:
    return ["--model_name", str(ctx.model_dir), "--device", "cpu"]


def generate(ctx: Ctx, *flags: str, x0_bytes: bytes = b"Be a pirate.\n", q=None) -> list[str]:
    """generate_data.py's flags (run through the seed script's entry point); a flag in
    `flags` overrides the same flag before it (argparse keeps the last)."""
    return [
        "generate", *model(ctx), "--x0_file", str(x0(ctx, x0_bytes)),
        "--question_dataset", str(questions(ctx, q)),
        "--traj_out_file", str(ctx.tmp / "out" / "t.jsonl"), "--num_questions", "2",
        "--num_sequences_per_question", "1", "--max_sequence_length", "3", "--batch_size", "2",
        *flags,
    ]  # fmt: skip


def train(ctx: Ctx, *flags: str, edit=None, n_gen: int = 2, out: str = "run") -> list[str]:
    """train_loop.py's flags, one quick epoch of the tiny model."""
    data = ctx.tmp / "t.jsonl"
    if not data.exists() or edit is not None or n_gen != 2:
        data = trajectories(ctx, edit, n_gen)
    return [
        "train", *model(ctx), "--data_path", str(data), "--out_dir", str(ctx.tmp / out),
        "--num_epochs", "1", "--batch_size", "2", "-r", "2", "--lora_alpha", "4",
        "--plot", "false", *flags,
    ]  # fmt: skip


def bake(ctx: Ctx, *flags: str) -> list[str]:
    return [
        "bake", *model(ctx), "--question_dataset", str(questions(ctx)),
        "--out_dir", str(ctx.tmp / "bake"), *flags,
    ]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """The seed scripts run their command alone (``only``); the rest through `promptbake`."""
    if argv[0] == "generate":
        return main(argv[1:], "generate_data.py", "generate")
    if argv[0] == "train":
        return main(argv[1:], "train_loop.py", "train")
    return main(argv)


# ---------------------------------------------------------------- the checks
def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (
            stat.S_IMODE(p.stat().st_mode),
            p.read_bytes() if p.is_file() else None,
        )
        for p in sorted(root.rglob("*"))
    }


def error_line(ctx: Ctx, rc: int, expected_rc: int = 2) -> str:
    """The single `error:` line of a run that must exit `expected_rc` without a traceback."""
    err = ctx.capsys.readouterr().err
    assert rc == expected_rc, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def refused(setup, *fragments: str):
    """A row: `setup(ctx)` builds the inputs and returns the argv; the run must end in
    one error line holding every fragment, exit 2, and change no file."""

    def check(ctx: Ctx) -> None:
        argv = setup(ctx)
        before = snapshot(ctx.tmp), snapshot(ctx.built["adapter"])
        ctx.capsys.readouterr()
        line = error_line(ctx, run_cli(argv))
        for frag in fragments:
            assert frag in line, (frag, line)
        assert (snapshot(ctx.tmp), snapshot(ctx.built["adapter"])) == before

    return check


def adapters_row(builder):
    """An adapter builder of tiny.py's bad-input section, called the way it expects."""
    return lambda ctx: builder(ctx.built, ctx.tmp, ctx.model_dir)


def resume_other_shape(ctx: Ctx) -> list[str]:
    """Item 11: a finished 1-epoch run, then --resume true with another LoRA rank."""
    assert run_cli(train(ctx)) == 0
    return train(ctx, "--resume", "true", "-r", "4", "--num_epochs", "2")


def interrupt_training_at(monkeypatch, step: int) -> None:
    """Ctrl-C during the `step`-th training step (what the user's keyboard does)."""
    real, calls = objective.batch_kl, [0]

    def batch_kl(model, batch, *a, **kw):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == step:
                raise KeyboardInterrupt
        return real(model, batch, *a, **kw)

    monkeypatch.setattr(objective, "batch_kl", batch_kl)


def ctrl_c_in_training(ctx: Ctx) -> None:
    """Item 11: Ctrl-C in epoch 2 names the command that continues; the same command
    without --resume refuses (and deletes nothing); --resume true finishes the run."""
    argv = train(ctx, "--num_epochs", "2", "--batch_size", "1")  # 2 steps per epoch
    with ctx.monkeypatch.context() as m:
        interrupt_training_at(m, 3)
        ctx.capsys.readouterr()
        assert run_cli(argv) == 130
    err = ctx.capsys.readouterr().err
    assert "checkpoint after epoch 1" in err and "add --resume true" in err, err
    before = snapshot(ctx.tmp)
    line = error_line(ctx, run_cli(argv))
    assert "holds the checkpoint of an unfinished run (epoch 1 of 2)" in line, line
    assert "--resume true" in line and "--resume false" in line
    assert snapshot(ctx.tmp) == before  # the checkpoint, args.json and log are all kept
    assert run_cli([*argv, "--resume", "true"]) == 0
    metrics = [json.loads(x) for x in (ctx.tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def refused_generation_leaves_nothing(ctx: Ctx) -> None:
    """Item 11: a generation refused once it has started leaves no .partial/key, so the
    corrected command is not blocked as an unfinished run with other arguments."""
    from promptbake.sampling import trajectories as gen_module

    def cannot(*a, **k):
        raise UserError("the model cannot sample that")

    argv = generate(ctx)
    before = snapshot(ctx.tmp)
    with ctx.monkeypatch.context() as m:
        m.setattr(gen_module, "sample", cannot)
        ctx.capsys.readouterr()
        assert "cannot sample" in error_line(ctx, run_cli(argv))
    assert snapshot(ctx.tmp) == before
    assert run_cli(argv) == 0
    assert len((ctx.tmp / "out" / "t.jsonl").read_text().splitlines()) == 2


def second_writer(ctx: Ctx) -> list[str]:
    """Item 13: a second generate_data.py on the same --traj_out_file while one writes."""
    argv = generate(ctx)
    lock = exclusive_lock(ctx.tmp / "out" / "t.jsonl", "--traj_out_file")
    lock.__enter__()
    ctx.request.addfinalizer(lambda: lock.__exit__(None, None, None))
    return argv


def chat_non_utf8_stdin(ctx: Ctx) -> None:
    """Item 9: bytes that are not UTF-8 on chat's stdin: one error line, the chat goes on."""
    raw = b"caf\xe9 \xff\n/prompt\n"
    ctx.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    ctx.capsys.readouterr()
    rc = main(["chat", *model(ctx), "--prompt", "Be a pirate.", "--max_new_tokens", "2"])
    out, err = ctx.capsys.readouterr()
    assert rc == 0 and "Traceback" not in err, err
    assert out.splitlines() == [NOT_UTF8, "Be a pirate."]


def no_hub_request(ctx: Ctx) -> None:
    """Item 14: saving an adapter of the bundled model (its alias is the model's name)
    and merging one ask nothing of the Hugging Face Hub."""
    from promptbake.configs import LoraArgs
    from promptbake.training.outputs import save_adapter
    from promptbake.training.setup import add_lora

    attempts = ctx.request.getfixturevalue("hub_blocked")
    m, _ = load_model(str(ctx.model_dir), "cpu", "float32")
    m.name_or_path = "smollm2-135m"  # what load_model("smollm2-135m") records
    peft = add_lora(m, LoraArgs(r=2, lora_alpha=4.0, target_modules="q_proj,v_proj"))
    (ctx.tmp / "a").mkdir()
    save_adapter(peft, ctx.tmp / "a")
    assert main(["merge", "--adapter", str(ctx.built["adapter"]), "--out", str(ctx.tmp / "m")]) == 0
    assert attempts == []
    assert (ctx.tmp / "a" / "adapter_model.safetensors").is_file()


def modes_follow_umask(ctx: Ctx) -> None:
    """Item 15: adapters, checkpoints and merged weights get the modes of any file the
    user writes (0o666 / 0o777 less the umask), not mkstemp's 0600 / 0700."""
    umask = 0o027
    old = os.umask(umask)
    try:
        assert run_cli(train(ctx, "--save_every", "1")) == 0
        assert main(["merge", "--adapter", str(ctx.tmp / "run"), "--out", str(ctx.tmp / "m")]) == 0
    finally:
        os.umask(old)
    written = [p for p in ctx.tmp.rglob("*") if p.parts[len(ctx.tmp.parts)] in ("run", "m")]
    assert any(p.name == "state.pt" for p in written)
    assert any(p.name == "adapter_model.safetensors" for p in written)
    for p in [ctx.tmp / "run", ctx.tmp / "m", *written]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


# ---------------------------------------------------------------- the table
# (issue item, what the user does, check); exactly the 26 of issue 13 section C
ROWS = [
    # 9: tracebacks instead of one line
    ("9", "binary --x0_file", refused(lambda c: generate(c, x0_bytes=BINARY), "--x0_file", "not UTF-8")),
    ("9", "non-UTF-8 question file", refused(
        lambda c: generate(c, q='{"question": "très"}\n'.encode("latin-1")),
        "--question_dataset", "not UTF-8")),
    ("9", "--temperature inf", refused(
        lambda c: generate(c, "--temperature", "inf"), "--temperature must be a finite number")),
    ("9", "output under an unwritable place", refused(
        lambda c: train(c, "--out_dir", f"{UNWRITABLE}/run"),
        "--out_dir", "cannot write into /proc")),
    ("9", "output whose parent is a file", refused(
        lambda c: generate(c, "--traj_out_file", f"{x0(c, name='afile')}/t.jsonl"),
        "--traj_out_file", "is a file")),
    ("9", "static-cache generation longer than the context", refused(
        lambda c: generate(c, "--engine", "static", "--max_sequence_length", "100000"),
        "exceeds the model's context")),
    ("9", "trajectory with a negative id", refused(
        lambda c: train(c, edit=negative_id), "line 2", "integers >= 0")),
    ("9", "trajectory with null ids", refused(
        lambda c: train(c, edit=null_ids), "line 2", "input_ids_nosys")),
    ("9", "trajectory with a non-integer mask", refused(
        lambda c: train(c, edit=float_mask), "line 2", "generated_text_mask")),
    ("9", "adapter of another base model (merge)", refused(
        adapters_row(foreign_adapter("merge")), "was trained on")),
    ("9", "truncated adapter safetensors", refused(adapters_row(truncated), "is damaged")),
    ("9", "non-UTF-8 bytes on chat's stdin", chat_non_utf8_stdin),
    ("9", "adapter folder with only a pickle .bin", refused(
        adapters_row(pickle_only), "adapter_model.bin, a pickle")),
    # 10: accepted when it should be refused
    ("10", "--prompt of only whitespace", refused(
        lambda c: bake(c, "--prompt", "   "), "empty or only whitespace")),
    ("10", "trajectories with no generated tokens", refused(
        lambda c: train(c, n_gen=0), "none of its 2 trajectories", "generated token")),
    ("10", "--lora_alpha nan", refused(
        lambda c: train(c, "--lora_alpha", "nan"), "--lora_alpha must be a finite number")),
    ("10", '--marker "(" (before the bake)', refused(
        lambda c: bake(c, "--prompt", "Be a pirate.", "--marker", "("),
        "--marker '('", "not a valid regular expression")),
    # 11: damage by a refused or interrupted run
    ("11", "--resume true with another LoRA shape", refused(
        resume_other_shape, "cannot resume", "--r 2 (now 4)")),
    ("11", "refused generation leaves no .partial", refused_generation_leaves_nothing),
    ("11", "Ctrl-C in training, then the same command", ctrl_c_in_training),
    # 12: merge --out over a folder merge did not write
    ("12", "merge --out over a project folder with config.json", refused(
        adapters_row(merge_into({"config.json": "{}", "notes.md": "mine"})),
        "not a model directory written by promptbake merge")),
    # 13: two writers of one --traj_out_file
    ("13", "second generate_data.py on the same output", refused(
        second_writer, "is being written by another run", f"pid {os.getpid()}")),
    # 14: no Hub request the user did not ask for
    ("14", "adapter saves with the bundled model's alias", no_hub_request),
    # 15: file modes
    ("15", "adapters, checkpoints, merged weights follow the umask", modes_follow_umask),
    # 16: pursuit chains
    ("16", "chain entry with an absolute path", refused(
        adapters_row(chain_entry("ABS")), "outside this pursuit run")),
    ("16", "chain entry escaping with ..", refused(
        adapters_row(chain_entry("../../elsewhere")), "outside this pursuit run")),
]  # fmt: skip


def out_under_file(command: str, flag: str):
    """`command` asked to write under a file: refused before any model loads."""

    def setup(c: Ctx) -> list[str]:
        target = f"{x0(c, name='afile')}/out"
        a = str(c.built["adapter"])
        return {
            "train": train(c, "--out_dir", target),
            "bake": bake(c, "--prompt", "Hi.", "--out_dir", target),
            "pursue": ["pursue", *bake(c, "--prompt", "Hi.", "--out_dir", target)[1:]],
            "compare": ["compare", "--adapter", a, "--data_file", str(trajectories(c)),
                        "--out_dir", target],
            "eval": ["eval", "--adapter", a, "--questions", str(questions(c)), "--scorer",
                     "allcaps", "--prompt", "Shout.", "--out_dir", target],
            "merge": ["merge", "--adapter", a, "--out", target],
        }[command]  # fmt: skip

    return refused(setup, flag, "is a file, so nothing can be created under it")


def resume_false_starts_over(ctx: Ctx) -> None:
    """--resume false is the one way (besides a fresh --out_dir) to drop a checkpoint."""
    argv = train(ctx)
    assert run_cli(argv) == 0
    line = error_line(ctx, run_cli(argv))
    assert "holds the checkpoint of a finished run (1 epochs)" in line, line
    assert run_cli([*argv, "--resume", "false"]) == 0
    log = (ctx.tmp / "run" / "train_loop.log").read_text()
    assert "resumed" not in log and log.count("epoch 1:") == 1  # a fresh log, one epoch


def bake_redo_and_resume(ctx: Ctx) -> None:
    """A bake's --out_dir is its own run: the same command twice works (make demo), and
    --resume true continues its training from the checkpoint."""
    argv = bake(
        ctx, "--prompt", "Be a pirate.", "--num_questions", "3", "--num_sequences_per_question",
        "1", "--max_sequence_length", "3", "--num_epochs", "1", "--batch_size", "2", "-r", "2",
    )  # fmt: skip
    assert run_cli(argv) == 0
    assert run_cli(argv) == 0
    assert run_cli([*argv, "--num_epochs", "2", "--resume", "true"]) == 0
    log = (ctx.tmp / "bake" / "train_loop.log").read_text()
    assert "resumed from" in log and "after epoch 1" in log and "epoch 2:" in log


# the same checks for the other commands and spellings an item names (not counted)
EXTRA_ROWS = [
    ("9", "eval --temperature nan", refused(
        lambda c: ["eval", *model(c), "--questions", str(questions(c)), "--scorer", "allcaps",
                   "--temperature", "nan", "--out_dir", str(c.tmp / "ev")],
        "--temperature must be a finite number")),
    ("9", "chat --temperature inf", refused(
        lambda c: ["chat", *model(c), "--temperature", "inf"],
        "--temperature must be a finite number")),
    ("9", "generate --traj_out_file under /proc", refused(
        lambda c: generate(c, "--traj_out_file", f"{UNWRITABLE}/t.jsonl"),
        "--traj_out_file", "cannot write into /proc")),
    ("9", "merge --out under /proc", refused(
        lambda c: ["merge", "--adapter", str(c.built["adapter"]), "--out", f"{UNWRITABLE}/m"],
        "--out", "cannot write into /proc")),
    *[("9", f"{cmd} writing under a file", out_under_file(cmd, flag))
      for cmd, flag in (("train", "--out_dir"), ("bake", "--out_dir"), ("pursue", "--out_dir"),
                        ("compare", "--out_dir"), ("eval", "--out_dir"), ("merge", "--out"))],
    ("10", "train --learning_rate inf", refused(
        lambda c: train(c, "--learning_rate", "inf"), "--learning_rate must be a finite number")),
    ("10", "eval --scorer marker:(", refused(
        lambda c: ["eval", *model(c), "--questions", str(questions(c)), "--scorer", "marker:(",
                   "--out_dir", str(c.tmp / "ev")], "bad regex")),
    ("11", "--resume false deletes the checkpoint; nothing else does", resume_false_starts_over),
    ("11", "bake: the same command redoes it; --resume true continues", bake_redo_and_resume),
    ("13", "more rows than the sidecar records", refused(
        lambda c: train(c, "--data_path", str(write_rows(
            c.tmp / "twice.jsonl", tiny.small_rows(tiny.chatml_tokenizer("tiny")) * 2,
            {"tokenizer_fingerprint": tokenizer_fingerprint(tiny.chatml_tokenizer("tiny")),
             "num_trajectories": 2}))), "holds 4", "records 2")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "on_ctrl_c"),
    [
        ("generate", "interrupted: partial output is kept and the same command resumes it"),
        ("train", "interrupted: nothing half-written was kept; the same command starts it again"),
        ("bake", "interrupted: partial output is kept and the same command resumes it"),
    ],
)
def test_every_entry_point_of_the_table_ends_a_stage_error_in_one_line(
    command, on_ctrl_c, tiny_model_dir, tmp_path, monkeypatch, capsys, request
):
    """What the `refused` rows rest on, for each entry point they run through (the seed
    scripts' generate and train, `promptbake bake`): a UserError raised inside the stage
    prints exactly ``error: <its message>`` and exits 2; a Ctrl-C the stage did not
    handle itself exits 130 with the one line for that command."""
    import importlib

    from promptbake.cli import BY_NAME

    ctx = Ctx(tmp_path, Path(tiny_model_dir), {}, monkeypatch, capsys, request)
    argv = {"generate": generate, "train": train, "bake": bake}[command](ctx)
    module, function = BY_NAME[command][3].split(":")
    stage = importlib.import_module(f"promptbake.{module}")

    def fails(exc):
        def run(cfg):
            raise exc

        return run

    monkeypatch.setattr(stage, function, fails(UserError("--x0_file x: what is wrong, the fix")))
    capsys.readouterr()
    assert run_cli(argv) == 2
    out, err = capsys.readouterr()
    assert (out, err.splitlines()) == ("", ["error: --x0_file x: what is wrong, the fix"])
    monkeypatch.setattr(stage, function, fails(KeyboardInterrupt()))
    assert run_cli(argv) == 130
    out, err = capsys.readouterr()
    assert (out, err.splitlines()) == ("", [on_ctrl_c])


# rows that load the bundled model (saving an adapter under its alias materializes it)
SLOW = {no_hub_request}


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(r, id=f"{r[0]}: {r[1]}", marks=[pytest.mark.slow] if r[2] in SLOW else [])
        for r in ROWS + EXTRA_ROWS
    ],
)
def test_bad_input(row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request):
    _, _, check = row
    work = tmp_path / "work"
    work.mkdir()
    check(Ctx(work, Path(tiny_model_dir), built, monkeypatch, capsys, request))
