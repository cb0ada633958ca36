"""The llama family as ONNX: layer-range shard graphs built from a ``LlamaModel``'s weights (cached by content),
and a CPU onnxruntime runner of a shard chain, the reference every browser's tokens are checked against.

A shard [a, b) takes hidden states (or token ids, for the first) and the KV cache of its layers, and
returns hidden states (or, for the last, the top-k logits) and the new cache. The graphs are checked
against the numpy reference in sharding/models/llama.py, which shares no code with them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from sharding.models.cache import build_cached, file_sha256
from sharding.models.llama import LlamaConfig, LlamaError, LlamaModel, ShardArtifact, check_ids, rope_tables

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# Bump when the graph changes in any way that alters its bytes.
BUILDER_VERSION = 2
OPSET = 17
IR_VERSION = 8  # opset 17's IR; onnxruntime-web 1.30 reads it

# onnx is imported only where a graph is built or written: importing it takes ~1.3 s here (ml_dtypes),
# and the processes that only plan, tokenize or serve built files (the pool actor above all) never need it.


class _Graph:
    """Collects nodes and initializers; every helper returns its output tensor name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        # Initializers stay numpy arrays (memory-mapped for SmolLM2) until written one by one.
        self.inits: list[tuple[str, np.ndarray]] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        self._n += 1
        name = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n{self._n}_{op_type}", **attrs))
        return name

    def op_multi(self, op_type: str, inputs: list[str], outs: list[str], **attrs) -> list[str]:
        from onnx import helper

        self._n += 1
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._n}_{op_type}", **attrs))
        return outs

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append((name, array))
        return name

    def i64(self, name: str, values: Sequence[int] | int) -> str:
        return self.init(name, np.array(values, dtype=np.int64))

    def rms_norm(self, x: str, weight: str, eps: str) -> str:
        ms = self.op("ReduceMean", self.op("Mul", x, x), axes=[-1], keepdims=1)
        return self.op("Mul", self.op("Div", x, self.op("Sqrt", self.op("Add", ms, eps))), weight)


def _shard_names(c: LlamaConfig, a: int, b: int) -> tuple[list[str], list[str], list[list[str]]]:
    inputs = ["input_ids" if a == 0 else "hidden_in"]
    outputs = ["topk_values", "topk_indices"] if b == c.n_layers else ["hidden_out"]
    state = []
    for i in range(a, b):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
        outputs += [f"present_key_{i}", f"present_value_{i}"]
        state += [[f"present_key_{i}", f"past_key_{i}"], [f"present_value_{i}", f"past_value_{i}"]]
    return inputs, outputs, state


def _check_range(c: LlamaConfig, layer_start: int, layer_end: int | None) -> tuple[int, int]:
    b = c.n_layers if layer_end is None else layer_end
    for v in (layer_start, b):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LlamaError(f"layer bounds must be ints, got {v!r}")
    if not 0 <= layer_start < b <= c.n_layers:
        raise LlamaError(f"layer range [{layer_start}, {b}) is not a non-empty part of [0, {c.n_layers})")
    return layer_start, b


