"""all-MiniLM-L6-v2: the built ONNX graph against the float64 numpy reference, tokenizer input
checks, and the build cache. Pure: no Ray, no browser."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest

from events.errors import InputError
from sharding.models import minilm
from sharding.models.cache import file_sha256
from sharding.models.minilm import (
    EMBED_DIM,
    MAX_TOKENS,
    MiniLMArtifact,
    build_minilm_onnx,
    reference_embed,
    tokenize,
)

TOL = 1e-5
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, and I think everybody should see it as soon as it comes out!",
    "Hi",
    "Ray actors drive headless browsers that run ONNX models with onnxruntime-web.",
]
# Ops onnxruntime-web's wasm backend runs; the graph must stay inside this set.
WASM_SAFE_OPS = {
    "Add", "Cast", "Div", "Erf", "Gather", "MatMul", "Max", "Mul", "Pow", "ReduceMean", "ReduceSum",
    "Reshape", "Shape", "Slice", "Softmax", "Sqrt", "Sub", "Transpose", "Unsqueeze",
}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # A fresh cache per run, so the build itself is exercised every time (about 1 s).
    root = tmp_path_factory.mktemp("webpool-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEBPOOL_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def artifact(cache_root: Path) -> MiniLMArtifact:
    return build_minilm_onnx()


def _session(path: Path, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# The raw graph (no fusions) is what we wrote; the optimised one is what runtimes actually execute.
@pytest.fixture(scope="module", params=["raw", "optimized"])
def session(request: pytest.FixtureRequest, artifact: MiniLMArtifact) -> ort.InferenceSession:
    level = {"raw": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
             "optimized": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[request.param]
    return _session(artifact.path, level)


def _onnx_embed(session: ort.InferenceSession, texts: list[str]) -> np.ndarray:
    (out,) = session.run(["embedding"], tokenize(texts))
    return out


def test_onnx_matches_reference_batched(session: ort.InferenceSession) -> None:
    batch = tokenize(TEXTS)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding to test masking"
    got = _onnx_embed(session, TEXTS)
    want = reference_embed(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), EMBED_DIM)
    assert got.dtype == want.dtype == np.float32
    assert np.abs(got - want).max() <= TOL


def test_padding_does_not_change_embeddings(session: ort.InferenceSession) -> None:
    batched_onnx = _onnx_embed(session, TEXTS)
    batched_ref = reference_embed(TEXTS)
    for i, text in enumerate(TEXTS):
        alone_onnx = _onnx_embed(session, [text])
        alone_ref = reference_embed([text])
        assert np.abs(alone_onnx[0] - batched_onnx[i]).max() <= TOL, text
        assert np.abs(alone_ref[0] - batched_ref[i]).max() <= TOL, text
        assert np.abs(alone_onnx[0] - alone_ref[0]).max() <= TOL, text


def test_known_similarity_and_unit_norm(session: ort.InferenceSession) -> None:
    # Published sentence-transformers figure for this pair with all-MiniLM-L6-v2.
    pair = ["A man is eating food.", "A man is eating a piece of bread."]
    unrelated = "The stock market fell sharply on Tuesday."
    for emb in (reference_embed([*pair, unrelated]), _onnx_embed(session, [*pair, unrelated])):
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=TOL)
        cos = float(emb[0] @ emb[1])  # unit vectors: dot product is the cosine
        assert abs(cos - 0.7553) <= 0.002, cos
        assert float(emb[0] @ emb[2]) < cos - 0.3


def test_truncates_long_text_at_max_tokens(session: ort.InferenceSession) -> None:
    long_text = " ".join(f"word{i}" for i in range(400))
    batch = tokenize([long_text, "short"])
    assert batch["input_ids"].shape == (2, MAX_TOKENS)
    assert batch["input_ids"][0, 0] == 101 and batch["input_ids"][0, -1] == 102  # [CLS] ... [SEP]
    assert batch["attention_mask"].sum(axis=1).tolist() == [MAX_TOKENS, 3]
    got = _onnx_embed(session, [long_text])
    assert np.abs(got - reference_embed([long_text])).max() <= TOL


def test_the_references_erf_is_math_erf_at_every_element() -> None:
    x = np.linspace(-7.0, 7.0, 6 * 35).reshape(6, 35)
    assert np.array_equal(minilm._erf(x), np.array([[math.erf(v) for v in row] for row in x]))


def test_tokenize_shapes_and_types() -> None:
    batch = tokenize(["Hi", "A man is eating food."])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    lengths = batch["attention_mask"].sum(axis=1)
    for arr in batch.values():
        assert arr.dtype == np.int64
        assert arr.shape == (2, int(lengths.max()))  # padded to the batch's longest, not to a fixed length
    assert lengths.tolist() == [3, 8]
    assert batch["input_ids"][0, 3:].tolist() == [0] * 5  # [PAD]
    assert not batch["token_type_ids"].any()


def test_join_of_requests_equals_tokenizing_them_together() -> None:
    """The batcher's join: requests tokenized apart (each padded to its own longest text) become the batch
    tokenize would have made of all their texts, rows in order."""
    requests = [["Hi"], ["A man is eating food.", "ok"], ["A much longer sentence than the others in here."], ["x"]]
    joined = minilm.join([tokenize(texts) for texts in requests])
    together = tokenize([t for texts in requests for t in texts])
    assert set(joined) == set(together)
    for name, arr in together.items():
        assert joined[name].dtype == arr.dtype and np.array_equal(joined[name], arr), name
    alone = tokenize(["one request"])
    assert minilm.join([alone]) is alone


@pytest.mark.parametrize(
    ("texts", "field"),
    [
        ([], "texts"),
        ("a bare string", "texts"),
        (None, "texts"),
        ([""], "texts[0]"),
        (["fine", "   "], "texts[1]"),
        (["fine", 3], "texts[1]"),
        (["fine", "also fine", b"bytes"], "texts[2]"),
    ],
)
def test_tokenize_rejects_bad_input(texts: object, field: str) -> None:
    with pytest.raises(InputError) as info:
        tokenize(texts)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_input_error_survives_pickling() -> None:
    # Ray ships exceptions between processes by pickling them.
    err = pickle.loads(pickle.dumps(InputError("texts[1]", "expected str, got int")))
    assert isinstance(err, InputError)
    assert err.field == "texts[1]" and str(err) == "texts[1]: expected str, got int"


def test_graph_io_and_ops(artifact: MiniLMArtifact) -> None:
    model = onnx.load(str(artifact.path))
    ints = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    assert ints == [(n, onnx.TensorProto.INT64) for n in ("input_ids", "attention_mask", "token_type_ids")]
    (out,) = model.graph.output
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert (out.name, out.type.tensor_type.elem_type, dims) == ("embedding", onnx.TensorProto.FLOAT,
                                                               ["batch", EMBED_DIM])
    assert {n.op_type for n in model.graph.node} <= WASM_SAFE_OPS
    assert all(init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
               for init in model.graph.initializer)
    assert [i["name"] for i in artifact.meta["inputs"]] == [n for n, _ in ints]
    want_out = [{"name": "embedding", "dtype": "float32", "shape": ["batch", EMBED_DIM]}]
    assert artifact.meta["outputs"] == want_out
    assert artifact.meta["embed_dim"] == EMBED_DIM and artifact.meta["max_tokens"] == MAX_TOKENS


def test_cache_reuses_the_build(artifact: MiniLMArtifact, cache_root: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert artifact.path.is_relative_to(cache_root)
    assert file_sha256(artifact.path) == artifact.sha256
    assert orjson.loads((artifact.path.parent / "meta.json").read_bytes()) == artifact.meta
    stat = artifact.path.stat()

    def must_not_build(folder: Path) -> None:
        raise AssertionError("second call rebuilt the model")

    monkeypatch.setattr(minilm, "_build_into", must_not_build)
    again = build_minilm_onnx()
    assert (again.path, again.sha256) == (artifact.path, artifact.sha256)
    assert again.meta == artifact.meta
    after = artifact.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
