"""Content-addressed cache for generated model files.

Built artifacts (ONNX graphs, tokenizer files) are large and derived, so they live outside git in
``$WEBPOOL_CACHE`` (default ``~/.cache/webpool``), in a folder named by the hash of everything that
determines their bytes. A build writes into a temporary folder and renames it into place, so a
crashed build never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import orjson

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of webpool's cache, created owner-only on first use."""
    root = Path(os.environ.get("WEBPOOL_CACHE", Path.home() / ".cache" / "webpool"))
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    """Stable short key of everything that determines an artifact's bytes."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:20]


def build_cached(kind: str, parts: dict, build: Callable[[Path], None]) -> Path:
    """Return the cache folder for (kind, parts), running ``build(tmp_folder)`` once if missing.

    ``build`` writes its files into the folder it is given; the folder is published atomically.
    """
    final = cache_dir() / "models" / f"{kind}-{cache_key(parts)}"
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
    try:
        log.info("building %s into %s", kind, final)
        build(tmp)
        (tmp / "key.json").write_bytes(orjson.dumps(parts, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        (tmp / ".complete").touch()
        try:
            tmp.rename(final)
        except OSError:
            # Another process published the same key first; its bytes are identical by construction.
            if not (final / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
