"""The actors' log lines carry the context their calls pass (actors/logs.py): without it a worker's .err file
says "growing the pool failed" and not why."""

from __future__ import annotations

import logging

from actors import logs


def _record(**extra) -> logging.LogRecord:
    record = logging.LogRecord("actors.router", logging.WARNING, __file__, 1, "growing the pool failed", (), None)
    record.__dict__.update(extra)
    return record


def test_a_line_carries_the_context_and_the_traceback():
    line = logs.ContextFormatter().format(_record(model="m", error="TimeoutError: no answer", _ray_timestamp_ns=1))
    assert line == "WARNING actors.router: growing the pool failed model=m error=TimeoutError: no answer"
    try:
        raise ZeroDivisionError("x")
    except ZeroDivisionError:
        import sys

        record = _record(browser_id="b1")
        record.exc_info = sys.exc_info()
    with_trace = logs.ContextFormatter().format(record)
    assert with_trace.startswith("WARNING actors.router: growing the pool failed browser_id=b1\nTraceback")
    assert "ZeroDivisionError: x" in with_trace


def test_configure_adds_one_handler_and_leaves_a_configured_application_alone(monkeypatch):
    root, ours = logging.getLogger(), [logging.getLogger(p) for p in logs.PACKAGES]
    monkeypatch.setattr(root, "handlers", [])
    for logger in ours:
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "level", logging.NOTSET)
    logs.configure()
    logs.configure()
    assert all(len(lg.handlers) == 1 and lg.level == logging.WARNING for lg in ours)
    for logger in ours:
        logger.handlers = []
    root.handlers = [logging.NullHandler()]       # the application configured logging itself
    logs.configure()
    assert all(lg.handlers == [] for lg in ours)
