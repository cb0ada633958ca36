"""webpool: a fault-tolerant pool of headless browsers used as AI accelerators, driven through Ray.

The public face. Implementation lives in ``actors/`` (Ray actors), ``events/`` (the event log) and
``sharding/`` (models and shards)::

    import ray
    from webpool import ResourcePool
    ray.init()
    pool = ResourcePool.remote(max_connections=2)
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "Example input"}))
"""

from actors.browser import BrowserActor
from actors.errors import BrowserFailure, NoBrowserAvailableError, PoolBusyError, WebpoolError
from actors.pool import ResourcePool
from events.schema import FailureCategory
from sharding.models.errors import InputError
from sharding.models.registry import SPECS as MODELS
from sharding.models.registry import ModelNotFoundError

BrowserFailureCategory = FailureCategory

__all__ = [
    "MODELS",
    "BrowserActor",
    "BrowserFailure",
    "BrowserFailureCategory",
    "FailureCategory",
    "InputError",
    "ModelNotFoundError",
    "NoBrowserAvailableError",
    "PoolBusyError",
    "ResourcePool",
    "WebpoolError",
]
