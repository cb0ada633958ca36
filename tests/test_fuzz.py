"""Fuzzing the boundaries: request validation, the MiniLM tokenizer, the event codec, the segment reader.

Each property says what may come out of a boundary for arbitrary input: a valid result, or one of the
typed errors that boundary promises (InputError with a field; the events package's errors). Anything
else is a bug. The inputs include what once broke these boundaries: ints past every size limit (int64,
float, Python's 4300-digit str()), values nested deeper than the recursion limit, lone surrogates, and
damage anywhere in a segment's header, the schema-version value included; the plain tests at the end of
each section pin those cases with concrete inputs. A bug found here is fixed, then pinned by a plain
test with the input that found it.

No Ray and no browser here; the whole module runs in well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
import traceback
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.constants import MAX_BATCH, MAX_NEW_TOKENS, MAX_TEXT_CHARS
from actors.decisions.validation import EmbeddingRequest, GenerationRequest, embedding_request, generation_request
from events import errors as event_errors
from events.codec import decode, encode
from events.errors import (
    EventError,
    FailureCategory,
    InputError,
    InvalidEventError,
    MalformedPayloadError,
    SchemaVersionError,
    UnknownEventKindError,
)
from events.schema import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    BrowserConnected,
    BrowserLaunched,
    Event,
    ModelLoaded,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    SessionOpened,
    TokensAppended,
)
from events.store import EventStore
from sharding.models import minilm
from sharding.models.registry import SPECS

# --- shared strategies ------------------------------------------------------------------------------

# Any code point: ordinary text, lone surrogates (which UTF-8 cannot carry), NUL and invisible ones.
SPECIAL_CHARS = "\x00\t\n\r \u00a0\u200b\u2028\ufeff\U0010ffff"
any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(SPECIAL_CHARS))
# Ordinary text, or text with one of those characters inserted. Not st.text(any_char): it merges the
# alphabet into one pool of code points, where the 2 048 surrogates are almost never drawn.
any_text = st.one_of(st.text(max_size=24),
                     st.builds(lambda a, c, b: a + c + b, st.text(max_size=12), any_char, st.text(max_size=12)))
# Texts around the length limit, built by repetition (hypothesis does not draw 20 000-char strings).
huge_text = st.builds(lambda unit, n: unit * n, st.sampled_from(["a", " ", "é", "\x00", "ab c", "\U0001f600"]),
                      st.sampled_from([MAX_TEXT_CHARS - 1, MAX_TEXT_CHARS, MAX_TEXT_CHARS + 1, 3 * MAX_TEXT_CHARS]))
HUGE = 10**5000  # str()/repr() of an int this long raises ValueError (Python's 4300-digit limit)
# Ints past each limit the code meets: int64, float (2**1024), the 4300-digit str() limit. Drawn by
# index: hypothesis repr()s its strategies, and a strategy holding HUGE could not be repr()ed.
HUGE_INTS = [2**63, -(2**63) - 1, 2**64 + 1, 2**1024, -(2**1024), 10**4300, HUGE, -HUGE]


def _huge_int(index: int) -> int:
    return HUGE_INTS[index]


huge_ints = st.integers(0, len(HUGE_INTS) - 1).map(_huge_int)
# Ints past the float range and the str() limit are typed errors too (see
# test_event_fields_with_huge_ints_raise_invalid_event_error); hypothesis draws them by index.
codec_ints = st.one_of(st.integers(-(2**1000), 2**1000), huge_ints)
big_ints = st.one_of(codec_ints, huge_ints)

odd_values = st.sampled_from([
    Ellipsis, object(), float, np.float32(0.5), np.int64(3), np.float64("nan"), np.array([1, 2]),
    np.str_("text"), b"text", bytearray(b"x"), range(3), 1 + 2j, frozenset({1}),
])


def _junk(ints: st.SearchStrategy) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(hashables, junk): arbitrary Python values built from ``ints``. Values nested past the recursion
    limit are left to test_deeply_nested_values_give_an_input_error: hypothesis cannot print them."""
    scalars = st.one_of(
        st.none(), st.booleans(), ints, st.floats(), any_text, huge_text, st.binary(max_size=16), odd_values,
    )
    hashables = st.one_of(st.none(), st.booleans(), ints, st.floats(), any_text, st.tuples(ints, any_text))
    junk = st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                                st.dictionaries(hashables, inner, max_size=4)),
        max_leaves=10,
    )
    return hashables, junk


