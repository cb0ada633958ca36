"""Help texts in plain words: docstrings are written in reStructuredText for readers of the code;
``--help`` shows them without the markup."""

from __future__ import annotations

import re

_ROLE = re.compile(r":[a-z]+:`([^`]+)`")       # :class:`Foo` -> Foo
_LITERAL = re.compile(r"``([^`]+)``")          # ``foo`` -> foo


def plain(doc: str | None) -> str:
    """``doc`` without reStructuredText inline markup, its common indentation removed."""
    import inspect

    text = inspect.cleandoc(doc or "")
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))