def _make_shard_graph(
    model: LlamaModel, a: int, b: int, top_k: int
) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]]]:
    """The shard's model without initializers, and the initializers as (name, array)."""
    from onnx import TensorProto, helper

    c = model.config
    first, last = a == 0, b == c.n_layers
    g = _Graph()
    f32 = TensorProto.FLOAT
    kv_dims = [1, c.n_kv_heads, "past_len", c.head_dim]
    present_dims = [1, c.n_kv_heads, "total_len", c.head_dim]
    graph_inputs, graph_outputs = [], []

    # Shared constants.
    eps = g.init("rms_eps", np.array(c.rms_eps, dtype=np.float32))
    one = g.i64("one", 1)
    zero = g.i64("zero", 0)
    half = c.head_dim // 2
    cos_t, sin_t = rope_tables(c, c.max_context)
    g.init("rope_cos", cos_t.astype(np.float32))
    g.init("rope_sin", sin_t.astype(np.float32))
    g.init("attn_scale", np.array(1.0 / math.sqrt(c.head_dim), dtype=np.float32))
    g.init("mask_value", np.array(np.finfo(np.float32).min, dtype=np.float32))
    g.i64("shape_q", [1, -1, c.n_heads, c.head_dim])
    g.i64("shape_kv", [1, -1, c.n_kv_heads, c.head_dim])
    g.i64("shape_grouped", [1, c.n_kv_heads, c.group, -1, c.head_dim])
    g.i64("shape_heads", [1, c.n_heads, -1, c.head_dim])
    g.i64("shape_hidden", [1, -1, c.n_heads * c.head_dim])
    g.i64("axes_0", [0])
    g.i64("axes_1", [1])
    g.i64("axes_2", [2])
    g.i64("axes_3", [3])
    g.i64("half_start", [0])
    g.i64("half_mid", [half])
    g.i64("half_end", [c.head_dim])

    # Entry: token embedding or the previous shard's hidden state.
    if first:
        graph_inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq_len"]))
        g.init("embed", model.weights["embed"])
        x = g.op("Gather", "embed", "input_ids", axis=0)
        seq_src = "input_ids"
    else:
        graph_inputs.append(helper.make_tensor_value_info("hidden_in", f32, [1, "seq_len", c.hidden]))
        x = "hidden_in"
        seq_src = "hidden_in"

    # Positions P..P+S-1 come from the past's length, so the caller passes no position input.
    past_len = g.op("Squeeze", g.op("Shape", f"past_key_{a}", start=2, end=3), "axes_0")
    seq_len = g.op("Squeeze", g.op("Shape", seq_src, start=1, end=2), "axes_0")
    total_len = g.op("Add", past_len, seq_len)
    q_pos = g.op("Range", past_len, total_len, one)
    k_pos = g.op("Range", zero, total_len, one)
    cos = g.op("Gather", "rope_cos", q_pos, axis=0)  # [S, D]
    sin = g.op("Gather", "rope_sin", q_pos, axis=0)
    # future[s, t]: key t is after query s -> masked. [S, T], broadcast over [1, KV, G, S, T].
    future = g.op("Less", g.op("Unsqueeze", q_pos, "axes_1"), g.op("Unsqueeze", k_pos, "axes_0"))

    def rope(t: str) -> str:
        lo = g.op("Slice", t, "half_start", "half_mid", "axes_3")
        hi = g.op("Slice", t, "half_mid", "half_end", "axes_3")
        rot = g.op("Concat", g.op("Neg", hi), lo, axis=3)
        return g.op("Add", g.op("Mul", t, cos), g.op("Mul", rot, sin))

    for i in range(a, b):
        p = f"l{i}."
        for k in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down"):
            g.init(p + k, model.weights[p + k])
        graph_inputs += [
            helper.make_tensor_value_info(f"past_key_{i}", f32, kv_dims),
            helper.make_tensor_value_info(f"past_value_{i}", f32, kv_dims),
        ]
        graph_outputs_layer = [
            helper.make_tensor_value_info(f"present_key_{i}", f32, present_dims),
            helper.make_tensor_value_info(f"present_value_{i}", f32, present_dims),
        ]
        graph_outputs += graph_outputs_layer

        h = g.rms_norm(x, p + "attn_norm", eps)
        q = g.op("Transpose", g.op("Reshape", g.op("MatMul", h, p + "wq"), "shape_q"), perm=[0, 2, 1, 3])
        k = g.op("Transpose", g.op("Reshape", g.op("MatMul", h, p + "wk"), "shape_kv"), perm=[0, 2, 1, 3])
        v = g.op("Transpose", g.op("Reshape", g.op("MatMul", h, p + "wv"), "shape_kv"), perm=[0, 2, 1, 3])
        q = g.op("Mul", rope(q), "attn_scale")
        k = rope(k)
        present_k = g.op("Concat", f"past_key_{i}", k, axis=2, out=f"present_key_{i}")
        present_v = g.op("Concat", f"past_value_{i}", v, axis=2, out=f"present_value_{i}")
        # GQA without copying K/V: group the query heads of each KV head, broadcast K/V over the group.
        qg = g.op("Reshape", q, "shape_grouped")  # [1, KV, G, S, D]
        kt = g.op("Transpose", g.op("Unsqueeze", present_k, "axes_2"), perm=[0, 1, 2, 4, 3])  # [1,KV,1,D,T]
        scores = g.op("Where", future, "mask_value", g.op("MatMul", qg, kt))  # [1, KV, G, S, T]
        probs = g.op("Softmax", scores, axis=-1)
        ctx = g.op("MatMul", probs, g.op("Unsqueeze", present_v, "axes_2"))  # [1, KV, G, S, D]
        ctx = g.op("Transpose", g.op("Reshape", ctx, "shape_heads"), perm=[0, 2, 1, 3])  # [1, S, H, D]
        attn = g.op("MatMul", g.op("Reshape", ctx, "shape_hidden"), p + "wo")
        x = g.op("Add", x, attn)

        h = g.rms_norm(x, p + "ffn_norm", eps)
        gate = g.op("MatMul", h, p + "w_gate")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), g.op("MatMul", h, p + "w_up"))
        x = g.op("Add", x, g.op("MatMul", act, p + "w_down"))

    if last:
        g.init("final_norm", model.weights["final_norm"])
        head = "embed"
        if "head" in model.weights:
            head = g.init("head", model.weights["head"])
        elif not first:
            g.init("embed", model.weights["embed"])  # tied head: the last shard needs its own copy
        g.i64("last_start", [-1])
        g.i64("last_end", [np.iinfo(np.int64).max])
        g.i64("shape_row", [1, c.hidden])
        xl = g.op("Reshape", g.op("Slice", x, "last_start", "last_end", "axes_1"), "shape_row")  # [1, hidden]
        logits = g.op("Gemm", g.rms_norm(xl, "final_norm", eps), head, transB=1)  # [1, vocab]
        g.i64("top_k", [top_k])
        g.op_multi("TopK", [logits, "top_k"], ["topk_values", "topk_indices"], axis=-1, largest=1, sorted=1)
        graph_outputs = [
            helper.make_tensor_value_info("topk_values", f32, [1, top_k]),
            helper.make_tensor_value_info("topk_indices", TensorProto.INT64, [1, top_k]),
            *graph_outputs,
        ]
    else:
        g.op("Identity", x, out="hidden_out")
        graph_outputs = [helper.make_tensor_value_info("hidden_out", f32, [1, "seq_len", c.hidden]), *graph_outputs]

    graph = helper.make_graph(g.nodes, f"{model.name}_layers_{a}_{b}", graph_inputs, graph_outputs)
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="webpool.sharding.models.llama"
    )
    m.ir_version = IR_VERSION
    return m, g.inits


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def write_onnx_streaming(path: Path, model: onnx.ModelProto, inits: Sequence[tuple[str, np.ndarray]]) -> int:
    """Write ``model`` plus initializers without ever holding all of them serialized.

    A protobuf message is the concatenation of its encoded fields, in any order, so the file is the
    model without its graph, then the graph field (ModelProto #7) whose body is the graph without
    initializers followed by one GraphProto #5 record per tensor. Peak memory is one tensor, not
    three copies of every weight (which reached ~2.8 GB for SmolLM2). Returns the file size.
    """
    import onnx

    if len(model.graph.initializer):
        raise LlamaError("model passed to write_onnx_streaming already has initializers")
    graph_head = model.graph.SerializeToString()
    head_model = onnx.ModelProto()
    head_model.CopyFrom(model)
    head_model.ClearField("graph")
    head = head_model.SerializeToString()
    sizes = [_tensor(n, a).ByteSize() for n, a in inits]  # a second copy per tensor, one at a time
    graph_key, init_key = _varint((7 << 3) | 2), _varint((5 << 3) | 2)
    graph_len = len(graph_head) + sum(len(init_key) + len(_varint(s)) + s for s in sizes)
    with open(path, "wb") as f:
        f.write(head + graph_key + _varint(graph_len) + graph_head)
        for (name, array), size in zip(inits, sizes, strict=True):
            data = _tensor(name, array).SerializeToString()
            if len(data) != size:
                raise RuntimeError(f"tensor {name} serialized to {len(data)} bytes, expected {size}")
            f.write(init_key + _varint(size))
            f.write(data)
    return path.stat().st_size


