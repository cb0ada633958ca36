"""The recovery benchmark's output: the tables it prints, the PNG chart, the README's markdown, and the chart
drawn again from a saved JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from benchmarks.recovery_common import _fmt
from benchmarks.results import load_text, save_chart
from benchmarks.vanished_node import vanished_node_line


# ----- output ---------------------------------------------------------------------------------------------------
def print_tables(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:     # a log file or CI: do not squeeze the tables into 80 columns
        console = Console(width=200)
    m = r["machine"]
    t = Table(title=f"Recovery latency, median / p95 ms ({r['date']}, {m['cpus']} CPUs{load_text(m)}"
                    f"{', quick' if r['quick'] else ''})")
    for col in ("fault", "strategy", "level", "n", "detect", "recover", "time to result", "TTR - request",
                "rerun starts", "vs careful Ray actor", "outcomes / note"):
        t.add_column(col)
    for c in r["cases"]:
        s = c["summary"]
        vs = c.get("vs_baseline")
        if vs is None:
            vs_text = ""
        elif vs["ratio_median"] is not None:
            rm = vs["ratio_median"]
            vs_text = f"{rm:.3f}x ({1 / rm:.1f}x faster)" if rm < 1 else f"{rm:.2f}x ({rm:.1f}x slower)"
        else:
            vs_text = f"baseline {vs['baseline']}"
        note = c["note"] or ", ".join(f"{k}:{v}" for k, v in s["outcomes"].items())
        beyond = s.get("beyond_request_median_ms")
        t.add_row(c["fault"], c["strategy"], c["level"], str(s["trials"]), _fmt(s["detection"]), _fmt(s["recovery"]),
                  _fmt(s["time_to_result"]), "—" if beyond is None else f"{beyond:.0f}", _fmt(s.get("rerun_start")),
                  vs_text, note)
    console.print(t)
    console.print(after_kill_line(r))

    for key in ("careful_baseline", "baseline"):
        base = r.get(key)
        if not base:
            continue
        b = Table(title=f"Ray baseline: {base['actor']}; cold start {_fmt(base['cold_start'])} ms")
        for col in ("fault", "trials", "time to result (median / p95 ms)", "verdict"):
            b.add_column(col)
        for fault, f in base["faults"].items():
            b.add_row(fault, str(len(f["trials"])), _fmt(f["time_to_result"]), f["verdict"])
        console.print(b)

    o = Table(title="Fault-tolerance overhead (single sentence; ratio vs level none)")
    for col in ("level", "browsers", "seq req/s", "seq median / p95 ms",
                f"{r['config']['concurrency']} in flight req/s", "conc median / p95 ms",
                "throughput vs none (seq / conc)"):
        o.add_column(col)
    for level, x in r["overhead"]["levels"].items():
        if "error" in x:
            o.add_row(level, "", "", x["error"][:80], "", "", "")
            continue
        vs = x["vs_none"]
        ratios = "" if vs is None else f"{vs['sequential']['throughput']:.2f} / {vs['concurrent']['throughput']:.2f}"
        o.add_row(level, str(x["browsers"]), f"{x['sequential']['requests_per_s']:.1f}",
                  _fmt(x["sequential"]["latency"]), f"{x['concurrent']['requests_per_s']:.1f}",
                  _fmt(x["concurrent"]["latency"]), ratios)
    console.print(o)
    for what, why in r["not_measured"].items():
        console.print(f"{what}: {why}")


def write_chart(r: dict[str, Any], path: Path) -> None:
    """Time to result per fault (groups) and strategy/level (bars), log scale; the two Ray baselines last in
    each group (the careful actor grey, the plain one black, where they answered; a hatched bar marked "never"
    where one gave no correct answer)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend to set, renders with Agg

    faults = list(dict.fromkeys(c["fault"] for c in r["cases"]))
    series = list(dict.fromkeys((c["strategy"], c["level"]) for c in r["cases"]))
    by = {(c["fault"], c["strategy"], c["level"]): c for c in r["cases"]}
    baselines = [(r[key], label, color) for key, label, color in (
        ("careful_baseline", "careful Ray actor (restarts itself)", "dimgray"),
        ("baseline", "plain Ray actor (max_restarts=1)", "black")) if r.get(key)]
    slots = len(series) + len(baselines)
    width = 0.8 / slots

    def x_of(group: int, slot: int) -> float:
        return group + (slot - (slots - 1) / 2) * width

    fig = Figure(figsize=(max(8.0, 0.35 * len(faults) * slots + 3), 5.5))
    ax = fig.subplots()
    ymax = 10.0
    for i, (strategy, level) in enumerate(series):
        xs, ys, hi = [], [], []
        for j, fault in enumerate(faults):
            s = by.get((fault, strategy, level), {}).get("summary", {}).get("time_to_result")
            if s:
                xs.append(x_of(j, i))
                ys.append(s["median_ms"])
                hi.append(s["p95_ms"] - s["median_ms"])
                ymax = max(ymax, s["p95_ms"])
        ax.bar(xs, ys, width, yerr=[[0.0] * len(hi), hi], capsize=2, label=f"{strategy} / {level}")
    never = []
    for k, (base, label, color) in enumerate(baselines):
        labelled = False
        for j, fault in enumerate(faults):
            x = x_of(j, len(series) + k)
            f = base["faults"].get(fault)
            if f is not None and f["verdict"] == "answered" and f["time_to_result"] is not None:
                ax.bar([x], [f["time_to_result"]["median_ms"]], width, color=color,
                       label=None if labelled else label)
                labelled = True
                ymax = max(ymax, f["time_to_result"]["median_ms"])
            elif f is not None:
                never.append((x, f["verdict"]))
    for j, fault in enumerate(faults):
        notes = [by[(fault, s, lv)]["note"] for s, lv in series if (fault, s, lv) in by]
        if notes and all(n and n.startswith("no effect") for n in notes):
            ax.text(j, 1.3, notes[0].split(":")[0], rotation=90, fontsize=7, va="bottom", ha="center")
    top = ymax * 3
    # A baseline that gave no correct answer is a hatched bar to the top of the chart, marked "never":
    # as visible as a bar, and not mistaken for a time.
    for k, (x, verdict) in enumerate(never):
        ax.bar([x], [top], width, facecolor="none", edgecolor="dimgray", hatch="///", linewidth=0.6,
               label="Ray baseline: no correct answer" if k == 0 else None)
        box = {"facecolor": "white", "edgecolor": "none", "pad": 1.0}
        ax.text(x, top / 1.3, "never", fontsize=8, va="top", ha="center", weight="bold", bbox=box)
        ax.text(x, 1.3, verdict[:40], rotation=90, fontsize=6, va="bottom", ha="center", bbox=box)
    ax.set_yscale("log")
    ax.set_ylim(1.0, top)
    ax.set_xlim(-0.5, len(faults) - 0.5)
    ax.set_xticks(range(len(faults)), faults, rotation=20)
    ax.set_ylabel("time to result, ms (median; whisker to p95)")
    m = r["machine"]
    ax.set_title(f"webpool: fault -> correct answer ({r['date'][:16]}, {m['cpus']} CPUs{load_text(m)}"
                 f"{', quick' if r['quick'] else ''})", fontsize=10)
    # Below the axes: inside, it covered the first groups' "never" marks.
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    save_chart(fig, path)