hashables, junk = _junk(big_ints)  # for the request boundaries
_, codec_junk = _junk(codec_ints)  # for the event codec, see codec_ints


def _mostly(valid: st.SearchStrategy, other: st.SearchStrategy, k: int = 4) -> st.SearchStrategy:
    """``valid`` in about k draws of k + 1, else ``other``: with each of a request's up to seven arguments
    as likely invalid as not, almost no request would get past its first check."""
    return st.integers(0, k).flatmap(lambda i: valid if i else other)


def fuzz(examples: int, *extra_checks: HealthCheck) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *extra_checks])


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, (list, tuple)):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False


# --- request validation at the pool boundary ---------------------------------------------------------

MODEL_NAMES = sorted(SPECS)
model_names = st.one_of(st.sampled_from(MODEL_NAMES), st.sampled_from(MODEL_NAMES).map(str.upper), any_text, junk)
text_values = _mostly(any_text, st.one_of(huge_text, junk), k=3)
embedding_inputs = st.one_of(
    junk,
    st.fixed_dictionaries({"text": text_values}),
    st.fixed_dictionaries({"texts": st.one_of(st.lists(text_values, max_size=5),
                                              st.lists(st.just("ok"), min_size=MAX_BATCH, max_size=MAX_BATCH + 2),
                                              junk)}),
    st.fixed_dictionaries({"text": text_values, "texts": st.lists(text_values, max_size=2)}),
    st.dictionaries(st.one_of(st.sampled_from(["text", "texts", "Text", ""]), hashables), junk, max_size=3),
)


def _assert_input_error(exc: InputError, fields: re.Pattern[str]) -> None:
    assert isinstance(exc.field, str) and exc.field, exc
    assert fields.fullmatch(exc.field), exc.field
    assert str(exc).startswith(exc.field + ": ")


EMBEDDING_FIELDS = re.compile(r"model_name|inputs|inputs\.text|inputs\.texts(\[\d+\])?")
GENERATION_FIELDS = re.compile(r"model_name|prompt|max_new_tokens|shards|temperature|top_p|seed")


@fuzz(1000)
@given(_mostly(st.just("all-minilm-l6-v2"), model_names),
       _mostly(st.one_of(st.fixed_dictionaries({"text": text_values}),
                         st.fixed_dictionaries({"texts": st.lists(text_values, min_size=1, max_size=4)})),
               embedding_inputs))
def test_embedding_request_returns_a_request_or_an_input_error(model_name, inputs):
    try:
        spec, req = embedding_request(model_name, inputs)
    except InputError as exc:
        _assert_input_error(exc, EMBEDDING_FIELDS)
        return
    assert spec.task == "text_embedding" and isinstance(req, EmbeddingRequest)
    assert 1 <= len(req.texts) <= MAX_BATCH
    assert req.single == (set(inputs) == {"text"}) and (len(req.texts) == 1 if req.single else True)
    for text in req.texts:
        assert isinstance(text, str) and text.strip() and len(text) <= MAX_TEXT_CHARS
        assert not _has_surrogate(text)  # UTF-8 can carry it to the tokenizer


gen_counts = st.one_of(st.integers(-3, MAX_NEW_TOKENS + 3), st.sampled_from([0, 1, MAX_NEW_TOKENS]), junk)
gen_floats = st.one_of(st.floats(), st.floats(0, 1), st.sampled_from([0, 1, 0.0, 1.0, -0.0, True, False]), junk)
gen_seeds = st.one_of(st.none(), st.integers(0, 2**63 - 1), st.integers(),
                      st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64 + 1]), junk)


@fuzz(1000)
@given(_mostly(st.sampled_from(["tiny-llama", "smollm2-135m"]), model_names), text_values,
       _mostly(st.integers(1, MAX_NEW_TOKENS), gen_counts), _mostly(st.integers(1, 64), gen_counts),
       _mostly(st.floats(0, 2), gen_floats), _mostly(st.floats(0, 1, exclude_min=True), gen_floats),
       _mostly(st.one_of(st.none(), st.integers(0, 2**63 - 1)), gen_seeds))
