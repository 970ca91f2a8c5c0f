"""Writing files safely: atomic files and folders, the user's file modes, full disks.

    from promptbake.files import atomic_write, write_json
    with atomic_write("out.json") as f:   # a temp file, renamed into place when complete
        f.write("...")

Every file promptbake writes goes through here, so that a crash, a full disk or a
refused run never leaves a half-written file (:func:`atomic_path`, :func:`atomic_dir`;
a failed write is one line naming what, where and the free space, :func:`writing`),
and outputs get the modes the user's umask gives any file they write. Where a run may
write, and that one run writes at a time, is guards.py.
"""

from __future__ import annotations

import contextlib
import errno
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


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG through files.atomic_write (never a half-written
    image), then close it."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
