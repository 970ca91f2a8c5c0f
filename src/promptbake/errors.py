"""One exception type for problems the user can fix.

Anything raised as `UserError` is printed by the CLI as a single line
(``error: <what is wrong, where, how to fix>``) with exit status 2, never as a
traceback. Library callers can catch it like any other exception.
"""

import contextlib
import signal
from collections.abc import Iterator


class UserError(Exception):
    """A bad input or environment the user can fix; the message says how."""


def warn(msg: str) -> None:
    """A one-line warning on stderr (kept apart from stdout, which may be piped)."""
    import sys

    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, re-raised by a stage with the one line that says what was kept and which
    command continues (cli.py prints it; exit status 130)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop), raised where Ctrl-C raises KeyboardInterrupt
    (:func:`sigterm_as_interrupt`), so every stage keeps what it keeps on Ctrl-C and the
    CLI prints the same line; the exit status is then 143 (128 + SIGTERM), not 130."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """For the block, SIGTERM raises :class:`Terminated` in the main thread (once: a second
    one while the first unwinds is ignored, so the clean-up finishes). Yields a list that
    holds the signal number once one arrived. Elsewhere than the main thread: no change."""
    got: list[int] = []

    def handler(signum, frame):
        if not got:
            got.append(signum)
            raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield got
        return
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)
