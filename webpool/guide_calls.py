"""How the guide's calls reach the pool actor: the operations it names, the pool methods it needs, and one
place that turns a guide operation into a pool call and a pool failure into the pool's own typed error."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import ray

from actors.pool import PoolCore
from events.errors import InputError

log = logging.getLogger(__name__)

# The guide's operation names -> the pool method that runs them.
OPERATIONS = {"inference": "infer", "infer": "infer", "generate": "generate"}
GENERATE_OPTIONS = frozenset({"max_new_tokens", "temperature", "top_p", "seed"})
OPERATION_STATUSES = ("completed", "failed")

# What the bridge needs from the pool actor beyond infer/generate/shutdown (checked at initialize, so a
# pool without them fails there with one clear error instead of deep inside a recovery).
REQUIRED_POOL_API = {
    "place": ("model_name",),
    "recover_browser": ("browser_id", "category", "detail", "strategy"),
    "get_state": (),
    "get_recovery_statistics": (),
    "recent_events": ("n",),
}


def missing_pool_api(cls: type = PoolCore) -> list[str]:
    """Methods (and parameters) of REQUIRED_POOL_API that ``cls`` lacks, as readable strings."""
    missing = []
    for name, params in REQUIRED_POOL_API.items():
        method = getattr(cls, name, None)
        if method is None:
            missing.append(f"{name}({', '.join(params)})")
            continue
        have = inspect.signature(method).parameters
        missing.extend(f"{name}(..., {p}=...)" for p in params if p not in have)
    return missing


def _check_str(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(field, f"must be a non-empty str, got {value!r}")
    return value


async def pool_call(ref: ray.ObjectRef) -> Any:
    """Await a pool call; a failure raises the pool's own typed error (BrowserFailure, InputError,
    NoBrowserAvailableError), whose message is one line, rather than Ray's wrapper around it, whose message
    is the remote traceback (kept as ``__cause__``)."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as exc:
        if exc.cause is None:
            raise
        raise exc.cause from exc


async def run_pool_operation(pool: Any, model_name: str, operation: str, inputs: Any) -> dict[str, Any]:
    """Run one guide operation through the pool: "inference"/"infer" embeds ``inputs`` ({"text"} or
    {"texts"}); "generate" takes {"prompt", "max_new_tokens"?, "temperature"?, "top_p"?, "seed"?}.

    Returns the pool's result dict (it carries ``browser_id`` and ``metrics``). Bad input raises InputError.
    """
    method = OPERATIONS.get(operation) if isinstance(operation, str) else None
    if method is None:
        raise InputError("operation", f"must be one of {sorted(OPERATIONS)}, got {operation!r}")
    if method == "generate":
        if not isinstance(inputs, dict) or "prompt" not in inputs:
            raise InputError("inputs", 'generate needs a dict like {"prompt": "...", "max_new_tokens": 16}')
        unknown = set(inputs) - GENERATE_OPTIONS - {"prompt"}
        if unknown:
            raise InputError("inputs", f"unknown generate option(s) {sorted(unknown)}; known: "
                                       f"{sorted(GENERATE_OPTIONS | {'prompt'})}")
    if method == "infer":
        return await pool_call(pool.infer.remote(model_name, inputs))
    options = {k: v for k, v in inputs.items() if k != "prompt"}
    return await pool_call(pool.generate.remote(model_name, inputs["prompt"], **options))


class PoolBrowser:
    """One browser of the pool, as ``get_browser_for_model`` hands it out: ``await browser.call(op, request)``."""

    def __init__(self, pool: Any, browser_id: str, browser_type: str) -> None:
        self.pool = pool
        self.id = browser_id
        self.type = browser_type

    async def call(self, operation: str, request: dict[str, Any]) -> dict[str, Any]:
        """Run ``operation`` with ``request = {"model_name": ..., "inputs": ...}`` (see run_pool_operation).

        The pool serves it on the least busy browser holding the model, normally this one (module doc).
        """
        if not isinstance(request, dict) or set(request) != {"model_name", "inputs"}:
            raise InputError("request", 'must be a dict with exactly the keys "model_name" and "inputs"')
        return await run_pool_operation(self.pool, request["model_name"], operation, request["inputs"])

    def __repr__(self) -> str:
        return f"PoolBrowser(id={self.id!r}, type={self.type!r})"
