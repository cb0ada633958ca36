"""Typed errors that cross actor boundaries.

Each error keeps its fields in ``args`` so it pickles through Ray unchanged; ``ray.get`` raises a
``RayTaskError`` that is also an instance of the original class, so callers can ``except`` these.
"""

from __future__ import annotations

from events.schema import FailureCategory
from sharding.models.errors import InputError

__all__ = [
    "ActorUnreachable",
    "BrowserFailure",
    "FailureCategory",
    "InputError",
    "NoBrowserAvailableError",
    "PoolBusyError",
    "WebpoolError",
]


class WebpoolError(RuntimeError):
    """Base of webpool's runtime errors (input errors derive from ValueError instead)."""


class BrowserFailure(WebpoolError):
    """A browser stopped serving: ``category`` says how (from real signals, see actors/browser.py)."""

    def __init__(self, browser_id: str, category: FailureCategory, detail: str) -> None:
        super().__init__(browser_id, FailureCategory(category), detail)
        self.browser_id = browser_id
        self.category = FailureCategory(category)
        self.detail = detail

    def __str__(self) -> str:
        return f"browser {self.browser_id} failed ({self.category.value}): {self.detail}"


class ActorUnreachable(BrowserFailure):
    """The browser's actor process did not answer at all (it, or its node, is gone or cut off): there is
    no live process to reconnect to over CDP, so recovery goes straight to another process."""


class NoBrowserAvailableError(WebpoolError):
    """No browser can serve the request (none can be launched, or all failed)."""


class PoolBusyError(WebpoolError):
    """The pool's request queue is full; retry later."""
