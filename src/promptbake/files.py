"""Writing files safely: atomic writes, the user's file modes, output checks, one writer.

    from promptbake.files import atomic_write, write_json, check_out_dir, exclusive_lock
    with atomic_write("out.json") as f:   # a temp file, renamed into place when complete
        f.write("...")

Every output of promptbake goes through here, so that a crash or a refused run never
leaves a half-written file, outputs get the modes the user's umask gives any file they
write, an output location is checked before any expensive work, and two runs never
write one file at once. Outputs never replace what the tool did not write: no output is
an input (:func:`check_not_inputs`), and a folder without the tool's marker keeps any
file a run would write there (:func:`check_run_dir`); one run at a time writes a run
folder (:func:`run_dir_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(
    path: str | Path, what: str | None = None, need: int | None = None
) -> Iterator[Path]:
    """A temp path beside `path` for a writer that wants a file name (e.g. safetensors'
    save_file): on success it gets the user's file mode, is synced and renamed over
    `path`; on failure it is deleted. A reader sees the old file or the complete new one.

    A failed write (a full disk, a quota, an I/O error) is one line naming `what` and
    `path` (:func:`writing`); with `need` (bytes, where the caller knows them) a disk with
    less free space is refused before anything is written."""
    path = Path(path)
    with writing(path, what, need):
        path.parent.mkdir(parents=True, exist_ok=True)
        check_space(path.parent, need, what or str(path))
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual mode
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def atomic_write(
    path: str | Path, mode: str = "w", what: str | None = None, need: int | None = None
) -> Iterator[Any]:
    """Write to a temp file beside `path`, rename over it on success, delete it on failure
    (:func:`atomic_path`, opened in `mode`)."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path, what, need) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


@contextlib.contextmanager
def atomic_dir(
    path: str | Path,
    *,
    into: bool = False,
    aside: Path | None = None,
    replace: bool = True,
    what: str | None = None,
    need: int | None = None,
) -> Iterator[Path]:
    """A temp directory beside `path` for a writer that fills a folder (peft's and
    transformers' save_pretrained, a checkpoint). On success it gets the user's modes and:

    * replaces the directory `path` by renames: an existing one is first moved to `aside`
      (or a temp name) and removed only once the new one is in place, so a reader finds
      the old folder, the new one or (with `aside`) the old one there, never half of one;
    * or, with `into`, each of its files is renamed into `path`, which keeps its other
      files (an adapter saved into a run folder);
    * or, with ``replace=False``, is dropped when `path` exists by then (a cache another
      process filled first: theirs stays, for whoever is reading it).

    On failure the temp directory is deleted and `path` is as it was; a failed write is
    one line naming `what` and `path`, and `need` (bytes) is checked against the free
    space first, as :func:`atomic_path` does.
    """
    path = Path(path)
    parent = path if into else path.parent
    with writing(path, what, need):
        parent.mkdir(parents=True, exist_ok=True)
        check_space(parent, need, what or str(path))
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-"))
        try:
            yield tmp
            apply_umask(tmp)  # mkdtemp makes 0700: give the modes of any folder the user makes
            if into:
                for f in sorted(tmp.iterdir()):
                    os.replace(f, path / f.name)
            elif replace or not path.exists():
                _swap_in(tmp, path, aside)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- failed writes
# the errors that mean the disk (or the user's share of it) is full
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def writing(path: str | Path, what: str | None = None, need: int | None = None) -> Iterator[None]:
    """Turn a failed write in the block into one line (a UserError): a full disk, a quota,
    a read-only or failing device, whatever OSError the writer met, also when a library
    wraps it (torch.save's RuntimeError, safetensors' SafetensorError). The writers of this
    module use it, so every output says the same; anything else passes unchanged. Nested,
    the outermost names the failure (the checkpoint, not the temp file inside it)."""
    _nesting.depth = getattr(_nesting, "depth", 0) + 1
    try:
        yield
    except Exception as e:
        err = None if _nesting.depth > 1 else write_error(e, path, what, need)
        if err is None:
            raise
        raise err from None
    finally:
        _nesting.depth -= 1


