"""Issue 22, classes 1-3: a second sweep's bad inputs and faults, one table per class.

    python -m pytest tests/test_bad_inputs_sweep.py -q

1. Outputs never replace what the tool did not write: no output is an input
   (guards.check_not_inputs), and a folder the tool did not write keeps its files
   (guards.check_run_dir, the .promptbake-run marker).
2. Runs never mix: one run at a time in a run folder (guards.run_dir_lock), and a
   generation resumes only with the same inputs, by content (the resume key).
3. Damage is detected: checkpoint checksums, the teacher table's checksum, and one
   reader for every JSON file read back (records.read_json).

Each :class:`Row` is the command line (built by `setup` in the row's own folder), the
one line it must print (a regex), the files that must stay byte-identical, and how it
ends: ``refused`` (exit 2, one ``error:`` line, no traceback, nothing under the row's
folder changed: names, bytes, modes), ``warned`` (exit 0, one ``warning:`` line) or
``done`` (exit 0). Every row also checks that the run left nothing behind that was not
there before: no temp file, .partial, resume key or lock, no empty folder.

Models: the tiny random Qwen3 saved to a directory (conftest ``tiny_model_dir``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tiny

from promptbake.bake import BAKE_WRITES
from promptbake.cli import main
from promptbake.evaluation import report
from promptbake.guards import RUN_MARKER
from promptbake.merge import MERGED_MARKER

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a color."]
MESSAGES = json.dumps([{"role": "system", "content": "Be a pirate."}])  # a .json prompt
QUESTION_LINES = "".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS)


@dataclass
class Ctx:
    """What a row's setup may use: its own folder, the tiny model, the shared runs."""

    tmp: Path
    model_dir: Path
    built: dict
    monkeypatch: Any
    request: Any
    notes: dict = field(default_factory=dict)


@dataclass
class Row:
    name: str
    setup: Callable[[Ctx], list[str]]  # builds the inputs under ctx.tmp, returns the argv
    message: str | Callable[[Ctx], str]  # regex of the one error/warning line (done: output)
    keep: tuple[str, ...] = ()  # files under ctx.tmp that must exist and stay byte-identical
    ends: str = "refused"  # refused | warned | done
    after: Callable[[Ctx], None] | None = None  # further checks of a run that ends "done"


# ---------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """Generated trajectories (with .meta.json and teacher sidecar) and a finished
    one-epoch training run on them (its checkpoint, adapter and args.json)."""
    root = tmp_path_factory.mktemp("sweep_built")
    ctx = Ctx(root, Path(tiny_model_dir), {}, None, None)
    assert run_cli(generate(ctx, out="t.jsonl")) == 0
    assert run_cli(train(ctx, out="run")) == 0
    return {"gen": root, "run": root / "run"}


# ---------------------------------------------------------------- inputs a row builds
def text(ctx: Ctx, name: str, content: str) -> Path:
    p = ctx.tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content)
    return p


def questions(ctx: Ctx, name: str = "q.jsonl", qs=QUESTIONS) -> Path:
    return text(ctx, name, "".join(json.dumps({"question": q}) + "\n" for q in qs))


def model(ctx: Ctx) -> list[str]:
    return ["--model_name", str(ctx.model_dir), "--device", "cpu"]


def generate(ctx: Ctx, *flags: str, out: str = "out/t.jsonl") -> list[str]:
    """generate_data.py: 3 questions, 1 answer each, 1 per batch (3 batches)."""
    if not (ctx.tmp / "x0.md").exists():
        text(ctx, "x0.md", "Be a pirate.\n")
    if not (ctx.tmp / "q.jsonl").exists():
        questions(ctx)
    return [
        "generate", *model(ctx), "--x0_file", str(ctx.tmp / "x0.md"),
        "--question_dataset", str(ctx.tmp / "q.jsonl"), "--traj_out_file", str(ctx.tmp / out),
        "--num_questions", "3", "--num_sequences_per_question", "1",
        "--max_sequence_length", "3", "--batch_size", "1", *flags,
    ]  # fmt: skip


def trajectories(ctx: Ctx) -> Path:
    """The shared generated file, its .meta.json and sidecar, copied into the row's folder."""
    src = ctx.built["gen"] / "t.jsonl"
    for suffix in ("", ".meta.json", ".teacher.safetensors"):
        shutil.copy(f"{src}{suffix}", ctx.tmp / f"t.jsonl{suffix}")
    return ctx.tmp / "t.jsonl"


