"""User-facing errors: one readable line, exit code 2, no traceback.

Everything a user can fix (a config key, a missing path, a missing weight file, a missing optional
package) raises `UserError`; `cli_main` turns it into a message on stderr and exit status 2.
Bugs keep their tracebacks.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix; `str(err)` is the whole message (problem and fix)."""

    exit_code = 2


class ConfigError(UserError):
    """A bad configuration value: names the source file, the dotted key and what was expected."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        self.key, self.source, self.detail = key, source, message
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


def user_message(err: UserError) -> str:
    """The one line of a user error. A `UserError` raised in a DataLoader worker comes back as the
    same class around the worker's whole traceback ("Caught UserError in DataLoader worker process
    0. Original Traceback ..."): its own message is the traceback's last line."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        for line in reversed(text.rstrip().splitlines()):
            name, sep, rest = line.partition(": ")
            if sep and name.rsplit(".", 1)[-1] == type(err).__name__:
                return f"{rest} (in {text.split(' in ', 1)[1].split('.', 1)[0]})"
    return text


def cli_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)` and exit with its status; user errors print one message and exit 2."""
    try:
        code = main(argv)
    except UserError as err:
        prog = getattr(main, "__module__", "lct").rsplit(".", 1)[-1]
        print(f"error ({prog}): {user_message(err)}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    sys.exit(int(code or 0))
