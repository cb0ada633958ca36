"""How webpool's actors log: one line per record on stderr (Ray keeps it in the worker's .err file) with the
structured context each call passes in ``extra`` (``browser_id=... error=...``) and a traceback when there is
one. Without a handler Python prints the bare message only, and the context that says why is lost.
"""

from __future__ import annotations

import logging

PACKAGES = ("actors", "events", "sharding")
# The attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class ContextFormatter(logging.Formatter):
    """``LEVEL logger: message key=value ...``, then the traceback if the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in record.__dict__.items()
                           if k not in _STANDARD and not k.startswith("_"))     # Ray adds _ray_timestamp_ns
        line = f"{record.levelname} {record.name}: {record.getMessage()}" + (f" {context}" if context else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: int = logging.WARNING) -> None:
    """Give webpool's loggers a handler with ``ContextFormatter``, once per process, unless logging is already
    configured (a handler on the root logger: the application's, or Ray's ``logging_config``)."""
    if logging.getLogger().handlers:
        return
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if any(isinstance(h.formatter, ContextFormatter) for h in logger.handlers):
            continue
        handler = logging.StreamHandler()
        handler.setFormatter(ContextFormatter())
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
