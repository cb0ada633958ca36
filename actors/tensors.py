"""Tensors as they cross into and out of the page: dtype, dims and the raw bytes in base64 (data, never code)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """A numpy array as the page's tensor spec: dtype, dims and base64 of the raw bytes."""
    array = np.ascontiguousarray(array)
    dtype = "bool" if array.dtype == np.bool_ else str(array.dtype)
    return {"dtype": dtype, "dims": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_tensor(spec: dict[str, Any]) -> np.ndarray:
    dtype = np.bool_ if spec["dtype"] == "bool" else np.dtype(spec["dtype"])
    return np.frombuffer(base64.b64decode(spec["b64"]), dtype=dtype).reshape(spec["dims"])
