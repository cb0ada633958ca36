"""`webpool demo`: embedded Ray, real browsers, real models checked against CPU references, real faults
recovered, each step printed as it happens."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rich.table import Table

from webpool import render
from webpool.localray import start_local_ray


def _wait_until(predicate, timeout: float, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("the demo waited too long for the pool")


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded Ray, real browsers, real models checked against CPU references, real faults recovered."""
    import numpy as np

    from sharding.models import llama, llama_onnx, minilm

    temp = Path(tempfile.mkdtemp(prefix="wpdemo-", dir="/tmp"))
    ray = start_local_ray(temp / "ray", namespace="webpool")
    from events.state import SessionTokens, open_operations, recovery_statistics
    from webpool import ResourcePool

    pool = ResourcePool.remote(max_connections=args.browsers, event_log=str(temp / "events"), request_timeout=30.0,
                               fault_tolerance={"level": "medium", "recovery_strategy": "progressive"})
    try:
        with render.console.status("") as status:
            # 1. Embeddings in a browser, checked against the numpy reference.
            sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                         "The girl is carrying a baby.", "A man is riding a horse."]
            status.update("launching a browser and loading all-MiniLM-L6-v2 (first run builds the ONNX file)")
            t0 = time.perf_counter()
            out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": sentences}))
            cold_s = time.perf_counter() - t0
            ref = minilm.reference_embed(sentences)
            err = float(np.abs(out["embedding"] - ref).max())
            table = Table(title=f"1. all-MiniLM-L6-v2 in {out['browser_id']} ({out['backend']})")
            table.add_column("sentence")
            table.add_column("cosine to #1", justify="right")
            for text, e in zip(sentences, out["embedding"], strict=True):
                table.add_row(text, f"{float(e @ out['embedding'][0]):.4f}")
            render.console.print(table)
            render.console.print(f"   max |browser - numpy reference| = {err:.1e} (tolerance 1e-4); first request "
                          f"{cold_s:.1f} s including browser start and model load")
            if err > 1e-4:
                raise RuntimeError(f"browser embeddings differ from the reference by {err:.2e}")

            # 2. A real fault while a request is in flight: the browser process is killed. A browser that has
            # served a while keeps a spare process (actors/spare.py); the restart takes it.
            status.update("waiting for the browser's spare process")
            t_spare = time.perf_counter()
            _wait_until(lambda: ray.get(pool.health.remote())[out["browser_id"]].get("spare_ready"), 60, 0.1)
            render.console.print(f"   the browser's spare process (runtime set up, MiniLM loaded) was ready "
                                 f"{time.perf_counter() - t_spare:.1f} s later")
            status.update("killing the browser process while a request is in flight")
            batch = [f"{s} (variant {i})" for i in range(12) for s in sentences]
            ref_batch = minilm.reference_embed(batch)
            pending = pool.infer.remote("all-minilm-l6-v2", {"texts": batch})
            _wait_until(lambda: open_operations(ray.get(pool.get_state.remote())), 60)
            t_fault, t_fault_wall = time.perf_counter(), time.time()    # one machine: the log's clock too
            ray.get(pool.inject_fault.remote(out["browser_id"], "kill_browser"))
            recovered = ray.get(pending)
            ttr_ms = (time.perf_counter() - t_fault) * 1000
            hit = bool(recovered.get("recovered"))      # the kill met the request in flight
            if not hit:   # the run finished before the kill: the next request meets it
                recovered = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": batch}))
            err = float(np.abs(recovered["embedding"] - ref_batch).max())
            events = ray.get(pool.recent_events.remote(60))
            timeline = Table(title="2. browser process killed mid-request: what the event log recorded")
            for col in ("ms after the kill", "event", "subject", "detail"):
                timeline.add_column(col)
            shown = ("BrowserFailed", "RecoveryStarted", "RecoveryStepFinished", "RecoveryCompleted",
                     "BrowserLaunched", "ModelLoaded", "OperationFailed")
            for e in events:
                if e["action"] not in shown or e["timestamp"] < t_fault_wall:
                    continue
                data = e["data"]
                detail = data.get("category") or data.get("step") or data.get("strategy") or data.get("model") or ""
                if e["action"] == "RecoveryStepFinished":
                    detail = f"{data['step']} {'ok' if data['success'] else 'failed'} in {data['duration_ms']:.0f} ms"
                timeline.add_row(f"{(e['timestamp'] - t_fault_wall) * 1000:.0f}", e["action"], e["subject"],
                                 str(detail))
            render.console.print(timeline)
            render.console.print(f"   {len(batch)} embeddings returned {ttr_ms:.0f} ms after the kill, max error "
                          f"{err:.1e}; recovered: {bool(recovered.get('recovered'))}; the kill hit the request "
                          f"in flight: {hit}")
            if err > 1e-4:
                raise RuntimeError(f"embeddings after recovery differ from the reference by {err:.2e}")

            # 3. SmolLM2 split over browsers; one shard's browser is killed mid-generation.
            prompt = "The capital of France is"
            status.update("SmolLM2-135M: CPU onnxruntime reference")
            model = llama.load_smollm2()
            expected = llama_onnx.ort_greedy_generate(llama_onnx.build_shards(model, [(0, model.config.n_layers)]),
                                                 model.encode(prompt), args.tokens)
            status.update(f"SmolLM2-135M over {args.shards} browsers; a shard's browser is killed mid-generation")
            pending = pool.generate.remote("smollm2-135m", prompt, max_new_tokens=args.tokens, shards=args.shards)
            victim: list[str] = []

            watch = SessionTokens()      # follows the pool's log: cheaper than fetching its state each time

            def some_tokens() -> bool:
                watch.add(ray.get(pool.events_since.remote(watch.last_seq, 1.0)))
                session = watch.reached(4)
                if session is not None:
                    victim.append(watch.plans[session]["shards"][-1]["browser_id"])
                return session is not None

            _wait_until(some_tokens, 300, 0.0)
            ray.get(pool.inject_fault.remote(victim[0], "kill_browser"))
            gen = ray.get(pending)
            same = gen["token_ids"] == expected
            render.console.print(f"[bold]3. {prompt}[/bold]{gen['text']}")
            m = gen["metrics"]
            render.console.print(f"   {len(gen['token_ids'])} tokens over browsers {gen['browser_ids']}; shard browser "
                          f"{victim[0]} killed after 4 tokens, {m['replays']} shard rebuilt by prefix replay; "
                          f"identical to CPU onnxruntime: {same}")
            render.console.print(f"   decode {m['decode_tokens_per_s'] or 0:.1f} tokens/s, not counting the "
                          f"{m['recovery_ms']:.0f} ms the kill cost (detection, replacement and replay)")
            if not same:
                raise RuntimeError("sharded generation differs from the CPU reference")

            stats = recovery_statistics(ray.get(pool.get_state.remote()))
            summary = Table(title="recovery statistics (from the event log)")
            summary.add_column("statistic")
            summary.add_column("value", justify="right")
            for key, value in stats.items():
                summary.add_row(key, f"{value:.0%}" if key == "success_rate" else str(value))
            render.console.print(summary)
            status.update("shutting down")
    finally:
        ray.get(pool.shutdown.remote())
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return 0

