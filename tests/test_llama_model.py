"""Llama family: numpy reference vs ONNX (onnxruntime CPU), KV cache, shard chains, tokenizers.

Tiny-model tests build into a fresh temporary cache so the build path always runs; SmolLM2 tests
(marked slow) use the normal cache, as a deployment would.
"""

from __future__ import annotations

import numpy as np
import onnx
import orjson
import pytest
from onnx import numpy_helper

from sharding.models import llama as L
from sharding.models import llama_onnx as LO
from sharding.models.cache import file_sha256
from sharding.models.gguf_tokenizer import ByteTokenizer, TokenizerError

TOL_TINY = 1e-4
TOL_SMOL = 1e-3
PROMPT = "Hello, world"

# Ops every ONNX we emit may use: all are in onnxruntime-web's wasm build.
ALLOWED_OPS = {
    "Gather",
    "Mul",
    "ReduceMean",
    "Add",
    "Sqrt",
    "Div",
    "MatMul",
    "Reshape",
    "Transpose",
    "Slice",
    "Neg",
    "Concat",
    "Shape",
    "Squeeze",
    "Unsqueeze",
    "Range",
    "Less",
    "Where",
    "Softmax",
    "Sigmoid",
    "Gemm",
    "TopK",
    "Identity",
}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    # The temporary cache is set only while building, so later fixtures (SmolLM2) use the real one.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEBPOOL_CACHE", str(tiny_cache))
        model = L.tiny_llama(0)
        chains = {
            1: LO.build_shards(model, [(0, 4)]),
            2: LO.build_shards(model, [(0, 2), (2, 4)]),
            3: LO.build_shards(model, [(0, 1), (1, 3), (3, 4)]),
        }
    return model, chains


def _ref_topk(logits_row: np.ndarray, k: int) -> np.ndarray:
    return np.sort(logits_row)[::-1][:k]


