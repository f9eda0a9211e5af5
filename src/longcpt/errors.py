"""The one exception type users see, and the one warning.

Every user mistake (bad recipe key, missing file, unsupported checkpoint) raises `LongcptError`
with a message that names the offending key/file/line, the value and the fix. The command line
prints that message and exits non-zero without a traceback; anything else is a bug and keeps its
traceback. A recipe key that moved (`longcpt.config.DEPRECATED`) still works and warns with a
`DeprecatedKeyWarning`, which the command line prints as one line.
"""


class LongcptError(Exception):
    """A user-facing error: the message alone tells the user what to change."""


class ConfigError(LongcptError):
    """One or more problems in a recipe or its `key=value` overrides."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


class DeprecatedKeyWarning(FutureWarning):
    """A recipe key that moved: it still works, and the message names the key to write instead."""