_nesting = threading.local()  # how many `writing` blocks this thread is inside


def write_error(
    e: BaseException, path: str | Path, what: str | None = None, need: int | None = None
) -> UserError | None:
    """The one line for exception `e` met while writing `path`, or None when `e` is no
    failed write (a UserError, a bug in the writer)."""
    if isinstance(e, UserError):
        return None
    code, reason = _os_error(e)
    free = _free_bytes(Path(path))
    if code is None and free is not None and free < max(need or 0, 1 << 20):
        code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)  # torch's "unexpected pos"
    if code is None:
        return None
    target = f"{what} to {path}" if what else str(path)
    if code in _FULL:
        room = f"{human_bytes(free)} free on {_mount(Path(path))}" if free is not None else ""
        needs = f", it needs about {human_bytes(need)}" if need else ""
        return UserError(
            f"no space left writing {target} ({reason}; {room}{needs}); nothing half-written "
            "was kept: free some space or write elsewhere, then run the same command again"
        )
    name = errno.errorcode.get(code, str(code))
    return UserError(f"could not write {target}: {reason} ({name}); nothing half-written was kept")


def _os_error(e: BaseException) -> tuple[int | None, str]:
    """(errno, reason) of the OSError `e` is or wraps (its cause or context, or a Rust
    writer's "os error N" text); (None, "") when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno, e.strerror or os.strerror(e.errno)
        m = re.search(r"os error (\d+)", str(e))
        if m:
            return int(m.group(1)), os.strerror(int(m.group(1)))
        e = e.__cause__ or e.__context__
    return None, ""


def check_space(folder: Path, need: int | None, what: str) -> None:
    """Refuse, before writing, `need` bytes into `folder` when its disk has less free."""
    if not need:
        return
    free = _free_bytes(folder)
    if free is not None and free < need:
        raise UserError(
            f"no space left for {what}: it needs about {human_bytes(need)}, "
            f"{human_bytes(free)} free on {_mount(folder)}; free some space or write "
            "elsewhere, then run the same command again"
        )


def _free_bytes(path: Path) -> int | None:
    """Free bytes for this user on the disk of `path` (its nearest existing folder)."""
    here = path.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def _mount(path: Path) -> Path:
    """The mount point of `path`'s disk (its nearest existing folder's)."""
    here = path.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return here


def human_bytes(n: int | float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disk sizes are sold and df -H shows)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _swap_in(new: Path, path: Path, aside: Path | None) -> None:
    """Rename directory `new` to `path`; an existing `path` goes to `aside` (or a temp
    name) first, is put back if the rename fails, and is removed once `new` is in place."""
    old = None
    if path.exists():
        if aside is None:
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-")) / "d"
        else:
            shutil.rmtree(aside, ignore_errors=True)
            old = aside
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old if aside is not None else old.parent, ignore_errors=True)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log-like file (train_loop.log, metrics.jsonl) and flush it,
    so a killed run keeps every line written before the kill; on a failed write (a full
    disk) the file is cut back to its last whole line and the error is one line."""
    append_bytes(path, (line.rstrip("\n") + "\n").encode("utf-8"))


def append_bytes(path: str | Path, data: bytes, what: str | None = None, f=None) -> None:
    """Append `data` to `path` (or to the open unbuffered binary file `f`) completely or
    not at all: a write that fails part-way (a full disk) is cut back off the file, and
    the error is one line (:func:`writing`)."""
    with writing(path, what), contextlib.ExitStack() as stack:
        if f is None:
            f = stack.enter_context(open(path, "ab", buffering=0))
        start = os.fstat(f.fileno()).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view) :]
        except BaseException:
            os.ftruncate(f.fileno(), start)
            raise


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


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc), else the one at import."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return _UMASK


def apply_umask(path: str | Path) -> None:
    """Give `path` (a file, or a directory and all it holds) the modes open()/mkdir() give:
    0o666 / 0o777 less the umask. mkstemp, mkdtemp and safetensors create 0600 / 0700,
    which the user's other accounts (a serving user, a shared group) cannot read."""
    umask, path = current_umask(), Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


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


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG through files.atomic_write (never a half-written
    image), then close it."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)


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