def _assert_topk_matches(values, indices, ref_row, tol):
    """Values equal the reference's top-K, and the returned indices carry those values in the reference."""
    assert values.shape == indices.shape
    assert np.all(np.diff(values) <= 0), "top-k not sorted descending"
    np.testing.assert_allclose(values, _ref_topk(ref_row, len(values)), atol=tol, rtol=0)
    np.testing.assert_allclose(ref_row[indices], values, atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------------
# tiny llama


def test_tiny_prefill_matches_reference(tiny):
    model, chains = tiny
    ids = model.encode(PROMPT)
    ref = model.reference_logits(ids)
    assert ref.shape == (len(ids), model.config.vocab)
    chain = LO.OrtShardChain(chains[1])
    values, indices = chain.step(ids)
    assert values.shape == (64,) and values.dtype == np.float32 and indices.dtype == np.int64
    _assert_topk_matches(values, indices, ref[-1], TOL_TINY)


def test_tiny_kv_cached_decode_equals_full_recompute(tiny):
    model, chains = tiny
    ids = model.encode(PROMPT)
    cached = LO.OrtShardChain(chains[1])
    fresh = LO.OrtShardChain(chains[1])
    seq = list(ids)
    values, indices = cached.step(seq)
    for _ in range(10):
        seq.append(int(indices[0]))
        values, indices = cached.step(seq[-1:])
        fresh.reset()
        full_values, full_indices = fresh.step(seq)
        np.testing.assert_allclose(values, full_values, atol=1e-5, rtol=0)
        assert indices[0] == full_indices[0]
        _assert_topk_matches(values, indices, model.reference_logits(seq)[-1], TOL_TINY)
    assert cached.past_len == len(seq)
    # The random model must not just repeat one token, or this test would prove little.
    assert len(set(seq[len(ids) :])) >= 4


def test_tiny_chunked_prefill_uses_offset_positions_and_mask(tiny):
    model, chains = tiny
    ids = model.encode("chunked prefill of a prompt")
    chain = LO.OrtShardChain(chains[2])
    chain.step(ids[:5])
    values, indices = chain.step(ids[5:])  # S > 1 with P > 0: positions and mask start at P
    _assert_topk_matches(values, indices, model.reference_logits(ids)[-1], TOL_TINY)


def test_tiny_shard_chains_give_identical_tokens(tiny):
    model, chains = tiny
    ids = model.encode(PROMPT)
    expected = L.reference_greedy(model, ids, 16)
    for n, arts in chains.items():
        assert LO.ort_greedy_generate(arts, ids, 16) == expected, f"{n}-shard chain differs"
    assert len(expected) == 16


def test_tiny_hidden_out_matches_reference_and_shapes(tiny):
    model, chains = tiny
    c = model.config
    ids = model.encode(PROMPT)
    s = len(ids)
    import onnxruntime as ort

    art = chains[3][1]  # layers [1, 3): hidden in, hidden out
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == art.meta["inputs"]
    assert [o.name for o in sess.get_outputs()] == art.meta["outputs"]
    empty = np.zeros(art.meta["kv_shape"], dtype=np.float32)
    hidden_in = model.reference_hidden(ids, 1).astype(np.float32)[None]
    feeds = {"hidden_in": hidden_in} | {name: empty for _, name in art.meta["state"]}
    outs = dict(zip(art.meta["outputs"], sess.run(None, feeds), strict=True))
    assert outs["hidden_out"].shape == (1, s, c.hidden)
    np.testing.assert_allclose(outs["hidden_out"][0], model.reference_hidden(ids, 3), atol=TOL_TINY, rtol=0)
    for i in (1, 2):  # GQA: the cache holds n_kv_heads, not n_heads
        assert outs[f"present_key_{i}"].shape == (1, c.n_kv_heads, s, c.head_dim)
        assert outs[f"present_value_{i}"].shape == (1, c.n_kv_heads, s, c.head_dim)


def test_tiny_onnx_contract_and_meta(tiny):
    model, chains = tiny
    c = model.config
    arts = chains[3]
    assert [a.meta["layer_range"] for a in arts] == [[0, 1], [1, 3], [3, 4]]
    assert [(a.meta["first"], a.meta["last"]) for a in arts] == [(True, False), (False, False), (False, True)]
    for art in arts:
        a, b = art.meta["layer_range"]
        g = onnx.load(str(art.path)).graph
        ins = {i.name: i for i in g.input}
        outs = {o.name: o for o in g.output}
        assert list(ins) == art.meta["inputs"] and list(outs) == art.meta["outputs"]
        assert art.meta["inputs"][0] == ("input_ids" if a == 0 else "hidden_in")
        expected_state = []
        for i in range(a, b):
            dims = [d.dim_value or d.dim_param for d in ins[f"past_key_{i}"].type.tensor_type.shape.dim]
            assert dims == [1, c.n_kv_heads, "past_len", c.head_dim]
            expected_state += [[f"present_key_{i}", f"past_key_{i}"], [f"present_value_{i}", f"past_value_{i}"]]
        assert art.meta["state"] == expected_state
        assert art.meta["kv_shape"] == [1, c.n_kv_heads, 0, c.head_dim]
        assert art.meta["config"] == c.as_dict() and art.meta["model"] == model.name
        assert art.meta["top_k"] == 64
        assert {n.op_type for n in g.node} <= ALLOWED_OPS
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)
        assert art.sha256 == file_sha256(art.path)
        assert orjson.loads((art.path.parent / "meta.json").read_bytes()) == art.meta
    last = onnx.load(str(arts[2].path)).graph
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in last.output}
    assert dims["topk_values"] == [1, 64] and dims["topk_indices"] == [1, 64]


def test_tiny_streamed_file_holds_the_weights(tiny):
    model, chains = tiny
    inits = {t.name: t for t in onnx.load(str(chains[1][0].path)).graph.initializer}
    for name in ("embed", "l0.wq", "l3.w_down", "final_norm"):
        np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), model.weights[name])
    assert "head" not in inits  # tied: the embedding serves as head, stored once