def test_generation_request_returns_a_request_or_an_input_error(model_name, prompt, max_new_tokens, shards,
                                                                 temperature, top_p, seed):
    try:
        spec, req = generation_request(model_name, prompt, max_new_tokens, shards, temperature, top_p, seed)
    except InputError as exc:
        _assert_input_error(exc, GENERATION_FIELDS)
        return
    assert spec.task == "text_generation" and isinstance(req, GenerationRequest)
    assert isinstance(req.prompt, str) and req.prompt.strip() and len(req.prompt) <= MAX_TEXT_CHARS
    assert not _has_surrogate(req.prompt)
    assert type(req.max_new_tokens) is int and 1 <= req.max_new_tokens <= MAX_NEW_TOKENS
    assert type(req.shards) is int and req.shards >= 1
    assert type(req.temperature) is float and math.isfinite(req.temperature) and req.temperature >= 0
    assert type(req.top_p) is float and 0 < req.top_p <= 1
    # The seed goes to np.random.default_rng and into a SessionOpened event (int64): both need [0, 2**63).
    assert req.seed is None or (type(req.seed) is int and 0 <= req.seed < 2**63)
    if req.temperature > 0:
        assert type(req.seed) is int


@fuzz(400)
@given(st.lists(any_text, min_size=1, max_size=4))
def test_texts_the_pool_accepts_tokenize(texts):
    """What embedding_request lets through reaches minilm.tokenize (the next step in the pool) and works;
    what it refuses for a lone surrogate, tokenize refuses too."""
    try:
        _, req = embedding_request("all-minilm-l6-v2", {"texts": texts})
    except InputError as exc:
        if _has_surrogate(texts):
            assert re.fullmatch(r"inputs\.texts\[\d+\]", exc.field), exc.field
            with pytest.raises(InputError):
                minilm.tokenize(texts)
        return
    assert not _has_surrogate(texts)
    _check_tokens(req.texts, minilm.tokenize(req.texts))


def _check_tokens(texts: list[str], feeds: dict[str, np.ndarray]) -> None:
    ids, mask, types = feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
    assert ids.dtype == mask.dtype == types.dtype == np.int64
    assert ids.shape == mask.shape == types.shape and ids.shape[0] == len(texts)
    assert 2 <= ids.shape[1] <= minilm.MAX_TOKENS
    assert (ids[:, 0] == 101).all()  # [CLS]
    lengths = mask.sum(axis=1)
    for row, n in zip(ids, lengths, strict=True):
        assert row[n - 1] == 102  # [SEP] closes every text, also a truncated one
    assert set(np.unique(mask)) <= {0, 1} and (types == 0).all()


@fuzz(400)
@given(st.one_of(st.lists(text_values, max_size=4), st.tuples(any_text), junk))
def test_tokenize_gives_token_arrays_or_an_input_error(texts):
    try:
        feeds = minilm.tokenize(texts)
    except InputError as exc:
        assert isinstance(exc.field, str) and re.fullmatch(r"texts(\[\d+\])?", exc.field), exc.field
        return
    assert not _has_surrogate(list(texts))
    _check_tokens(list(texts), feeds)


@pytest.mark.parametrize(("call", "field"), [
    (lambda: embedding_request(HUGE, {"text": "x"}), "model_name"),
    (lambda: embedding_request("all-minilm-l6-v2", {HUGE: "x"}), "inputs"),
    (lambda: generation_request("tiny-llama", "hi", HUGE, 1, 0.0, 1.0, None), "max_new_tokens"),
    (lambda: generation_request("tiny-llama", "hi", 4, -HUGE, 0.0, 1.0, None), "shards"),
    (lambda: generation_request("tiny-llama", "hi", 4, 1, 10**400, 1.0, None), "temperature"),
    (lambda: generation_request("tiny-llama", "hi", 4, 1, 0.0, HUGE, None), "top_p"),
    (lambda: generation_request("tiny-llama", "hi", 4, 1, 0.7, 1.0, HUGE), "seed"),
], ids=["model_name", "inputs-key", "max_new_tokens", "shards", "temperature", "top_p", "seed"])
def test_huge_ints_give_an_input_error(call, field):
    """Ints past the float range and the 4300-digit str() limit are refused with a bounded message."""
    with pytest.raises(InputError) as info:
        call()
    assert info.value.field == field and len(str(info.value)) < 300, str(info.value)[:300]


def _nested(depth: int, wrap: Any) -> Any:
    value: Any = wrap("x")
    for _ in range(depth):
        value = wrap(value)
    return value


