"""One exception type for problems the user can fix.

Anything raised as `UserError` is printed by the CLI as a single line
(``error: <what is wrong, where, how to fix>``) with exit status 2, never as a
traceback. Library callers can catch it like any other exception.
"""


class UserError(Exception):
    """A bad input or environment the user can fix; the message says how."""


def warn(msg: str) -> None:
    """A one-line warning on stderr (kept apart from stdout, which may be piped)."""
    import sys

    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, re-raised by a stage with the one line that says what was kept and which
    command continues (cli.py prints it; exit status 130)."""