def build_llama_onnx(
    model: LlamaModel, layer_start: int = 0, layer_end: int | None = None, top_k: int = 64
) -> ShardArtifact:
    """ONNX graph of layers [layer_start, layer_end) with fp32 weights inside; cached by content."""
    c = model.config
    a, b = _check_range(c, layer_start, layer_end)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= c.vocab:
        raise LlamaError(f"top_k must be an int in [1, {c.vocab}], got {top_k!r}")
    inputs, outputs, state = _shard_names(c, a, b)
    meta = {
        "model": model.name,
        "layer_range": [a, b],
        "inputs": inputs,
        "outputs": outputs,
        "state": state,
        "kv_shape": [1, c.n_kv_heads, 0, c.head_dim],
        "config": c.as_dict(),
        "top_k": top_k,
        "first": a == 0,
        "last": b == c.n_layers,
    }
    parts = {
        "source": model.source_key,
        "name": model.name,
        "config": c.as_dict(),
        "range": [a, b],
        "top_k": top_k,
        "builder": BUILDER_VERSION,
        "opset": OPSET,
    }

    def build(out: Path) -> None:
        import onnx

        t0 = time.perf_counter()
        log.info("onnx %s [%d, %d): building graph", model.name, a, b)
        proto, inits = _make_shard_graph(model, a, b, top_k)
        log.info(
            "onnx %s [%d, %d): graph has %d nodes, %d initializers; writing",
            model.name,
            a,
            b,
            len(proto.graph.node),
            len(inits),
        )
        size = write_onnx_streaming(out / "model.onnx", proto, inits)
        log.info(
            "onnx %s [%d, %d): wrote %.1f MB (%.1f s), checking", model.name, a, b, size / 1e6, time.perf_counter() - t0
        )
        onnx.checker.check_model(str(out / "model.onnx"))
        (out / "model.onnx.sha256").write_text(file_sha256(out / "model.onnx"))
        (out / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        log.info("onnx %s [%d, %d): done in %.1f s", model.name, a, b, time.perf_counter() - t0)

    folder = build_cached("llama-onnx", parts, build)
    return ShardArtifact(
        path=folder / "model.onnx",
        sha256=(folder / "model.onnx.sha256").read_text().strip(),
        meta=orjson.loads((folder / "meta.json").read_bytes()),
    )


def build_shards(model: LlamaModel, ranges: list[tuple[int, int]], top_k: int = 64) -> list[ShardArtifact]:
    """One artifact per layer range; the ranges must tile [0, n_layers) in order."""
    check_chain_ranges([tuple(r) for r in ranges], model.config.n_layers)
    return [build_llama_onnx(model, a, b, top_k) for a, b in ranges]


def check_chain_ranges(ranges: Sequence[Sequence[int]], n_layers: int) -> None:
    if not ranges:
        raise LlamaError("no layer ranges")
    expect = 0
    for r in ranges:
        if len(r) != 2 or r[0] != expect or not r[0] < r[1]:
            raise LlamaError(f"layer ranges {list(map(list, ranges))} do not tile [0, {n_layers}) in order")
        expect = r[1]
    if expect != n_layers:
        raise LlamaError(f"layer ranges end at {expect}, model has {n_layers} layers")


# ----------------------------------------------------------------------------------------------------
# CPU onnxruntime reference runner


class OrtShardChain:
    """Runs a chain of shard graphs with onnxruntime on CPU, keeping each shard's KV cache."""

    def __init__(self, artifacts: Sequence[ShardArtifact], threads: int = 1) -> None:
        import onnxruntime as ort

        if not artifacts:
            raise LlamaError("no artifacts")
        metas = [a.meta for a in artifacts]
        names = {m["model"] for m in metas}
        if len(names) != 1 or any(m["config"] != metas[0]["config"] for m in metas):
            raise LlamaError(f"artifacts mix models: {sorted(names)}")
        self.config = LlamaConfig(**metas[0]["config"])
        check_chain_ranges([m["layer_range"] for m in metas], self.config.n_layers)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise LlamaError(f"threads must be a positive int, got {threads!r}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if threads > 1 and len(artifacts) > 1:
            # Chained sessions run one after another; spinning pool threads of the idle ones would
            # steal the cores from the running one (measured: 3 shards, 2 threads, 57 -> 30 ms/token).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.metas = metas
        self.sessions = [ort.InferenceSession(str(a.path), opts, providers=["CPUExecutionProvider"]) for a in artifacts]
        self.reset()

    def reset(self) -> None:
        """Forget all KV caches (a new sequence starts at position 0)."""
        c = self.config
        empty = np.zeros([1, c.n_kv_heads, 0, c.head_dim], dtype=np.float32)
        self.past = [{inp: empty for _, inp in m["state"]} for m in self.metas]
        self.past_len = 0

    def step(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Feed ids at the next positions; return (topk_values [K], topk_indices [K]) for the last one."""
        ids = check_ids(ids, self.config)
        if self.past_len + len(ids) > self.config.max_context:
            raise LlamaError(f"position {self.past_len + len(ids)} exceeds max_context {self.config.max_context}")
        x: np.ndarray = np.array([ids], dtype=np.int64)
        for meta, sess, past in zip(self.metas, self.sessions, self.past, strict=True):
            feeds = {meta["inputs"][0]: x, **past}
            outs = dict(zip(meta["outputs"], sess.run(meta["outputs"], feeds), strict=True))
            for out_name, in_name in meta["state"]:
                past[in_name] = outs[out_name]
            x = outs["topk_values"] if meta["last"] else outs["hidden_out"]
            if meta["last"]:
                indices = outs["topk_indices"]
        self.past_len += len(ids)
        return x[0], indices[0]

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Prefill, then decode one token at a time; returns new tokens, ending with EOS if produced."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise LlamaError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        prompt = check_ids(prompt_ids, self.config)
        if len(prompt) + max_new_tokens > self.config.max_context:
            raise LlamaError(f"{len(prompt)} + {max_new_tokens} tokens exceed max_context {self.config.max_context}")
        self.reset()
        out: list[int] = []
        feed = prompt
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            _, indices = self.step(feed)
            nxt = int(indices[0])
            out.append(nxt)
            if nxt == self.config.eos_id:
                break
            feed = [nxt]
        if out:
            log.debug("ort greedy: %d tokens in %.1f ms", len(out), (time.perf_counter() - t0) * 1e3)
        return out


def ort_greedy_generate(
    artifacts: list[ShardArtifact], prompt_ids: list[int], max_new_tokens: int, threads: int = 1
) -> list[int]:
    """CPU onnxruntime greedy decoding through the shard chain; returns new tokens (EOS included)."""
    return OrtShardChain(artifacts, threads).greedy(prompt_ids, max_new_tokens)

