"""Layer partitioning of a llama model into contiguous shards over browsers (pure).

``plan_layers(config, browsers)`` cuts layers ``[0, n_layers)`` into contiguous ranges, one per browser,
so that every shard fits its browser's memory budget. The first shard holds the embedding and the last
the final norm and the head, as ``sharding.models.llama_onnx.build_llama_onnx`` builds them.

Bytes of a shard's ONNX file (``shard_file_bytes``), fp32, from the config alone:
  every shard  RoPE tables cos + sin ``[config.max_context, head_dim]`` (built from the model's full
               context, whatever context a session uses) and a few scalar constants;
  per layer    two norms ``[hidden]``, wq ``[hidden, H*D]``, wk, wv ``[hidden, KV*D]``, wo ``[H*D, hidden]``,
               w_gate, w_up ``[hidden, ffn]``, w_down ``[ffn, hidden]``; plus ~4 KB of node protos
               (measured on the built SmolLM2 shards: 3.96-4.06 KB per layer);
  first shard  the embedding ``[vocab, hidden]`` (Gather);
  last shard   final norm ``[hidden]`` and the head ``[vocab, hidden]``. A tied head IS the embedding
               matrix, which the Gemm (transB) reads, so a last shard that is not also the first
               stores its own copy of the embedding (build_llama_onnx does so); a one-shard plan stores
               it once. An untied head is a separate matrix of the same shape.

Browser memory a shard needs (``MemoryModel``; bytes of Chromium PSS, the measure docs/facts.md uses):
  need = page + max(creation peak, running peak)
  creation peak = weight_peak_factor * file bytes
  running peak  = weight_steady_factor * file bytes + KV cache + activations
The weight factors come from docs/facts.md, "Memory": a Chromium holding one fp32 SmolLM2 session
(one 542,374,375 byte file) is ~1.8 GB PSS, peaks at ~2.4 GB while the session is created, and an idle
page with ORT loaded is ~0.39 GB. We read these GB as GiB: docs/facts.md gives a blank page as ~380 MiB, and 0.39 GiB
(~399 MiB) is a blank page plus ORT, while 0.39e9 bytes (~372 MiB) would be less than a blank page.
So peak (2.4 - 0.39) GiB / 542.37 MB = 3.98x the file, steady (1.8 - 0.39) GiB / 542.37 MB = 2.79x.
The factors are taken as linear in the file size: the fetched ArrayBuffer, its copy in the wasm heap
and ORT's initializer tensors all scale with the weights (the split between them was not measured).
They were measured at a short context (16-token prompt), so KV cache and attention buffers at long
contexts are added explicitly:
  KV cache    per session and layer, K and V ``[1, KV, context, D]`` fp32, times ``kv_copies`` = 4: the
              page holds the past as JS tensors, a wasm-backend run copies them into the wasm heap,
              writes the presents there and copies them out to new JS tensors before the old ones go.
  activations one forward over ``forward_tokens`` new tokens against ``context_tokens`` keys: the
              attention scores ``[H, S, T]`` (two live: MatMul/Where output and Softmax output), and
              per token 3 ffn-wide and 4 hidden-wide temporaries. A recovery replays a session's whole
              prefix in one forward, so ``forward_tokens`` defaults to ``context_tokens``.
The activations do not grow with the number of layers (ORT reuses buffers layer after layer) nor with
sessions (a page runs one forward at a time). Defaults assume the model's full ``max_context``
(SmolLM2: 8192 tokens, where the two score buffers alone are 2 x 2.4e9 bytes): pass the context
your sessions really use. Not modelled: onnxruntime-web's wasm32 heap limit of 4 GiB per page.

Partition (like exo's ring memory-weighted partitioner, adjusted by throughput): for a given order of
browsers, each position's capacity in layers follows from its budget and its fixed costs (embedding,
head); the layers are then handed out proportionally to ``capacity * throughput`` by the Sainte-Laguë
highest-averages method (each shard at least one layer, none above its capacity). With equal
throughputs every browser keeps about the same fraction of its budget free. The first and last
positions carry the embedding / head, so every ordered pair of browsers is tried there (the others,
in between, by memory, most first); the plan with the lowest estimated compute time (sum of layers /
throughput), then the lowest peak memory use (need / budget), then the earliest tried, wins.
``n_shards=None`` takes the fewest shards that fit (each extra shard adds a hop per token);
when ``n_shards`` is less than the number of browsers, those with the most memory are used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from sharding.models.llama import LlamaConfig

F32 = 4  # bytes
GIB = 1 << 30

# docs/facts.md, "Memory" (see the module doc for why GB reads as GiB).
MEASURED_IDLE_PAGE_BYTES = round(0.39 * GIB)
MEASURED_SESSION_STEADY_BYTES = round(1.8 * GIB)
MEASURED_SESSION_PEAK_BYTES = round(2.4 * GIB)
MEASURED_MODEL_FILE_BYTES = 542_374_375  # the one-shard fp32 SmolLM2 ONNX those figures were measured with

# Serialized node protos and small constants, measured on the built SmolLM2 shards.
GRAPH_BYTES_PER_LAYER = 4_000
GRAPH_BYTES_PER_SHARD = 1_000


class PlanError(ValueError):
    """A plan that cannot be made. ``missing_bytes``: the least memory that, added to the browsers'
    budgets, would make it fit (None when the request itself was malformed)."""

    def __init__(self, message: str, missing_bytes: int | None = None) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes


class PlanInputError(PlanError):
    """A malformed planning request (bad budget, shard count, config...)."""


@dataclasses.dataclass(frozen=True)
class BrowserBudget:
    browser_id: str
    memory_limit_bytes: int   # the most PSS this browser (Chromium, all its processes) may use
    throughput: float = 1.0   # measured speed relative to the others (2.0 = computes a layer twice as fast)

    def __post_init__(self) -> None:
        if type(self.browser_id) is not str or not self.browser_id:
            raise PlanInputError(f"BrowserBudget.browser_id must be a non-empty str, got {self.browser_id!r}")
        m = self.memory_limit_bytes
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise PlanInputError(f"BrowserBudget {self.browser_id}: memory_limit_bytes must be a positive int, "
                                 f"got {m!r}")
        t = self.throughput
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise PlanInputError(f"BrowserBudget {self.browser_id}: throughput must be a finite number > 0, "
                                 f"got {t!r}")


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """How much browser memory a shard needs; defaults derived from docs/facts.md, "Memory" (module doc)."""

    page_bytes: int = MEASURED_IDLE_PAGE_BYTES
    weight_peak_factor: float = (MEASURED_SESSION_PEAK_BYTES - MEASURED_IDLE_PAGE_BYTES) / MEASURED_MODEL_FILE_BYTES
    weight_steady_factor: float = (MEASURED_SESSION_STEADY_BYTES - MEASURED_IDLE_PAGE_BYTES) / MEASURED_MODEL_FILE_BYTES
    kv_copies: int = 4
    score_buffers: int = 2
    ffn_buffers: int = 3
    hidden_buffers: int = 4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise PlanInputError(f"MemoryModel.{f.name} must be a finite number >= 0, got {v!r}")


DEFAULT_MEMORY_MODEL = MemoryModel()


@dataclasses.dataclass(frozen=True)
class ShardAssignment:
    index: int
    layer_start: int
    layer_end: int            # exclusive
    browser_id: str
    file_bytes: int           # estimated size of the shard's ONNX file (fp32 weights + graph)
    memory_bytes: int         # estimated browser memory the shard needs (page + peak)
    budget_bytes: int         # the browser's memory_limit_bytes

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    n_layers: int
    shards: tuple[ShardAssignment, ...]
    context_tokens: int
    forward_tokens: int
    sessions: int

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.layer_start, s.layer_end) for s in self.shards]

    @property
    def browser_ids(self) -> list[str]:
        return [s.browser_id for s in self.shards]

    @property
    def file_bytes(self) -> list[int]:
        return [s.file_bytes for s in self.shards]

    @property
    def memory_bytes(self) -> list[int]:
        return [s.memory_bytes for s in self.shards]

    def as_dict(self) -> dict[str, Any]:
        """JSON data (e.g. for a SessionOpened plan)."""
        return {
            "n_layers": self.n_layers,
            "context_tokens": self.context_tokens,
            "forward_tokens": self.forward_tokens,
            "sessions": self.sessions,
            "shards": [{"index": s.index, "layers": [s.layer_start, s.layer_end], "browser_id": s.browser_id,
                        "file_bytes": s.file_bytes, "memory_bytes": s.memory_bytes,
                        "budget_bytes": s.budget_bytes} for s in self.shards],
        }


# --------------------------------------------------------------------------------------------------
# bytes


def layer_weight_bytes(config: LlamaConfig) -> int:
    """fp32 bytes of one decoder layer's weights."""
    c = config
    qo = c.n_heads * c.head_dim
    kv = c.n_kv_heads * c.head_dim
    return F32 * (2 * c.hidden + 2 * c.hidden * qo + 2 * c.hidden * kv + 3 * c.hidden * c.ffn)


