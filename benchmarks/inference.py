"""Inference through the pool vs its floors, measured in one run on real browsers.

1. MiniLM, one sentence per request: ``ray.get(pool.infer.remote(...))`` vs the same page runtime
   called in-process through Playwright (BrowserCore, no Ray, no pool): the pool's overhead.
2. SmolLM2-135M greedy decode: ``pool.generate`` ms per token vs Python onnxruntime on the CPU with
   the same ONNX file and the same thread count (1), each over the same number of runs (10; 3 quick):
   median and p95 of each, the ratio of the medians, and whether every run's tokens were identical.

Prints a table and writes ``results/inference.json``. Run: ``python -m benchmarks.inference [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results import ended, load_text, machine, summary_ms, utc_now, write_results
from webpool.helptext import plain
from webpool.localray import configure_auth_env, start_local_ray


async def floor_minilm(n: int, text: str) -> list[float]:
    """Same page runtime, same model, called in-process through Playwright."""
    from actors.browser import BrowserCore
    from sharding.models import minilm
    from sharding.models.registry import artifacts

    [art] = artifacts("all-minilm-l6-v2")
    core = BrowserCore("floor")
    await core.start()
    try:
        await core.load_model(art.key, np.fromfile(art.path, np.uint8), art.sha256, "wasm")
        feeds = minilm.tokenize([text])
        for _ in range(3):
            await core.run(art.key, feeds, fetch=["embedding"])
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await core.run(art.key, minilm.tokenize([text]), fetch=["embedding"])
            samples.append((time.perf_counter() - t0) * 1000)
        return samples
    finally:
        await core.close()


def native_decode(model_name: str, prompt: str, tokens: int, runs: int) -> list[dict[str, Any]]:
    """Greedy decode with CPU onnxruntime on the same ONNX, 1 thread, ``runs`` times (after one warm run),
    timing prefill and each step."""
    from sharding.models import llama_onnx
    from sharding.models.registry import llama_model

    model = llama_model(model_name)
    chain = llama_onnx.OrtShardChain(llama_onnx.build_shards(model, [(0, model.config.n_layers)]), threads=1)
    ids = model.encode(prompt)
    chain.greedy(ids, 2)                                              # warm
    results = []
    for _ in range(runs):
        chain.reset()
        t0 = time.perf_counter()
        _, indices = chain.step(ids)
        prefill_ms = (time.perf_counter() - t0) * 1000
        out, steps = [int(indices[0])], []
        while len(out) < tokens and out[-1] != model.config.eos_id:
            t0 = time.perf_counter()
            _, indices = chain.step([out[-1]])
            steps.append(time.perf_counter() - t0)
            out.append(int(indices[0]))
        results.append({"token_ids": out, "prefill_ms": prefill_ms,
                        "decode_ms_per_token": sum(steps) * 1000 / len(steps)})
    return results


def decode_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and p95 of decode ms per token and of prefill ms over ``runs`` (every run counted)."""
    return {"decode_ms_per_token": summary_ms([r["decode_ms_per_token"] for r in runs]),
            "prefill_ms": summary_ms([r["prefill_ms"] for r in runs])}


def run(quick: bool) -> dict[str, Any]:
    import ray

    from webpool import ResourcePool

    n = 20 if quick else 200
    tokens = 8 if quick else 32
    decode_runs = 3 if quick else 10
    gen_model = "tiny-llama" if quick else "smollm2-135m"
    text = "A man is eating food."
    results: dict[str, Any] = {
        "benchmark": "inference", "quick": quick,
        "date": utc_now(),
        "machine": machine(),
    }
    floor = asyncio.run(floor_minilm(n, text))

    temp = Path(tempfile.mkdtemp(prefix="wpbench-", dir="/tmp"))
    start_local_ray(temp / "ray")
    try:
        pool = ResourcePool.remote(max_connections=1, event_log=str(temp / "events"))
        for _ in range(3):
            ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": text}))
        pool_ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": text}))
            pool_ms.append((time.perf_counter() - t0) * 1000)
        ray.get(pool.generate.remote(gen_model, "The capital of France is", max_new_tokens=2))   # load + warm
        pool_runs = []
        for _ in range(decode_runs):
            gen = ray.get(pool.generate.remote(gen_model, "The capital of France is", max_new_tokens=tokens))
            pool_runs.append({"token_ids": gen["token_ids"], "prefill_ms": gen["metrics"]["prefill_ms"],
                              "decode_ms_per_token": gen["metrics"]["decode_ms_per_token"]})
        ray.get(pool.shutdown.remote())
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    native = native_decode(gen_model, "The capital of France is", tokens, decode_runs)
    ended(results["machine"])
    results["minilm"] = {"pool": summary_ms(pool_ms), "floor_in_process": summary_ms(floor)}
    results["minilm"]["overhead_ratio_median"] = results["minilm"]["pool"]["median_ms"] / summary_ms(floor)["median_ms"]
    results["minilm"]["overhead_ratio_p95"] = results["minilm"]["pool"]["p95_ms"] / summary_ms(floor)["p95_ms"]
    pool_s, native_s = decode_summary(pool_runs), decode_summary(native)
    results["generation"] = {
        "model": gen_model, "new_tokens": tokens, "runs": decode_runs,
        "pool": pool_s, "native_onnxruntime_1_thread": native_s,
        # Above 1: the pool takes longer per token than native onnxruntime on one thread.
        "decode_ratio_vs_native": (pool_s["decode_ms_per_token"]["median_ms"]
                                   / native_s["decode_ms_per_token"]["median_ms"]),
        "tokens_identical": all(r["token_ids"] == native[0]["token_ids"] for r in [*pool_runs, *native]),
    }
    return results


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = r["machine"]
    t = Table(title=f"webpool inference ({r['date']}, {m['cpus']} CPUs{load_text(m)}{', quick' if r['quick'] else ''})")
    for col in ("measure", "webpool", "baseline", "ratio"):
        t.add_column(col)
    m = r["minilm"]
    t.add_row("MiniLM request median (ms)", f"{m['pool']['median_ms']:.1f}",
              f"{m['floor_in_process']['median_ms']:.1f} (in-process page)", f"{m['overhead_ratio_median']:.2f}x")
    t.add_row("MiniLM request p95 (ms)", f"{m['pool']['p95_ms']:.1f}",
              f"{m['floor_in_process']['p95_ms']:.1f}", f"{m['overhead_ratio_p95']:.2f}x")
    g = r["generation"]
    pool_d, native_d = g["pool"]["decode_ms_per_token"], g["native_onnxruntime_1_thread"]["decode_ms_per_token"]
    t.add_row(f"{g['model']} decode ms/token, median of {g['runs']}", f"{pool_d['median_ms']:.1f}",
              f"{native_d['median_ms']:.1f} (onnxruntime CPU, 1 thread)", f"{g['decode_ratio_vs_native']:.2f}x")
    t.add_row("  p95", f"{pool_d['p95_ms']:.1f}", f"{native_d['p95_ms']:.1f}", "")
    t.add_row("same tokens as native", str(g["tokens_identical"]), "", "")
    Console().print(t)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_auth_env()
    parser = argparse.ArgumentParser(description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI): 20 requests, tiny llama")
    args = parser.parse_args(argv)
    r = run(args.quick)
    out = write_results("inference", args.quick, r)
    print_table(r)
    print(f"wrote {out}")
    return r


if __name__ == "__main__":
    main()
