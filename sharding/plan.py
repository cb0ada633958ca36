"""Layer partitioning of a llama model into contiguous shards (pure)."""

from __future__ import annotations


def even_layer_ranges(n_layers: int, n_shards: int) -> list[tuple[int, int]]:
    """Split layers 0..n_layers into ``n_shards`` contiguous ranges whose sizes differ by at most one.

    The first shard also holds the embedding and the last the final norm and head (see the ONNX
    builder), so earlier shards take the extra layers when the split is uneven.
    """
    if not 1 <= n_shards <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_shards} shards")
    base, extra = divmod(n_layers, n_shards)
    ranges, start = [], 0
    for i in range(n_shards):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges
