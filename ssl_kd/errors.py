"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """Bad input that the user can fix (a wrong path, flag or file); never a bug."""


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ShardSpecError(UserError):
    """A shard spec that matches nothing or names missing files."""