NESTINGS = {"list": lambda v: [v], "tuple": lambda v: (v,), "dict": lambda v: {"text": v}}
DEEP_CALLS = {  # each argument of each boundary, given a value v
    "model_name": (lambda v: embedding_request(v, {"text": "x"}), "model_name"),
    "inputs": (lambda v: embedding_request("all-minilm-l6-v2", v), "inputs.*"),
    "inputs-key": (lambda v: embedding_request("all-minilm-l6-v2", {v if isinstance(v, tuple) else "k": v}),
                   "inputs"),
    "text": (lambda v: embedding_request("all-minilm-l6-v2", {"text": v}), "inputs.text"),
    "texts": (lambda v: embedding_request("all-minilm-l6-v2", {"texts": v}), r"inputs\.texts.*"),
    "prompt": (lambda v: generation_request("tiny-llama", v, 4, 1, 0.0, 1.0, None), "prompt"),
    "max_new_tokens": (lambda v: generation_request("tiny-llama", "hi", v, 1, 0.0, 1.0, None), "max_new_tokens"),
    "shards": (lambda v: generation_request("tiny-llama", "hi", 4, v, 0.0, 1.0, None), "shards"),
    "temperature": (lambda v: generation_request("tiny-llama", "hi", 4, 1, v, 1.0, None), "temperature"),
    "top_p": (lambda v: generation_request("tiny-llama", "hi", 4, 1, 0.0, v, None), "top_p"),
    "seed": (lambda v: generation_request("tiny-llama", "hi", 4, 1, 0.7, 1.0, v), "seed"),
    "tokenize": (lambda v: minilm.tokenize(v), r"texts(\[\d+\])?"),
    "tokenize-item": (lambda v: minilm.tokenize(["ok", v]), r"texts\[1\]"),
}


@pytest.mark.parametrize("nesting", sorted(NESTINGS))
@pytest.mark.parametrize("where", sorted(DEEP_CALLS))
def test_deeply_nested_values_give_an_input_error(where, nesting):
    """A value nested far past the recursion limit, passed anywhere, is refused with a bounded message
    (no RecursionError from formatting it). Not fuzzed: hypothesis cannot print such a value."""
    call, field = DEEP_CALLS[where]
    with pytest.raises(InputError) as info:
        call(_nested(20_000, NESTINGS[nesting]))
    assert re.fullmatch(field, info.value.field) and len(str(info.value)) < 300, str(info.value)[:300]


def test_text_with_a_lone_surrogate_is_refused_before_tokenizing():
    """UTF-8 cannot carry a lone surrogate: both the pool's validation and the tokenizer refuse it."""
    text = "a\ud800b"
    with pytest.raises(InputError) as info:
        embedding_request("all-minilm-l6-v2", {"text": text})
    assert info.value.field == "inputs.text"
    with pytest.raises(InputError) as info:
        minilm.tokenize(["ok", text])
    assert info.value.field == "texts[1]"


@pytest.mark.parametrize("seed", [-1, 0, 2**63 - 1, 2**63, 2**64 + 1, -HUGE],
                         ids=["-1", "0", "2**63-1", "2**63", "2**64+1", "-10**5000"])
def test_a_seed_is_accepted_only_where_it_works_downstream(seed):
    """Seeds in [0, 2**63) are accepted and work where the pool uses them; all others are refused."""
    try:
        _, req = generation_request("tiny-llama", "hi", 4, 1, 0.7, 0.9, seed)
    except InputError as exc:
        assert exc.field == "seed" and not 0 <= seed < 2**63
        return
    assert 0 <= seed < 2**63
    np.random.default_rng(req.seed)  # what the coordinator does with it
    SessionOpened(session_id="s", model="tiny-llama", plan={"seed": req.seed})  # what the pool records


def test_a_prompt_with_a_lone_surrogate_is_refused():
    """Refused as 'prompt' before it reaches a tokenizer's encode (which would fail untyped)."""
    from sharding.models.registry import llama_model

    with pytest.raises(InputError) as info:
        generation_request("tiny-llama", "a\udfffb", 4, 1, 0.0, 1.0, None)
    assert info.value.field == "prompt"
    _, req = generation_request("tiny-llama", "a\u00e9b", 4, 1, 0.0, 1.0, None)
    assert llama_model("tiny-llama").tokenizer.encode(req.prompt)  # the next step in pool.generate


# --- the event codec ---------------------------------------------------------------------------------

# JSON data as event dict fields hold it: int64 ints, finite floats, any text (surrogates included).
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner),
                            st.dictionaries(any_text, inner, max_size=3)),
    max_leaves=12,
)