def test_build_is_cached_and_deterministic(tiny, tiny_cache, tmp_path, monkeypatch):
    model, chains = tiny
    monkeypatch.setenv("WEBPOOL_CACHE", str(tiny_cache))
    cached = LO.build_llama_onnx(model, 0, 2)
    assert cached.path == chains[2][0].path  # a cache hit, no rebuild
    monkeypatch.setenv("WEBPOOL_CACHE", str(tmp_path))
    rebuilt = LO.build_llama_onnx(model, 0, 2)  # an empty cache: built again, same bytes
    assert rebuilt.path != cached.path and rebuilt.sha256 == cached.sha256


def test_untied_head_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("WEBPOOL_CACHE", str(tmp_path))
    base = L.tiny_llama(1)
    rng = np.random.default_rng(7)
    weights = dict(base.weights, head=rng.standard_normal((512, 64)).astype(np.float32))
    model = L.LlamaModel("tiny-untied", base.config, weights, base.tokenizer, source_key="tiny-untied:7")
    arts = LO.build_shards(model, [(0, 3), (3, 4)], top_k=8)
    ids = model.encode(PROMPT)
    values, indices = LO.OrtShardChain(arts).step(ids)
    assert values.shape == (8,)
    _assert_topk_matches(values, indices, model.reference_logits(ids)[-1], TOL_TINY)


# ---------------------------------------------------------------------------------------------------
# RoPE convention of llama.cpp GGUFs


def _hf_to_gguf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj ([out, in]).
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_qk_inverts_the_gguf_permutation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 10))
    np.testing.assert_array_equal(L.unpermute_qk(_hf_to_gguf_permute(w, 3), 3), w)


def test_gguf_interleaved_rope_equals_rotate_half_after_unpermute():
    # llama.cpp applies interleaved RoPE to the GGUF (permuted) weights; we apply rotate-half RoPE to
    # unpermuted weights. Attention scores must be the same.
    c = L.LlamaConfig(
        n_layers=1,
        hidden=32,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        ffn=8,
        vocab=4,
        rope_base=1e4,
        rms_eps=1e-5,
        bos_id=0,
        eos_id=1,
        max_context=32,
    )
    rng = np.random.default_rng(1)
    s = 6
    x = rng.standard_normal((s, c.hidden))
    wq_gguf = rng.standard_normal((c.n_heads * c.head_dim, c.hidden))
    wk_gguf = rng.standard_normal((c.n_kv_heads * c.head_dim, c.hidden))
    cos, sin = L.rope_tables(c, s)
    half = c.head_dim // 2

    def heads(t, n):
        return t.reshape(s, n, c.head_dim).transpose(1, 0, 2)

    q_cpp = L.rope_interleaved(heads(x @ wq_gguf.T, c.n_heads), cos[:, :half], sin[:, :half])
    k_cpp = L.rope_interleaved(heads(x @ wk_gguf.T, c.n_kv_heads), cos[:, :half], sin[:, :half])
    q_hf = L.rope_rotate_half(heads(x @ L.unpermute_qk(wq_gguf, c.n_heads).T, c.n_heads), cos, sin)
    k_hf = L.rope_rotate_half(heads(x @ L.unpermute_qk(wk_gguf, c.n_kv_heads).T, c.n_kv_heads), cos, sin)
    np.testing.assert_allclose(q_cpp @ k_cpp[0].T, q_hf @ k_hf[0].T, atol=1e-9)
    # And the conventions do differ: mixing them (no unpermute) gives other scores.
    q_wrong = L.rope_rotate_half(heads(x @ wq_gguf.T, c.n_heads), cos, sin)
    k_wrong = L.rope_rotate_half(heads(x @ wk_gguf.T, c.n_kv_heads), cos, sin)
    assert not np.allclose(q_cpp @ k_cpp[0].T, q_wrong @ k_wrong[0].T, atol=1e-3)


def test_rope_tables_are_rotations():
    c = L.tiny_llama(0).config
    cos, sin = L.rope_tables(c, 50)
    assert cos.shape == (50, c.head_dim)
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, atol=1e-12)
    np.testing.assert_allclose(cos[:, 1], np.cos(np.arange(50) * c.rope_base ** (-2 / c.head_dim)))