def after_kill_line(r: dict[str, Any]) -> str:
    a = r.get("after_kill") or {}
    if not a:
        return "A request right after a SIGKILL: not measured in this run."
    if a.get("error") or a["after_kill"] is None:
        return f"A request right after a SIGKILL: not measured ({(a.get('error') or 'no correct answer')[:200]})."
    return (f"A one-sentence request sent right after a SIGKILL of the serving browser (level high, failover): "
            f"{_fmt(a['after_kill'])} ms (p50 / p95) against {_fmt(a['normal'])} ms with no fault; ratio "
            f"{a['ratio_median']:.2f}x p50, {a['ratio_p95']:.2f}x p95; {len(a['trials'])} trials, all correct: "
            f"{'yes' if a['all_correct'] else 'NO'}, {a['answered_by_standby']} answered by the standby.")


def markdown(r: dict[str, Any]) -> str:
    """The results as the README shows them: time to result per (fault, strategy, level), medians and p95,
    the Ray baseline, and the overhead ratios; with the date, the machine and its load."""
    m = r["machine"]
    lines = [f"Recovery latency, {r['date'][:16]} UTC, {m['cpus']} CPUs ({m['platform']}){load_text(m)}, "
             f"{r['config']['trials']} trial(s) per case"
             f"{', quick' if r['quick'] else ''}; all answers checked against the numpy reference "
             f"(max abs error ≤ {r['config']['tolerance']:g}).", "",
             "| fault | strategy | level | time to result p50 / p95 ms | beyond the request p50 ms "
             "| rerun starts p50 / p95 ms | detect p50 ms | recover p50 ms | vs careful Ray actor | correct |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        s = c["summary"]
        vs = c.get("vs_baseline")
        if vs is None:
            vs_text = ""
        elif vs.get("ratio_median") is not None:
            vs_text = f"{1 / vs['ratio_median']:.1f}x faster" if vs["ratio_median"] < 1 else \
                f"{vs['ratio_median']:.1f}x slower"
        else:
            vs_text = f"baseline {vs['baseline']}"
        detect = s["detection"]["median_ms"] if s["detection"] else None
        recover = s["recovery"]["median_ms"] if s["recovery"] else None
        ttr = _fmt(s["time_to_result"]) if s["time_to_result"] else (c["note"] or "—")
        beyond = s.get("beyond_request_median_ms")
        lines.append(f"| {c['fault']} | {c['strategy']} | {c['level']} | {ttr} | "
                     f"{'—' if beyond is None else f'{beyond:.0f}'} | {_fmt(s.get('rerun_start'))} | "
                     f"{'—' if detect is None else f'{detect:.0f}'} | {'—' if recover is None else f'{recover:.0f}'} | "
                     f"{vs_text} | {'yes' if s['all_answers_correct'] else 'NO'} |")
    lines += ["", after_kill_line(r)]
    v = r.get("vanished_node")
    if v and v.get("time_to_result"):
        lines += ["", vanished_node_line(v)]
    elif v:
        why = "; ".join(v.get("errors") or ["no trial"])
        lines += ["", f"A node vanishing under load: not measured ({why[:200]})."]
    for key in ("careful_baseline", "baseline"):
        b = r.get(key)
        if not b:
            continue
        lines += ["", f"Ray baseline ({b['actor']}):", ""]
        lines += [f"- {fault}: {_fmt(f['time_to_result'])} ms, {f['verdict']}" if f["time_to_result"]
                  else f"- {fault}: {f['verdict']}" for fault, f in b["faults"].items()]
    levels = r["overhead"]["levels"]
    if levels:
        lines += ["", "| level | req/s sequential | req/s 4 in flight | vs none (seq / conc) | hedges sent / won |",
                  "|---|---|---|---|---|"]
        for level, x in levels.items():
            if "error" in x:
                lines.append(f"| {level} | {x['error'][:60]} | | | |")
                continue
            vs = x.get("vs_none")
            seq, conc = x["sequential"], x["concurrent"]
            ratios = "" if vs is None else \
                f"{vs['sequential']['throughput']:.2f} / {vs['concurrent']['throughput']:.2f}"
            hedges = x.get("hedges") or {}
            lines.append(f"| {level} | {seq['requests_per_s']:.1f} | {conc['requests_per_s']:.1f} | {ratios} | "
                         f"{hedges.get('sent', 0)} / {hedges.get('won', 0)} |")
    return "\n".join(lines)


def rechart(json_path: Path) -> Path:
    """Draw the chart again from a saved JSON (no browsers needed)."""
    r = orjson.loads(json_path.read_bytes())
    out = json_path.with_suffix(".png")
    write_chart(r, out)
    return out