def _valid_strategy(hint: Any) -> st.SearchStrategy:
    scalars_by_type: dict[Any, st.SearchStrategy] = {
        str: any_text,
        int: st.integers(0, 2**63 - 1),
        float: st.one_of(st.floats(0, allow_nan=False, allow_infinity=False), st.integers(0, 2**53)),
        bool: st.booleans(),
        dict: st.dictionaries(any_text, json_values, max_size=4),
        FailureCategory: st.sampled_from([*FailureCategory, *(c.value for c in FailureCategory)]),
    }
    if hint in scalars_by_type:
        return scalars_by_type[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return scalars_by_type[dict]
    if origin is tuple:
        inner = _valid_strategy(args[0])
        return st.one_of(st.lists(inner, max_size=5), st.lists(inner, max_size=5).map(tuple))
    inner_hint = next(a for a in args if a is not type(None))
    return st.one_of(st.none(), _valid_strategy(inner_hint))


def _event_strategy(cls: type[Event], junk_rate: bool) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        s = _valid_strategy(hints[f.name])
        fields[f.name] = st.one_of(s, codec_junk) if junk_rate else s
    return st.fixed_dictionaries(fields)


KINDS = sorted(EVENT_TYPES)
# One strategy per kind, drawn through a kind so that every kind gets its share of examples.
field_values = st.sampled_from(KINDS).flatmap(
    lambda kind: st.tuples(st.just(kind), _event_strategy(EVENT_TYPES[kind], junk_rate=False)))
field_values_or_junk = st.sampled_from(KINDS).flatmap(
    lambda kind: st.tuples(st.just(kind), _event_strategy(EVENT_TYPES[kind], junk_rate=True)))


def _round_trip(kind: str, values: dict[str, Any]) -> None:
    cls = EVENT_TYPES[kind]
    try:
        event = cls(**values)
    except InvalidEventError:
        return
    try:
        payload = encode(event)
    except InvalidEventError as exc:
        # The only thing a valid event may hold that JSON cannot carry is a lone surrogate.
        assert _has_surrogate([getattr(event, n) for n in cls._NAMES]), exc
        return
    assert not _has_surrogate([getattr(event, n) for n in cls._NAMES])
    assert decode(kind, payload) == event
    assert decode(kind, payload, trusted=True) == event
    assert encode(decode(kind, payload)) == payload
    assert event.subject == (getattr(event, cls.SUBJECT_FIELD) if cls.SUBJECT_FIELD else "")


@fuzz(720)
@given(field_values)
def test_every_kind_round_trips_through_the_codec(kind_values):
    _round_trip(*kind_values)


@fuzz(600)
@given(field_values_or_junk)
def test_building_from_junk_fields_raises_only_invalid_event_error(kind_values):
    _round_trip(*kind_values)


TYPED_DECODE_ERRORS = (SchemaVersionError, UnknownEventKindError, MalformedPayloadError)
kind_names = st.one_of(st.sampled_from(KINDS), any_text, st.sampled_from(KINDS).map(lambda k: k.lower() + " "))
versions = st.one_of(st.just(SCHEMA_VERSION), st.integers(-3, SCHEMA_VERSION + 3), codec_ints)


def _assert_typed(exc: Exception) -> None:
    assert isinstance(exc, TYPED_DECODE_ERRORS), "".join(traceback.format_exception(exc))
    assert type(exc).__module__ == event_errors.__name__


@fuzz(800)
@given(kind_names, st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{}", b"[]", b"null", b"{\"a\":"])),
       versions, st.booleans())
def test_decode_of_arbitrary_bytes_raises_only_typed_errors(kind, payload, version, trusted):
    try:
        event = decode(kind, payload, version, trusted=trusted)
    except Exception as exc:
        _assert_typed(exc)
        return
    assert isinstance(event, EVENT_TYPES[kind])  # e.g. b'{"browser_id": "x"}' for BrowserConnected


# Payloads that are JSON objects (the interesting case: past the parser), written with the standard
# library so they can hold what orjson never writes: ints past 64 bits, NaN/Infinity, surrogate escapes.
def _payload_for(kind: str, names_exact: bool | None = None) -> st.SearchStrategy:
    """JSON object payloads for ``kind``: with exactly its field names (True), other names (False), or either."""
    names = sorted(EVENT_TYPES[kind]._FIELDS)
    value = st.one_of(json_values, codec_junk.filter(_jsonable), st.integers(), st.floats())
    exact = st.fixed_dictionaries({n: value for n in names})
    other = st.dictionaries(st.one_of(st.sampled_from(names), any_text), value, max_size=len(names) + 1).filter(
        lambda d: d.keys() != set(names))
    chosen = {True: exact, False: other, None: st.one_of(exact, other)}[names_exact]
    return chosen.map(lambda d: json.dumps(d, allow_nan=True).encode())


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


