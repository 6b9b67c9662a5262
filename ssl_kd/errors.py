"""User-facing errors: the CLI prints their message on one line and exits with status 2."""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """Bad input that the user can fix (a wrong path, flag or file); never a bug."""


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ShardSpecError(UserError):
    """A shard spec that matches nothing or names missing files."""


# Errors of the machine, not of the program: the user fixes them and reruns.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def environment_error(exc: BaseException) -> UserError | None:
    """The UserError for an OS error the user fixes outside the program (a full disk), else
    None. Every output is written to a temp file and renamed, so what finished is intact."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        # The file is a temp file beside the output: its directory is what the user knows.
        where = (
            f" (writing in {os.path.dirname(os.path.abspath(exc.filename))})"
            if exc.filename
            else ""
        )
        return UserError(
            f"no space left on the device{where}; finished outputs are intact: "
            "free space and rerun to continue"
        )
    return None
