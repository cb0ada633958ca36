"""Validation of requests at the pool boundary: pure functions raising InputError naming the field.

Nothing invalid reaches a browser: a bad request costs the caller an error and nobody else anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from actors.constants import MAX_BATCH, MAX_NEW_TOKENS, MAX_TEXT_CHARS
from events.errors import InputError, show
from sharding.models.registry import ModelSpec, get_spec


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    single: bool          # the caller passed {"text": ...} and gets one vector back


SEED_LIMIT = 2**63          # seeds are recorded in events as int64




def _check_text(field: str, text: Any) -> str:
    if not isinstance(text, str):
        raise InputError(field, f"must be a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(field, f"is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    if not text.strip():
        raise InputError(field, "must not be empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(field, f"is not valid Unicode text (lone surrogate at index {exc.start})") from None
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def embedding_request(model_name: Any, inputs: Any) -> tuple[ModelSpec, EmbeddingRequest]:
    spec = get_spec(model_name)
    if spec.task != "text_embedding":
        raise InputError("model_name", f"{spec.name} is a {spec.task} model; call generate() for it")
    if not isinstance(inputs, dict):
        raise InputError("inputs", f'must be a dict like {{"text": "..."}}, got {type(inputs).__name__}')
    keys = set(inputs)
    if keys == {"text"}:
        return spec, EmbeddingRequest([_check_text("inputs.text", inputs["text"])], single=True)
    if keys == {"texts"}:
        texts = inputs["texts"]
        if not isinstance(texts, list) or not texts:
            raise InputError("inputs.texts", "must be a non-empty list of str")
        if len(texts) > MAX_BATCH:
            raise InputError("inputs.texts", f"has {len(texts)} texts; the limit is {MAX_BATCH}")
        return spec, EmbeddingRequest([_check_text(f"inputs.texts[{i}]", t) for i, t in enumerate(texts)],
                                      single=False)
    raise InputError("inputs", f'needs exactly one of the keys "text" or "texts", got {show(sorted(keys, key=show))}')


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int
    shards: int
    temperature: float
    top_p: float
    seed: int | None


def generation_request(model_name: Any, prompt: Any, max_new_tokens: Any, shards: Any, temperature: Any,
                       top_p: Any, seed: Any) -> tuple[ModelSpec, GenerationRequest]:
    spec = get_spec(model_name)
    if spec.task != "text_generation":
        raise InputError("model_name", f"{spec.name} is a {spec.task} model; call infer() for it")
    _check_text("prompt", prompt)
    if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError("max_new_tokens", f"must be an int in 1..{MAX_NEW_TOKENS}, got {show(max_new_tokens)}")
    if not _is_int(shards) or shards < 1:
        raise InputError("shards", f"must be a positive int, got {show(shards)}")
    try:
        finite_temperature = _is_number(temperature) and math.isfinite(float(temperature))
    except OverflowError:
        finite_temperature = False
    if not finite_temperature or temperature < 0:
        raise InputError("temperature", f"must be a finite number >= 0, got {show(temperature)}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InputError("top_p", f"must be in (0, 1], got {show(top_p)}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise InputError("seed", f"must be an int in [0, 2**63), got {show(seed)}")
    if temperature > 0 and seed is None:
        raise InputError("seed", "sampling with temperature > 0 needs an int seed (so results are reproducible)")
    return spec, GenerationRequest(prompt, max_new_tokens, shards, float(temperature), float(top_p), seed)


def check_context(prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
    if prompt_tokens + max_new_tokens > max_context:
        raise InputError("prompt", f"{prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                                   f"model's context of {max_context} tokens")


def check_shards(shards: int, n_layers: int) -> None:
    if shards > n_layers:
        raise InputError("shards", f"{shards} shards for a model of {n_layers} layers; at most {n_layers}")