@fuzz(700)
@given(st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), _payload_for(k))))
def test_decode_of_json_objects_gives_an_event_or_a_typed_error(kind_payload):
    kind, payload = kind_payload
    try:
        event = decode(kind, payload)
    except Exception as exc:
        _assert_typed(exc)
        return
    # Whatever decoding accepts is a valid event: it encodes, and decodes to itself.
    assert isinstance(event, EVENT_TYPES[kind])
    again = encode(event)
    assert decode(kind, again) == event
    # The trusted path (the store's, for checksummed payloads it wrote itself) agrees on valid payloads.
    assert decode(kind, again, trusted=True) == event


@fuzz(300)
@given(st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), _payload_for(k, names_exact=False))))
def test_trusted_decode_checks_field_names(kind_payload):
    # With the right names and wrong values trusted decode may raise anything: it is documented to skip
    # value checks, for payloads whose checksum proves this code wrote them. Only names are fuzzed here.
    kind, payload = kind_payload
    with pytest.raises(TYPED_DECODE_ERRORS):
        decode(kind, payload, trusted=True)


@pytest.mark.parametrize("call", [
    lambda: TokensAppended("s", (HUGE,)),
    lambda: OperationCompleted("op", 1.0, {"n": HUGE}),
    lambda: OperationCompleted("op", 2**1024, {}),
    lambda: decode("BrowserConnected", b'{"browser_id": "b"}', HUGE),
], ids=["int-field", "json-field", "float-field", "decode-version"])
def test_event_fields_with_huge_ints_raise_invalid_event_error(call):
    with pytest.raises((InvalidEventError, SchemaVersionError)):
        call()


# --- the segment reader: damaged tails -----------------------------------------------------------------

SEGMENT_BYTES = 4096  # the store's minimum: small segments, so a few batches span several of them


def _workload() -> list[tuple[list[Event], str | None]]:
    batches: list[tuple[list[Event], str | None]] = [
        ([BrowserLaunched("b1", "chromium", ("wasm", "webgpu"), 4242, "node-1", False), BrowserConnected("b1"),
          ModelLoaded("b1", "all-minilm-l6-v2", None, "ab" * 32, "wasm", 812.5)], "launch"),
        ([SessionOpened("s1", "smollm2-135m", {"shards": [{"browser_id": "b1", "layers": [0, 30]}], "seed": None})],
         None),
    ]
    for i in range(40):
        end = (OperationFailed(f"op{i}", FailureCategory.TIMEOUT, "no answer in 60 s") if i % 5 == 3
               else OperationCompleted(f"op{i}", 3.25 + i, {"tokens": i, "backend": "wasm"}))
        events = [OperationStarted(f"op{i}", "all-minilm-l6-v2", "b1", "infer", f"{i:016x}"), end,
                  TokensAppended("s1", tuple(range(i, i + 1 + i % 4)))]
        batches.append((events, f"batch-{i}" if i % 3 else None))
    return batches


@dataclasses.dataclass(frozen=True)
class BaseLog:
    root: Path
    records: list
    last_segment: str  # relative path of the newest segment
    last_first_seq: int  # seq of its first event
    header_end: int  # where its first batch begins
    batch_ends: list[int]  # byte offset after each of its batches
    batch_last_seqs: list[int]  # seq of the last event in each of its batches


@pytest.fixture(scope="module")
def base_log(tmp_path_factory) -> BaseLog:
    root = tmp_path_factory.mktemp("fuzz-base") / "log"
    records = []
    with EventStore.open(root, fsync="never", segment_bytes=SEGMENT_BYTES) as store:
        for events, batch_id in _workload():
            records += store.append(events, batch_id=batch_id)
    segments = sorted((root / "segments").glob("*.arrows"))
    assert len(segments) >= 3, "the workload should span several segments"
    last = segments[-1]
    data = last.read_bytes()
    src = pa.BufferReader(data)
    reader = ipc.open_stream(src)
    header_end = src.tell()
    first_seq = int(last.stem)
    ends, last_seqs, seq = [], [], first_seq - 1
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        ends.append(src.tell())
        seq += batch.num_rows
        last_seqs.append(seq)
    assert last_seqs[-1] == records[-1].seq and len(ends) >= 2
    return BaseLog(root, records, f"segments/{last.name}", first_seq, header_end, ends, last_seqs)


