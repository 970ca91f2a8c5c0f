"""Output guards: where a run may write, checked before any work, and one writer at a time.

    from promptbake.guards import check_not_inputs, check_run_dir, exclusive_lock
    check_run_dir("runs/x", ("args.json", "adapter_config.json"))   # refuses a user's folder
    with exclusive_lock("data/t.jsonl", "--traj_out_file"):           # a second run is refused
        ...

* an output location must be creatable and writable (:func:`check_writable`);
* an output is never an input, compared by resolved path (:func:`check_not_inputs`);
* a run folder holds only what a run writes: promptbake marks the folders it makes
  (:data:`RUN_MARKER`), and refuses to write a name into an unmarked folder that already
  holds it (:func:`check_run_dir`);
* one run writes an output at a time (:func:`exclusive_lock`, :func:`run_dir_lock`).

Writing itself is files.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserError
from .files import write_text


def check_out_dir(path: str | Path, flag: str = "--out_dir") -> Path:
    """`path` as a Path, refused (before any work) when a file is in the way of the
    output directory or it cannot be created or written (:func:`check_writable`)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file; give a directory path")
    check_writable(p, flag)
    return p


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, before any model loads, an output `path` (file or directory) that this
    process could not create or replace: its nearest existing folder must be a directory
    this user may write into. Otherwise the run would fail only when it first writes,
    after the model load or the whole generation.

    os.access answers from the mode bits, which root passes everywhere; an anonymous
    temporary file (never visible, gone on close) tries the real thing, so /proc, /sys
    and read-only mounts are refused too.
    """
    p = Path(path).expanduser().absolute()
    here = p
    while not here.exists() and here != here.parent:  # exists() is False under a file too
        here = here.parent
    if here == p and not here.is_dir():  # an existing output file is replaced in its folder
        here = here.parent
    if not here.is_dir():
        raise UserError(
            f"{flag} {path}: {here} is a file, so nothing can be created under it; "
            "give a path inside a directory"
        )
    if os.access(here, os.W_OK | os.X_OK):
        try:
            with tempfile.TemporaryFile(dir=here):
                return
        except OSError:
            pass
    raise UserError(
        f"{flag} {path}: this user cannot write into {here}; choose a path in a writable "
        "directory (or fix its permissions)"
    )


def _lock_fd(lock: Path, what: str, path: str | Path) -> int:
    """An fd holding the flock of `lock`, which is still the file at that path."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"{what} {path} is being written by another run (pid {holder}, lock {lock}); "
                "wait for it to finish or write to another path"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder deleted the file as we locked it: lock the new one


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, what: str, lock_file: str | Path | None = None
) -> Iterator[Path]:
    """Hold an exclusive lock on ``<path>.lock`` (or `lock_file`) for the block; refuse at
    once when another process holds it (one line naming its pid): two runs writing one
    output interleave rows.

    The holder deletes the lock file on exit, still holding the lock, so nothing is left
    behind; a killed holder's lock is released by the kernel and blocks no later run.
    """
    lock = Path(str(path) + ".lock") if lock_file is None else Path(lock_file)
    made = [d for d in lock.parents if not d.exists()]  # removed again if left empty
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock_fd(lock, what, path)
        try:
            with contextlib.suppress(OSError):  # the pid only names the holder (a full disk)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield lock
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)
    finally:
        for d in made:  # deepest first; a directory the run wrote into stays
            with contextlib.suppress(OSError):
                d.rmdir()


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create a run folder once every input is checked, and mark it as the tool's
    (:data:`RUN_MARKER`): the next run may then replace the files a run writes there."""
    p = check_out_dir(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    if not (p / RUN_MARKER).is_file():
        write_text(p / RUN_MARKER, RUN_MARKER_TEXT)
    return p


# ---------------------------------------------------------------- outputs vs. inputs
# An output folder holds RUN_MARKER once promptbake has written it: the files a run writes
# there (by name) may then be replaced by the next run. A folder without it is the
# user's: a file in it that a run would write is refused, left untouched.
RUN_MARKER = ".promptbake-run"


RUN_MARKER_TEXT = (
    "written by promptbake: the next run into this folder replaces the files a run writes\n"
)


def _matches(name: str, names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in names)


def check_run_dir(path: str | Path, writes: Iterable[str], flag: str = "--out_dir") -> Path:
    """:func:`check_out_dir`, and refuse (before any work) a folder the tool did not
    write (no :data:`RUN_MARKER`) that holds a file a run would write there: `writes`
    are the names (glob patterns: ``epoch_*``) of what the run writes into the folder.
    Without this, a run into a project folder replaces its README.md (the adapter's model
    card) or args.json."""
    p = check_out_dir(path, flag)
    if not p.is_dir() or (p / RUN_MARKER).is_file():
        return p
    writes = tuple(writes)
    taken = sorted(e.name for e in p.iterdir() if _matches(e.name, writes))
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise UserError(
            f"{flag} {path} holds {taken[0]}{more}, which a run writes, but promptbake did not "
            f"write this folder (no {RUN_MARKER}); it is left untouched: choose a new or empty "
            f"{flag} (a folder an older promptbake wrote: create {p / RUN_MARKER} first)"
        )
    return p


@contextlib.contextmanager
def run_dir_lock(path: str | Path, flag: str = "--out_dir") -> Iterator[Path]:
    """One run at a time in a run folder (:func:`exclusive_lock` on
    ``<folder>/.promptbake-run.lock``): a second run into it is refused at once, naming
    the holder's pid. A folder the lock created is removed again if the run leaves
    nothing in it but its marker (a run refused after :func:`prepare_out_dir`)."""
    folder = Path(path)
    made = not folder.exists()
    lock = folder / (RUN_MARKER + ".lock")
    with exclusive_lock(path, flag, lock_file=lock) as held:
        try:
            yield held
        finally:  # still holding the lock: no other run is using the folder
            if made and {e.name for e in folder.iterdir()} <= {RUN_MARKER, lock.name}:
                (folder / RUN_MARKER).unlink(missing_ok=True)


def _identity(path: Path) -> tuple:
    """What makes two paths one file: (device, inode) when it exists (symlinks and hard
    links included), else the resolved path."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path.expanduser().resolve()))