def shard_file_bytes(config: LlamaConfig, layer_start: int, layer_end: int, tied_head: bool = True) -> int:
    """Estimated bytes of the ONNX file build_llama_onnx writes for layers [layer_start, layer_end)."""
    c = _check_config(config)
    a, b = _check_range(c, layer_start, layer_end)
    table = c.vocab * c.hidden * F32
    n = b - a
    size = 2 * c.max_context * c.head_dim * F32 + n * (layer_weight_bytes(c) + GRAPH_BYTES_PER_LAYER)
    size += GRAPH_BYTES_PER_SHARD
    if a == 0:
        size += table
    if b == c.n_layers:
        size += c.hidden * F32
        if not tied_head or a != 0:  # tied and first: the head reads the embedding already stored
            size += table
    return size


def kv_cache_bytes(config: LlamaConfig, n_layers: int, context_tokens: int) -> int:
    """fp32 K and V of ``n_layers`` layers for one session of ``context_tokens`` tokens (one copy)."""
    return n_layers * 2 * config.n_kv_heads * context_tokens * config.head_dim * F32


def activation_bytes(config: LlamaConfig, forward_tokens: int, context_tokens: int,
                     memory: MemoryModel = DEFAULT_MEMORY_MODEL) -> int:
    """Transient bytes of one forward over ``forward_tokens`` new tokens against ``context_tokens`` keys."""
    c = config
    per_token = (memory.score_buffers * c.n_heads * context_tokens + memory.ffn_buffers * c.ffn
                 + memory.hidden_buffers * c.hidden)
    return math.ceil(forward_tokens * per_token * F32)