def train(ctx: Ctx, *flags: str, out: str = "run") -> list[str]:
    """train_loop.py: one quick epoch on the generated trajectories."""
    data = ctx.tmp / "t.jsonl"
    if not data.exists():
        data = trajectories(ctx)
    return [
        "train", *model(ctx), "--data_path", str(data), "--out_dir", str(ctx.tmp / out),
        "--num_epochs", "1", "--batch_size", "2", "-r", "2", "--lora_alpha", "4",
        "--plot", "false", *flags,
    ]  # fmt: skip


def bake(ctx: Ctx, *flags: str, out: str = "bake", command: str = "bake") -> list[str]:
    if not (ctx.tmp / "q.jsonl").exists():
        questions(ctx)
    return [
        command, *model(ctx), "--prompt", "Be a pirate.",
        "--question_dataset", str(ctx.tmp / "q.jsonl"), "--out_dir", str(ctx.tmp / out),
        "--num_questions", "3", "--num_sequences_per_question", "1",
        "--max_sequence_length", "3", "--num_epochs", "1", "--batch_size", "2", "-r", "2",
        "--gen_batch_size", "1", *flags,
    ]  # fmt: skip


def run_copy(ctx: Ctx, name: str = "run") -> Path:
    """The shared training run (a marked folder with a checkpoint), copied."""
    return Path(shutil.copytree(ctx.built["run"], ctx.tmp / name))


def model_copy(ctx: Ctx, name: str = "m", marker: str | None = None) -> Path:
    d = Path(shutil.copytree(ctx.model_dir, ctx.tmp / name))
    if marker:
        (d / marker).write_text("written by promptbake\n")
    return d


def run_folder(ctx: Ctx, name: str, files: dict[str, str], marked: bool = True) -> Path:
    """A folder as a run leaves it (marked), or the user's (not), holding `files`."""
    d = ctx.tmp / name
    d.mkdir(parents=True, exist_ok=True)
    if marked:
        (d / RUN_MARKER).write_text("written by promptbake\n")
    for rel, content in files.items():
        text(ctx, f"{name}/{rel}", content)
    return d


def flip16(path: Path, offset: int) -> None:
    """Invert 16 bytes at `offset`: damage that still loads."""
    b = bytearray(path.read_bytes())
    b[offset : offset + 16] = bytes(x ^ 0xFF for x in b[offset : offset + 16])
    path.write_bytes(bytes(b))


def safetensors_data(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and header)."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def zip_member_data(path: Path, member: str) -> int:
    """Where a stored (uncompressed) zip member's bytes start: torch.save's tensors."""
    with zipfile.ZipFile(path) as z:
        h = z.getinfo(member).header_offset
    n, m = struct.unpack("<HH", path.read_bytes()[h + 26 : h + 30])
    return h + 30 + n + m


def interrupted(ctx: Ctx, argv: list[str], at_call: int = 2) -> list[str]:
    """Run `argv` with Ctrl-C at the `at_call`-th sampling call (a killed generation:
    the batches before it are kept in the .partial file); returns `argv`."""
    from promptbake.sampling import trajectories as gen_module

    real, calls = gen_module.sample, [0]

    def sample(*a, **k):
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    with ctx.monkeypatch.context() as m:
        m.setattr(gen_module, "sample", sample)
        assert run_cli(argv) == 130
    return argv


def hold_run_lock(ctx: Ctx, folder: Path) -> None:
    """Another process holding the run folder's lock, as a run in progress does."""
    code = (
        "import sys\nfrom promptbake.guards import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip

    def release():
        proc.stdin.close()
        proc.wait(timeout=30)

    ctx.request.addfinalizer(release)
    assert proc.stdout.readline().strip() == "held"
    ctx.notes["pid"] = proc.pid


def run_cli(argv: list[str]) -> int:
    """The seed scripts run their command alone; `report` is ``python -m promptbake.report``."""
    if argv[0] == "generate":
        return main(argv[1:], "generate_data.py", "generate")
    if argv[0] == "train":
        return main(argv[1:], "train_loop.py", "train")
    if argv[0] == "report":
        return report.main(argv[1:])
    return main(argv)


# ---------------------------------------------------------------- the checks
def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (
            stat.S_IMODE(p.lstat().st_mode),
            p.read_bytes() if p.is_file() and not p.is_symlink() else None,
        )
        for p in sorted(root.rglob("*"))
    }


def leftovers(root: Path) -> set[str]:
    """Temp files and folders, .partial files, resume keys, locks and empty folders."""
    found = set()
    for p in root.rglob("*"):
        n = p.name
        if (
            ".tmp" in n
            or ".old-" in n
            or ".partial" in n
            or n.endswith(".lock")
            or (p.is_dir() and not any(p.iterdir()))
        ):
            found.add(str(p.relative_to(root)))
    return found


