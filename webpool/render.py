"""How the command line renders: times, and tables of plain values."""

from __future__ import annotations

import datetime

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(stderr=False)  # every command prints through this one


def entry_time(ts: float) -> str:
    """A log time as local date and time to the millisecond."""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def table(title: str, columns: list[str], rows: list[list], empty: str = "none") -> Table:
    """A rich table of ``rows``: floats with one decimal, None as blank, one row saying ``empty`` if none.
    Cells are Text, so a value's brackets are never read as markup."""
    out = Table(title=title)
    for col in columns:
        out.add_column(col)
    for row in rows:
        out.add_row(*(Text("" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)) for v in row))
    if not rows:
        out.add_row(Text(empty), *([""] * (len(columns) - 1)))
    return out
