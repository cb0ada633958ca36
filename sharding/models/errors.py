"""Typed errors shared by the model builders and the pool's input handling."""

from __future__ import annotations


class InputError(ValueError):
    """Bad caller input. ``field`` names what was wrong (e.g. ``"texts[2]"``), so callers and
    logs can point at the exact argument without parsing the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions across processes; the default reduce would call __init__ with
        # the formatted string only and fail.
        return (type(self), (self.field, self.message))