def _version_value_span(data: bytes, header_end: int) -> tuple[int, int]:
    """Byte range of the value of webpool.schema_version in a segment header: a flatbuffer string
    (int32 length, bytes, NUL), the only one-character string there."""
    pattern = b"\x01\x00\x00\x00" + str(SCHEMA_VERSION).encode() + b"\x00"
    starts = [m.start() + 4 for m in re.finditer(re.escape(pattern), data[:header_end])]
    assert len(starts) == 1 and b"webpool.schema_version" in data[:header_end], starts
    return starts[0], starts[0] + 1


class Outcome(typing.NamedTuple):
    kept: int  # events readable after reopening
    refused_newer: bool  # the store refused the tail as written by a newer schema


def _reopen_damaged(base: BaseLog, damaged: bytes, workdir: Path) -> Outcome:
    """Copy the base log, replace its newest segment by ``damaged``, reopen, read, append, reopen."""
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        shutil.copytree(base.root, root / "log", ignore=shutil.ignore_patterns("LOCK"))
        (root / "log" / base.last_segment).write_bytes(damaged)
        try:
            store = EventStore.open(root / "log", fsync="never", segment_bytes=SEGMENT_BYTES)
        except SchemaVersionError as exc:
            assert "was written by schema version" in str(exc) and "payload" not in str(exc)
            return Outcome(0, True)
        with store:
            got = list(store.read())
            assert got == base.records[: len(got)], "reopening must keep a prefix of the log, unaltered"
            assert store.last_seq == len(got)
            rec = store.append([BrowserConnected("b-after")], batch_id="after-damage")[0]
            assert rec.seq == len(got) + 1, "append continues the sequence"
        with EventStore.open(root / "log", fsync="never", segment_bytes=SEGMENT_BYTES) as store:
            again = list(store.read())
            assert again[:-1] == got and again[-1].event == BrowserConnected("b-after")
            assert store.append([BrowserConnected("b-after")], batch_id="after-damage")[0].seq == rec.seq
        return Outcome(len(got), False)
    finally:
        shutil.rmtree(root)


def _whole_before(base: BaseLog, first_damage: int) -> int:
    """Events in batches that end at or before the first damaged byte (all older segments included)."""
    kept = base.last_first_seq - 1
    for end, last_seq in zip(base.batch_ends, base.batch_last_seqs, strict=True):
        if end <= first_damage:
            kept = last_seq
    return kept


@fuzz(200, HealthCheck.function_scoped_fixture)
@given(data=st.data())
def test_damaged_tail_keeps_every_whole_batch_before_the_damage(base_log, tmp_path, data):
    base = (base_log.root / base_log.last_segment).read_bytes()
    lo, hi = _version_value_span(base, base_log.header_end)
    damaged = bytearray(base)
    first_damage = len(base)
    # Mostly the batches, sometimes anywhere, sometimes at the schema-version value or its length prefix
    # (a few bytes in thousands: hardly ever hit otherwise). Whatever the damage: repaired like a torn
    # tail, or refused as written by a newer schema.
    regions = [(base_log.header_end, len(base))] * 2 + [(0, len(base)), (lo, lo), (lo - 4, hi)]
    region = data.draw(st.sampled_from(regions), label="region")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        op = data.draw(st.sampled_from(["flip", "truncate", "append", "overwrite", "zero"]), label="op")
        pos = data.draw(st.integers(min(region[0], len(damaged)), min(region[1], len(damaged))), label="pos")
        if op == "flip" and pos < len(damaged):
            damaged[pos] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "truncate":
            del damaged[pos:]
        elif op == "append":
            pos = len(damaged)
            damaged += data.draw(st.binary(min_size=1, max_size=48), label="garbage")
        elif op == "overwrite":
            chunk = data.draw(st.binary(min_size=1, max_size=24), label="chunk")
            damaged[pos:pos + len(chunk)] = chunk
        else:
            n = data.draw(st.integers(1, 64), label="zeros")
            damaged[pos:pos + n] = bytes(min(n, max(0, len(damaged) - pos)))
        first_damage = min(first_damage, pos)
    outcome = _reopen_damaged(base_log, bytes(damaged), tmp_path)
    if not outcome.refused_newer:
        assert outcome.kept >= _whole_before(base_log, first_damage)