_Phases = tuple[tuple[float, float], ...]  # per phase: (bytes at 0 layers, bytes per layer)


def _affine_need(config: LlamaConfig, layer_start: int, layer_end: int, context_tokens: int, forward_tokens: int,
                 sessions: int, tied_head: bool, memory: MemoryModel) -> _Phases:
    """The two phases' need as (bytes at 0 layers, bytes per layer) for a shard at this position.

    Position matters only through the embedding/head, so (start, end) just says first and/or last.
    """
    c = config
    n = layer_end - layer_start
    f0 = shard_file_bytes(c, layer_start, layer_end, tied_head) - n * (layer_weight_bytes(c) + GRAPH_BYTES_PER_LAYER)
    f1 = layer_weight_bytes(c) + GRAPH_BYTES_PER_LAYER
    kv1 = memory.kv_copies * sessions * kv_cache_bytes(c, 1, context_tokens)
    act = activation_bytes(c, forward_tokens, context_tokens, memory)
    create = (memory.page_bytes + memory.weight_peak_factor * f0, memory.weight_peak_factor * f1)
    run = (memory.page_bytes + memory.weight_steady_factor * f0 + act, memory.weight_steady_factor * f1 + kv1)
    return create, run


def _need(phases: _Phases, n: int) -> int:
    return math.ceil(max(a + b * n for a, b in phases))