def check(row: Row, ctx: Ctx, capsys) -> None:
    argv = row.setup(ctx)
    kept = {k: (ctx.tmp / k).read_bytes() for k in row.keep}  # each must exist beforehand
    before, left = snapshot(ctx.tmp), leftovers(ctx.tmp)
    capsys.readouterr()
    rc = run_cli(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    pattern = row.message(ctx) if callable(row.message) else row.message
    if row.ends == "done":
        assert rc == 0, err
        assert re.search(pattern, out + err), (pattern, out[-2000:], err[-2000:])
    else:
        assert rc == (2 if row.ends == "refused" else 0), err
        kind = "error:" if row.ends == "refused" else "warning:"
        lines = [x for x in err.splitlines() if x.startswith(kind)]
        assert len(lines) == 1, err
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        if row.ends == "refused":
            assert snapshot(ctx.tmp) == before  # nothing written, replaced or left behind
    for k, data in kept.items():
        assert (ctx.tmp / k).read_bytes() == data, k
    assert leftovers(ctx.tmp) <= left, leftovers(ctx.tmp) - left
    if row.after is not None:
        row.after(ctx)


def run_row(row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request):
    work = tmp_path / "work"
    work.mkdir()
    check(row, Ctx(work, Path(tiny_model_dir), built, monkeypatch, request), capsys)


# ================================================================ 1. outputs never replace inputs
def gen_out_is(name: str, make):
    """generate_data.py whose --traj_out_file is `name`, after `make(ctx)` built it."""

    def setup(c: Ctx) -> list[str]:
        argv = generate(c)
        make(c)
        return [*argv, "--traj_out_file", str(c.tmp / name)]

    return setup


def comma_questions(c: Ctx) -> list[str]:
    questions(c, "q2.jsonl", ["Another question?"])
    argv = generate(c, "--traj_out_file", str(c.tmp / "q2.jsonl"))
    i = argv.index("--question_dataset")
    argv[i + 1] = f"{c.tmp / 'q.jsonl'},{c.tmp / 'q2.jsonl'}"
    return argv


def project(c: Ctx, files: dict[str, str]) -> Path:
    return run_folder(c, "proj", files, marked=False)


def repo_root_bake(c: Ctx) -> list[str]:
    """`bake --out_dir .` at the root of a repository with its README.md."""
    repo = run_folder(c, "repo", {"README.md": "# my project\n", ".git/HEAD": "ref\n"}, False)
    argv = bake(c)
    c.monkeypatch.chdir(repo)
    return [*argv, "--out_dir", "."]


def bake_x0_in_out(c: Ctx) -> list[str]:
    """bake --x0_file naming the report.md of its own (marked) --out_dir."""
    report_md = run_folder(c, "bake", {"report.md": "# r\n"}) / "report.md"
    argv = [a for a in bake(c) if a not in ("--prompt", "Be a pirate.")]
    return [*argv, "--x0_file", str(report_md)]


def pursue_question_in_round(c: Ctx) -> list[str]:
    q = run_folder(c, "p", {"round_2/q.jsonl": QUESTION_LINES})
    return [*bake(c, out="p", command="pursue"), "--question_dataset", str(q / "round_2/q.jsonl")]


def pursue_round_not_ours(c: Ctx) -> list[str]:
    """A marked pursuit folder whose round_2/ the user made (with a README.md)."""
    run_folder(c, "p/round_2", {"README.md": "# mine\n"}, marked=False)
    run_folder(c, "p", {})
    return [*bake(c, out="p", command="pursue"), "--rounds", "2"]


def declared(c: Ctx) -> None:
    """Every name a bake (training every epoch into epoch_N/, its plot) writes is in
    BAKE_WRITES, so a folder check knows all of them."""
    names = {p.name for p in (c.tmp / "bake").iterdir()}
    assert names >= {"README.md", "args.json", "epoch_1", "kl_curve.png", "summary.json"}
    known = [n for n in names if any(fnmatch.fnmatchcase(n, w) for w in BAKE_WRITES)]
    assert names - set(known) == {RUN_MARKER}


def marked_and_kept(c: Ctx) -> None:
    assert (c.tmp / "proj" / RUN_MARKER).is_file()
    assert (c.tmp / "proj" / "adapter_model.safetensors").is_file()


OVERWRITE = "would overwrite the input"
NOT_OURS = "promptbake did not write this folder \\(no \\.promptbake-run\\); it is left untouched"

CLASS_1 = [
    # (a) an output is never an input
    Row("generate: --traj_out_file is its --question_dataset",
        gen_out_is("q.jsonl", lambda c: None),
        rf"--traj_out_file \S+/q\.jsonl {OVERWRITE} --question_dataset \S+/q\.jsonl; an output "
        r"is never an input", keep=("q.jsonl",)),
    Row("generate: --traj_out_file is a symlink to the questions",
        gen_out_is("link.jsonl", lambda c: (c.tmp / "link.jsonl").symlink_to(c.tmp / "q.jsonl")),
        rf"--traj_out_file \S+/link\.jsonl {OVERWRITE} --question_dataset", keep=("q.jsonl",)),
    Row("generate: --traj_out_file is a hard link of the prompt file",
        gen_out_is("hard.jsonl", lambda c: os.link(c.tmp / "x0.md", c.tmp / "hard.jsonl")),
        rf"--traj_out_file \S+/hard\.jsonl {OVERWRITE} --x0_file", keep=("x0.md",)),
    Row("generate: the .meta.json written beside the output is the --x0_file",
        lambda c: [*generate(c), "--x0_file", str(text(c, "o.jsonl.meta.json", MESSAGES)),
                   "--traj_out_file", str(c.tmp / "o.jsonl")],
        rf"--traj_out_file \S+/o\.jsonl\.meta\.json {OVERWRITE} --x0_file",
        keep=("o.jsonl.meta.json",)),
    Row("generate: the .partial beside the output is the question file",
        lambda c: [*generate(c), "--question_dataset", str(questions(c, "o.jsonl.partial")),
                   "--traj_out_file", str(c.tmp / "o.jsonl")],
        rf"--traj_out_file \S+/o\.jsonl\.partial {OVERWRITE} --question_dataset",
        keep=("o.jsonl.partial",)),
    Row("generate: the second file of a comma-separated --question_dataset", comma_questions,
        rf"{OVERWRITE} --question_dataset \S+/q2\.jsonl", keep=("q.jsonl", "q2.jsonl")),
    Row("train: --out_dir is the local --model_name folder",
        lambda c: [*train(c), "--model_name", str(model_copy(c)), "--out_dir", str(c.tmp / "m")],
        rf"--out_dir \S+/m {OVERWRITE} --model_name", keep=("m/config.json",)),
    Row("bake: --question_dataset is the trajectories_train.jsonl of the same --out_dir",
        lambda c: [*bake(c), "--question_dataset", str(run_folder(c, "bake", {
            "trajectories_train.jsonl": QUESTION_LINES}) /
            "trajectories_train.jsonl")],
        rf"--out_dir \S+/bake \(it writes \S+/trajectories_train\.jsonl\) {OVERWRITE} "
        r"--question_dataset", keep=("bake/trajectories_train.jsonl",)),
    Row("bake: --x0_file is the report.md of the same --out_dir", bake_x0_in_out,
        rf"\(it writes \S+/report\.md\) {OVERWRITE} --x0_file", keep=("bake/report.md",)),
    Row("pursue: --question_dataset inside a round folder it writes", pursue_question_in_round,
        rf"--out_dir \S+/p \(it writes \S+/round_2\) {OVERWRITE} --question_dataset",
        keep=("p/round_2/q.jsonl",)),
    Row("compare: --out_dir is the --adapter folder",
        lambda c: ["compare", "--adapter", str(run_copy(c)), "--data_file", str(trajectories(c)),
                   "--out_dir", str(c.tmp / "run")],
        rf"--out_dir \S+/run {OVERWRITE} --adapter", keep=("run/adapter_model.safetensors",)),
    Row("eval: --out_dir is the --adapter folder",
        lambda c: ["eval", "--adapter", str(run_copy(c)), "--questions", str(questions(c)),
                   "--scorer", "allcaps", "--prompt", "Shout.", "--out_dir", str(c.tmp / "run")],
        rf"--out_dir \S+/run {OVERWRITE} --adapter", keep=("run/adapter_config.json",)),
    Row("merge: --out is the --model_name it merges into (a merged model)",
        lambda c: ["merge", "--adapter", str(run_copy(c)), "--model_name",
                   str(model_copy(c, "merged", MERGED_MARKER)), "--out", str(c.tmp / "merged")],
        rf"--out \S+/merged {OVERWRITE} --model_name", keep=("merged/model.safetensors",)),
    Row("merge: --out holds the --adapter (it is replaced whole)",
        lambda c: ["merge", "--adapter", str(shutil.copytree(
            c.built["run"], model_copy(c, "merged", MERGED_MARKER) / "a")),
            "--model_name", str(c.model_dir), "--out", str(c.tmp / "merged")],
        rf"--out \S+/merged \(it writes \S+/merged/a\) {OVERWRITE} --adapter",
        keep=("merged/a/adapter_model.safetensors",)),
    # (b) a folder the tool did not write keeps its files
    Row("train: --out_dir a project folder with its README.md",
        lambda c: [*train(c), "--out_dir", str(project(c, {"README.md": "# mine\n",
                                                            "notes.txt": "x"}))],
        rf"--out_dir \S+/proj holds README\.md, which a run writes, but {NOT_OURS}",
        keep=("proj/README.md", "proj/notes.txt")),
    Row("bake: --out_dir . at a repository root", repo_root_bake,
        rf"--out_dir \. holds README\.md, which a run writes, but {NOT_OURS}",
        keep=("repo/README.md", "repo/.git/HEAD")),
    Row("train: --out_dir holding the user's args.json and epoch_3/",
        lambda c: [*train(c), "--out_dir", str(project(c, {"args.json": "{}",
                                                            "epoch_3/x": "mine"}))],
        rf"--out_dir \S+/proj holds args\.json \(and 1 more\), which a run writes, but {NOT_OURS}",
        keep=("proj/args.json", "proj/epoch_3/x")),
    Row("bake: --out_dir holding the user's summary.json",
        lambda c: [*bake(c), "--out_dir", str(project(c, {"summary.json": "{}"}))],
        rf"holds summary\.json, which a run writes, but {NOT_OURS}", keep=("proj/summary.json",)),
    Row("pursue: a round folder holding the user's README.md", pursue_round_not_ours,
        rf"--out_dir \S+/p/round_2 holds README\.md, which a run writes, but {NOT_OURS}",
        keep=("p/round_2/README.md",)),
    Row("eval: --out_dir holding the user's eval.md",
        lambda c: ["eval", *model(c), "--questions", str(questions(c)), "--scorer", "allcaps",
                   "--prompt", "Shout.", "--out_dir", str(project(c, {"eval.md": "mine"}))],
        rf"holds eval\.md, which a run writes, but {NOT_OURS}", keep=("proj/eval.md",)),
    Row("compare: --out_dir holding the user's file named by --path_prefix",
        lambda c: ["compare", "--adapter", str(run_copy(c)), "--data_file", str(trajectories(c)),
                   "--path_prefix", "x_", "--out_dir", str(project(c, {"x_compare.md": "m"}))],
        rf"holds x_compare\.md, which a run writes, but {NOT_OURS}", keep=("proj/x_compare.md",)),
    Row("bake: refused after its folder was prepared (no such model): no folder is left",
        lambda c: [*bake(c), "--model_name", str(c.tmp / "no-model")],
        r"--model_name \S+/no-model"),
    # what still works
    Row("train: a folder holding only other files is used, and marked",
        lambda c: [*train(c), "--out_dir", str(project(c, {"notes.txt": "mine"}))],
        r"done: best", keep=("proj/notes.txt",), ends="done", after=marked_and_kept),
    Row("train: a folder the tool marked is reused (--resume false)",
        lambda c: [*train(c), "--out_dir", str(run_copy(c)), "--resume", "false"],
        r"done: best", ends="done"),
    Row("bake: every name a run writes is declared (BAKE_WRITES cannot drift)",
        lambda c: bake(c, "--save_every", "1", "--plot", "true"), r"Baked 'Be a pirate\.'",
        ends="done", after=declared),
]  # fmt: skip


# ================================================================ 2. runs never mix
def locked(argv_of, folder: str):
    def setup(c: Ctx) -> list[str]:
        argv = argv_of(c)
        hold_run_lock(c, c.tmp / folder)
        return argv

    return setup


def held_by(flag: str, folder: str):
    return lambda c: (
        rf"{flag} \S+/{folder} is being written by another run \(pid {c.notes['pid']}, lock "
        rf"\S+/{folder}/\.promptbake-run\.lock\)"
    )


def resume_run(c: Ctx) -> list[str]:
    run_copy(c)
    return train(c, "--resume", "true", "--num_epochs", "2")


def killed_then(edit):
    """A generation killed after its first batch, then `edit(ctx)`; the same command."""

    def setup(c: Ctx) -> list[str]:
        argv = interrupted(c, generate(c))
        edit(c)
        return argv

    return setup


def other_model(c: Ctx) -> None:
    """Another model saved where --model_name points (same tokenizer, other shapes)."""
    shutil.rmtree(c.tmp / "m")
    tiny.save_tiny_model(c.tmp / "m", kind="tiny", seed=1, hidden_size=32)


def killed_with_model_copy(c: Ctx) -> list[str]:
    argv = generate(c)
    argv[argv.index("--model_name") + 1] = str(model_copy(c))
    interrupted(c, argv)
    other_model(c)
    return argv


def killed_bake_then_edited(c: Ctx) -> list[str]:
    argv = interrupted(c, bake(c))
    questions(c, qs=[q.replace("?", "!") for q in QUESTIONS])
    return argv


def resumed_whole(c: Ctx) -> None:
    rows = (c.tmp / "out" / "t.jsonl").read_text().splitlines()
    assert len(rows) == 3 and [json.loads(r)["question_index"] for r in rows] != []
    assert not (c.tmp / "out" / "t.jsonl.partial").exists()


CHANGED = r"t\.jsonl\.partial is an unfinished run, but the inputs changed since it was started"
START_OVER = r"delete the \.partial file \(and its \.key\.json\) to start over"
PARTIAL = ("out/t.jsonl.partial", "out/t.jsonl.partial.key.json")

CLASS_2 = [
    # (a) one run at a time in a run folder
    Row("train: a second run into a folder being trained", locked(train, "run"),
        held_by("--out_dir", "run")),
    Row("bake: a second bake into the same --out_dir", locked(bake, "bake"),
        held_by("--out_dir", "bake")),
    Row("pursue: a second pursuit into the same --out_dir",
        locked(lambda c: bake(c, out="p", command="pursue"), "p"), held_by("--out_dir", "p")),
    Row("train: a second run into a marked folder with a checkpoint", locked(resume_run, "run"),
        held_by("--out_dir", "run"), keep=("run/checkpoint/state.pt", "run/args.json")),
    # (b) a generation resumes only with the same inputs, by content
    Row("generate: killed, the question file edited, the same command",
        killed_then(lambda c: questions(c, qs=[*QUESTIONS[:2], "Name a fruit."])),
        rf"{CHANGED} \(the question records\); .*{START_OVER}", keep=(*PARTIAL, "q.jsonl")),
    Row("generate: killed, the prompt file edited, the same command",
        killed_then(lambda c: text(c, "x0.md", "Be a robot.\n")),
        rf"{CHANGED} \(the prompt\); .*{START_OVER}", keep=(*PARTIAL, "x0.md")),
    Row("generate: killed, another model saved at --model_name, the same command",
        killed_with_model_copy, rf"{CHANGED} \(the model\); .*{START_OVER}", keep=PARTIAL),
    Row("bake: killed in generation, the questions edited, the same command",
        killed_bake_then_edited,
        r"trajectories_train\.jsonl\.partial is an unfinished run, but the inputs changed since "
        r"it was started \(the question records\)",
        keep=("bake/trajectories_train.jsonl.partial", "q.jsonl")),
    Row("generate: killed, nothing changed: the same command resumes it",
        killed_then(lambda c: None), r"Resuming \S+t\.jsonl\.partial: 1/3 batches already done",
        ends="done", after=resumed_whole),
]  # fmt: skip


# ================================================================ 3. damage is detected
def damaged_run(damage):
    """The shared run copied, `damage(run folder)`, then --resume true for one more epoch
    (on the data it was trained on: a checkpoint of other data is refused)."""

    def setup(c: Ctx) -> list[str]:
        damage(run_copy(c))
        data = str(c.built["gen"] / "t.jsonl")
        return train(c, "--resume", "true", "--num_epochs", "2", "--data_path", data)

    return setup


def lora_bytes_in_state(run: Path) -> None:
    """16 bytes of the first LoRA tensor in state.pt: torch.load still reads it."""
    state = run / "checkpoint" / "state.pt"
    flip16(state, zip_member_data(state, "archive/data/0") + 16)


def adapter_bytes(run: Path) -> None:
    w = run / "checkpoint" / "adapter_model.safetensors"
    flip16(w, safetensors_data(w) + 16)


def older_checkpoint(run: Path) -> None:
    """The checkpoint as an older promptbake wrote it: no checksums, none recorded."""
    import torch

    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    del state["checksums"]
    torch.save(state, run / "checkpoint" / "state.pt")
    (run / "checkpoint" / "checksums.json").unlink()


def resumed(c: Ctx) -> None:
    log = (c.tmp / "run" / "train_loop.log").read_text()
    assert "resumed from" in log and "after epoch 1" in log and "epoch 2:" in log


def sidecar_bytes(c: Ctx) -> list[str]:
    argv = train(c)
    side = c.tmp / "t.jsonl.teacher.safetensors"
    flip16(side, safetensors_data(side) + 64)
    return argv


def built_own_teacher(c: Ctx) -> None:
    log = (c.tmp / "run" / "train_loop.log").read_text()
    assert "teacher: exact table built" in log and "read from the trajectories' sidecar" not in log


def with_file(path: str, content: str | bytes, argv_of):
    """The command of `argv_of(ctx)` after writing `content` to `path` (under ctx.tmp)."""

    def setup(c: Ctx) -> list[str]:
        argv = argv_of(c)
        p = c.tmp / path
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return argv

    return setup


def meta_train(c: Ctx) -> list[str]:
    return train(c)


def run_then(argv_of):
    """The shared run copied to run/, then `argv_of(ctx)`."""

    def setup(c: Ctx) -> list[str]:
        run_copy(c)
        return argv_of(c)

    return setup


def no_base_record(c: Ctx) -> list[str]:
    """A run whose base model is found only through args.json (no promptbake_adapter.json,
    no base_model_name_or_path), args.json a list."""
    run = run_copy(c)
    (run / "promptbake_adapter.json").unlink()
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    (run / "args.json").write_text("[]")
    return ["merge", "--adapter", str(run), "--out", str(c.tmp / "merged")]


def compare_run(c: Ctx) -> list[str]:
    return ["compare", "--adapter", str(c.tmp / "run")]


def merge_run(c: Ctx, *flags: str) -> list[str]:
    return ["merge", "--adapter", str(c.tmp / "run"), "--out", str(c.tmp / "merged"), *flags]


def eval_run(c: Ctx) -> list[str]:
    return ["eval", "--adapter", str(c.tmp / "run"), "--questions", str(questions(c)),
            "--scorer", "allcaps", "--out_dir", str(c.tmp / "ev")]  # fmt: skip


def killed_gen(c: Ctx) -> list[str]:
    return interrupted(c, generate(c))


TRUNCATED = b'{"format": 1, "sha256": {"state.pt": "ab'
BAD_JSON = r"not valid JSON \(.* at line \d+ column \d+\); the file is damaged or truncated"
REDO = "delete it or regenerate the data"
RUN_DAMAGED = "the run folder is damaged: restore the file, or train it again"
CK = r"\S+/run/checkpoint"
CK_FIX = r"delete \S+/run/checkpoint \(or rerun with --resume false\) to start over"

CLASS_3 = [
    # (a) checksums of what a checkpoint and a teacher sidecar hold
    Row("checkpoint: 16 bytes of a LoRA tensor in state.pt changed, then --resume true",
        damaged_run(lora_bytes_in_state),
        rf"{CK}/state\.pt does not match the sha256 recorded when the checkpoint was saved "
        rf"\(damaged or changed since\); {CK_FIX}", keep=("run/checkpoint/state.pt",)),
    Row("checkpoint: 16 bytes of its adapter_model.safetensors changed",
        damaged_run(adapter_bytes),
        rf"{CK}/adapter_model\.safetensors does not match the sha256",
        keep=("run/checkpoint/adapter_model.safetensors",)),
    Row("checkpoint: its checksums.json deleted",
        damaged_run(lambda r: (r / "checkpoint" / "checksums.json").unlink()),
        rf"{CK} has no checksums\.json, though its state\.pt records one \(damaged\).*; {CK_FIX}", keep=("run/checkpoint/state.pt",)),
    Row("checkpoint: an older promptbake's, without checksums (resumed, with a warning)",
        damaged_run(older_checkpoint),
        rf"{CK} was written by an older promptbake, without checksums: resuming from it "
        r"unchecked", ends="warned", after=resumed),
    Row("checkpoint: a file its checksums name is missing",
        damaged_run(lambda r: (r / "checkpoint" / "adapter_config.json").unlink()),
        rf"{CK}/adapter_config\.json is missing from the checkpoint; {CK_FIX}"),
    Row("checkpoint: its checksums.json truncated",
        damaged_run(lambda r: (r / "checkpoint" / "checksums.json").write_bytes(TRUNCATED)),
        rf"{CK}/checksums\.json: {BAD_JSON}; {CK_FIX}", keep=("run/checkpoint/checksums.json",)),
    Row("teacher sidecar: 16 bytes of its table changed (ignored, with a warning)",
        sidecar_bytes,
        r"ignoring \S+/t\.jsonl\.teacher\.safetensors: its table does not match the sha256 "
        r"recorded when it was written \(damaged\); training computes the teacher itself",
        keep=("t.jsonl.teacher.safetensors", "t.jsonl"), ends="warned", after=built_own_teacher),
    # (b) one reader, one line, for every JSON file read back
    Row(".meta.json truncated (train)", with_file("t.jsonl.meta.json", b'{"num_traj', meta_train),
        rf"\S+/t\.jsonl\.meta\.json: {BAD_JSON}; {REDO}", keep=("t.jsonl.meta.json",)),
    Row(".meta.json empty (train)", with_file("t.jsonl.meta.json", b"", meta_train),
        rf"\S+/t\.jsonl\.meta\.json: the file is empty \(truncated\?\); {REDO}"),
    Row(".meta.json not UTF-8 (train)", with_file("t.jsonl.meta.json", b'{"x0": "\xff"}',
                                                  meta_train),
        rf"\S+/t\.jsonl\.meta\.json: not UTF-8 text \(byte 8\); the file is damaged; {REDO}"),
    Row(".meta.json a list (train)", with_file("t.jsonl.meta.json", "[1, 2]", meta_train),
        rf"\S+/t\.jsonl\.meta\.json: holds a list where a JSON object belongs; {REDO}"),
    Row(".meta.json whose args is a list (train)",
        with_file("t.jsonl.meta.json", '{"args": []}', meta_train),
        rf"\S+/t\.jsonl\.meta\.json: its 'args' is a list, expected an object; {REDO}"),
    Row("args.json truncated (compare finds the validation data through it)",
        run_then(with_file("run/args.json", b'{"val_path": "x', compare_run)),
        rf"\S+/run/args\.json: {BAD_JSON}; {RUN_DAMAGED}", keep=("run/args.json",)),
    Row("args.json a list (merge finds the base model through it)", no_base_record,
        rf"\S+/run/args\.json: holds a list where a JSON object belongs; {RUN_DAMAGED}"),
    Row("summary.json truncated (eval finds the prompt through it)",
        run_then(with_file("run/summary.json", b'{"prompt": "Be', eval_run)),
        rf"\S+/run/summary\.json: {BAD_JSON}; {RUN_DAMAGED}", keep=("run/summary.json",)),
    Row("summary.json a list (python -m promptbake.report)",
        run_then(with_file("run/summary.json", "[]", lambda c: ["report", str(c.tmp / "run")])),
        r"\S+/run/summary\.json: holds a list where a JSON object belongs; restore it, or bake "
        r"the run again"),
    Row("adapter_config.json truncated (merge, the base model given)",
        run_then(with_file("run/adapter_config.json", b'{"peft_type": "LO',
                           lambda c: merge_run(c, "--model_name", str(c.model_dir)))),
        rf"\S+/run/adapter_config\.json: {BAD_JSON}; {RUN_DAMAGED}",
        keep=("run/adapter_config.json",)),
    Row("adapter_config.json a list (compare)",
        run_then(with_file("run/adapter_config.json", "[]", lambda c: [
            *compare_run(c), "--data_file", str(trajectories(c))])),
        r"\S+/run/adapter_config\.json: holds a list where a JSON object belongs"),
    Row("adapter_config.json of another kind of adapter (merge)",
        run_then(with_file("run/adapter_config.json", '{"peft_type": "IA3"}', merge_run)),
        r"--adapter \S+/run: adapter_config\.json has peft_type 'IA3', not 'LORA'"),
    Row("promptbake_adapter.json truncated (merge)",
        run_then(with_file("run/promptbake_adapter.json", b'{"base_model": "/', merge_run)),
        rf"\S+/run/promptbake_adapter\.json: {BAD_JSON}; {RUN_DAMAGED}"),
    Row("promptbake_adapter.json whose base_model is a list (eval)",
        run_then(with_file("run/promptbake_adapter.json", '{"base_model": ["m"]}', eval_run)),
        r"\S+/run/promptbake_adapter\.json: its 'base_model' is a list, expected a string"),
    Row("promptbake_chain.json whose merge_first is a string (merge)",
        run_then(with_file("run/promptbake_chain.json",
                           '{"base_model": "m", "merge_first": "../round_1"}', merge_run)),
        r"\S+/run/promptbake_chain\.json: its 'merge_first' is a string, expected a list"),
    Row(".partial.key.json truncated (generate resumes)",
        with_file("out/t.jsonl.partial.key.json", b'{"args": {"model_na', killed_gen),
        rf"\S+/out/t\.jsonl\.partial\.key\.json: {BAD_JSON}; {START_OVER}", keep=PARTIAL),
    Row(".partial.key.json a list (generate resumes)",
        with_file("out/t.jsonl.partial.key.json", "[]", killed_gen),
        rf"\S+/t\.jsonl\.partial\.key\.json: holds a list where a JSON object belongs; "
        rf"{START_OVER}", keep=PARTIAL),
]  # fmt: skip


def ids(rows: list[Row]) -> list[str]:
    return [r.name for r in rows]


@pytest.mark.parametrize("row", CLASS_1, ids=ids(CLASS_1))
def test_outputs_never_replace_what_the_tool_did_not_write(
    row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request
):
    run_row(row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request)


@pytest.mark.parametrize("row", CLASS_2, ids=ids(CLASS_2))
def test_runs_never_mix(row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request):
    run_row(row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request)


@pytest.mark.parametrize("row", CLASS_3, ids=ids(CLASS_3))
def test_damage_is_detected(row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request):
    run_row(row, built, tiny_model_dir, tmp_path, monkeypatch, capsys, request)