def test_every_single_byte_damage_to_the_tail_header_is_repaired_or_refused(base_log, tmp_path):
    """Exhaustive over the newest segment's header: each byte inverted, and set to one of 0x00, 'x', a
    bit-flip or '9' (by position); the version byte to each of those. Open and read only (appending
    after damage is the property test's job), in one copy of the log reused for every case."""
    base = (base_log.root / base_log.last_segment).read_bytes()
    lo, _ = _version_value_span(base, base_log.header_end)
    whole_before = base_log.last_first_seq - 1
    root = tmp_path / "log"
    shutil.copytree(base_log.root, root)
    outcomes: dict[int, int] = {}  # events read (-1: refused as newer) -> cases
    cases = 0
    for pos in range(base_log.header_end):
        rotating = (0x00, ord("x"), base[pos] ^ 0x01, ord("9"))[pos % 4]
        values = {base[pos] ^ 0xFF, rotating} | ({0x00, ord("x"), ord("9")} if pos == lo else set())
        for value in sorted(values - {base[pos]}):
            cases += 1
            (root / base_log.last_segment).write_bytes(base[:pos] + bytes([value]) + base[pos + 1:])
            try:
                with EventStore.open(root, fsync="never", segment_bytes=SEGMENT_BYTES) as store:
                    got = list(store.read())
            except SchemaVersionError as exc:
                if "was written by schema version" not in str(exc):
                    raise AssertionError(f"byte {pos} set to {value:#04x}") from exc
                outcomes[-1] = outcomes.get(-1, 0) + 1  # a newer version: refused, loudly
                continue
            except Exception as exc:
                raise AssertionError(f"byte {pos} set to {value:#04x}") from exc
            assert got == base_log.records[: len(got)], (pos, value)
            outcomes[len(got)] = outcomes.get(len(got), 0) + 1
    assert cases >= 3 * base_log.header_end // 2
    # Each damage either hit a byte nobody reads, or cost exactly the newest segment (or was refused).
    assert set(outcomes) <= {whole_before, len(base_log.records), -1}, outcomes
    assert outcomes.get(whole_before, 0) > base_log.header_end // 2  # most header bytes matter
    assert outcomes.get(-1, 0) >= 1  # the version byte set to '9'


@pytest.mark.parametrize("value", [b"x", b"0", b"-", b" "])
def test_a_damaged_version_in_the_tail_header_is_repaired(base_log, tmp_path, value):
    """An unparsable or impossible (< 1) schema version in the newest segment is a torn tail: the segment
    is cut and the older ones kept; neither open nor read raises."""
    base = (base_log.root / base_log.last_segment).read_bytes()
    lo, hi = _version_value_span(base, base_log.header_end)
    outcome = _reopen_damaged(base_log, base[:lo] + value + base[hi:], tmp_path)
    assert not outcome.refused_newer and outcome.kept == base_log.last_first_seq - 1


def test_a_newer_schema_version_in_the_tail_is_refused(base_log, tmp_path):
    base = (base_log.root / base_log.last_segment).read_bytes()
    lo, hi = _version_value_span(base, base_log.header_end)
    assert _reopen_damaged(base_log, base[:lo] + str(SCHEMA_VERSION + 1).encode() + base[hi:], tmp_path).refused_newer


@pytest.mark.parametrize("cut", ["each-batch-end", "mid-batch"])
def test_truncation_at_every_batch_boundary_and_inside_each_batch(base_log, tmp_path, cut):
    base = (base_log.root / base_log.last_segment).read_bytes()
    starts = [base_log.header_end, *base_log.batch_ends[:-1]]
    for i, (begin, end) in enumerate(zip(starts, base_log.batch_ends, strict=True)):
        at = end if cut == "each-batch-end" else (begin + end) // 2
        outcome = _reopen_damaged(base_log, base[:at], tmp_path)
        expected = base_log.batch_last_seqs[i] if cut == "each-batch-end" else (
            base_log.batch_last_seqs[i - 1] if i else base_log.last_first_seq - 1)
        assert outcome.kept == expected, (i, at)


def test_error_types_used_here_are_the_packages_own():
    # The typed errors above are the events package's: a rename there must not silently widen a check.
    for cls in (*TYPED_DECODE_ERRORS, InvalidEventError):
        assert issubclass(cls, EventError) and cls.__module__ == event_errors.__name__