def _capacity(phases: _Phases, budget: int) -> tuple[int, float]:
    """(whole layers that fit, the same as a real number) for a position with these phases."""
    real = min((budget - a) / b for a, b in phases)
    whole = math.floor(real)
    while whole > 0 and _need(phases, whole) > budget:  # guard the float/ceil edge
        whole -= 1
    return max(whole, 0), real


def shard_memory_bytes(config: LlamaConfig, layer_start: int, layer_end: int, *, context_tokens: int | None = None,
                       forward_tokens: int | None = None, sessions: int = 1, tied_head: bool = True,
                       memory: MemoryModel = DEFAULT_MEMORY_MODEL) -> int:
    """Estimated browser memory (PSS bytes) to hold layers [layer_start, layer_end); see the module doc."""
    c = _check_config(config)
    a, b = _check_range(c, layer_start, layer_end)
    ctx, fwd, sessions = _check_workload(c, context_tokens, forward_tokens, sessions)
    return _need(_affine_need(c, a, b, ctx, fwd, sessions, tied_head, memory), b - a)


# --------------------------------------------------------------------------------------------------
# partition


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


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integers in [1, cap_i] summing to ``total``, proportional to ``weights`` (Sainte-Laguë).

    Each part starts at one; every further unit goes to the part with room whose weight / (2 * units + 1)
    is highest (ties: the earlier part). Needs len(weights) <= total <= sum(caps) and every cap >= 1.
    """
    if len(weights) != len(caps) or not weights:
        raise PlanInputError(f"apportion needs as many weights as caps (got {len(weights)}, {len(caps)})")
    if any(c < 1 for c in caps) or not len(caps) <= total <= sum(caps):
        raise PlanInputError(f"cannot apportion {total} into {len(caps)} parts with caps {list(caps)}")
    if any(not 0 < w < math.inf for w in weights):
        raise PlanInputError(f"weights must be finite and > 0, got {list(weights)}")
    units = [1] * len(caps)
    for _ in range(total - len(caps)):
        best = max((i for i in range(len(caps)) if units[i] < caps[i]),
                   key=lambda i: (weights[i] / (2 * units[i] + 1), -i))
        units[best] += 1
    return units


@dataclasses.dataclass(frozen=True)
class _Candidate:
    key: tuple[float, float, int]         # (compute time, peak use, order tried): lower is better
    layers: tuple[int, ...]
    order: tuple[int, ...]                # browser indices by position


def _positions(n_layers: int, n: int) -> list[tuple[int, int]]:
    """A stand-in (start, end) per position that is first/last exactly where the real one is."""
    if n == 1:
        return [(0, n_layers)]
    return [(0, 1)] + [(1, 2)] * (n - 2) + [(n_layers - 1, n_layers)]


def _missing_for(phases_by_pos: list[_Phases], budgets: list[int], n_layers: int) -> int:
    """The least bytes that added to these budgets let the positions hold all layers (need is convex
    in layers, so taking the cheapest next layers one at a time is optimal)."""
    units, missing = [], 0
    for phases, budget in zip(phases_by_pos, budgets, strict=True):
        whole, _ = _capacity(phases, budget)
        u = max(whole, 1)
        missing += max(0, _need(phases, u) - budget)
        units.append(u)
    for _ in range(n_layers - sum(units)):
        cost = [max(0, _need(p, u + 1) - b) - max(0, _need(p, u) - b)
                for p, u, b in zip(phases_by_pos, units, budgets, strict=True)]
        i = min(range(len(cost)), key=lambda k: (cost[k], k))
        missing += cost[i]
        units[i] += 1
    return missing


def _plan_for(config: LlamaConfig, chosen: list[int], browsers: Sequence[BrowserBudget], ctx: int, fwd: int,
              sessions: int, tied_head: bool, memory: MemoryModel) -> tuple[_Candidate | None, int]:
    """Best arrangement of exactly these browsers, or (None, least missing bytes)."""
    c = config
    n = len(chosen)
    pos = _positions(c.n_layers, n)
    phases = [_affine_need(c, a, b, ctx, fwd, sessions, tied_head, memory) for a, b in pos]
    by_memory = sorted(chosen, key=lambda i: (-browsers[i].memory_limit_bytes, -browsers[i].throughput, i))
    if n == 1:
        orders = [tuple(by_memory)]
    else:
        # Last from the end of the memory order, so that among equals the first order tried is it.
        orders = [(f, *[i for i in by_memory if i not in (f, la)], la)
                  for f in by_memory for la in reversed(by_memory) if la != f]
    best: _Candidate | None = None
    missing = None
    for tried, order in enumerate(orders):
        budgets = [browsers[i].memory_limit_bytes for i in order]
        caps = [_capacity(p, bud) for p, bud in zip(phases, budgets, strict=True)]
        whole = [w for w, _ in caps]
        if min(whole) < 1 or sum(whole) < c.n_layers:
            m = _missing_for(phases, budgets, c.n_layers)
            missing = m if missing is None else min(missing, m)
            continue
        speed = [browsers[i].throughput for i in order]
        layers = apportion(c.n_layers, [real * s for (_, real), s in zip(caps, speed, strict=True)], whole)
        compute = sum(k / s for k, s in zip(layers, speed, strict=True))
        use = max(_need(p, k) / bud for p, k, bud in zip(phases, layers, budgets, strict=True))
        # Round the compute time so float noise in the sum cannot beat the memory tie-break.
        cand = _Candidate((round(compute, 9), use, tried), tuple(layers), order)
        if best is None or cand.key < best.key:
            best = cand
    return best, (0 if missing is None else missing)


def plan_layers(config: LlamaConfig, browsers: Sequence[BrowserBudget], n_shards: int | None = None, *,
                context_tokens: int | None = None, forward_tokens: int | None = None, sessions: int = 1,
                tied_head: bool = True, memory: MemoryModel = DEFAULT_MEMORY_MODEL) -> ShardPlan:
    """Contiguous layer ranges over ``browsers`` that fit their memory; see the module doc.

    ``context_tokens``: tokens a session may hold (default ``config.max_context``); ``forward_tokens``:
    the most tokens in one forward, a prompt or a replayed prefix (default ``context_tokens``);
    ``sessions``: concurrent sessions, each with its own KV cache. Raises PlanError (with
    ``missing_bytes``) when no plan fits, PlanInputError for a malformed request.
    """
    c = _check_config(config)
    if not isinstance(memory, MemoryModel):
        raise PlanInputError(f"memory must be a MemoryModel, got {type(memory).__name__}")
    browsers = list(browsers)
    if not browsers:
        raise PlanInputError("no browsers to plan over")
    for b in browsers:
        if not isinstance(b, BrowserBudget):
            raise PlanInputError(f"browsers must be BrowserBudget, got {type(b).__name__}")
    ids = [b.browser_id for b in browsers]
    if len(set(ids)) != len(ids):
        raise PlanInputError(f"browser ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    ctx, fwd, sessions = _check_workload(c, context_tokens, forward_tokens, sessions)
    most = min(len(browsers), c.n_layers)
    if n_shards is None:
        counts = list(range(1, most + 1))
    else:
        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not 1 <= n_shards <= most:
            raise PlanInputError(f"n_shards must be an int in 1..{most} (min of {len(browsers)} browsers and "
                                 f"{c.n_layers} layers), got {n_shards!r}")
        counts = [n_shards]
    by_memory = sorted(range(len(browsers)),
                       key=lambda i: (-browsers[i].memory_limit_bytes, -browsers[i].throughput, i))
    least_missing = None
    for n in counts:
        best, missing = _plan_for(c, by_memory[:n], browsers, ctx, fwd, sessions, tied_head, memory)
        if best is not None:
            return _make_plan(c, best, browsers, ctx, fwd, sessions, tied_head, memory)
        least_missing = missing if least_missing is None else min(least_missing, missing)
    assert least_missing is not None
    what = f"{counts[0]}" if len(counts) == 1 else f"1..{counts[-1]}"
    total = sum(b.memory_limit_bytes for b in browsers)
    raise PlanError(
        f"no plan of {what} shard(s) fits {c.n_layers} layers into browsers {ids} "
        f"(budgets {total / GIB:.2f} GiB in all, context {ctx}, forward {fwd}, {sessions} session(s)): "
        f"{least_missing} bytes ({least_missing / GIB:.2f} GiB) of memory are missing",
        missing_bytes=least_missing)


def _make_plan(c: LlamaConfig, best: _Candidate, browsers: Sequence[BrowserBudget], ctx: int, fwd: int,
               sessions: int, tied_head: bool, memory: MemoryModel) -> ShardPlan:
    shards, start = [], 0
    for index, (k, i) in enumerate(zip(best.layers, best.order, strict=True)):
        end = start + k
        b = browsers[i]
        need = _need(_affine_need(c, start, end, ctx, fwd, sessions, tied_head, memory), k)
        if need > b.memory_limit_bytes:  # the planner's own invariant
            raise AssertionError(f"shard {index} needs {need} > budget {b.memory_limit_bytes} of {b.browser_id}")
        shards.append(ShardAssignment(index, start, end, b.browser_id, shard_file_bytes(c, start, end, tied_head),
                                      need, b.memory_limit_bytes))
        start = end
    return ShardPlan(c.n_layers, tuple(shards), ctx, fwd, sessions)


# --------------------------------------------------------------------------------------------------
# checks


def _check_config(config: Any) -> LlamaConfig:
    if not isinstance(config, LlamaConfig):
        raise PlanInputError(f"config must be a LlamaConfig, got {type(config).__name__}")
    return config


def _check_range(c: LlamaConfig, a: Any, b: Any) -> tuple[int, int]:
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, int):
            raise PlanInputError(f"layer bounds must be ints, got {v!r}")
    if not 0 <= a < b <= c.n_layers:
        raise PlanInputError(f"layer range [{a}, {b}) is not a non-empty part of [0, {c.n_layers})")
    return a, b


def _check_workload(c: LlamaConfig, context_tokens: Any, forward_tokens: Any, sessions: Any) -> tuple[int, int, int]:
    ctx = c.max_context if context_tokens is None else context_tokens
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 1 <= ctx <= c.max_context:
        raise PlanInputError(f"context_tokens must be an int in 1..{c.max_context}, got {context_tokens!r}")
    fwd = ctx if forward_tokens is None else forward_tokens
    if isinstance(fwd, bool) or not isinstance(fwd, int) or not 1 <= fwd <= ctx:
        raise PlanInputError(f"forward_tokens must be an int in 1..{ctx} (context_tokens), got {forward_tokens!r}")
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1:
        raise PlanInputError(f"sessions must be a positive int, got {sessions!r}")
    return ctx, fwd, sessions


__all__ = [
    "DEFAULT_MEMORY_MODEL",
    "BrowserBudget",
    "MemoryModel",
    "PlanError",
    "PlanInputError",
    "ShardAssignment",
    "ShardPlan",
    "activation_bytes",
    "apportion",
    "even_layer_ranges",
    "kv_cache_bytes",
    "layer_weight_bytes",
    "plan_layers",
    "shard_file_bytes",
    "shard_memory_bytes",
]
