"""Errors a user can act on.

Anything raised as `TailorError` is the user's input or environment being wrong, not a bug: the CLI prints the
message (exit code 2) and the GUI shows it on the page, both without a traceback.
"""


class TailorError(Exception):
    """A problem the user can fix, with a plain-words message and, where known, what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


class DatasetError(TailorError):
    """The dataset cannot be used; `problems` lists what was found, each naming the file and line or row."""

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        self.problems = list(problems or [])
        detail = message if not self.problems else message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(detail, hint)


class AdapterError(TailorError):
    """An adapter in the library or offered for import is damaged, missing or does not fit the base model."""


class ModelError(TailorError):
    """A base model could not be found, downloaded or loaded."""