def _input_paths(flag: str, value: str | Path | None) -> list[tuple[str, Path]]:
    """An input flag's paths that exist (a hub id is none): a comma list split, a folder
    with its top-level files."""
    if value is None or value == "":
        return []
    out = []
    for part in str(value).split(","):
        part = part.strip()
        p = Path(part).expanduser()
        if not part or not p.exists():
            continue
        out.append((f"{flag} {part}", p))
        if p.is_dir():
            with contextlib.suppress(OSError):
                out += [(f"{flag} {part}", e) for e in sorted(p.iterdir()) if e.is_file()]
    return out


def _written(out: Path, writes: tuple[str, ...], ins: list[tuple[str, Path]]) -> list[Path]:
    """The paths a folder output replaces that may be inputs: its written names that
    exist (a symlink in it counts as what it points to), and the entry holding each
    input found inside the folder under a written name (``checkpoint/``, ``round_2/``)."""
    targets = [out / n for n in writes if not any(c in n for c in "*?[") and (out / n).exists()]
    root = out.resolve()
    for _, p in ins:
        r = p.resolve()
        if r != root and r.is_relative_to(root):
            first = r.relative_to(root).parts[0]
            if _matches(first, writes):
                targets.append(root / first)
    return targets


def check_not_inputs(
    outputs: Iterable[tuple[str, str | Path, Iterable[str] | None]],
    inputs: Iterable[tuple[str, str | Path | None]],
) -> None:
    """Refuse, before any work, an output that is one of the command's inputs: paths are
    compared resolved (symlinks and hard links included), so ``--traj_out_file`` naming
    its own ``--question_dataset`` never overwrites the questions.

    `outputs`: (flag, path, writes): `writes` None for a file the command replaces; for a
    folder, the names (glob patterns) it writes into it, ``("*",)`` for a folder
    replaced whole. The folder itself is never an input either. `inputs`: (flag, path or
    comma-separated paths, or None); a folder input counts with its top-level files (a
    model or adapter directory). A local ``--model_name`` counts; a hub id does not.
    """
    ins = [item for flag, value in inputs for item in _input_paths(flag, value)]
    if not ins:
        return
    for flag, out, writes in outputs:
        o = Path(out).expanduser()
        targets = [(o, False)]
        if writes is not None:
            targets += [(t, True) for t in _written(o, tuple(writes), ins)]
        for target, inside in targets:
            ident, t_res = _identity(target), target.resolve()
            for what, p in ins:
                if _identity(p) == ident or (inside and p.resolve().is_relative_to(t_res)):
                    shown = f" (it writes {target})" if inside else ""
                    raise UserError(
                        f"{flag} {out}{shown} would overwrite the input {what}; an output is "
                        f"never an input: choose another {flag}"
                    )
