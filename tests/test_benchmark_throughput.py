"""The throughput benchmark in its CI size, on real browsers, so it cannot rot: every cell and the kill
run answered correctly and lost nothing, and the JSON holds what the README's table is made of. No
speed is asserted: the machine is shared."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from benchmarks import throughput, throughput_kill


def test_quick_throughput_run_answers_everything_correctly(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("WEBPOOL_RESULTS", str(tmp_path))
    r = throughput.main(["--quick"])          # on the session's Ray
    written = orjson.loads((tmp_path / "throughput-quick.json").read_bytes())
    assert written["cells"] == orjson.loads(orjson.dumps(r["cells"]))
    assert (tmp_path / "throughput_kill-quick.png").stat().st_size > 1000
    assert r["machine"]["load_before"] >= 0 and r["machine"]["load_after"] >= 0    # the table says how loaded
    assert {(c["batching"], c["clients"]) for c in r["cells"]} == {(b, n) for b in (False, True) for n in (1, 4)}
    for cell in r["cells"]:
        assert cell["answered"] > 0 and cell["wrong"] == 0 and cell["errors"] == 0, cell
        assert cell["requests_per_s"]["n"] == cell["trials"] == 2
        assert cell["latency"]["p99_ms"] >= cell["latency"]["median_ms"] > 0
    kills = r["kill"]
    assert kills["answered"] > 0 and kills["wrong"] == 0 and kills["errors"] == 0, kills
    assert len(kills["runs"]) == kills["dip_s"]["n"] == 1 and kills["shown"] == 0
    for kill in kills["runs"]:
        assert kill["recovery_statistics"]["recovery_attempts"] >= 1
        assert sum(kill["answers_per_s"]) * kill["bin_s"] <= kill["answered"]
    assert kills["answered"] == sum(k["answered"] for k in kills["runs"])
    assert r["targets"]["kill"]["runs"] == 1

    native = r["native_onnxruntime"]["1_threads"]
    assert native["best_rows_per_s_median"] > 0 and set(native["by_batch"]) == {"1", "8"}
    assert set(r["targets"]) >= {"vs_one_sequential_client", "vs_batching_off", "vs_native_onnxruntime_best", "kill"}
    # The ceiling each target is set against: the same pages with nothing in front, every output checked.
    alone = r["browsers_alone"]["1_pages_1_threads"]
    assert alone["best_rows_per_s"] > 0 and alone["wrong"] == 0 and set(alone["by_batch"]) == {"8"}
    assert alone["by_batch"]["8"]["n"] == 2
    for name in ("vs_one_sequential_client", "vs_batching_off", "vs_native_onnxruntime_best", "p50_ms"):
        target = r["targets"][name]
        assert target["browsers_alone_rows_s"] == alone["best_rows_per_s"]
        assert target["within_ceiling"] == (target["needs_req_s"] <= alone["best_rows_per_s"])


def test_kill_timeline_dip_and_rates():
    """The kill run's arithmetic on a planted timeline (4 bins per second, the kill at 2 s)."""
    rate = np.array([0, 0, 0, 0] + [80] * 4 + [0, 20] + [80] * 6 + [0] + [40] * 7, dtype=float)
    t = throughput_kill.kill_timeline(rate, killed_at=2.0, bin_s=0.25)
    assert t["steady_answers_per_s"] == 80.0         # the ramp's first second left out
    assert t["dip_s"] == 0.5                          # two low bins right after the kill; the later one is apart
    assert t["early_rate_ratio"] == pytest.approx((20 + 6 * 80) / 8 / 80)
    assert t["late_rate_ratio"] == pytest.approx(7 * 40 / 8 / 80)
    assert t["empty_bins_after"] == 2
    # Each bin after the kill adds its shortfall from the mean rate before (80): 2 empty bins, one at 20, seven at 40.
    assert t["lost_s"] == pytest.approx(0.25 * (2 + 0.75 + 7 * 0.5))
    assert throughput_kill.kill_timeline(np.zeros(8), killed_at=1.0, bin_s=0.25)["late_rate_ratio"] is None


def test_kill_plot_says_n_a_when_no_run_lasted_past_the_early_window(tmp_path):
    """A kill that came late in a short run leaves no bins for the later rate (None): the PNG says so
    rather than failing (CI once killed 2 s into a 4 s quick run)."""
    rate = np.array([0] * 4 + [80] * 6, dtype=float)
    run = {"answers_per_s": rate.tolist(), "bin_s": 0.25, "killed_at_s": 2.0, "answered": 30,
           **throughput_kill.kill_timeline(rate, killed_at=2.0, bin_s=0.25)}
    assert run["late_rate_ratio"] is None
    kills = {"runs": [run], "shown": 0, "answered": 30, "wrong": 0, "errors": 0,
             "dip_s": {"median": 0.0, "p95": 0.0}, "late_rate_ratio": None}
    assert throughput_kill.plot_kill(kills, tmp_path / "kill.png").stat().st_size > 1000