# ---------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_typed_errors(tiny):
    model, chains = tiny
    for a, b in ((2, 2), (3, 1), (-1, 2), (0, 5)):
        with pytest.raises(L.LlamaError, match="layer range"):
            LO.build_llama_onnx(model, a, b)
    with pytest.raises(L.LlamaError, match="top_k"):
        LO.build_llama_onnx(model, top_k=0)
    with pytest.raises(L.LlamaError, match="tile"):
        LO.build_shards(model, [(0, 2), (3, 4)])
    with pytest.raises(L.LlamaError, match="end at 3"):
        LO.build_shards(model, [(0, 3)])
    with pytest.raises(L.LlamaError, match="tile"):
        LO.OrtShardChain([chains[2][1], chains[2][0]])
    with pytest.raises(L.LlamaError, match="token id"):
        model.reference_logits([1, 512])
    with pytest.raises(L.LlamaError, match="empty"):
        LO.ort_greedy_generate(chains[1], [], 4)
    with pytest.raises(L.LlamaError, match="max_context"):
        LO.ort_greedy_generate(chains[1], [5] * 250, 10)
    with pytest.raises(L.LlamaError, match="n_kv_heads"):
        L.LlamaConfig(
            n_layers=1,
            hidden=8,
            n_heads=3,
            n_kv_heads=2,
            head_dim=4,
            ffn=8,
            vocab=4,
            rope_base=1e4,
            rms_eps=1e-5,
            bos_id=0,
            eos_id=1,
            max_context=8,
        )
    bad = dict(model.weights)
    bad["l0.wq"] = bad["l0.wq"][:, :8]
    with pytest.raises(L.LlamaError, match=r"l0\.wq"):
        L.LlamaModel("bad", model.config, bad, model.tokenizer, "bad")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(512)
    text = "héllo wörld ✓ 123"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    with pytest.raises(TokenizerError):
        tok.decode([512])


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real weights)


@pytest.fixture(scope="module")
def smol():
    model = L.load_smollm2()
    return model, LO.build_llama_onnx(model)


@pytest.mark.slow
def test_smollm2_tokenizer_follows_the_gguf(smol):
    import gguf

    model, _ = smol
    reader = gguf.GGUFReader(L.smollm2_gguf_path()[0])
    assert model.config.bos_id == int(reader.fields["tokenizer.ggml.bos_token_id"].contents())
    assert model.config.eos_id == int(reader.fields["tokenizer.ggml.eos_token_id"].contents())
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ids = model.encode("The capital of France is")
    assert ids[0] != model.config.bos_id  # llama.cpp adds no BOS for this file
    assert [tokens[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    for text in ["Hello world! 12345 café 日本語\n\n  x", "<|im_start|>user\nhi<|im_end|>\n", "  a\tb "]:
        assert model.decode(model.encode(text)) == text
    assert len(model.encode("12345")) == 5  # smollm pre-tokenizer: every digit alone
    assert model.encode("<|im_start|><|im_end|>") == [model.config.bos_id, model.config.eos_id]


@pytest.mark.slow
def test_smollm2_onnx_matches_reference(smol):
    model, art = smol
    ids = model.encode("The capital of France is")
    values, indices = LO.OrtShardChain([art]).step(ids)
    _assert_topk_matches(values, indices, model.reference_logits(ids)[-1], TOL_SMOL)


@pytest.mark.slow
def test_smollm2_greedy_paris_and_three_shards(smol):
    model, art = smol
    ids = model.encode("The capital of France is")
    full = LO.ort_greedy_generate([art], ids, 16)
    assert "Paris" in model.decode(full), model.decode(full)
    shards = LO.build_shards(model, [(0, 10), (10, 20), (20, 30)])
    assert LO.ort_greedy_generate(shards, ids, 16) == full


def test_the_cache_is_under_the_home_directory_unless_webpool_cache_says_otherwise(tmp_path, monkeypatch):
    """README: generated ONNX files go to ``~/.cache/webpool`` (owner-only); ``WEBPOOL_CACHE`` overrides."""
    from sharding.models.cache import cache_dir

    monkeypatch.delenv("WEBPOOL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "webpool"
    assert (cache_dir().stat().st_mode & 0o777) == 0o700
    monkeypatch.setenv("WEBPOOL_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
